"""Sampling speed against transformers' generate() on a Llama of the same dimensions (`generate`).

Two settings, each a ratio measured in the same alternating rounds: batch-1 sampling (top-k 50,
top-p 0.9, temperature 0.8), and a batch of prompts of different lengths decoded greedily
together (`engine.generate_batch` against `generate()` with left padding and an attention mask).
"""

import torch

from benchmarks.common import TINY, alternate, hf_llama, llama_peer_config, machine, print_table, ratio, verdict
from common import pick_dtype
from config import ModelConfig
from model import Blueberry

SAMPLING = dict(temperature=0.8, top_k=50, top_p=0.9)
GOAL = 1.2  # at least this many times HF generate()'s tokens/s, at batch 1 and batched


def random_decoder(cfg: ModelConfig, seed: int) -> Blueberry:
    """A model with every weight nonzero: a zero-init head would make every distribution uniform."""
    torch.manual_seed(seed)
    model = Blueberry(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02).add_(1.0 if p.ndim == 1 else 0.0)
    return model.eval()


def batch_of_prompts(n: int, shortest: int, longest: int, vocab: int) -> list:
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(shortest, longest + 1, (n,), generator=gen).tolist()
    return [torch.randint(0, vocab, (k,), generator=gen).tolist() for k in lengths]


def hf_batch(prompts: list) -> tuple:
    """Left-padded input_ids and attention_mask, as a transformers user batches prompts."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def cmd_generate(args):
    import engine
    cfg = TINY if args.tiny else ModelConfig()
    new = 8 if args.tiny else args.new_tokens
    full, plain = random_decoder(cfg, 0), random_decoder(llama_peer_config(cfg), 0)
    llama = hf_llama(plain)  # the same weights as `plain`: the same function
    dtype = pick_dtype(args.dtype, torch.device("cpu"))
    full, plain, llama = full.to(dtype), plain.to(dtype), llama.to(dtype)
    # Neither side has an end-of-sequence token, so both decode exactly the tokens asked for. (Asking HF for
    # them with min_new_tokens instead would add a logits processor over the whole vocabulary to its every step.)
    llama.generation_config.eos_token_id = None
    prompt = torch.randint(0, cfg.vocab_size, (1, 4 if args.tiny else args.prompt_len),
                           generator=torch.Generator().manual_seed(0))

    def ours(model):
        def run():
            assert sum(1 for _ in engine.generate(model, prompt[0].tolist(), new, **SAMPLING)) == new
        return run

    def hf():
        with torch.inference_mode():
            out = llama.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, **SAMPLING,
                                 max_new_tokens=new, pad_token_id=0)
        assert out.size(1) == prompt.size(1) + new

    hf_name, ours_name, plain_name = ("transformers LlamaForCausalLM.generate", "Blueberry, all features",
                                      "Blueberry, Llama-equivalent")
    print(f"machine: {machine()}")
    timing = alternate({ours_name: ours(full), plain_name: ours(plain), hf_name: hf},
                       rounds=args.rounds, warmup=args.warmup)
    rows = [(name, f"{new / t.median:,.1f}", f"{t.median / new * 1e3:.2f}", f"{t.spread:.0%}",
             f"{ratio(timing, hf_name, name):.2f}x") for name, t in timing.items()]
    print_table(f"batch 1: prompt {prompt.size(1)} + {new} sampled tokens, top_k 50 / top_p 0.9 / T 0.8, {args.dtype}, "
                f"median of {args.rounds} alternating rounds",
                ["sampler", "tokens/s", "ms/token", "spread", "vs HF generate"], rows)
    verdicts = [(f"batch 1, {ours_name}", ratio(timing, hf_name, ours_name))]

    # batched greedy decoding of prompts of different lengths
    count, new_b = (4, 8) if args.tiny else (args.batch, args.batch_new_tokens)
    prompts = batch_of_prompts(count, 2 if args.tiny else 8, 8 if args.tiny else 40, cfg.vocab_size)
    ids, mask = hf_batch(prompts)

    def ours_batch(model):
        return lambda: engine.generate_batch(model, prompts, new_b, temperature=0)

    def hf_batched():
        with torch.inference_mode():
            out = llama.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new_b, pad_token_id=0)
        assert out.size(1) == ids.size(1) + new_b
        return out[:, ids.size(1):].tolist()

    timing = alternate({ours_name: ours_batch(full), plain_name: ours_batch(plain), hf_name: hf_batched},
                       rounds=args.rounds, warmup=args.warmup)
    # the Llama-equivalent model and HF's Llama compute the same function: their greedy tokens should agree
    same = sum(a == b for a, b in zip(timing[plain_name].values[0], timing[hf_name].values[0]))
    rows = [(name, f"{count * new_b / t.median:,.1f}", f"{t.spread:.0%}", f"{ratio(timing, hf_name, name):.2f}x")
            for name, t in timing.items()]
    print_table(f"batch of {count} prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens, {new_b} greedy "
                f"tokens each, {args.dtype}, median of {args.rounds} alternating rounds (Llama-equivalent and HF "
                f"agree on {same} of {count} rows)", ["decoder", "tokens/s", "spread", "vs HF generate"], rows)
    verdicts.append((f"batch of {count}, {ours_name}", ratio(timing, hf_name, ours_name)))
    for name, r in verdicts:  # the goal is set in fp32
        goal = f" (goal >= {GOAL}x: {verdict(r >= GOAL)})" if args.dtype == "fp32" else ""
        print(f"{name}, {args.dtype}: {r:.2f}x HF generate{goal}")
