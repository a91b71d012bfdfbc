"""Blueberry configuration: the model, training and sampling dataclasses, presets, and the CLI.

Every field of `ModelConfig` and `TrainConfig` can be set from the command line, and
`--help` describes each one with the default this run would use:

    python run_train.py --preset cpu --d_model 192 --max_steps 500 --compile true

Edit the defaults here to scale up; the presets below are starting points. The README's
configuration table is `python config.py --markdown`.
"""

import argparse
import dataclasses
import math
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path


def option(default, help: str, choices: tuple | None = None, kind=None, shown: str | None = None):
    """A dataclass field that documents itself: `help` and `choices` feed --help and the README table;
    `kind` is the value type where the default (None) cannot tell it, and `shown` what --help says in place of the
    default (where the default is None, or is not what a run uses)."""
    return field(default=default, metadata={"help": help, "choices": choices, "kind": kind, "shown": shown})


@dataclass
class ModelConfig:
    # sizes (the reference configuration: 21.9M parameters, 4.1M without the embeddings and the bigram table)
    vocab_size: int = option(24576, "vocabulary size; always the tokenizer's, set at run time",
                             shown="the tokenizer's (--tokenizer)")
    d_model: int = option(256, "width of the residual stream")
    n_layers: int = option(8, "number of transformer blocks")
    n_heads: int = option(8, "query heads (must divide d_model; head_dim = d_model / n_heads must be even)")
    n_kv_heads: int = option(2, "key/value heads for grouped-query attention (must divide n_heads)")
    max_seq_len: int = option(256, "context length in tokens")
    rope_theta: float = option(10000.0, "RoPE base")
    ffn_mult_first: float = option(1.25, "MLP width of the first block, in multiples of d_model")
    ffn_mult_last: float = option(3.0, "MLP width of the last block (equal to first: a uniform MLP)")
    multiple_of: int = option(64, "MLP widths are rounded up to a multiple of this")
    norm_eps: float = option(1e-6, "RMSNorm epsilon")
    dropout: float = option(0.0, "dropout on attention and sublayer outputs")
    init_std: float = option(0.02, "std of the normal init of linear and embedding weights")
    init_std_first: float = option(0.02, "std of the first block's MLP input weights (depth-aware init)")
    init_std_last: float = option(0.01, "std of the last block's MLP input weights")
    # feature switches: see LLAMA_SWITCHES for the set that turns them into plain Llama
    tie_embeddings: bool = option(False, "share the input embedding with the output head")
    embed_scale: bool = option(True, "multiply token embeddings by sqrt(d_model)")
    sandwich_norm: bool = option(True, "RMSNorm after each sublayer as well as before")
    qk_norm: bool = option(True, "RMSNorm over head_dim on queries and keys")
    attn_gate: bool = option(True, "gated attention (G1): sigmoid gate on the attention output")
    zero_init: bool = option(True, "blocks start as the identity, the head at zero")
    depth_init: bool = option(True, "MLP input std falls with depth from init_std_first to init_std_last")
    # 2026 recipe switches (nanochat, modded-nanogpt): on where the race and `python bench.py ablate` showed a win
    # (BENCHMARKS.md, recipe), else off
    mlp: str = option("relu2", "MLP kind: `relu2` (down(relu(x W)^2), one input matrix) or `swiglu` (down(silu(x G) "
                      "* x U))",
                      choices=("swiglu", "relu2"))
    value_embeds: bool = option(False, "gated value embeddings: every other block (the last always) adds a per-token "
                                "embedding to its values, gated per kv head")
    resid_lambdas: bool = option(False, "learnable residual/x0 lambdas: before block i, x = a_i x + b_i x0 (x0: the "
                                 "input embedding)")
    bigram_buckets: int = option(20480, "bigram hash embedding (modded-nanogpt): a table of this many rows, indexed by a "
                                 "hash of each token and the one before it, mixed into the stream before every "
                                 "block with a learned weight per block (0 = off)")
    logit_softcap: float = option(0.0, "squash the logits to (-c, c) with c tanh(logits / c) (0 = off; nanochat: 15)")

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "max_seq_len", "multiple_of"):
            _check(getattr(self, name) > 0, name, "must be a positive integer")
        for name in ("rope_theta", "ffn_mult_first", "ffn_mult_last", "norm_eps", "init_std", "init_std_first",
                     "init_std_last"):
            _check(getattr(self, name) > 0, name, "must be > 0")
        _check(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        _check(self.logit_softcap >= 0, "logit_softcap", "must be >= 0 (0 = off)")
        _check(self.bigram_buckets == 0 or self.bigram_buckets >= 2, "bigram_buckets",
               "must be 0 (off) or at least 2 (one row is kept for a sequence's first token)")
        _check_choices(self)
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
        """Hidden width of block `layer`'s MLP (pyramidal, rounded up to multiple_of)."""
        frac = layer / (self.n_layers - 1) if self.n_layers > 1 else 0.0
        mult = self.ffn_mult_first + (self.ffn_mult_last - self.ffn_mult_first) * frac
        return self.multiple_of * math.ceil(self.d_model * mult / self.multiple_of)

    def mlp_init_std(self, layer: int) -> float:
        """Std of block `layer`'s MLP input weights: falls linearly with depth (depth-aware init)."""
        if not self.depth_init:
            return self.init_std
        frac = layer / (self.n_layers - 1) if self.n_layers > 1 else 0.0
        return self.init_std_first + (self.init_std_last - self.init_std_first) * frac

    def non_llama_features(self) -> list:
        """The switches that make this model compute something plain Llama cannot ([] = Llama architecture).
        The init switches (zero_init, depth_init) only choose starting values, so they do not count."""
        on = [name for name, value in LLAMA_SWITCHES.items() if name not in INIT_SWITCHES and getattr(self, name) != value]
        if len({self.ffn_hidden(i) for i in range(self.n_layers)}) > 1:
            on.append("pyramidal MLP (ffn_mult_first != ffn_mult_last)")
        return on


# The 2026 recipe switches, off. A saved config that lacks one predates it: it loads with the switch off,
# whatever today's default (saved_model_config).
RECIPE_OFF = dict(mlp="swiglu", value_embeds=False, resid_lambdas=False, bigram_buckets=0, logit_softcap=0.0)
# With these switches and a uniform MLP (`llama_equivalent`), Blueberry is transformers' LlamaForCausalLM:
# the same function of the same weights (tested), initialized the way Llama is.
LLAMA_SWITCHES = dict(embed_scale=False, sandwich_norm=False, qk_norm=False, attn_gate=False,
                      zero_init=False, depth_init=False, **RECIPE_OFF)
INIT_SWITCHES = ("zero_init", "depth_init")


def saved_model_config(fields: dict) -> ModelConfig:
    """The ModelConfig of a saved model (config.json, an export's `blueberry`): the fields it has, and a recipe
    switch it was saved before off."""
    return ModelConfig(**{**RECIPE_OFF, **fields})


def llama_equivalent(cfg: ModelConfig, **overrides) -> ModelConfig:
    """cfg as plain Llama: every feature switch off and a uniform MLP of the first block's width."""
    return dataclasses.replace(cfg, **{**LLAMA_SWITCHES, "ffn_mult_last": cfg.ffn_mult_first, **overrides})


@dataclass
class TrainConfig:
    # data (see data.py)
    dataset: str = option("Hosseinlack123/Blueberry-testdataset",
                          "hub dataset id, local file or folder, or `shakespeare` (embedded)")
    tokenizer: str = option("Hosseinlack123/Blueberry-testtokenizer", "hub id or local folder, `char`, `bpe` or `bpe:N`")
    text_column: str = option("text", "column holding the text in JSONL/Parquet/CSV/hub data")
    val_fraction: float = option(0.01, "share of the data held out for validation when there is no validation split")
    max_tokens: int = option(0, "cap on tokens read from the source (0 = all)")
    cache_dir: str = option("data_cache", "where tokenizers and token caches are stored")
    thinking: bool = option(True, "conversations: keep the assistant's steps (`thinking`); false trains on answers only")
    # optimization
    batch_size: int = option(32, "sequences per micro-batch per process")
    grad_accum_steps: int = option(1, "micro-batches per optimizer step")
    max_steps: int = option(3000, "optimizer steps (the run ends at max_steps or time_budget, whichever comes first)")
    time_budget: float = option(0.0, "seconds of training; > 0 runs the schedule on wall time and ends on time")
    warmup_frac: float = option(0.02, "share of the run spent warming the learning rate up")
    decay_frac: float = option(0.5, "share of the run at the end spent decaying it linearly")
    min_lr_frac: float = option(0.0, "learning rate at the end of the decay, as a share of the peak")
    optimizer: str = option("muon", "`muon` (Muon for hidden matrices + AdamW) or `adamw` (AdamW for everything)",
                            choices=("muon", "adamw"))
    muon_lr: float = option(0.02, "Muon learning rate")
    muon_momentum: float = option(0.95, "Muon (Nesterov) momentum")
    muon_momentum_warmup_steps: int = option(300, "steps over which momentum ramps from 0.85 (0 = off)")
    muon_weight_decay: float = option(0.05, "Muon decoupled weight decay")
    muon_polar_express: bool = option(False, "Muon orthogonalizes with Polar Express's per-step coefficients instead "
                                      "of the fixed quintic")
    normuon: bool = option(False, "NorMuon: each neuron of Muon's update divided by its running RMS, the update's "
                           "norm kept (not under --parallel fsdp yet)")
    cautious_weight_decay: bool = option(False, "Muon's weight decay only where the update moves a weight toward zero")
    adamw_lr: float = option(0.003, "AdamW learning rate (embeddings, head, norms)")
    adamw_beta1: float = option(0.9, "AdamW beta1")
    adamw_beta2: float = option(0.95, "AdamW beta2")
    weight_decay: float = option(0.1, "AdamW weight decay (matrices only, not norms)")
    grad_clip: float = option(1.0, "max global gradient norm (0 = off)")
    # evaluation, logging, checkpoints
    eval_every: int = option(250, "steps between evaluations")
    eval_batches: int = option(20, "batches in each evaluation (the final one covers a small validation split whole)")
    eval_answers: int = option(100, "held-out problems answered greedily at each evaluation (`arithmetic` data; 0 = "
                               "none)")
    log_every: int = option(10, "steps between log lines")
    save_every: int = option(1000, "steps between checkpoints")
    out_dir: str = option("out", "output folder")
    resume: bool = option(False, "continue from the checkpoint in out_dir")
    overwrite: bool = option(False, "replace the run already in out_dir (at this run's first checkpoint, so a run that "
                             "fails before it keeps the old one whole)")
    init_from: str = option("", "start from these weights and tokenizer: a run's out_dir, or a Hugging Face Llama "
                            "folder or hub id (the model settings come from it; optimizers start fresh; empty = "
                            "from scratch)")
    sample_tokens: int = option(200, "length of the sample printed at the end (0 = none)")
    report_to: str = option("none", "also log every metrics row to this experiment tracker (its package must be "
                            "installed)", choices=("none", "tensorboard", "wandb"))
    # runtime
    seed: int = option(1337, "random seed (weights, batches)")
    device: str = option("auto", "where to train (auto: CUDA, else MPS, else CPU)", choices=("auto", "cuda", "mps", "cpu"))
    dtype: str = option("auto", "`auto` (bf16 where native, fp16 + grad scaler on older GPUs, else fp32), or one "
                        "precision", choices=("auto", "fp32", "bf16", "fp16"))
    compile: bool = option(False, "`torch.compile` the model")
    threads: int = option(0, "CPU threads for training (0 = auto: one per core that other work is not already "
                          "using, by the load average)")
    parallel: str = option("ddp", "how torchrun spreads the model: `ddp` (every process holds all of it) or `fsdp` "
                           "(weights, gradients and optimizer state sharded across processes; also in one)",
                           choices=("ddp", "fsdp"))
    activation_checkpointing: bool = option(False, "recompute each block in the backward pass instead of keeping its "
                                            "activations (less memory, ~1/3 more compute; same losses)")
    reduce_every_micro_batch: bool = option(False, "fsdp with grad_accum_steps > 1: reduce-scatter each micro-batch's "
                                            "gradients, which then stay sharded (less memory, more communication), "
                                            "instead of holding them whole until the step's last")

    def __post_init__(self):
        for name in ("batch_size", "grad_accum_steps", "eval_batches"):
            _check(getattr(self, name) > 0, name, "must be a positive integer")
        for name in ("max_tokens", "sample_tokens"):
            _check(getattr(self, name) >= 0, name, "must be >= 0")
        _check(0.0 < self.val_fraction < 1.0, "val_fraction", "must be in (0, 1)")
        _check_run(self)
        _check(bool(self.dataset), "dataset", "must name a hub id, a local path or 'shakespeare'")
        _check(bool(self.tokenizer), "tokenizer", "must name a hub id, a local folder, 'char' or 'bpe[:N]'")


@dataclass
class SampleConfig:
    """How inference.py samples (the prompt itself is chosen on its command line)."""
    out_dir: str = option("out", "the run to load: a folder written by run_train.py")
    max_new_tokens: int = option(256, "tokens to generate per answer")
    temperature: float = option(0.8, "sampling temperature (0 = greedy)")
    top_k: int = option(50, "sample among the k most likely tokens (0 = off)")
    top_p: float = option(0.9, "nucleus sampling: the smallest set of tokens reaching this probability (1 = off)")
    repetition_penalty: float = option(1.0, "> 1 discourages tokens already seen (1 = off)")
    seed: int | None = option(None, "makes the samples reproducible", kind=int, shown="a fresh seed each run")
    device: str = option("auto", "where to run (auto: CUDA, else MPS, else CPU)", choices=("auto", "cuda", "mps", "cpu"))
    dtype: str = option("auto", "`auto` (bf16 where native, fp16 on older GPUs, else fp32), or one precision",
                        choices=("auto", "fp32", "bf16", "fp16"))
    hide_thinking: bool = option(False, "chat models: do not show the thinking steps, only the answer")
    verbose: bool = option(False, "print the model and tokens/s to stderr")

    def __post_init__(self):
        _check(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        _check(self.temperature >= 0, "temperature", "must be >= 0 (0 = greedy)")
        _check(self.top_k >= 0, "top_k", "must be >= 0 (0 = off)")
        _check(0 < self.top_p <= 1, "top_p", "must be in (0, 1] (1 = off)")
        _check(self.repetition_penalty > 0, "repetition_penalty", "must be > 0 (1 = off)")
        _check_choices(self)


@dataclass
class ServeConfig:
    """How serve.py serves a run (the sampling settings come with each request)."""
    out_dir: str = option("out", "the run to serve: a folder written by run_train.py")
    host: str = option("127.0.0.1", "address to listen on (0.0.0.0: every interface, reachable from other machines)")
    port: int = option(8000, "port to listen on (0: any free port, printed at start)")
    max_batch: int = option(16, "requests decoded together in the running batch")
    max_queue: int = option(64, "requests that may wait for a row of the batch; past that a request gets 429")
    api_key: str = option("", "require `Authorization: Bearer KEY` on /v1/ (empty = no key)")
    model_name: str = option("", "the model's id in the API (empty = the out_dir folder's name)")
    device: str = option("auto", "where to run (auto: CUDA, else MPS, else CPU)", choices=("auto", "cuda", "mps", "cpu"))
    dtype: str = option("auto", "`auto` (bf16 where native, fp16 on older GPUs, else fp32), or one precision",
                        choices=("auto", "fp32", "bf16", "fp16"))

    def __post_init__(self):
        _check(0 <= self.port <= 65535, "port", "must be in [0, 65535] (0 = any free port)")
        _check(self.max_batch >= 1, "max_batch", "must be >= 1")
        _check(self.max_queue >= 0, "max_queue", "must be >= 0")
        _check(bool(self.host), "host", "must name an address, e.g. 127.0.0.1")
        _check_choices(self)


def like(name: str, default=dataclasses.MISSING):
    """TrainConfig's field `name` for another config: its help and choices, and its default unless given."""
    f = TrainConfig.__dataclass_fields__[name]
    return option(f.default if default is dataclasses.MISSING else default, **f.metadata)


@dataclass
class RLConfig:
    """How run_rl.py improves a chat model by reinforcement learning on checkable answers (GRPO). The optimizer,
    schedule and run fields mean what they mean in TrainConfig; the learning rates are a fraction of fine-tuning's."""
    # what to learn from
    init_from: str = option("", "the chat model to start from: a run's out_dir fine-tuned on conversations (a "
                            "Blueberry run or a Hugging Face folder with the chat format)")
    dataset: str = option("arithmetic", "problems with checkable answers: `arithmetic`, `arithmetic:hard` or "
                          "`arithmetic:terse` (built-in), or a local or hub dataset with `question` and `answer` "
                          "columns (GSM8K's `#### answer`) or `messages` whose last assistant turn is the answer")
    reward: str = option("rewards:reward", "the reward of a completion, as module:function(problem, completion) -> "
                         "float (default: 1 for the right final answer, else 0)")
    cache_dir: str = like("cache_dir")
    # GRPO
    group_size: int = option(8, "completions sampled per prompt (G); each one's advantage is its reward minus its "
                             "group's mean")
    prompts_per_step: int = option(16, "prompts per step, per process")
    max_new_tokens: int = option(256, "longest completion in tokens (and at most what the context leaves)")
    temperature: float = option(1.0, "sampling temperature of the completions")
    top_k: int = option(0, "sample among the k most likely tokens (0 = all: the policy itself)")
    scale_rewards: bool = option(False, "also divide each advantage by its group's reward std (GRPO as published)")
    kl_coef: float = option(0.0, "weight of a KL penalty to the starting model (0: none; the kl column is then "
                            "measured on logged steps only)")
    ppo_epochs: int = option(1, "optimizer passes over each step's samples; from the second on, the probability "
                             "ratios are clipped")
    clip_eps: float = option(0.2, "PPO clip range: ratios outside [1 - clip_eps, 1 + clip_eps] give no gradient")
    batch_size: int = option(32, "sequences per micro-batch of the policy-gradient pass (memory; not the step size)")
    # optimization (TrainConfig's fields)
    max_steps: int = like("max_steps", 200)
    time_budget: float = like("time_budget")
    warmup_frac: float = like("warmup_frac", 0.0)
    decay_frac: float = like("decay_frac", 0.5)
    min_lr_frac: float = like("min_lr_frac")
    optimizer: str = like("optimizer")
    muon_lr: float = like("muon_lr", 0.001)
    muon_momentum: float = like("muon_momentum")
    muon_momentum_warmup_steps: int = like("muon_momentum_warmup_steps", 0)
    muon_weight_decay: float = like("muon_weight_decay", 0.0)
    adamw_lr: float = like("adamw_lr", 0.0001)
    adamw_beta1: float = like("adamw_beta1")
    adamw_beta2: float = like("adamw_beta2")
    weight_decay: float = like("weight_decay", 0.0)
    grad_clip: float = like("grad_clip")
    # evaluation, logging, checkpoints
    eval_every: int = like("eval_every", 25)
    eval_answers: int = option(100, "held-out problems answered greedily at each evaluation (pass_at_1)")
    log_every: int = like("log_every", 5)
    save_every: int = like("save_every", 100)
    out_dir: str = like("out_dir", "out_rl")
    resume: bool = like("resume")
    overwrite: bool = like("overwrite")
    report_to: str = like("report_to")
    # runtime
    seed: int = like("seed")
    device: str = like("device")
    dtype: str = like("dtype")
    compile: bool = like("compile")
    threads: int = like("threads")
    parallel: str = option("ddp", "how torchrun spreads the model: `ddp` (every process holds all of it and samples "
                           "its own prompts; RL does not shard yet)", choices=("ddp",))
    activation_checkpointing: bool = like("activation_checkpointing")

    def __post_init__(self):
        _check(self.group_size >= 2, "group_size", "must be >= 2: each sample is judged against the others of its "
               "group")
        for name in ("prompts_per_step", "max_new_tokens", "ppo_epochs", "batch_size"):
            _check(getattr(self, name) > 0, name, "must be a positive integer")
        _check(self.temperature > 0, "temperature", "must be > 0 (RL learns from samples, not greedy replies)")
        for name in ("top_k", "kl_coef"):
            _check(getattr(self, name) >= 0, name, "must be >= 0")
        _check(0 < self.clip_eps < 1, "clip_eps", "must be in (0, 1)")
        _check(":" in self.reward, "reward", "must be module:function, e.g. rewards:reward")
        _check_run(self)


def _check_run(cfg) -> None:
    """The checks of the fields a training run and an RL run share: schedule, optimizers, evaluation, logging."""
    for name in ("max_steps", "eval_every", "log_every", "save_every"):
        _check(getattr(cfg, name) > 0, name, "must be a positive integer")
    for name in ("muon_momentum_warmup_steps", "eval_answers"):
        _check(getattr(cfg, name) >= 0, name, "must be >= 0")
    for name in ("muon_lr", "adamw_lr"):
        _check(getattr(cfg, name) > 0, name, "must be > 0")
    for name in ("time_budget", "weight_decay", "muon_weight_decay", "grad_clip"):
        _check(getattr(cfg, name) >= 0, name, "must be >= 0")
    for name in ("warmup_frac", "decay_frac", "min_lr_frac"):
        _check(0.0 <= getattr(cfg, name) <= 1.0, name, "must be in [0, 1]")
    _check(cfg.warmup_frac + cfg.decay_frac <= 1.0, "decay_frac", "warmup_frac + decay_frac must be <= 1")
    for name in ("muon_momentum", "adamw_beta1", "adamw_beta2"):
        _check(0.0 <= getattr(cfg, name) < 1.0, name, "must be in [0, 1)")
    _check_choices(cfg)


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{name} {message}")


def _check_choices(cfg) -> None:
    for f in fields(cfg):
        choices = f.metadata.get("choices")
        _check(not choices or getattr(cfg, f.name) in choices, f.name, f"must be one of {', '.join(choices or ())}")


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
    "stepwise": dict(  # the Stepwise Think demo: the cpu model fine-tuned from scratch on the arithmetic set; a step
        # budget, not a time budget, so a busy machine takes longer but learns as much (1,200 steps: >= 90% held out)
        dataset="arithmetic", tokenizer="bpe:4096",
        d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=128,
        batch_size=16, max_steps=1200, time_budget=0.0, eval_every=200, eval_batches=10, save_every=600,
        muon_momentum_warmup_steps=100,
    ),
    "scale": dict(
        vocab_size=50304, d_model=2048, n_layers=24, n_heads=32, n_kv_heads=8, max_seq_len=2048,
        # the MLP it was sized and memory-planned with (the README's table), and no bigram table; the recipe race
        # that made ReLU², narrower widths and the bigram table the defaults ran at 1-6M parameters, far from 1.39B
        mlp="swiglu", ffn_mult_first=1.5, ffn_mult_last=4.0, bigram_buckets=0,
        batch_size=8, grad_accum_steps=8, max_steps=20000, eval_every=500, save_every=1000,
        tokenizer="gpt2", muon_lr=0.01, adamw_lr=0.001, parallel="fsdp", activation_checkpointing=True,
        reduce_every_micro_batch=True,  # whole fp32 gradients (+5.2 GiB per GPU) would not fit two T4s
        # The token budget: ~20 tokens per parameter (Chinchilla) for 1.39B parameters is ~28B tokens, 56 GB
        # of uint16 (GPT-2's 50,257 tokens fit) read from a streamed corpus that stops at the cap. The run
        # draws 20,000 x 8 x 8 x 2048 = 2.6B tokens per GPU: 21B on 8 GPUs, 42B on 16 (~1.5 passes).
        # 0.1% held out is 28M validation tokens, far more than an evaluation reads.
        max_tokens=28_000_000_000, val_fraction=0.001,
    ),
}


def default_preset() -> str:
    """t4 (the reference configuration) where a CUDA GPU is visible, cpu otherwise."""
    import torch
    return "t4" if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------- the command line

def parse_bool(text: str) -> bool:
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


def add_fields(group, cls, defaults: dict | None = None) -> None:
    """One --FIELD flag per field of dataclass `cls`, described by its help, choices and the default that
    applies (`defaults` overrides the class's, e.g. a preset's). Flags default to None: 'not given'."""
    for f in fields(cls):
        value = (defaults or {}).get(f.name, f.default)
        meta = f.metadata
        kind = meta.get("kind") or type(f.default)
        shown = meta.get("shown") or value
        if kind is bool:
            group.add_argument(f"--{f.name}", type=parse_bool, nargs="?", const=True, metavar="BOOL",
                               help=f"{meta['help']} (default: {str(value).lower()})")
        else:
            group.add_argument(f"--{f.name}", type=kind, choices=meta.get("choices"), metavar=kind.__name__.upper()
                               if not meta.get("choices") else None, help=f"{meta['help']} (default: {shown})")


def uses_presets(classes) -> bool:
    """Do the presets apply to these dataclasses? They are the model and training configs' (RLConfig shares field
    names with TrainConfig, but starts from a model whose settings come with it)."""
    return any(cls in (ModelConfig, TrainConfig) for cls in classes)


def build_parser(classes, preset: str | None, default: str | None, description: str, options=None) -> OneLineParser:
    """A parser with one --FIELD flag per field of each dataclass in `classes`, and --preset when presets apply to
    them (--help then shows the values of `preset`; `default` is the one this machine picks). `options(parser)`
    adds a script's own flags."""
    parser = OneLineParser(description=description,
                           epilog=f"Defaults shown are the {preset} preset's." if preset else None)
    if preset:
        parser.add_argument("--preset", choices=sorted(PRESETS),
                            help=f"named starting point: t4 (the reference configuration), cpu (a small model on the "
                                 f"embedded corpus, a 150 s run), stepwise (the cpu model learns arithmetic in steps, "
                                 f"1,200 steps) or scale (1.39B parameters) (default: {default} on this machine)")
    if options:
        options(parser)
    for cls in classes:
        add_fields(parser.add_argument_group(cls.__name__) if len(classes) > 1 else parser, cls,
                   PRESETS[preset] if preset else None)
    return parser


def make_configs(preset: str | None = None, classes=(ModelConfig, TrainConfig), **overrides) -> tuple:
    """One config per dataclass in `classes` (default (ModelConfig, TrainConfig)) from a preset plus field
    overrides; ValueError on bad input."""
    values = dict(PRESETS[preset]) if preset else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    names = [{f.name for f in fields(cls)} for cls in classes]
    unknown = set(values).difference(*names)
    if unknown:
        raise ValueError(f"unknown config field(s): {', '.join(sorted(unknown))}")
    return tuple(cls(**{k: v for k, v in values.items() if k in known}) for cls, known in zip(classes, names))


def parse_args(argv=None, description: str = "Train a Blueberry language model.", classes=(ModelConfig, TrainConfig),
               options=None) -> tuple:
    """The one command line of every script: CLI -> (one config per dataclass in `classes`, ..., preset name or
    None, given), where `given` holds every flag given on the command line ({name: value}, "preset" among them
    when it was given) and the values of the script's own `options` flags. Bad input exits with one line."""
    argv = sys.argv[1:] if argv is None else list(argv)
    preset = default = None
    if uses_presets(classes):
        first = OneLineParser(add_help=False)
        first.add_argument("--preset", choices=sorted(PRESETS))
        known, _ = first.parse_known_args(argv)
        default = default_preset()
        preset = known.preset or default
    parser = build_parser(classes, preset, default, description, options)
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    field_names = {f.name for cls in classes for f in fields(cls)}
    try:
        configs = make_configs(preset, classes, **{k: v for k, v in given.items() if k in field_names})
    except ValueError as e:
        sys.stderr.write(f"error: {e}\n")
        raise SystemExit(2)
    return (*configs, preset, given)


def markdown_table() -> str:
    """The README's configuration table, from the dataclasses (the t4 preset: the class defaults)."""
    rows = ["| field | default | meaning |", "| --- | --- | --- |"]
    for cls in (ModelConfig, TrainConfig):
        for f in fields(cls):
            choices = f.metadata.get("choices")
            meaning = f.metadata["help"] + (f" (one of {', '.join(choices)})" if choices else "")
            rows.append(f"| `{f.name}` | `{f.default}` | {meaning} |")
    return "\n".join(rows)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--memory"]:  # the memory planner: memory.py is its script (it imports this module)
        import subprocess
        sys.exit(subprocess.run([sys.executable, str(Path(__file__).with_name("memory.py")), *sys.argv[2:]]).returncode)
    elif sys.argv[1:] == ["--markdown"]:
        print(markdown_table())
    else:
        sys.exit("usage: python config.py --markdown (the README's configuration table) | --memory [--preset P] "
                 "[--FIELD V ...] [--nproc N] (memory per GPU, ddp and fsdp)")
