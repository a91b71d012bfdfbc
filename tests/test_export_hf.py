"""export_hf.py and --init_from: Blueberry <-> Hugging Face transformers, offline.

Every exported folder is loaded by transformers in a separate `python -I` process that runs from a
temporary folder, so it cannot import this repository: it sees only what the folder ships. That process
reports logits and tokens; this one checks them against Blueberry's own forward pass and sampler.
"""

import copy
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import checkpoint
import export_hf
from config import ModelConfig, llama_equivalent
from conftest import REPO, TINY_MODEL, assert_one_line_error, make_text, run_script
from inference import generate
from llama import to_llama_state_dict
from model import Blueberry
from tokenizer import add_chat_format, build_tokenizer, decode, encode, save_tokenizer

NEW_TOKENS = 12

# Runs in the clean process: everything a user of the exported folder would do, reported as JSON.
HF_CHECK = r'''
import importlib.util, json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
hf_dir, texts, trust, new, report_path = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4]), sys.argv[5]
assert importlib.util.find_spec("model") is None and importlib.util.find_spec("hf_model") is None, "repo importable"
options = {"trust_remote_code": True} if trust else {}
model = AutoModelForCausalLM.from_pretrained(hf_dir, **options)
tok = AutoTokenizer.from_pretrained(hf_dir)  # as the issue asks: no flag
report = {"class": type(model).__name__, "ids": [tok(t)["input_ids"] for t in texts], "logits": [], "greedy": [],
          "steps": []}
inner = getattr(model, "model")  # Blueberry (remote code) or LlamaModel: count the tokens each forward gets
inner.register_forward_pre_hook(lambda m, a, k: report["steps"][-1].append((a[0] if a else k["input_ids"]).shape[1]),
                                with_kwargs=True)
with torch.no_grad():
    for ids in report["ids"]:
        report["steps"].append([])
        report["logits"].append(model(torch.tensor([ids])).logits[0].tolist())
        report["steps"][-1] = []
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=new, do_sample=False)
        report["greedy"].append(out[0, len(ids):].tolist())
    report["steps"].append([])
    batch = tok(texts, return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=new, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    report["batch"] = out.sequences[:, batch["input_ids"].shape[1]:].tolist()
    report["batch_logits"] = torch.stack(out.logits, 1).tolist()  # (rows, steps, vocab)
    report["pad_id"], report["mask"] = tok.pad_token_id, batch["attention_mask"].tolist()
    report["stops"] = model.generation_config.eos_token_id
    generator = pipeline("text-generation", model=hf_dir, **options)
    report["pipeline"] = generator(texts[0], max_new_tokens=new, do_sample=False)[0]["generated_text"]
    half = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.bfloat16, **options)
    logits = half(torch.tensor([report["ids"][0]])).logits
    report["bf16"] = [str(next(half.parameters()).dtype), str(logits.dtype), logits[0].float().tolist()]
if tok.chat_template:
    report["chat"] = tok.apply_chat_template([{"role": "user", "content": texts[0]}], tokenize=False,
                                             add_generation_prompt=True)
open(report_path, "w").write(json.dumps(report))
'''


def hf_check(hf_dir, texts, tmp_path, trust):
    """Run HF_CHECK on hf_dir in a process that cannot import the repository; returns its report."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "hf_modules")}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-I", "-c", HF_CHECK, str(hf_dir), json.dumps(texts), str(int(trust)),
                           str(NEW_TOKENS), "report.json"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((elsewhere / "report.json").read_text())


def check_same_model(report, model, tokenizer, texts):
    """The clean process computed what Blueberry computes: fp32 logits, greedy tokens (with a cache: one new
    token per forward), the same tokens for padded batches, the pipeline's text, a bf16 model in bf16."""
    stops = report["stops"] if isinstance(report["stops"], list) else [report["stops"]]
    assert tokenizer.eos_token_id in stops
    for i, text in enumerate(texts):
        ids = encode(tokenizer, text)
        assert report["ids"][i] == ids
        with torch.no_grad():
            ours = model(torch.tensor([ids]))[0]
        diff = (torch.tensor(report["logits"][i]) - ours).abs().max().item()
        assert diff < 1e-4, f"logits differ by {diff}"
        greedy = list(generate(model, ids, NEW_TOKENS, temperature=0))
        hf = report["greedy"][i]
        assert hf == greedy[:len(hf)] and (len(hf) == NEW_TOKENS or hf[-1] in stops), (hf, greedy)
        # padded rows: the same logits and tokens as alone (after a stop, generate() fills the row with pad ids)
        assert report["batch"][i][:len(hf)] == hf, (report["batch"][i], hf)
        with torch.no_grad():
            alone = model(torch.tensor([ids + hf[:-1]]))[0, len(ids) - 1:]
        diff = (torch.tensor(report["batch_logits"][i][:len(hf)]) - alone).abs().max().item()
        assert diff < 1e-4, f"padded row {i}: logits differ by {diff}"
    assert report["steps"][0] == [len(report["ids"][0])] + [1] * (len(report["greedy"][0]) - 1), report["steps"][0]
    assert any(0 in row for row in report["mask"]), "the texts should need padding"
    assert report["pipeline"] == texts[0] + decode(tokenizer, report["greedy"][0])
    dtype, logits_dtype, half = report["bf16"]
    assert dtype == logits_dtype == "torch.bfloat16"
    with torch.no_grad():
        ref = copy.deepcopy(model).to(torch.bfloat16)(torch.tensor([report["ids"][0]]))[0].float()
    diff = (torch.tensor(half) - ref).abs().max().item()
    print(f"bf16 logits differ from Blueberry's in bf16 by {diff}")
    assert diff < 2e-2, diff  # bf16 rounding of the same function


def make_run(out_dir, cfg: ModelConfig, tokenizer, seed=0):
    """A run folder as run_train.py writes it (weights, config, tokenizer, metrics), with random weights."""
    torch.manual_seed(seed)
    model = Blueberry(cfg).eval()
    checkpoint.save_model(out_dir, model, {"dataset": "made by the test", "validation": "none", "tokens": 1234,
                                           "train": {"batch_size": 4, "optimizer": "muon"}}, step=7)
    save_tokenizer(tokenizer, out_dir / checkpoint.TOKENIZER_DIR)
    row = {"step": 7, "tokens": 1234, "elapsed_s": 1.0, "val_loss": 5.4321, "val_ppl": 228.6, "val_acc": 0.125}
    (out_dir / checkpoint.METRICS).write_text(json.dumps(row) + "\n")
    return model


def chat_tokenizer():
    """A small byte-level BPE with the chat format (turn and thinking tokens, the template), as a chat run's has."""
    tokenizer = build_tokenizer("bpe", 300, [make_text(300)])
    add_chat_format(tokenizer)
    return tokenizer


def tiny_cfg(vocab_size, **overrides):
    sizes = dict(zip(TINY_MODEL[::2], TINY_MODEL[1::2]))
    return ModelConfig(vocab_size=vocab_size, **{k.lstrip("-"): int(v) for k, v in sizes.items()}, **overrides)


# ----------------------------------------------------------------------------- export

@pytest.fixture(scope="module")
def exported_run(trained_run, tmp_path_factory):
    """The tiny trained run (default switches) exported with the CLI: (HF_DIR, what it printed)."""
    hf_dir = tmp_path_factory.mktemp("export") / "hf"
    proc = run_script("export_hf.py", trained_run, hf_dir, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return hf_dir, proc.stdout


def test_a_trained_run_exports_with_its_own_code(trained_run, exported_run, tmp_path):
    hf_dir, printed = exported_run
    assert "BlueberryForCausalLM" in printed
    # the modeling code is the repository's own, byte for byte
    for shipped, source in (("model.py", "model.py"), ("config.py", "config.py"), ("modeling_blueberry.py", "hf_model.py")):
        assert (hf_dir / shipped).read_bytes() == (REPO / source).read_bytes(), shipped
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_blueberry.BlueberryForCausalLM"
    card = (hf_dir / "README.md").read_text()
    final = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()][-1]
    run = json.loads((trained_run / "config.json").read_text())
    for needle in (f"{final['val_loss']:.4f}", f"{run['tokens']:,} in {run['step']:,} steps", "trust_remote_code=True",
                   "`embed_scale`, `sandwich_norm`, `qk_norm`, `attn_gate`", run["dataset"]):
        assert needle in card, needle
    assert f'from_pretrained("{export_hf.CARD_PLACEHOLDER}"' in card and str(hf_dir) not in card  # no local path

    model, tokenizer, _ = checkpoint.load_run(trained_run)
    texts = ["ROMEO:", "To be, or not"]
    report = hf_check(hf_dir, texts, tmp_path, trust=True)
    assert report["class"] == "BlueberryForCausalLM"
    check_same_model(report, model, tokenizer, texts)


def test_llama_switches_export_a_plain_llama_with_the_chat_template(tmp_path):
    tokenizer = chat_tokenizer()
    cfg = llama_equivalent(tiny_cfg(len(tokenizer)), tie_embeddings=True)
    model = make_run(tmp_path / "run", cfg, tokenizer)
    hf_dir = tmp_path / "hf"
    proc = run_script("export_hf.py", tmp_path / "run", hf_dir, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "plain Llama, no remote code" in proc.stdout
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert "auto_map" not in config and not list(hf_dir.glob("*.py"))
    generation = json.loads((hf_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert "a plain `LlamaForCausalLM`" in (hf_dir / "README.md").read_text()

    texts = ["the quick brown fox", "seven wise owls hum softly near old"]
    report = hf_check(hf_dir, texts, tmp_path, trust=False)
    assert report["class"] == "LlamaForCausalLM"
    check_same_model(report, model, tokenizer, texts)
    assert report["chat"] == f"<|im_start|>user\n{texts[0]}<|im_end|>\n<|im_start|>assistant\n"


def test_export_bad_input_is_one_line_and_never_half_written(tmp_path):
    tokenizer = build_tokenizer("char", 0, ["abc def"])
    make_run(tmp_path / "run", tiny_cfg(len(tokenizer)), tokenizer)
    assert_one_line_error(run_script("export_hf.py", tmp_path / "nothing", tmp_path / "a", timeout=60), "no run folder")
    incomplete = tmp_path / "incomplete"
    shutil.copytree(tmp_path / "run", incomplete)
    shutil.rmtree(incomplete / checkpoint.TOKENIZER_DIR)
    with pytest.raises(checkpoint.CheckpointError, match="incomplete: cannot load tokenizer/"):
        export_hf.export(incomplete, tmp_path / "b")
    (incomplete / checkpoint.WEIGHTS).unlink()
    with pytest.raises(checkpoint.CheckpointError, match="no model.safetensors"):
        export_hf.export(incomplete, tmp_path / "b")
    assert not (tmp_path / "b").exists()

    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "keep.txt").write_text("mine")
    assert_one_line_error(run_script("export_hf.py", tmp_path / "run", hf_dir, timeout=60), "not empty", "--force")
    assert [p.name for p in hf_dir.iterdir()] == ["keep.txt"]

    # --push_to_hub without a token, and offline: one line each, and the folder is complete and replaced (--force)
    no_token = {"HF_TOKEN": "", "HF_HOME": str(tmp_path / "hf_home")}
    proc = run_script("export_hf.py", tmp_path / "run", hf_dir, "--force", "--push_to_hub", "someone/tiny", env=no_token)
    assert_one_line_error(proc, "no Hugging Face token", f"{hf_dir} is complete")
    offline = {**no_token, "HF_TOKEN": "hf_not_a_real_token"}
    proc = run_script("export_hf.py", tmp_path / "run", hf_dir, "--force", "--push_to_hub", "someone/tiny", env=offline)
    assert_one_line_error(proc, "cannot reach the Hugging Face hub (HF_HUB_OFFLINE=1)")
    names = {p.name for p in hf_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md"} <= names
    assert "keep.txt" not in names and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    assert 'from_pretrained("someone/tiny"' in (hf_dir / "README.md").read_text()  # a pushed card loads the hub id


def test_lm_eval_scores_the_export_with_blueberrys_log_likelihoods(trained_run, exported_run, tmp_path):
    pytest.importorskip("lm_eval")
    hf_dir = exported_run[0]
    rows = [{"context": "ROMEO:", "choices": ["the", "xyz"]}, {"context": "To be, or not", "choices": ["to be", "qq"]}]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tiny_mc.yaml").write_text(
        f"task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'data.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{context}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: 0\nmetric_list:\n  - metric: acc\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_MODULES_CACHE": str(tmp_path / "hf_modules")}
    proc = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                           f"pretrained={hf_dir},trust_remote_code=True", "--tasks", "tiny_mc", "--include_path",
                           str(tmp_path), "--batch_size", "2", "--device", "cpu", "--log_samples", "--output_path",
                           str(tmp_path / "results")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    samples = [json.loads(line) for path in (tmp_path / "results").rglob("samples_tiny_mc*.jsonl")
               for line in path.read_text().splitlines()]
    assert len(samples) == len(rows)
    model, tokenizer, _ = checkpoint.load_run(trained_run)
    for sample in samples:
        for args, resp in zip(sample["arguments"].values(), sample["resps"]):
            context, continuation = encode(tokenizer, args["arg_0"]), encode(tokenizer, args["arg_1"])
            with torch.no_grad():
                logp = model(torch.tensor([context + continuation])).log_softmax(-1)[0]
            ours = sum(logp[len(context) - 1 + i, t].item() for i, t in enumerate(continuation))
            assert abs(float(resp[0][0]) - ours) < 1e-3, (args, resp, ours)


# ----------------------------------------------------------------------------- import (--init_from)

@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny LlamaForCausalLM saved with its tokenizer: GQA, tied embeddings, a non-default RoPE base and
    rms eps, an MLP width that is no multiple of 64."""
    from transformers import LlamaConfig, LlamaForCausalLM
    folder = tmp_path_factory.mktemp("llama")
    tokenizer = chat_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=144, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rope_theta=50000.0,
                         rms_norm_eps=1e-5, tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_llama_loads_as_blueberry_with_the_same_logits(llama_dir):
    from transformers import LlamaForCausalLM
    model, tokenizer, description = checkpoint.load_pretrained(str(llama_dir))
    cfg = model.cfg
    assert "LlamaForCausalLM" in description and cfg.non_llama_features() == []
    assert (cfg.n_kv_heads, cfg.tie_embeddings, cfg.rope_theta, cfg.norm_eps) == (2, True, 50000.0, 1e-5)
    assert {cfg.ffn_hidden(i) for i in range(cfg.n_layers)} == {144}
    llama = LlamaForCausalLM.from_pretrained(llama_dir).eval()
    ids = torch.tensor([encode(tokenizer, "the quick brown fox jumps over a lazy dog")])
    with torch.no_grad():
        diff = (model(ids) - llama(ids).logits).abs().max().item()
    assert diff < 1e-4, diff
    # and back: Llama's own weights again
    ours, theirs = to_llama_state_dict(model), llama.state_dict()
    assert ours.keys() <= theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_fine_tuning_a_llama_and_exporting_it_gives_a_llama(llama_dir, tmp_path):
    from transformers import LlamaForCausalLM
    (tmp_path / "text.txt").write_text(make_text(400, seed=1))
    out = tmp_path / "out"
    proc = run_script("run_train.py", "--init_from", llama_dir, "--dataset", tmp_path / "text.txt", "--batch_size", "4",
                      "--max_steps", "3", "--time_budget", "0", "--eval_every", "3", "--eval_batches", "2",
                      "--sample_tokens", "0", "--out_dir", out, "--cache_dir", tmp_path / "cache", timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "init from " in proc.stdout and "Hugging Face LlamaForCausalLM" in proc.stdout
    tuned, tokenizer, _ = checkpoint.load_run(out)
    start, _, _ = checkpoint.load_pretrained(str(llama_dir))
    assert tuned.cfg == start.cfg and len(tokenizer) == tuned.cfg.vocab_size
    assert not torch.equal(tuned.blocks[0].attn.qkv.weight, start.blocks[0].attn.qkv.weight)  # it trained

    assert run_script("export_hf.py", out, tmp_path / "hf", timeout=120).returncode == 0
    llama = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.tensor([encode(tokenizer, "seven wise owls hum softly")])
    with torch.no_grad():
        assert (tuned(ids) - llama(ids).logits).abs().max().item() < 1e-4


def test_init_from_a_run_or_its_export_is_that_run(trained_run, exported_run):
    run, tokenizer, _ = checkpoint.load_run(trained_run)
    ids = torch.tensor([encode(tokenizer, "ROMEO:")])
    for spec in (trained_run, exported_run[0]):
        model, loaded, description = checkpoint.load_pretrained(str(spec))
        assert model.cfg == run.cfg and len(loaded) == len(tokenizer), description
        with torch.no_grad():
            assert torch.equal(model(ids), run(ids)), description


def test_init_from_what_cannot_be_loaded_the_same_is_one_line(llama_dir, tmp_path):
    proc = run_script("run_train.py", "--init_from", "someone/no-such-llama", "--out_dir", tmp_path / "out", timeout=60)
    assert_one_line_error(proc, "--init_from someone/no-such-llama", "HF_HUB_OFFLINE=1")

    def broken(name, **changes):
        folder = tmp_path / name
        shutil.copytree(llama_dir, folder)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **changes}))
        return str(folder)

    cases = [
        (broken("gpt2", model_type="gpt2", architectures=["GPT2LMHeadModel"]), "GPT2LMHeadModel is not Llama"),
        (broken("yarn", rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}), "rope scaling 'yarn'"),
        (broken("bias", attention_bias=True), "attention_bias"),
        (broken("vocab", vocab_size=100), f"the tokenizer has {len(chat_tokenizer())} tokens but the model's "
                                          f"vocabulary is 100"),
        (str(tmp_path / "missing"), "no such folder"),
    ]
    for spec, needle in cases:
        with pytest.raises(checkpoint.CheckpointError) as info:
            checkpoint.load_pretrained(spec)
        assert needle in str(info.value) and "\n" not in str(info.value), str(info.value)


CHAT_CHECK = r'''
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
hf_dir, question = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True)
tok = AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=True)
ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, return_dict=True,
                              return_tensors="pt")
out = model.generate(**ids, max_new_tokens=60, do_sample=False)  # stops at generation_config's end of turn
print(json.dumps({"prompt": ids["input_ids"][0].tolist(), "reply": out[0, ids["input_ids"].shape[1]:].tolist()}))
'''


def test_a_chat_run_exports_a_chat_model(chat_run, tmp_path):
    """The exported tokenizer renders the chat prompt Blueberry renders, and HF generate() replies as Blueberry
    does, stopping at the end of the turn."""
    from tokenizer import IM_END, render_prompt
    hf_dir = tmp_path / "hf"
    assert run_script("export_hf.py", chat_run, hf_dir, timeout=120).returncode == 0
    question = "What is 12 + 9?"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-I", "-c", CHAT_CHECK, str(hf_dir), question], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    model, tokenizer, _ = checkpoint.load_run(chat_run)
    prompt = render_prompt(tokenizer, [{"role": "user", "content": question}])
    end_of_turn = tokenizer.convert_tokens_to_ids(IM_END)
    assert report["prompt"] == prompt
    assert report["reply"] == list(generate(model, prompt, 60, temperature=0, eos_id=end_of_turn))


def test_the_recipe_switches_export_with_their_own_code(tmp_path):
    """ReLU² MLP, gated value embeddings, residual/x0 lambdas, a bigram table and a logit soft-cap (issue 29) are not
    Llama: the export ships Blueberry's code, and transformers computes the same logits, cached greedy tokens and
    padded rows."""
    tokenizer = chat_tokenizer()
    cfg = tiny_cfg(len(tokenizer), mlp="relu2", value_embeds=True, resid_lambdas=True, logit_softcap=8.0,
                   bigram_buckets=53)
    assert {"mlp", "value_embeds", "resid_lambdas", "bigram_buckets", "logit_softcap"} <= set(cfg.non_llama_features())
    model = make_run(tmp_path / "run", cfg, tokenizer)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a fresh model's zero head gives uniform logits: give every weight a value
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2 + (1.0 if p.ndim == 1 else 0.0))
    checkpoint.save_model(tmp_path / "run", model, {"dataset": "made by the test", "validation": "none", "tokens": 1234,
                                                    "train": {"batch_size": 4, "optimizer": "muon"}}, step=7)
    hf_dir = tmp_path / "hf"
    proc = run_script("export_hf.py", tmp_path / "run", hf_dir, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "BlueberryForCausalLM" in proc.stdout
    texts = ["the quick brown fox", "seven wise owls hum softly near old"]
    report = hf_check(hf_dir, texts, tmp_path, trust=True)
    assert report["class"] == "BlueberryForCausalLM"
    check_same_model(report, model, tokenizer, texts)


def test_a_bigram_model_continues_a_transformers_cache_only_with_the_token_before():
    """generate() passes the token before the new ones; a forward pass by hand on a filled cache without it is
    refused in one line instead of reading the wrong pair, and with it equals the whole sequence at once."""
    from hf_model import BlueberryConfig, BlueberryForCausalLM, new_cache
    cfg = ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32, bigram_buckets=53)
    torch.manual_seed(0)
    model = BlueberryForCausalLM(BlueberryConfig(blueberry=cfg.__dict__)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        ids = torch.randint(0, 40, (2, 9))
        cache = new_cache(model.config)
        model(input_ids=ids[:, :8], cache=cache)
        with pytest.raises(ValueError, match="previous_token"):
            model(input_ids=ids[:, 8:], cache=copy.deepcopy(cache))
        last = model(input_ids=ids[:, 8:], cache=cache, previous_token=ids[:, 7]).logits[:, -1]
        torch.testing.assert_close(last, model(input_ids=ids, use_cache=False).logits[:, -1], rtol=1e-4, atol=1e-4)
