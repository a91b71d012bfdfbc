"""The Blueberry decoder: a Llama-style transformer with a few well-tested upgrades.

Read top to bottom: RMSNorm, RoPE, Attention (fused QKV, GQA, QK-norm, gated output),
MLP (SwiGLU, pyramidal widths), Block (sandwich norm), Blueberry (embedding, blocks,
head, init, KV cache). Every upgrade has a `ModelConfig` switch; with attn_gate, qk_norm,
sandwich_norm, embed_scale, zero_init and depth_init off and equal ffn multipliers, this is
exactly `transformers.LlamaForCausalLM` (see `to_llama_state_dict`).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from config import ModelConfig


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 (as Hugging Face Llama does), cast back to the input dtype."""

    # Up to this many elements on CPU without grad (a decoding step: one row, or the q/k heads of one
    # token), `normalize` uses a layer norm: F.rms_norm is ~15 small ops there, F.layer_norm one kernel.
    decode_numel = 1024

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.normalize(x, self.weight)

    def normalize(self, x, weight=None):
        """The norm with `weight` as the gain, or none (QK-norm applies its own to q and k heads at once)."""
        if x.dtype != torch.float32:
            return F.rms_norm(x.float(), (x.size(-1),), None if weight is None else weight.float(), self.eps).type_as(x)
        if x.numel() <= self.decode_numel and x.is_cpu and not torch.is_grad_enabled():
            # [x, -x] has mean 0 and variance mean(x^2), so its layer norm begins with rms_norm(x).
            # (Slower than F.rms_norm on many rows, hence the size limit.)
            d = x.size(-1)
            x = F.layer_norm(torch.cat((x, -x), -1), (2 * d,), eps=self.eps)[..., :d]
            return x if weight is None else x * weight
        return F.rms_norm(x, (x.size(-1),), weight, self.eps)  # no casts on the fp32 path (they cost time at batch 1)


def linear(x, weight):
    """x @ weight.T. On CPU, a single row (batch-1 decoding) is split by output features across the
    threads as one batched product: MKL runs a lone matrix-vector product on one core, and at batch 1
    those products are memory-bound, so one core leaves half the bandwidth idle (the reference head
    takes 1.07 ms on one core, 0.55 on two).

    At batch 1 every Python-level call here is a measurable share of the step, so the test is cheap
    (x.is_cpu, not x.device, which builds an object) and x is expanded, not reshaped first."""
    n, k = weight.shape
    pieces = math.gcd(n, torch.get_num_threads())
    if not x.is_cpu or pieces == 1 or x.numel() != k or x.dim() > 3:
        return F.linear(x, weight)
    # piece i is rows i*n/pieces... of weight, transposed: a (pieces, k, n/pieces) view, no copy, any layout
    rows = weight.as_strided((pieces, k, n // pieces), (weight.stride(0) * (n // pieces), weight.stride(1), weight.stride(0)))
    return torch.bmm(x.expand(pieces, 1, k), rows).view(*x.shape[:-1], n)  # x (k), (1, k) or (1, 1, k) to every piece


class Linear(nn.Linear):
    """nn.Linear without bias whose batch-1 products on CPU use every thread (see `linear`)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__(d_in, d_out, bias=False)

    def forward(self, x):
        return linear(x, self.weight)


def rope_tables(head_dim: int, max_len: int, theta: float):
    """cos/sin tables (max_len, 1, head_dim) for rotate-half RoPE, as Hugging Face Llama builds them,
    with the sign of rotate_half folded into the first half of sin (see apply_rope). The 1 broadcasts
    over heads."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    angles = torch.outer(torch.arange(max_len).float(), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos(), angles.sin()
    sin[:, :head_dim // 2] *= -1
    return cos.unsqueeze(1), sin.unsqueeze(1)


def apply_rope(x, cos, sin):
    """x: (..., T, H, D); cos/sin: (T, 1, D). Rotate-half convention: pairs are (i, i + D/2), i.e.
    x * cos + rotate_half(x) * sin with rotate_half(x) = (-x2, x1) = roll(x, D/2) * (-1 | +1)."""
    return torch.addcmul(x * cos, x.roll(x.size(-1) // 2, dims=-1), sin)


class LinearCrossEntropy(torch.autograd.Function):
    """logits = x @ W.T and their mean cross-entropy (fp32), in one autograd node.

    `F.cross_entropy` on a (tokens x vocab) matrix allocates three more matrices of that size
    (log-softmax, its gradient, the NLL gradient); at vocab 24,576 each is hundreds of MB, and
    fresh allocations that large cost page faults on every step. Here the softmax statistics are
    computed in row chunks, and backward turns each chunk of logits into its gradient and feeds it
    straight into the two matmuls, so only the logits are ever vocab-sized. They are returned too
    (without gradient).
    """

    @staticmethod
    def forward(ctx, x, weight, targets):
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        with torch.autocast(device, enabled=False):
            x, weight = x.to(dtype), weight.to(dtype)
            logits = x @ weight.t()
            lse = torch.empty(logits.size(0), device=x.device, dtype=torch.float32)
            for rows in _row_chunks(logits):
                lse[rows] = torch.logsumexp(logits[rows].float(), dim=-1)
            valid = targets != -100
            target_logits = logits.gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1).float()
            loss = ((lse - target_logits) * valid).sum() / valid.sum()
        ctx.save_for_backward(x, weight, logits, lse, targets)
        ctx.mark_non_differentiable(logits)
        ctx.input_dtype = x.dtype
        return logits, loss

    @staticmethod
    def backward(ctx, _grad_logits, grad_loss):
        x, weight, logits, lse, targets = ctx.saved_tensors
        valid = targets != -100
        scale = (grad_loss / valid.sum()) * valid
        grad_x, grad_w = torch.empty_like(x), torch.zeros_like(weight)
        for rows in _row_chunks(logits):
            # d loss / d logits = (softmax - one_hot(target)) * scale, zero on ignored rows
            g = (logits[rows].float() - lse[rows, None]).exp_()
            g[torch.arange(g.size(0), device=g.device), targets[rows].clamp(min=0)] -= 1.0
            g = g.mul_(scale[rows, None]).to(weight.dtype)
            torch.mm(g, weight, out=grad_x[rows])
            grad_w.addmm_(g.t(), x[rows])
        return grad_x, grad_w, None


def _row_chunks(matrix):
    """Row slices of the logits. On CPU ~6M entries, small enough for the allocator to reuse
    without page faults; on a GPU ~64M (a few chunks at the reference size), since there every
    chunk costs a dozen kernel launches and launches, not memory, bound a small model's step."""
    elements = (64 << 20) if matrix.is_cuda else (6 << 20)
    step = max(1, elements // matrix.size(1))
    return [slice(i, i + step) for i in range(0, matrix.size(0), step)]


class KVCache:
    """Keys and values (n_layers, B, n_kv_heads, max_len, head_dim) for every layer; `pos` counts the tokens
    stored, and `slot` holds the same count as a tensor.

    A one-token step takes its position from `slot` (RoPE, where to write) and attends over the whole buffer
    under a mask of the filled slots. So it runs the same ops on the same shapes at every position, with no
    Python number that depends on the position: inference.py records it once as a TorchScript trace."""

    def __init__(self, keys, values, slot=None):
        self.k, self.v = keys, values
        self.layers = [(keys[i], values[i]) for i in range(keys.size(0))]  # per-layer views, made once
        self.slot = torch.zeros(1, dtype=torch.long, device=keys.device) if slot is None else slot
        self.slots = torch.arange(keys.size(3), device=keys.device).view(1, -1)  # (1, max_len): SDPA wants 2-D masks
        self.pos = 0 if slot is None or torch.jit.is_tracing() else int(slot)  # a traced step reads only slot
        self.max_len = keys.size(3)

    def update(self, layer: int, k, v):
        """Store the new k, v (B, Hkv, T, D) at the current position. Returns the keys, values and mask that
        attention needs: for several tokens the filled prefix and no mask, for one the whole buffer and the
        mask of its filled slots (see the class)."""
        keys, values = self.layers[layer]
        t = k.size(2)
        if t == 1:  # index_copy_, not narrow: narrow would read slot back, a wait on a GPU
            keys.index_copy_(2, self.slot, k.to(keys.dtype))  # (autocast can leave k in fp32)
            values.index_copy_(2, self.slot, v.to(values.dtype))
            return keys, values, self.slots <= self.slot
        keys.narrow(2, self.pos, t).copy_(k)  # narrow, not slicing: cheaper in Python
        values.narrow(2, self.pos, t).copy_(v)
        return keys.narrow(2, 0, self.pos + t), values.narrow(2, 0, self.pos + t), None

    def advance(self, t: int):
        self.pos += t
        self.slot += t  # in place: a traced step moves it too

    def reset(self):
        self.pos = 0
        self.slot.zero_()


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        # One fused projection for q, k, v and (G1) the output gate: the gate is computed from the
        # same normalized input as q, one sigmoid per head and channel. Muon orthogonalizes each
        # projection separately (muon_split).
        self.split = (q_dim, kv_dim, kv_dim) + ((q_dim,) if cfg.attn_gate else ())
        self.qkv = Linear(cfg.d_model, sum(self.split))
        self.qkv.weight.muon_split = self.split
        self.qk_split = (q_dim + kv_dim,) + self.split[2:]  # q and k as one piece (see forward)
        self.attn_gate = cfg.attn_gate
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.o_proj = Linear(q_dim, cfg.d_model)
        self.dropout = cfg.dropout

    def forward(self, x, cos, sin, cache=None, layer=0):
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        qk, v, *gate = self.qkv(x).split_with_sizes(self.qk_split, dim=-1)  # not .split: a Python wrapper
        # q and k heads side by side (B, T, H + Hkv, D): normalized and rotated together, half the small ops
        qk = qk.view(B, T, H + Hkv, D)
        if self.q_norm is not None:  # QK-norm: each head over head_dim, then the q or k gain (shared by heads)
            gains = torch.cat((self.q_norm.weight.expand(H, D), self.k_norm.weight.expand(Hkv, D)))
            qk = self.q_norm.normalize(qk) * gains
        qk = apply_rope(qk, cos, sin)
        q, k = qk.transpose(1, 2).split_with_sizes((H, Hkv), dim=1)
        v = v.view(B, T, Hkv, D).transpose(1, 2)

        start, mask = 0, None
        if cache is not None:
            start = cache.pos
            k, v, mask = cache.update(layer, k, v)
        dropout = self.dropout if self.training else 0.0
        if T == 1:
            # One new token sees every (unmasked) key, so the H / Hkv query heads that share a kv head are just
            # a batch of queries for it: each kv head is read once instead of once per query head.
            y = F.scaled_dot_product_attention(q.view(B, Hkv, H // Hkv, D), k, v, attn_mask=mask,
                                               dropout_p=dropout).view(B, H, 1, D)
        else:
            # after a cache prefix, new tokens see all of it plus the causal part of themselves
            mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start) if start else None
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=not start, dropout_p=dropout,
                                               enable_gqa=Hkv != H)
        y = y.transpose(1, 2).reshape(B, T, -1)
        if self.attn_gate:
            y = y * torch.sigmoid(gate[0])
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), with gate and up fused into one matmul."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.w_in = Linear(d_model, 2 * hidden)
        self.w_in.weight.muon_split = (hidden, hidden)
        self.down = Linear(hidden, d_model)

    def forward(self, x):
        gate, up = self.w_in(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.pre_attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.pre_mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg.d_model, cfg.ffn_hidden(layer))
        # sandwich norm: also normalize each sublayer's output before it joins the residual
        self.post_attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps) if cfg.sandwich_norm else nn.Identity()
        self.post_mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps) if cfg.sandwich_norm else nn.Identity()
        self.dropout = cfg.dropout

    def forward(self, x, cos, sin, cache=None):
        x = x + self.drop(self.post_attn_norm(self.attn(self.pre_attn_norm(x), cos, sin, cache, self.layer)))
        x = x + self.drop(self.post_mlp_norm(self.mlp(self.pre_mlp_norm(x))))
        return x

    def drop(self, h):
        """Residual dropout, in training only. A method, not an nn.Dropout: at batch 1 every module
        call is a measurable share of a decoding step."""
        return F.dropout(h, self.dropout, training=True) if self.training and self.dropout > 0 else h


class Blueberry(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else Linear(cfg.d_model, cfg.vocab_size)
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        cfg = self.cfg
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=cfg.init_std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        for i, block in enumerate(self.blocks):
            # depth-aware init: wide late MLPs start with smaller input weights
            nn.init.normal_(block.mlp.w_in.weight, mean=0.0, std=cfg.mlp_init_std(i))
            if cfg.zero_init:
                if cfg.sandwich_norm:
                    # Zero the post-norm gain, not the projection: RMSNorm of a zero vector has a
                    # 1/sqrt(eps) gradient. A zero gain still makes the block start as the identity.
                    nn.init.zeros_(block.post_attn_norm.weight)
                    nn.init.zeros_(block.post_mlp_norm.weight)
                else:
                    nn.init.zeros_(block.attn.o_proj.weight)
                    nn.init.zeros_(block.mlp.down.weight)
        if cfg.zero_init and self.lm_head is not None:
            nn.init.zeros_(self.lm_head.weight)  # uniform next-token distribution at step 0

    def make_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        max_len = max_len or self.cfg.max_seq_len
        if max_len > self.cfg.max_seq_len:
            raise ValueError(f"cache max_len {max_len} exceeds max_seq_len {self.cfg.max_seq_len}")
        weight = self.embed.weight
        dtype = torch.get_autocast_dtype(weight.device.type) if torch.is_autocast_enabled(weight.device.type) else weight.dtype
        shape = (self.cfg.n_layers, batch_size, self.cfg.n_kv_heads, max_len, self.cfg.head_dim)
        return KVCache(torch.zeros(shape, device=weight.device, dtype=dtype),
                       torch.zeros(shape, device=weight.device, dtype=dtype))

    def forward(self, idx, targets=None, cache=None):
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.cfg.max_seq_len or (cache is not None and start + T > cache.max_len):
            limit = self.cfg.max_seq_len if cache is None else min(cache.max_len, self.cfg.max_seq_len)
            raise ValueError(f"sequence of {start + T} tokens exceeds the context of {limit}")
        # a one-token step indexes with the cache's slot tensor (see KVCache)
        where = cache.slot if cache is not None and T == 1 else slice(start, start + T)
        cos, sin = self.rope_cos[where], self.rope_sin[where]

        x = self.embed(idx)
        if self.cfg.embed_scale:
            x = x * math.sqrt(self.cfg.d_model)
        for block in self.blocks:
            x = block(x, cos, sin, cache)
        if cache is not None:
            cache.advance(T)
        x = self.norm(x)
        head = self.lm_head.weight if self.lm_head is not None else self.embed.weight
        if targets is None:
            return linear(x, head)
        logits, loss = LinearCrossEntropy.apply(x.reshape(B * T, -1), head, targets.reshape(-1))
        return logits.view(B, T, -1), loss

    def num_params(self, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if not embeddings:
            n -= self.embed.weight.numel() + (self.lm_head.weight.numel() if self.lm_head is not None else 0)
        return n

    def summary(self) -> str:
        cfg = self.cfg
        widths = [cfg.ffn_hidden(i) for i in range(cfg.n_layers)]
        on = [name for name in ("embed_scale", "sandwich_norm", "qk_norm", "attn_gate", "zero_init", "depth_init",
                                "tie_embeddings") if getattr(cfg, name)]
        return (f"Blueberry: {self.num_params() / 1e6:.2f}M params ({self.num_params(False) / 1e6:.2f}M without "
                f"embeddings) | {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads / "
                f"{cfg.n_kv_heads} kv, context {cfg.max_seq_len}, vocab {cfg.vocab_size} | "
                f"MLP widths {widths} | {', '.join(on) or 'plain Llama'}")


# ----------------------------------------------------------------------------------------
# Hugging Face Llama interop: one mapping, used by the equivalence test and for export.

def llama_config(cfg: ModelConfig):
    """A `transformers.LlamaConfig` with the same dimensions (uniform MLP: ffn_mult_first)."""
    from transformers import LlamaConfig
    return LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_hidden(0),
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, mlp_bias=False,
        initializer_range=cfg.init_std)


def to_llama_state_dict(model: Blueberry) -> dict:
    """Blueberry weights under Hugging Face Llama names (Llama-equivalent switches only)."""
    cfg = model.cfg
    unsupported = [name for name in ("embed_scale", "sandwich_norm", "qk_norm", "attn_gate") if getattr(cfg, name)]
    if unsupported or cfg.ffn_mult_first != cfg.ffn_mult_last:
        raise ValueError(f"Llama has no equivalent for {unsupported or ['a pyramidal MLP']}; switch it off first")
    q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    sd = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight}
    if model.lm_head is not None:
        sd["lm_head.weight"] = model.lm_head.weight
    for i, block in enumerate(model.blocks):
        p = f"model.layers.{i}."
        q, k, v = block.attn.qkv.weight.split((q_dim, kv_dim, kv_dim))
        gate, up = block.mlp.w_in.weight.chunk(2)
        sd.update({
            p + "input_layernorm.weight": block.pre_attn_norm.weight,
            p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v,
            p + "self_attn.o_proj.weight": block.attn.o_proj.weight,
            p + "post_attention_layernorm.weight": block.pre_mlp_norm.weight,
            p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
            p + "mlp.down_proj.weight": block.mlp.down.weight,
        })
    return {name: t.detach().clone().contiguous() for name, t in sd.items()}
