"""Reading and writing a run's output folder: weights, config, tokenizer, training state.

Every file is written to a temporary name and renamed into place, so a kill at any moment
leaves either the old file or the new one, never half of one. `trainer_state.pt` holds
everything a resume needs (model, optimizers, schedule, RNG, data position) in that one
file, so a resumable checkpoint is always whole; `model.safetensors` + `config.json` + the
tokenizer are what inference loads.
"""

import dataclasses
import json
import os
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from config import ModelConfig
from model import Blueberry

WEIGHTS, CONFIG, STATE, TOKENIZER_DIR = "model.safetensors", "config.json", "trainer_state.pt", "tokenizer"


class CheckpointError(ValueError):
    """A missing, incomplete or mismatched checkpoint; the message says what to do."""


def atomic_write(path, write):
    """Call write(tmp_path), then rename tmp_path over `path`; returns what write returned.
    A failure leaves `path` as it was and no temporary behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        result = write(tmp)
        os.replace(tmp, path)
        return result
    finally:
        if tmp.exists():
            tmp.unlink()


def save_model(out_dir, model: Blueberry, extra_config: dict | None = None, step: int = 0):
    """Write model.safetensors and config.json ({"model": ModelConfig fields, **extra_config})."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    atomic_write(out_dir / WEIGHTS, lambda p: save_file(weights, str(p), metadata={"step": str(step)}))
    config = {"model": dataclasses.asdict(model.cfg), "step": step, **(extra_config or {})}
    atomic_write(out_dir / CONFIG, lambda p: p.write_text(json.dumps(config, indent=2)))


def read_config(out_dir) -> dict:
    path = Path(out_dir) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"no {CONFIG} in {out_dir}: train a model first (python run_train.py --out_dir {out_dir})")
    try:
        config = json.loads(path.read_text())
        config["model"] = ModelConfig(**config["model"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path} is not a Blueberry config ({e}); retrain or point --out_dir elsewhere")
    return config


def load_model(out_dir, device="cpu", dtype=None) -> tuple:
    """Build the model from config.json and load model.safetensors: returns (model, config dict)."""
    config = read_config(out_dir)
    path = Path(out_dir) / WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"no {WEIGHTS} in {out_dir}: the run did not save weights yet; train or resume it")
    model = Blueberry(config["model"])
    try:
        model.load_state_dict(load_file(str(path)), strict=True)
    except (SafetensorError, RuntimeError, OSError) as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"{path} does not match {CONFIG} ({first}); retrain or restore both files together")
    return model.to(device=device, dtype=dtype).eval(), config
