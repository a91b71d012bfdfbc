"""Export a Blueberry run as a Hugging Face `transformers` model folder, and push it to the hub if asked.

    python export_hf.py out hf_out                                   # the folder
    python export_hf.py out hf_out --push_to_hub you/blueberry-tiny  # ... and upload it
    python export_hf.py out hf_out --force                           # replace a folder that is not empty

A run whose switches are all Llama-equivalent (config.LLAMA_SWITCHES and a uniform MLP) becomes a plain
`LlamaForCausalLM`: no remote code, taken as it is by every Llama tool. Any other run ships Blueberry's own
code: model.py and config.py unchanged, and hf_model.py (the transformers glue) as modeling_blueberry.py;
it loads with `trust_remote_code=True`. Either way the folder holds config.json, model.safetensors, the
tokenizer (with its chat template, if any; padding on the left), generation_config.json and a model card.

The folder is written under a temporary name next to HF_DIR and renamed into place, so HF_DIR is never
half-written; an upload that fails leaves it complete.
"""

import dataclasses
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from safetensors.torch import save_file

import checkpoint
from common import first_line
from config import LLAMA_SWITCHES, OneLineParser, SampleConfig
from llama import llama_config, to_llama_state_dict
from sources import HubUnreachable, require_hub

REPO = Path(__file__).resolve().parent
# What a folder that runs Blueberry's own code ships: file in the folder <- file in this repository
REMOTE_CODE = {"modeling_blueberry.py": "hf_model.py", "model.py": "model.py", "config.py": "config.py"}
AUTO_MAP = {"AutoConfig": "modeling_blueberry.BlueberryConfig",
            "AutoModelForCausalLM": "modeling_blueberry.BlueberryForCausalLM"}


CARD_PLACEHOLDER = "path/to/this/folder"  # what the model card loads when the export is not pushed to the hub


class ExportError(Exception):
    """Stops the export with a one-line message (no traceback)."""


# ----------------------------------------------------------------------------- the folder

def export(out_dir, hf_dir, force: bool = False, repo_id: str | None = None) -> str:
    """Write the run in out_dir as a transformers model folder at hf_dir; returns the class it loads as.
    `repo_id` (where it will be pushed) only changes how the model card says to load it."""
    model, tokenizer, config = checkpoint.load_run(out_dir)
    hf_dir = Path(hf_dir)
    if hf_dir.exists() and not hf_dir.is_dir():
        raise ExportError(f"{hf_dir} is a file; give a folder to export into")
    if hf_dir.is_dir() and any(hf_dir.iterdir()) and not force:
        raise ExportError(f"{hf_dir} is not empty; pass --force to replace it")
    plain = not model.cfg.non_llama_features()
    architecture = "LlamaForCausalLM" if plain else "BlueberryForCausalLM"

    def fill(folder: Path):
        ids = save_tokenizer(tokenizer, folder)
        if plain:
            save_llama(model, ids, folder)
        else:
            save_remote_code(model, ids, folder)
        generation_config(tokenizer, ids).save_pretrained(str(folder))
        # the hub id it will be pushed to, else a placeholder: this machine's path means nothing to a reader
        card = model_card(model, config, last_eval(Path(out_dir)), architecture, repo_id or CARD_PLACEHOLDER)
        (folder / "README.md").write_text(card)

    write_folder(hf_dir, fill)
    return architecture


def save_tokenizer(tokenizer, folder: Path) -> dict:
    """The run's tokenizer, set up for batched generation: padding on the left (the side a decoder-only model
    needs) and EOS as the pad token where it has none. Returns the special token ids the configs name."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = tokenizer.init_kwargs["padding_side"] = "left"  # init_kwargs: what tokenizer_config keeps
    for how_it_was_loaded in ("is_local", "local_files_only"):  # true here, wrong on the hub
        tokenizer.init_kwargs.pop(how_it_was_loaded, None)
    tokenizer.save_pretrained(str(folder))
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}


def save_llama(model, ids: dict, folder: Path):
    """A plain LlamaForCausalLM: Llama's config and Llama's weight names (llama.llama_config, to_llama_state_dict)."""
    hf_config = llama_config(model.cfg)
    for name, value in {**ids, "architectures": ["LlamaForCausalLM"], "dtype": "float32"}.items():
        setattr(hf_config, name, value)
    hf_config.save_pretrained(str(folder))
    save_file(to_llama_state_dict(model), str(folder / "model.safetensors"), metadata={"format": "pt"})


def save_remote_code(model, ids: dict, folder: Path):
    """BlueberryForCausalLM: the ModelConfig in config.json, model.py's weights under `model.`, and the code."""
    from hf_model import BlueberryConfig  # transformers is only needed here, and only when exporting
    hf_config = BlueberryConfig(blueberry=dataclasses.asdict(model.cfg), architectures=["BlueberryForCausalLM"],
                                auto_map=AUTO_MAP, dtype="float32", **ids)
    hf_config.save_pretrained(str(folder))
    weights = {f"model.{name}": t.detach().contiguous() for name, t in model.state_dict().items()}
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    for shipped, source in REMOTE_CODE.items():
        shutil.copyfile(REPO / source, folder / shipped)


def stop_token_ids(tokenizer) -> list:
    """EOS, and for a chat model the token its chat template puts right after an assistant's answer (ChatML's
    <|im_end|>, Llama 3's <|eot_id|>), so that generate() and pipelines stop at the end of a turn."""
    stops = [tokenizer.eos_token_id]
    if getattr(tokenizer, "chat_template", None):
        answer = "Blueberry-answer"
        try:
            text = tokenizer.apply_chat_template([{"role": "user", "content": "?"},
                                                  {"role": "assistant", "content": answer}], tokenize=False)
            after = tokenizer.encode(text.split(answer, 1)[1], add_special_tokens=False)
        except Exception:  # a template that cannot render a plain exchange names no end of turn
            after = []
        if after and after[0] in tokenizer.added_tokens_decoder and after[0] not in stops:
            stops.append(after[0])
    return stops


def generation_config(tokenizer, ids: dict):
    """Stop tokens, and inference.py's sampling defaults (SampleConfig), for generate() and pipelines."""
    from transformers import GenerationConfig
    sample = SampleConfig()
    stops = stop_token_ids(tokenizer)
    return GenerationConfig(bos_token_id=ids["bos_token_id"], pad_token_id=ids["pad_token_id"],
                            eos_token_id=stops[0] if len(stops) == 1 else stops, do_sample=True,
                            temperature=sample.temperature, top_k=sample.top_k, top_p=sample.top_p)


def write_folder(hf_dir: Path, fill):
    """fill(folder) into a fresh temporary folder next to hf_dir, then rename it into place (replacing an old
    hf_dir): a failure or a kill leaves hf_dir as it was."""
    hf_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=hf_dir.parent, prefix=f".{hf_dir.name}.tmp-"))
    try:
        fill(tmp)
        umask = os.umask(0)
        os.umask(umask)
        for path in [tmp, *tmp.iterdir()]:  # mkdtemp and safetensors make them private: this is an ordinary folder
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
        if hf_dir.exists():
            old = hf_dir.with_name(f".{hf_dir.name}.old-{os.getpid()}")
            os.replace(hf_dir, old)
            try:
                os.replace(tmp, hf_dir)
            except OSError:
                os.replace(old, hf_dir)  # put the old folder back
                raise
            shutil.rmtree(old)
        else:
            os.replace(tmp, hf_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- the model card

def last_eval(out_dir: Path) -> dict:
    """The run's last evaluation line in metrics.jsonl ({} if it has none)."""
    path = out_dir / checkpoint.METRICS
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return next((row for row in reversed(rows) if "val_loss" in row), {})


def model_card(model, config: dict, final: dict, architecture: str, where: str) -> str:
    cfg, train = model.cfg, config.get("train") or {}
    plain = architecture == "LlamaForCausalLM"
    blockers = cfg.non_llama_features()
    widths = sorted({cfg.ffn_hidden(i) for i in range(cfg.n_layers)})
    switches = "\n".join(f"| `{name}` | `{getattr(cfg, name)}` | `{value}` |" for name, value in LLAMA_SWITCHES.items())
    results = (f"validation loss **{final['val_loss']:.4f}**, perplexity {final['val_ppl']:.2f}, next-token accuracy "
               f"{final['val_acc']:.1%} (step {final['step']:,}, {final['tokens']:,} tokens)"
               if final else "no evaluation was recorded (metrics.jsonl has no validation line)")
    remote = "" if plain else ", trust_remote_code=True"
    prompt = config.get("sample_prompt") or "Once upon a time"
    lm_eval_args = f"pretrained={where}" + ("" if plain else ",trust_remote_code=True")
    exported_as = (
        "a plain `LlamaForCausalLM`: every switch is Llama-equivalent, so no custom code is needed and any tool "
        "that takes Llama (vLLM, llama.cpp conversion, quantizers) takes this model"
        if plain else
        f"`BlueberryForCausalLM` with Blueberry's own code (`model.py`, `config.py`, `modeling_blueberry.py`), "
        f"loaded with `trust_remote_code=True`. These switches stop it from being a plain Llama: "
        f"{', '.join(f'`{b}`' for b in blockers)}")
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [blueberry, {'llama, ' if plain else ''}text-generation]
---

# Blueberry language model

A {model.num_params() / 1e6:.2f}M-parameter decoder-only language model trained with Blueberry.
Exported as {exported_as}.

## Architecture

| layers | d_model | heads / kv heads | context | vocabulary | MLP widths | tied embeddings | RoPE theta |
| --- | --- | --- | --- | --- | --- | --- | --- |
| {cfg.n_layers} | {cfg.d_model} | {cfg.n_heads} / {cfg.n_kv_heads} | {cfg.max_seq_len} | {cfg.vocab_size:,} | {', '.join(map(str, widths))} | {cfg.tie_embeddings} | {cfg.rope_theta:g} |

{model.num_params() / 1e6:.2f}M parameters, {model.num_params(embeddings=False) / 1e6:.2f}M without embeddings.

| switch | this model | plain Llama |
| --- | --- | --- |
{switches}
| uniform MLP (`ffn_mult_first == ffn_mult_last`) | `{len(widths) == 1}` | `True` |

A model exports as plain `LlamaForCausalLM` only when `embed_scale`, `sandwich_norm`, `qk_norm` and
`attn_gate` are off and the MLP is uniform (`zero_init` and `depth_init` only choose the starting weights).

## Training

- data: {config.get('dataset', train.get('dataset', 'unknown'))}
- validation: {config.get('validation', 'unknown')}
- tokens seen: {config.get('tokens', 0):,} in {config.get('step', 0):,} steps
  (batch {train.get('batch_size', '?')} x {cfg.max_seq_len} tokens x {train.get('grad_accum_steps', 1)} accumulation steps)
- optimizer: {train.get('optimizer', 'muon')}{f"; started from `{train['init_from']}`" if train.get('init_from') else ''}
- final: {results}

## How to load it

```python
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

model = AutoModelForCausalLM.from_pretrained("{where}"{remote})
tokenizer = AutoTokenizer.from_pretrained("{where}"{remote})
inputs = tokenizer([{prompt!r}, "The"], return_tensors="pt", padding=True)  # pads on the left
out = model.generate(**inputs, max_new_tokens=50, do_sample=False)
print(tokenizer.batch_decode(out, skip_special_tokens=True))

generator = pipeline("text-generation", model="{where}"{remote})
print(generator({prompt!r}, max_new_tokens=50)[0]["generated_text"])
```

{"" if plain else "The tokenizer takes `trust_remote_code=True` too: transformers reads config.json for it, and "
                 "otherwise asks before running the model's code. "}Pass `dtype=torch.bfloat16` to `from_pretrained`
for half the memory. Evaluate it with
`lm_eval --model hf --model_args {lm_eval_args} --tasks TASK`.
The context is {cfg.max_seq_len} tokens: keep prompt + new tokens within it.
"""


# ----------------------------------------------------------------------------- the hub

def push_to_hub(hf_dir: Path, repo_id: str, private: bool = False) -> str:
    """Upload the folder to the hub as model repo `repo_id` (created if needed); returns its URL."""
    from huggingface_hub import HfApi, get_token
    later = f"{hf_dir} is complete: upload it later with `hf upload {repo_id} {hf_dir}`"
    if get_token() is None:
        raise ExportError(f"--push_to_hub: no Hugging Face token (run `hf auth login` or set HF_TOKEN); {later}")
    try:
        require_hub()
    except HubUnreachable as e:
        raise ExportError(f"--push_to_hub: cannot reach the Hugging Face hub ({e}); {later}") from None
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(hf_dir), repo_id=repo_id, commit_message="Upload a Blueberry model")
    except Exception as e:  # auth, permissions, network: one line, the folder stays
        raise ExportError(f"--push_to_hub {repo_id}: {first_line(e)}; {later}") from None
    return f"https://huggingface.co/{repo_id}"


def main(argv=None):
    p = OneLineParser(description="Export a Blueberry run as a Hugging Face transformers model folder.")
    p.add_argument("out_dir", help="the run: a folder written by run_train.py")
    p.add_argument("hf_dir", help="the folder to write (must be empty or new, unless --force)")
    p.add_argument("--push_to_hub", metavar="REPO_ID", help="then upload the folder to this hub model repo")
    p.add_argument("--private", action="store_true", help="with --push_to_hub: create the repo private")
    p.add_argument("--force", action="store_true", help="replace hf_dir if it is not empty")
    args = p.parse_args(argv)
    hf_dir = Path(args.hf_dir)
    architecture = export(args.out_dir, hf_dir, args.force, args.push_to_hub)
    remote = "" if architecture == "LlamaForCausalLM" else ", trust_remote_code=True"
    print(f"exported {args.out_dir} to {hf_dir}/ as {architecture}"
          f"{' (plain Llama, no remote code)' if not remote else ' (with Blueberry model code)'}")
    print(f"load it: AutoModelForCausalLM.from_pretrained({str(hf_dir)!r}{remote})")
    if args.push_to_hub:
        print(f"pushed: {push_to_hub(hf_dir, args.push_to_hub, args.private)}")


if __name__ == "__main__":
    try:
        main()
    except (ExportError, checkpoint.CheckpointError) as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(1)
