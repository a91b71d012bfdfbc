"""Reading and writing a run's output folder: weights, config, tokenizer, training state.

Every file is written to a temporary name and renamed into place, so a kill at any moment
leaves either the old file or the new one, never half of one. `trainer_state.pt` holds
everything a resume needs (model, optimizers, schedule, grad scaler, RNG, data position) in
that one file, so a resumable checkpoint is always whole (an fsdp run's is the folder `trainer_state.dcp/`, see
save_sharded); `model.safetensors` +
`config.json` + the tokenizer are what inference loads. `load_pretrained` is where `--init_from` starts:
a run's out_dir, or a Hugging Face Llama folder or hub id.
"""

import dataclasses
import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from common import atomic_write, first_line
from config import ModelConfig, saved_model_config
from llama import from_llama_config, from_llama_state_dict
from model import Blueberry
from sources import HubUnreachable, looks_like_path, require_hub
from tokenizer import load_tokenizer, with_eos

WEIGHTS, CONFIG, STATE, TOKENIZER_DIR, METRICS = (
    "model.safetensors", "config.json", "trainer_state.pt", "tokenizer", "metrics.jsonl")
SHARDED, LATEST, REST = "trainer_state.dcp", "latest", "rest.pt"  # fsdp: step folders, the pointer, the small rest


class CheckpointError(ValueError):
    """A missing, incomplete or mismatched checkpoint; the message says what to do."""


# ----------------------------------------------------------------------------- weights and config

def save_model(out_dir, model: Blueberry, extra_config: dict | None = None, step: int = 0, weights: dict | None = None):
    """Write model.safetensors and config.json ({"model": ModelConfig fields, **extra_config}). `weights`: the
    model's full state dict where the model itself holds only a shard of it (parallel.full_state_dict)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().contiguous() for k, v in (model.state_dict() if weights is None else weights).items()}
    atomic_write(out_dir / WEIGHTS, lambda p: save_file(weights, str(p), metadata={"step": str(step)}))
    config = {"model": dataclasses.asdict(model.cfg), "step": step, **(extra_config or {})}
    atomic_write(out_dir / CONFIG, lambda p: p.write_text(json.dumps(config, indent=2)))


def read_config(out_dir) -> dict:
    path = Path(out_dir) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"no {CONFIG} in {out_dir}: train a model first (python run_train.py --out_dir {out_dir})")
    try:
        config = json.loads(path.read_text())
        config["model"] = saved_model_config(config["model"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path} is not a Blueberry config ({e}); retrain or point --out_dir elsewhere")
    return config


def resumed_settings(model_cfg, train_cfg, given: dict) -> tuple:
    """--resume: (model settings, train settings) of the run in out_dir, from its config.json, with the flags given
    now on top. A run resumes as it was started, even after a default it relied on changed (issue 29 changed the
    MLP and the schedule); a given model flag that differs from the checkpoint is refused by load_resume_state."""
    if not (train_cfg.resume and (Path(train_cfg.out_dir) / CONFIG).is_file()):
        return model_cfg, train_cfg
    saved = read_config(train_cfg.out_dir)
    model_fields = {f.name for f in dataclasses.fields(model_cfg)}
    train_fields = {f.name for f in dataclasses.fields(train_cfg)}
    train = {k: v for k, v in saved.get("train", {}).items() if k in train_fields}  # a field since removed is dropped
    try:
        model_cfg = dataclasses.replace(saved["model"], **{k: v for k, v in given.items() if k in model_fields})
        return model_cfg, dataclasses.replace(train_cfg, **{**train, "overwrite": False,
                                                            **{k: v for k, v in given.items() if k in train_fields}})
    except ValueError as e:  # a saved value today's checks refuse
        raise CheckpointError(f"{Path(train_cfg.out_dir) / CONFIG}: {first_line(e)}; give that field as a flag with "
                              f"--resume, or start a new run")


def load_model(out_dir, device="cpu", dtype=None) -> tuple:
    """Build the model from config.json and load model.safetensors: returns (model in eval mode, config dict)."""
    config = read_config(out_dir)
    path = Path(out_dir) / WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"no {WEIGHTS} in {out_dir}: the run did not save weights yet; train or resume it")
    try:
        weights = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is damaged ({first_line(e)}); restore it, or retrain")
    model = Blueberry(config["model"])
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not match {CONFIG} ({first_line(e)}); restore both files together")
    return model.to(device=device, dtype=dtype).eval(), config


# ----------------------------------------------------------------------------- the resume state

def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out_dir, model, optimizers, scaler, batches, progress: dict, extra_config: dict,
                    weights: dict | None = None):
    """Weights + config for inference, then the one-file resume state (both atomic). `weights` as in save_model."""
    weights = model.state_dict() if weights is None else weights
    save_model(out_dir, model, {**extra_config, "tokens": progress["tokens"]}, step=progress["step"], weights=weights)
    state = {**_rest(model, scaler, batches, progress), "model": weights,
             "optimizers": [opt.state_dict() for opt in optimizers]}
    atomic_write(Path(out_dir) / STATE, lambda p: torch.save(state, p))


def _rest(model, scaler, batches, progress: dict) -> dict:
    """What a resume needs besides weights and optimizer state (the same on every rank, so rank 0's)."""
    return {"model_config": dataclasses.asdict(model.cfg), "progress": dict(progress), "scaler": scaler.state_dict(),
            "rng": rng_state(), "data": batches.state_dict()}


def save_sharded(out_dir, model, optimizers, scaler, batches, progress: dict, extra_config: dict, weights: dict,
                 master: bool):
    """An fsdp checkpoint, called on every rank: each writes its shards of the weights and optimizer state with
    torch.distributed.checkpoint into a new folder trainer_state.dcp/step-N/ (readable on any number of ranks);
    then rank 0 adds the rest (rest.pt), writes model.safetensors and config.json from the whole `weights`
    (parallel.full_state_dict) for every other script, points trainer_state.dcp/latest at the new folder (an atomic
    rename) and removes the older ones. Killed at any moment, `latest` names a whole checkpoint. With several
    nodes, out_dir must be a filesystem they share."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    import parallel  # here, not at the top: inference and serving import this module without torch.distributed's weight
    root = Path(out_dir) / SHARDED
    folder = root / f"step-{progress['step']:08d}"
    if master and folder.exists():  # a save of this step killed before it finished
        shutil.rmtree(folder)
    parallel.barrier()
    model_state, optimizer_state = get_state_dict(model, optimizers)
    dcp.save({"model": model_state, "optimizers": optimizer_state}, checkpoint_id=str(folder))
    if master:
        save_model(out_dir, model, {**extra_config, "tokens": progress["tokens"]}, step=progress["step"],
                   weights=weights)
        atomic_write(folder / REST, lambda p: torch.save(_rest(model, scaler, batches, progress), p))
        atomic_write(root / LATEST, lambda p: p.write_text(folder.name))
        for old in root.iterdir():
            if old.is_dir() and old != folder:
                shutil.rmtree(old)


def resume_state(parallel: str) -> str:
    """What holds a run's resume state: the one file (ddp), or the folder of shards (fsdp)."""
    return f"{SHARDED}/" if parallel == "fsdp" else STATE


def load_resume_state(out_dir, model_cfg: ModelConfig) -> dict:
    """The resume state in out_dir, checked against the model settings asked for (CheckpointError). An fsdp
    checkpoint's shards are read later, by restore, into the sharded model: here only its small rest."""
    latest = Path(out_dir) / SHARDED / LATEST
    sharded = latest.is_file()
    path = Path(out_dir) / (f"{SHARDED}/{latest.read_text().strip()}/{REST}" if sharded else STATE)
    if not path.is_file():
        what = f"{path} is missing" if sharded else f"nothing to resume in {out_dir} (no {STATE})"
        raise CheckpointError(f"--resume: {what}; drop --resume to start fresh")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say so in one line
        raise CheckpointError(f"--resume: {path} is unreadable ({type(e).__name__}); drop --resume to start fresh")
    if sharded:
        state["sharded"] = str(path.parent)
    wanted = dataclasses.asdict(model_cfg)
    diff = {k: (v, wanted.get(k)) for k, v in state["model_config"].items() if wanted.get(k) != v}
    if diff:
        shown = ", ".join(f"{k}={old} (asked {new})" for k, (old, new) in sorted(diff.items()))
        raise CheckpointError(f"--resume: the checkpoint in {out_dir} has {shown}; "
                              f"use the same model settings or another --out_dir")
    return state


def restore(state: dict, model, optimizers, scaler, batches) -> dict:
    """Load a resume state into the run's objects; returns its progress (step, tokens, elapsed_s). A checkpoint
    of the other kind (ddp's one file, fsdp's shards) is refused in one line."""
    import parallel
    if "sharded" in state and not parallel.sharded(model):
        raise CheckpointError(f"--resume: {Path(state['sharded']).parent.parent} holds an fsdp run's sharded "
                              f"checkpoint; resume it with --parallel fsdp (on any number of processes)")
    if "sharded" not in state and parallel.sharded(model):
        raise CheckpointError("--resume: this is a ddp run's checkpoint (trainer_state.pt); resume it with "
                              "--parallel ddp, or start an fsdp run from its weights with --init_from")
    settings = [[{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups] for opt in optimizers]
    if "sharded" in state:
        _load_sharded(state["sharded"], model, optimizers)
    else:
        model.load_state_dict(state["model"])
        for opt, opt_state in zip(optimizers, state["optimizers"]):
            opt.load_state_dict(opt_state)  # moments and momentum buffers continue...
    for opt, groups in zip(optimizers, settings):
        for group, mine in zip(opt.param_groups, groups):
            group.update(mine)  # ...under this run's lr, betas and weight decay (flags given with --resume apply)
    scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    batches.load_state_dict(state["data"])
    return dict(state["progress"])


def _load_sharded(folder, model, optimizers):
    """Every rank reads its shards of the weights and optimizer state, on however many ranks saved them."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model_state, optimizer_state = get_state_dict(model, optimizers)
    try:
        dcp.load({"model": model_state, "optimizers": optimizer_state}, checkpoint_id=folder)
    except Exception as e:  # a damaged folder, or another model's: one line
        raise CheckpointError(f"--resume: cannot read the sharded checkpoint {folder} ({first_line(e)})")
    set_state_dict(model, optimizers, model_state_dict=model_state, optim_state_dict=optimizer_state)


def truncate_metrics(path: Path, step: int):
    """Drop log lines written after the checkpoint we resume from (the killed run's tail)."""
    if path.exists():
        keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        atomic_write(path, lambda p: p.write_text("".join(line + "\n" for line in keep)))


# ----------------------------------------------------------------------------- starting points

def load_run(out_dir, device="cpu") -> tuple:
    """A run's out_dir -> (model in eval mode, its tokenizer, config.json as a dict). CheckpointError (one line)
    for a missing or incomplete run, or a tokenizer that is not the model's."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise CheckpointError(f"no run folder {out_dir}: train one first (python run_train.py --out_dir {out_dir})")
    model, config = load_model(out_dir, device)
    try:
        tokenizer = load_tokenizer(out_dir / TOKENIZER_DIR)
    except Exception as e:  # missing (DataError) or unreadable (whatever transformers raises): one line either way
        raise CheckpointError(f"the run in {out_dir} is incomplete: cannot load {TOKENIZER_DIR}/ ({first_line(e)})")
    _check_vocab(tokenizer, model.cfg.vocab_size, out_dir, exact=True)
    return model, tokenizer, config


def load_pretrained(spec, device="cpu") -> tuple:
    """Where `--init_from` starts: a Blueberry run's out_dir, a folder written by export_hf.py, or a Hugging Face
    LlamaForCausalLM (a folder or a hub id; SmolLM and TinyLlama are such). Returns (model in eval mode, fp32, its
    tokenizer, a one-line description). A Llama becomes Blueberry with config.LLAMA_SWITCHES: the same function.
    CheckpointError (one line) for what cannot be loaded, or loaded the same."""
    where = f"--init_from {spec}"
    path = Path(spec).expanduser()
    if not path.is_dir():
        if looks_like_path(spec):
            raise CheckpointError(f"{where}: no such folder")
        path = _download(spec, where)
    try:
        hf_config = json.loads((path / CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{where}: no readable {CONFIG} in {path} ({first_line(e)}); "
                              f"give a Blueberry out_dir or a Hugging Face model folder")
    if "model_type" not in hf_config:  # Blueberry's own config.json
        model, tokenizer, config = load_run(path, device)
        return model, tokenizer, f"{spec} (a Blueberry run, step {config.get('step', 0)})"
    if hf_config["model_type"] not in ("llama", "blueberry"):
        architecture = "/".join(hf_config.get("architectures") or []) or hf_config["model_type"]
        raise CheckpointError(f"{where}: architecture {architecture} is not Llama (LlamaForCausalLM); Blueberry "
                              f"imports Llama checkpoints and its own exports")
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM
    try:
        tokenizer = with_eos(AutoTokenizer.from_pretrained(str(path)))
    except Exception as e:
        raise CheckpointError(f"{where}: cannot load its tokenizer ({first_line(e)})")
    blueberry = hf_config["model_type"] == "blueberry"  # exported by export_hf.py with model.py's own code
    try:
        cfg = saved_model_config(hf_config["blueberry"]) if blueberry else from_llama_config(AutoConfig.from_pretrained(str(path)))
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{where}: {first_line(e)}")
    _check_vocab(tokenizer, cfg.vocab_size, where)
    if blueberry:  # model.py's weights, under model.*
        weights = {name.removeprefix("model."): t for name, t in _read_weights(path, where).items()}
    else:
        try:
            weights = from_llama_state_dict(LlamaForCausalLM.from_pretrained(str(path)).state_dict(), cfg)
        except Exception as e:
            raise CheckpointError(f"{where}: cannot load its weights ({first_line(e)})")
    model = Blueberry(cfg)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{where}: its weights do not match its {CONFIG} ({first_line(e)})")
    kind = "a Blueberry export" if blueberry else "Hugging Face LlamaForCausalLM"
    return model.to(device).eval(), tokenizer, f"{spec} ({kind}, {model.num_params() / 1e6:.1f}M params)"


def _download(repo_id, where) -> Path:
    """A hub model's config, weights and tokenizer, from the hub or, where it cannot be reached, the local cache."""
    from huggingface_hub import snapshot_download
    try:
        require_hub()
        offline = ""
    except HubUnreachable as e:
        offline = str(e)
    try:
        return Path(snapshot_download(repo_id, local_files_only=bool(offline), allow_patterns=[
            "*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.txt"]))
    except Exception as e:
        why = f"the Hugging Face hub is unreachable ({offline}) and it is not in the cache" if offline else first_line(e)
        raise CheckpointError(f"{where}: not a local folder, and not a hub model that can be had: {why}")


def _read_weights(path, where) -> dict:
    try:
        return load_file(str(Path(path) / WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{where}: cannot read {WEIGHTS} ({first_line(e)})")


def _check_vocab(tokenizer, vocab_size: int, where, exact=False):
    # A run's vocabulary is its tokenizer's. Other models may have more embedding rows than tokens (padded for
    # speed), never fewer.
    if len(tokenizer) > vocab_size or (exact and len(tokenizer) != vocab_size):
        raise CheckpointError(f"{where}: the tokenizer has {len(tokenizer)} tokens but the model's vocabulary is "
                              f"{vocab_size}: they do not belong together; restore the run's own tokenizer")
