"""The Blueberry decoder: a Llama-style transformer with a few well-tested upgrades.

Read top to bottom: RMSNorm, RoPE, the fused head + loss, the KV cache, Attention (fused QKV, GQA, QK-norm, gated
output), MLP (SwiGLU, pyramidal widths), Block (sandwich norm), Blueberry (embedding, blocks,
head, init). Every upgrade has a `ModelConfig` switch; with config.LLAMA_SWITCHES and equal ffn
multipliers this is exactly `transformers.LlamaForCausalLM` (llama.py maps the weights).
"""

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # in a folder written by export_hf.py, transformers imports this file as part of a package, next to config.py
    from .config import ModelConfig
except ImportError:  # in the repository: a top-level module
    from config import ModelConfig


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm computed in fp32, as Hugging Face Llama computes it, and returned in the input's dtype:
    under autocast the input arrives in bf16 or fp16, and an inference model may hold bf16 gains."""

    def forward(self, x):
        return F.rms_norm(x.float(), self.normalized_shape, self.weight.float(), self.eps).type_as(x)


def rope_tables(head_dim: int, max_len: int, theta: float):
    """cos/sin tables (max_len, 1, head_dim) for rotate-half RoPE, as Hugging Face Llama builds them, with the
    sign of rotate_half folded into the first half of sin (see apply_rope). The 1 broadcasts over heads."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    angles = torch.outer(torch.arange(max_len).float(), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos(), angles.sin()
    sin[:, :head_dim // 2] *= -1
    return cos.unsqueeze(1), sin.unsqueeze(1)


def apply_rope(x, cos, sin):
    """x: (B, T, H, D); cos/sin: (T, 1, D), or (B, T, 1, D) for per-row positions. Rotate-half convention:
    channel i pairs with i + D/2, x * cos + rotate_half(x) * sin with rotate_half(x) = (-x2, x1), which is
    x rolled by D/2 with the first half negated: that sign lives in the sin table, so this is one fused
    multiply-add."""
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
    """Keys and values of every layer, (n_layers, B, n_kv_heads, max_len, head_dim), filled left to right.

    `pos` counts the filled slots; attention reads only those, so a new token costs work in
    proportion to the tokens so far, not to max_len. Rows of a batch can hold prompts of different
    lengths, right-aligned: row b starts with `pad[b]` slots of left padding, which no real token
    attends to and which RoPE positions skip, so every row computes what it would alone.
    """

    def __init__(self, keys, values, pad=None):
        self.k, self.v = keys, values
        self.pad = pad  # (B,) long tensor of left-padding slots per row, or None
        self.pos = 0

    @property
    def max_len(self) -> int:
        return self.k.size(3)

    def reset(self, pad=None):
        """Empty the cache (the buffers are reused) for rows with `pad` slots of left padding."""
        self.pos, self.pad = 0, pad

    def update(self, layer: int, k, v):
        """Store the new k, v (B, Hkv, T, D) at the current position; return every key and value so far."""
        t = k.size(2)
        self.k[layer, :, :, self.pos:self.pos + t] = k
        self.v[layer, :, :, self.pos:self.pos + t] = v
        return self.k[layer, :, :, :self.pos + t], self.v[layer, :, :, :self.pos + t]


def attention_mask(start: int, T: int, pad, device):
    """Which keys (slots 0 .. start+T-1) the T new queries at slots start.. may see: (T, S), (B, 1, T, S),
    or None where SDPA needs no mask (no cache prefix: its own causal flag; one new token: every key)."""
    if pad is None and (start == 0 or T == 1):
        return None
    keys = torch.arange(start + T, device=device)
    queries = keys[start:, None]
    mask = keys <= queries  # causal: a query sees its own slot and the ones before it
    if pad is not None:
        # Left padding is seen by nobody but itself: a padding query with no key at all would give NaN,
        # which would then reach real tokens through its (masked, but NaN) value.
        mask = (mask & (keys >= pad[:, None, None])) | (keys == queries)
        mask = mask[:, None]
    return mask


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        # One fused projection for q, k, v and (G1) the output gate: the gate is computed from the
        # same normalized input as q, one sigmoid per head and channel. Muon orthogonalizes each
        # projection separately (Blueberry.muon_splits).
        self.split = (q_dim, kv_dim, kv_dim) + ((q_dim,) if cfg.attn_gate else ())
        self.qkv = nn.Linear(cfg.d_model, sum(self.split), bias=False)
        self.attn_gate = cfg.attn_gate
        self.q_norm = RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.o_proj = nn.Linear(q_dim, cfg.d_model, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x, cos, sin, mask=None, cache=None, layer=0):
        B, T, _ = x.shape
        q, k, v, *gate = self.qkv(x).split(self.split, dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:  # QK-norm: each head over head_dim, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, D)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        dropout = self.dropout if self.training else 0.0
        if T == 1:
            # One new token sees every key it is given: the query heads that share a kv head are a batch of
            # queries for it, so each kv head is read once, with no copy of the keys per query head.
            y = F.scaled_dot_product_attention(q.view(B, self.n_kv_heads, -1, self.head_dim), k, v, attn_mask=mask,
                                               dropout_p=dropout).view(B, self.n_heads, 1, self.head_dim)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=dropout,
                                               enable_gqa=self.n_kv_heads != self.n_heads)
        y = y.transpose(1, 2).reshape(B, T, -1)
        if self.attn_gate:
            y = y * torch.sigmoid(gate[0])
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), with gate and up fused into one matmul."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.w_in = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x):
        gate, up = self.w_in(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.pre_attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.pre_mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg.d_model, cfg.ffn_hidden(layer))
        # sandwich norm: also normalize each sublayer's output before it joins the residual
        self.post_attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps) if cfg.sandwich_norm else nn.Identity()
        self.post_mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps) if cfg.sandwich_norm else nn.Identity()
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, mask=None, cache=None):
        x = x + self.dropout(self.post_attn_norm(self.attn(self.pre_attn_norm(x), cos, sin, mask, cache, self.layer)))
        x = x + self.dropout(self.post_mlp_norm(self.mlp(self.pre_mlp_norm(x))))
        return x


class Blueberry(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
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
            elif isinstance(module, nn.RMSNorm):
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

    def make_cache(self, batch_size: int, max_len: int | None = None, pad=None) -> KVCache:
        """An empty KVCache for `batch_size` rows of up to `max_len` tokens (default: the context), in the
        dtype the forward pass will compute in; `pad`: left-padding slots per row (see KVCache)."""
        max_len = max_len or self.cfg.max_seq_len
        if max_len > self.cfg.max_seq_len:
            raise ValueError(f"cache max_len {max_len} exceeds max_seq_len {self.cfg.max_seq_len}")
        weight = self.embed.weight
        device = weight.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        shape = (self.cfg.n_layers, batch_size, self.cfg.n_kv_heads, max_len, self.cfg.head_dim)
        cache = KVCache(weight.new_zeros(shape, dtype=dtype), weight.new_zeros(shape, dtype=dtype))
        cache.reset(None if pad is None else torch.as_tensor(pad, device=weight.device))
        return cache

    def forward(self, idx, targets=None, cache=None, logits_to_keep: int = 0):
        """Logits (B, T, vocab), or (logits, fp32 mean loss) with `targets` (-100 is ignored). With a cache, the
        new tokens are appended to it. `logits_to_keep`: only the last that many positions get logits (0 = all),
        as in transformers: a prefill needs the last one alone."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        limit = self.cfg.max_seq_len if cache is None else cache.max_len
        if start + T > limit:
            raise ValueError(f"sequence of {start + T} tokens exceeds the context of {limit}")
        pad = cache.pad if cache is not None else None
        positions = torch.arange(start, start + T, device=idx.device)
        if pad is not None:  # each row counts its positions from its first real token
            positions = (positions - pad[:, None]).clamp_min(0)
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        mask = attention_mask(start, T, pad, idx.device)

        x = self.embed(idx)
        if self.cfg.embed_scale:
            x = x * math.sqrt(self.cfg.d_model)
        for block in self.blocks:
            x = block(x, cos, sin, mask, cache)
        if cache is not None:
            cache.pos += T
        x = self.norm(x[:, -logits_to_keep:])
        head = self.lm_head.weight if self.lm_head is not None else self.embed.weight
        if targets is None:
            return F.linear(x, head)
        logits, loss = LinearCrossEntropy.apply(x.reshape(B * T, -1), head, targets.reshape(-1))
        return logits.view(B, T, -1), loss

    @torch.no_grad()
    def resize_token_embeddings(self, vocab_size: int):
        """Grow the embedding and the head to `vocab_size` rows (new tokens, e.g. the chat format's): each new
        row starts as the mean of the existing rows, so a new token begins as an average known one; every other
        weight is unchanged. (The name transformers uses.)"""
        old = self.cfg.vocab_size
        if vocab_size < old:
            raise ValueError(f"cannot shrink the vocabulary from {old} to {vocab_size}")
        for module in (self.embed, self.lm_head):
            if module is not None:
                grown = torch.cat((module.weight, module.weight.mean(0, keepdim=True).expand(vocab_size - old, -1)))
                module.weight = nn.Parameter(grown)
        self.embed.num_embeddings = vocab_size
        if self.lm_head is not None:
            self.lm_head.out_features = vocab_size
        self.cfg = dataclasses.replace(self.cfg, vocab_size=vocab_size)

    def muon_splits(self) -> dict:
        """The weights that fuse several projections: parameter name -> their row counts, in order. Muon
        orthogonalizes each projection on its own, and llama.py splits them into Llama's separate weights."""
        splits = {}
        for i, block in enumerate(self.blocks):
            splits[f"blocks.{i}.attn.qkv.weight"] = block.attn.split
            splits[f"blocks.{i}.mlp.w_in.weight"] = (block.mlp.hidden, block.mlp.hidden)
        return splits

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6N for the matmuls (embedding lookups excluded) + attention scores,
        forward and backward."""
        cfg = self.cfg
        matmul_params = self.num_params(embeddings=False) + cfg.vocab_size * cfg.d_model  # the head is one, tied or not
        return 6 * matmul_params + 12 * cfg.n_layers * cfg.d_model * cfg.max_seq_len

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
