"""Blueberry configuration: the model and training dataclasses, presets, and the CLI.

Every field of `ModelConfig` and `TrainConfig` can be set from the command line:

    python run_train.py --preset cpu --d_model 192 --max_steps 500 --compile true

Edit the defaults here to scale up; the presets at the bottom are starting points.
"""

import argparse
import math
import sys
from dataclasses import dataclass, fields


@dataclass
class ModelConfig:
    # sizes (the reference configuration: ~ a few M non-embedding parameters)
    vocab_size: int = 24576  # overwritten by the tokenizer's size at run time
    d_model: int = 256
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int = 2  # grouped-query attention: n_heads / n_kv_heads query heads share a K/V head
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    # pyramidal SwiGLU: block i of L has hidden width d_model * lerp(first, last, i / (L - 1))
    ffn_mult_first: float = 1.5
    ffn_mult_last: float = 4.0
    multiple_of: int = 64
    norm_eps: float = 1e-6
    dropout: float = 0.0
    # init: normal(0, init_std); MLP input weights fall with depth from first to last
    init_std: float = 0.02
    init_std_first: float = 0.02
    init_std_last: float = 0.01
    # feature switches: all off (with a uniform MLP) is exactly Llama
    tie_embeddings: bool = False  # share the input embedding with lm_head
    embed_scale: bool = True  # multiply token embeddings by sqrt(d_model)
    sandwich_norm: bool = True  # RMSNorm after each sublayer as well as before
    qk_norm: bool = True  # RMSNorm over head_dim on q and k before RoPE
    attn_gate: bool = True  # gated attention (G1): sdpa(q,k,v) * sigmoid(x @ W_gate)
    zero_init: bool = True  # every block starts as the identity, lm_head at zero
    depth_init: bool = True  # depth-aware std for MLP input weights

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "max_seq_len", "multiple_of"):
            _check(getattr(self, name) > 0, name, "must be a positive integer")
        for name in ("rope_theta", "ffn_mult_first", "ffn_mult_last", "norm_eps", "init_std", "init_std_first", "init_std_last"):
            _check(getattr(self, name) > 0, name, "must be > 0")
        _check(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        _check(self.d_model % self.n_heads == 0, "n_heads",
               f"must divide d_model={self.d_model}; pick n_heads from {_divisors(self.d_model)}")
        _check(self.n_heads % self.n_kv_heads == 0, "n_kv_heads",
               f"must divide n_heads={self.n_heads}; pick n_kv_heads from {_divisors(self.n_heads)}")
        _check(self.head_dim % 2 == 0, "n_heads",
               f"gives an odd head_dim={self.head_dim} (d_model / n_heads); RoPE needs an even head_dim")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def ffn_hidden(self, layer: int) -> int:
        """Hidden width of block `layer`'s SwiGLU MLP (pyramidal, rounded up to multiple_of)."""
        frac = layer / (self.n_layers - 1) if self.n_layers > 1 else 0.0
        mult = self.ffn_mult_first + (self.ffn_mult_last - self.ffn_mult_first) * frac
        return self.multiple_of * math.ceil(self.d_model * mult / self.multiple_of)

    def mlp_init_std(self, layer: int) -> float:
        """Std of block `layer`'s MLP input weights: falls linearly with depth (depth-aware init)."""
        if not self.depth_init:
            return self.init_std
        frac = layer / (self.n_layers - 1) if self.n_layers > 1 else 0.0
        return self.init_std_first + (self.init_std_last - self.init_std_first) * frac


@dataclass
class TrainConfig:
    # data (see data.py)
    dataset: str = "Hosseinlack123/Blueberry-testdataset"  # hub id, local file/folder, or "shakespeare"
    tokenizer: str = "Hosseinlack123/Blueberry-testtokenizer"  # hub id, local folder, "char", "bpe" or "bpe:N"
    text_column: str = "text"
    val_fraction: float = 0.01
    max_tokens: int = 0  # cap on tokens read from the source (0 = all)
    cache_dir: str = "data_cache"
    # optimization
    batch_size: int = 32  # sequences per micro-batch per process
    grad_accum_steps: int = 1
    max_steps: int = 3000
    time_budget: float = 0.0  # seconds; > 0 runs the schedule on elapsed time and ends on time
    warmup_frac: float = 0.02  # warmup -> stable -> decay (fractions of the run)
    decay_frac: float = 0.3
    min_lr_frac: float = 0.0  # lr at the end of the decay, as a fraction of the peak
    optimizer: str = "muon"  # "muon" (Muon for hidden matrices + AdamW) or "adamw" (everything on AdamW)
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    muon_momentum_warmup_steps: int = 300  # momentum ramps 0.85 -> muon_momentum (0 = off)
    muon_weight_decay: float = 0.0
    adamw_lr: float = 0.003
    adamw_beta1: float = 0.9
    adamw_beta2: float = 0.95
    weight_decay: float = 0.1  # AdamW decoupled weight decay (matrices only, not norms/biases)
    grad_clip: float = 1.0  # max global grad norm (0 = off)
    # evaluation, logging, checkpoints
    eval_every: int = 250
    eval_batches: int = 20
    log_every: int = 10
    save_every: int = 1000
    out_dir: str = "out"
    resume: bool = False
    sample_tokens: int = 200  # length of the sample printed at the end (0 = none)
    # runtime
    seed: int = 1337
    device: str = "auto"  # auto | cuda | mps | cpu
    dtype: str = "auto"  # auto | fp32 | bf16 | fp16
    compile: bool = False

    def __post_init__(self):
        for name in ("batch_size", "grad_accum_steps", "max_steps", "eval_every", "eval_batches", "log_every", "save_every"):
            _check(getattr(self, name) > 0, name, "must be a positive integer")
        for name in ("max_tokens", "muon_momentum_warmup_steps", "sample_tokens"):
            _check(getattr(self, name) >= 0, name, "must be >= 0")
        for name in ("muon_lr", "adamw_lr"):
            _check(getattr(self, name) > 0, name, "must be > 0")
        for name in ("time_budget", "weight_decay", "muon_weight_decay", "grad_clip"):
            _check(getattr(self, name) >= 0, name, "must be >= 0")
        _check(0.0 < self.val_fraction < 1.0, "val_fraction", "must be in (0, 1)")
        for name in ("warmup_frac", "decay_frac", "min_lr_frac"):
            _check(0.0 <= getattr(self, name) <= 1.0, name, "must be in [0, 1]")
        _check(self.warmup_frac + self.decay_frac <= 1.0, "decay_frac", "warmup_frac + decay_frac must be <= 1")
        for name in ("muon_momentum", "adamw_beta1", "adamw_beta2"):
            _check(0.0 <= getattr(self, name) < 1.0, name, "must be in [0, 1)")
        _check(self.optimizer in ("muon", "adamw"), "optimizer", "must be 'muon' or 'adamw'")
        _check(self.device in ("auto", "cuda", "mps", "cpu"), "device", "must be auto, cuda, mps or cpu")
        _check(self.dtype in ("auto", "fp32", "bf16", "fp16"), "dtype", "must be auto, fp32, bf16 or fp16")
        _check(bool(self.dataset), "dataset", "must name a hub id, a local path or 'shakespeare'")
        _check(bool(self.tokenizer), "tokenizer", "must name a hub id, a local folder, 'char' or 'bpe[:N]'")


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{name} {message}")


def _divisors(n: int) -> list:
    return [d for d in range(1, n + 1) if n % d == 0]


# Presets: named overrides of the defaults above. "t4" is the reference configuration on
# the reference hub data (what a Colab T4 runs); "cpu" is a small model on the embedded
# corpus that trains for 150 s (or 5000 steps on a fast machine) and still learns; "scale"
# is the planned scale-up (24 layers, d_model 2048, GPT-2-sized vocabulary).
PRESETS = {
    "t4": dict(),
    "cpu": dict(
        dataset="shakespeare", tokenizer="bpe:4096",
        d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=128,
        batch_size=16, max_steps=5000, time_budget=150.0, eval_every=100, eval_batches=10, save_every=500,
        muon_momentum_warmup_steps=100,
    ),
    "scale": dict(
        vocab_size=50304, d_model=2048, n_layers=24, n_heads=32, n_kv_heads=8, max_seq_len=2048,
        batch_size=8, grad_accum_steps=8, max_steps=20000, eval_every=500, save_every=1000,
        tokenizer="gpt2", muon_lr=0.01, adamw_lr=0.001,
    ),
}


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag or value in one line instead of usage + error."""

    def error(self, message):
        sys.stderr.write(f"error: {message} (see --help)\n")
        raise SystemExit(2)


def build_parser(description: str = "Train a Blueberry language model.") -> argparse.ArgumentParser:
    parser = OneLineParser(description=description,
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="named starting point (default: t4 on a CUDA GPU, cpu otherwise)")
    for cls in (ModelConfig, TrainConfig):
        group = parser.add_argument_group(cls.__name__)
        for f in fields(cls):
            kind = type(f.default)
            if kind is bool:
                group.add_argument(f"--{f.name}", type=_parse_bool, nargs="?", const=True, default=None,
                                   metavar="BOOL", help=f"(default {f.default})")
            else:
                group.add_argument(f"--{f.name}", type=kind, default=None, metavar=kind.__name__.upper(),
                                   help=f"(default {f.default})")
    return parser


def make_configs(preset: str | None = None, **overrides) -> tuple:
    """Build (ModelConfig, TrainConfig) from a preset plus field overrides; ValueError on bad input."""
    values = dict(PRESETS[preset]) if preset else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    model_names = {f.name for f in fields(ModelConfig)}
    train_names = {f.name for f in fields(TrainConfig)}
    unknown = set(values) - model_names - train_names
    if unknown:
        raise ValueError(f"unknown config field(s): {', '.join(sorted(unknown))}")
    model_cfg = ModelConfig(**{k: v for k, v in values.items() if k in model_names})
    train_cfg = TrainConfig(**{k: v for k, v in values.items() if k in train_names})
    return model_cfg, train_cfg


def parse_args(argv=None, default_preset: str | None = None) -> tuple:
    """CLI -> (ModelConfig, TrainConfig, preset name). Bad input exits with one line."""
    args = vars(build_parser().parse_args(argv))
    preset = args.pop("preset") or default_preset
    try:
        model_cfg, train_cfg = make_configs(preset, **args)
    except ValueError as e:
        sys.stderr.write(f"error: {e}\n")
        raise SystemExit(2)
    return model_cfg, train_cfg, preset


def pick_device(requested: str = "auto", index: int = 0):
    """CUDA (GPU `index`), else MPS, else CPU; a device asked for by name must exist (ValueError)."""
    import torch
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if requested in (None, "auto"):
        requested = next(kind for kind, ok in available.items() if ok)
    if not available.get(requested, False):
        raise ValueError(f"device {requested!r} is not available here; use --device auto or cpu")
    return torch.device(requested, index) if requested == "cuda" else torch.device(requested)
