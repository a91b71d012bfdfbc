"""Hugging Face Llama <-> Blueberry: one mapping, both ways.

With config.LLAMA_SWITCHES and a uniform MLP, Blueberry computes what transformers' LlamaForCausalLM
computes (tested logit for logit). These functions translate the settings and the weight names:
export_hf.py writes such a run as a plain LlamaForCausalLM, and checkpoint.load_pretrained
(--init_from) reads a Llama into Blueberry.
"""

import math

import torch

from config import LLAMA_SWITCHES, ModelConfig


def llama_config(cfg: ModelConfig):
    """A `transformers.LlamaConfig` with the same dimensions (uniform MLP: ffn_mult_first)."""
    from transformers import LlamaConfig
    return LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_hidden(0),
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, mlp_bias=False,
        initializer_range=cfg.init_std)


def from_llama_config(hf) -> ModelConfig:
    """The inverse of llama_config: the Blueberry settings (LLAMA_SWITCHES, a uniform MLP) of a transformers
    LlamaConfig. ValueError naming the first thing Blueberry cannot compute the same way."""
    if getattr(hf, "model_type", None) != "llama":
        raise ValueError(f"architecture {'/'.join(hf.architectures or []) or hf.model_type} is not Llama "
                         f"(LlamaForCausalLM); Blueberry imports Llama checkpoints only")
    # transformers 5 keeps the RoPE settings in rope_parameters, 4.x in rope_theta + rope_scaling
    rope = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    unsupported = [
        (rope_type != "default", f"rope scaling {rope_type!r}"),
        (getattr(hf, "attention_bias", False), "attention_bias"), (getattr(hf, "mlp_bias", False), "mlp_bias"),
        (hf.hidden_act != "silu", f"hidden_act {hf.hidden_act!r}"),
        (head_dim * hf.num_attention_heads != hf.hidden_size, f"head_dim {head_dim} != hidden_size / heads"),
    ]
    for present, name in unsupported:
        if present:
            raise ValueError(f"Blueberry has no {name}")
    # One MLP width for every block: multiple_of = that width, so the rounding in ffn_hidden cannot change it
    # (nextafter keeps d_model * mult / width from landing a hair above 1 in floating point).
    hidden = hf.intermediate_size
    mult = hidden / hf.hidden_size
    while math.ceil(hf.hidden_size * mult / hidden) > 1:
        mult = math.nextafter(mult, 0.0)
    return ModelConfig(
        vocab_size=hf.vocab_size, d_model=hf.hidden_size, n_layers=hf.num_hidden_layers,
        n_heads=hf.num_attention_heads, n_kv_heads=hf.num_key_value_heads or hf.num_attention_heads,
        max_seq_len=hf.max_position_embeddings, rope_theta=float(rope.get("rope_theta", getattr(hf, "rope_theta", 1e4))),
        ffn_mult_first=mult, ffn_mult_last=mult, multiple_of=hidden, norm_eps=hf.rms_norm_eps,
        init_std=hf.initializer_range, tie_embeddings=bool(hf.tie_word_embeddings), **LLAMA_SWITCHES)


def llama_weight_names(cfg: ModelConfig) -> dict:
    """Blueberry weight name -> the Llama weight names it holds, in order: the fused qkv and w_in stack Llama's
    separate projections along dim 0; every other weight is one Llama weight under another name."""
    names = {"embed.weight": ["model.embed_tokens.weight"], "norm.weight": ["model.norm.weight"]}
    if not cfg.tie_embeddings:
        names["lm_head.weight"] = ["lm_head.weight"]
    for i in range(cfg.n_layers):
        b, p = f"blocks.{i}.", f"model.layers.{i}."
        names.update({
            b + "pre_attn_norm.weight": [p + "input_layernorm.weight"],
            b + "attn.qkv.weight": [p + f"self_attn.{x}_proj.weight" for x in "qkv"],
            b + "attn.o_proj.weight": [p + "self_attn.o_proj.weight"],
            b + "pre_mlp_norm.weight": [p + "post_attention_layernorm.weight"],
            b + "mlp.w_in.weight": [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"],
            b + "mlp.down.weight": [p + "mlp.down_proj.weight"],
        })
    return names


def to_llama_state_dict(model) -> dict:
    """A Blueberry model's weights under Hugging Face Llama names (Llama-equivalent switches only)."""
    unsupported = model.cfg.non_llama_features()
    if unsupported:
        raise ValueError(f"Llama has no equivalent for {', '.join(unsupported)}; switch it off first")
    params, splits = dict(model.named_parameters()), model.muon_splits()
    sd = {}
    for name, llama_names in llama_weight_names(model.cfg).items():
        weight = params[name].detach()
        # a fused weight splits into its projections where Muon splits it: (q, k, v) or (gate, up)
        sd.update(zip(llama_names, weight.split(splits.get(name, weight.size(0)))))
    return {name: t.clone().contiguous() for name, t in sd.items()}


def from_llama_state_dict(llama: dict, cfg: ModelConfig) -> dict:
    """The inverse of to_llama_state_dict: a LlamaForCausalLM state dict -> Blueberry's, for cfg = from_llama_config."""
    return {name: torch.cat([llama[n] for n in names]) for name, names in llama_weight_names(cfg).items()}
