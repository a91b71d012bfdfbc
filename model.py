"""The Blueberry decoder: a Llama-style transformer with a few well-tested upgrades.

Read top to bottom: RMSNorm, RoPE, the fused head + loss, the KV cache, Attention (fused QKV, GQA, QK-norm, gated
output, gated value embeddings), MLP (SwiGLU or ReLU², pyramidal widths), Block (sandwich norm), Blueberry
(embedding, bigram hash embedding, residual/x0 lambdas, blocks, head with an optional logit soft-cap, init). Every
upgrade has a `ModelConfig` switch; with config.LLAMA_SWITCHES and equal ffn multipliers this is exactly
`transformers.LlamaForCausalLM` (llama.py maps the weights).
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
    (without gradient). `softcap` > 0 squashes the logits first: softcap * tanh(logits / softcap).
    """

    @staticmethod
    def forward(ctx, x, weight, targets, softcap=0.0):
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        with torch.autocast(device, enabled=False):
            x, weight = x.to(dtype), weight.to(dtype)
            logits = x @ weight.t()
            if softcap:
                logits = torch.tanh(logits / softcap).mul_(softcap)
            lse = torch.empty(logits.size(0), device=x.device, dtype=torch.float32)
            for rows in _row_chunks(logits):
                lse[rows] = torch.logsumexp(logits[rows].float(), dim=-1)
            valid = targets != -100
            target_logits = logits.gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1).float()
            loss = ((lse - target_logits) * valid).sum() / valid.sum()
        ctx.save_for_backward(x, weight, logits, lse, targets)
        ctx.softcap = softcap
        ctx.mark_non_differentiable(logits)
        ctx.set_materialize_grads(False)  # else backward is handed a zero "gradient" of the logits: vocab-sized too
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
            g = g.mul_(scale[rows, None])
            if ctx.softcap:  # through the cap: d(c tanh(z / c))/dz = 1 - (capped / c)^2
                g.mul_(1 - (logits[rows].float() / ctx.softcap).square())
            g = g.to(weight.dtype)
            torch.mm(g, weight, out=grad_x[rows])
            grad_w.addmm_(g.t(), x[rows])
        return grad_x, grad_w, None, None


def _row_chunks(matrix):
    """Row slices of the logits. On CPU ~6M entries, small enough for the allocator to reuse
    without page faults; on a GPU ~64M (a few chunks at the reference size), since there every
    chunk costs a dozen kernel launches and launches, not memory, bound a small model's step."""
    elements = (64 << 20) if matrix.is_cuda else (6 << 20)
    step = max(1, elements // matrix.size(1))
    return [slice(i, i + step) for i in range(0, matrix.size(0), step)]


class KVCache:
    """Keys and values of every layer, (n_layers, B, n_kv_heads, max_len, head_dim), and how many slots each row
    has filled: `lengths` (B,), as nanochat's cache_seqlens.

    A row's new tokens go after what it holds, at its own RoPE positions, and a key mask per row lets each token
    see its own row's keys up to itself: rows of different lengths share a batch, each computing what it would
    alone, and a row can be emptied and refilled while the others go on (engine.py). Attention reads the slots up
    to the longest row only, so a new token costs work in proportion to the tokens so far, not to max_len.
    `pad` (B,), optional: slots of left padding that open each row (how transformers batches prompts, see
    hf_model.py), which no real token attends to and which RoPE positions skip. `tokens` (B, max_len), optional:
    the token in each slot, for a model whose input reads the token before (bigram_buckets).
    """

    def __init__(self, keys, values, lengths=None, pad=None, tokens=None):
        self.k, self.v, self.pad, self.tokens = keys, values, pad, tokens
        self.lengths = keys.new_zeros(keys.size(1), dtype=torch.long) if lengths is None else lengths

    @property
    def max_len(self) -> int:
        return self.k.size(3)

    @property
    def pos(self) -> int:
        """The longest row's length."""
        return int(self.lengths.max())

    def rows(self, start: int, stop: int) -> "KVCache":
        """Rows start..stop-1 as a cache of their own that shares this one's memory (a forward pass on some rows)."""
        if (start, stop) == (0, len(self.lengths)):
            return self
        pad = None if self.pad is None else self.pad[start:stop]
        tokens = None if self.tokens is None else self.tokens[start:stop]
        return KVCache(self.k[:, start:stop], self.v[:, start:stop], self.lengths[start:stop], pad, tokens)

    def move(self, src: int, dst: int):
        """Copy row src over row dst (the engine keeps its running rows first)."""
        self.k[:, dst], self.v[:, dst], self.lengths[dst] = self.k[:, src], self.v[:, src], self.lengths[src]
        if self.tokens is not None:
            self.tokens[dst] = self.tokens[src]

    def previous_tokens(self, idx, slots):
        """The token before each new one (idx, at `slots`) in its row, -1 before a row's first real token; the new
        tokens are stored in their slots for the next call."""
        self.tokens.scatter_(1, slots, idx)
        before = self.tokens.gather(1, (slots - 1).clamp_min(0))
        first = slots if self.pad is None else slots - self.pad[:, None]
        return before.masked_fill(first <= 0, -1)

    def append(self, T: int) -> tuple:
        """Room for T new tokens after each row's: returns their slots (B, T) and how many slots attention reads
        (update() stores each layer's keys and values in those slots)."""
        end = self.pos + T
        check_length(end, self.max_len)
        slots = self.lengths[:, None] + torch.arange(T, device=self.lengths.device)
        B, H, _, D = self.k.shape[1:]
        self.index = slots[:, None, :, None].expand(B, H, T, D)  # where update() scatters the new k and v
        self.end = end
        self.lengths += T
        return slots, end

    def update(self, layer: int, k, v):
        """Store the new k, v (B, Hkv, T, D) in their slots; return every row's keys and values up to the longest."""
        keys, values = self.k[layer], self.v[layer]
        keys.scatter_(2, self.index, k)
        values.scatter_(2, self.index, v)
        return keys[:, :, :self.end], values[:, :, :self.end]


def check_length(n: int, limit: int):
    if n > limit:
        raise ValueError(f"sequence of {n} tokens exceeds the context of {limit}")


def attention_mask(slots, end: int, pad=None):
    """Which of the `end` keys each new token (at `slots`, (B, T)) may see: (B, 1, T, end), its own slot and the
    ones before it in its row. None where SDPA needs no mask: one row without padding that starts empty (its
    causal flag) or adds one token (every key)."""
    B, T = slots.shape
    if B == 1 and pad is None and (T == 1 or end == T):
        return None
    keys = torch.arange(end, device=slots.device)
    mask = keys <= slots[..., None]
    if pad is not None:
        # Left padding is seen by nobody but itself: a padding query with no key at all would give NaN,
        # which would then reach real tokens through its (masked, but NaN) value.
        mask = (mask & (keys >= pad[:, None, None])) | (keys == slots[..., None])
    return mask[:, None]


def bigram_rows(idx, before, buckets: int):
    """Each token's row of the bigram table: the pair (token before it, token) hashed into the first buckets - 1
    rows (modded-nanogpt's hash: no vocabulary size in it, so added tokens keep every pair's row), the last row
    where no token comes before (`before` < 0)."""
    pair = torch.bitwise_xor(36313 * idx, 27191 * before.clamp_min(0)) % (buckets - 1)
    return pair.masked_fill(before < 0, buckets - 1)


VE_GATE_CHANNELS = 12  # input channels the value-embedding gate reads (nanochat's)


def has_value_embed(cfg: ModelConfig, layer: int) -> bool:
    """With cfg.value_embeds, every other block has a value embedding, the last one always (nanochat's layout)."""
    return cfg.value_embeds and layer % 2 == (cfg.n_layers - 1) % 2


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
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
        # gated value embeddings (nanochat): blocks that get one add it to v, gated per kv head from the first
        # channels of the input; the gate starts at zero, i.e. half its (0, 3) range
        self.ve_gate = (nn.Linear(min(VE_GATE_CHANNELS, cfg.d_model), cfg.n_kv_heads, bias=False)
                        if has_value_embed(cfg, layer) else None)

    def forward(self, x, cos, sin, mask=None, cache=None, layer=0, ve=None):
        B, T, _ = x.shape
        q, k, v, *gate = self.qkv(x).split(self.split, dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        if ve is not None:  # value embedding of each token, through its gate
            gate_ve = 3 * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate.in_features]))
            v = v + gate_ve.unsqueeze(-1) * ve.view_as(v).type_as(v)
        if self.q_norm is not None:  # QK-norm: each head over head_dim, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, D)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        dropout = self.dropout if self.training else 0.0
        if T == 1:
            # One new token: the query heads that share a kv head are a batch of queries for it (under its row's
            # mask), so each kv head is read once, with no copy of the keys per query head.
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
    """SwiGLU: down(silu(gate(x)) * up(x)), with gate and up fused into one matmul; or ReLU² (kind="relu2",
    modded-nanogpt's and nanochat's): down(relu(w_in(x))^2), one input matrix."""

    def __init__(self, d_model: int, hidden: int, kind: str = "swiglu"):
        super().__init__()
        self.hidden, self.kind = hidden, kind
        self.w_in = nn.Linear(d_model, (2 if kind == "swiglu" else 1) * hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x):
        if self.kind == "relu2":
            return self.down(F.relu(self.w_in(x)).square())
        gate, up = self.w_in(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.pre_attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.pre_mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg.d_model, cfg.ffn_hidden(layer), cfg.mlp)
        # sandwich norm: also normalize each sublayer's output before it joins the residual
        self.post_attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps) if cfg.sandwich_norm else nn.Identity()
        self.post_mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps) if cfg.sandwich_norm else nn.Identity()
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, mask=None, cache=None, ve=None):
        x = x + self.dropout(self.post_attn_norm(self.attn(self.pre_attn_norm(x), cos, sin, mask, cache, self.layer, ve)))
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
        # value embeddings (value_embeds): per-token vectors added to the values of every other block
        kv_dim = cfg.n_kv_heads * cfg.head_dim
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(cfg.vocab_size, kv_dim)
                                           for i in range(cfg.n_layers) if has_value_embed(cfg, i)})
        # residual/x0 lambdas (resid_lambdas): before block i, x = resid_lambdas[i] * x + x0_lambdas[i] * x0
        self.resid_lambdas = nn.Parameter(torch.ones(cfg.n_layers)) if cfg.resid_lambdas else None
        self.x0_lambdas = nn.Parameter(torch.zeros(cfg.n_layers)) if cfg.resid_lambdas else None
        # bigram hash embedding (bigram_buckets): a vector per (token before, token) pair, hashed into a table, added
        # before block i with weight bigram_lambdas[i]: the pairs a small model learns first, for one lookup
        self.bigram_embed = nn.Embedding(cfg.bigram_buckets, cfg.d_model) if cfg.bigram_buckets else None
        self.bigram_lambdas = nn.Parameter(torch.ones(cfg.n_layers)) if cfg.bigram_buckets else None
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
            if block.attn.ve_gate is not None:
                nn.init.zeros_(block.attn.ve_gate.weight)
        if cfg.zero_init and self.lm_head is not None:
            nn.init.zeros_(self.lm_head.weight)  # uniform next-token distribution at step 0
        if self.bigram_embed is not None:  # modded-nanogpt's: the table starts at zero, each weight at 0.1
            nn.init.zeros_(self.bigram_embed.weight)
            self.bigram_lambdas.fill_(0.1)
        if cfg.resid_lambdas:  # nanochat's: early blocks keep more of the stream and mix in more of x0
            frac = torch.arange(cfg.n_layers) / max(cfg.n_layers - 1, 1)
            self.resid_lambdas.copy_(1.15 - 0.10 * frac)
            self.x0_lambdas.copy_(0.20 - 0.15 * frac)

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
        pad = None if pad is None else torch.as_tensor(pad, device=weight.device)
        tokens = weight.new_zeros((batch_size, max_len), dtype=torch.long) if self.bigram_embed is not None else None
        return KVCache(weight.new_zeros(shape, dtype=dtype), weight.new_zeros(shape, dtype=dtype), pad=pad,
                       tokens=tokens)

    def forward(self, idx, targets=None, cache=None, logits_to_keep=0):
        """Logits (B, T, vocab), or (logits, fp32 mean loss) with `targets` (-100 is ignored). With a cache, the
        new tokens are appended to it. `logits_to_keep`: only the last that many positions get logits (0 = all),
        as in transformers: a prefill needs the last one alone; or a LongTensor (B,) of the one position per row
        that does (each row's last token in a right-padded batch)."""
        B, T = idx.shape
        if cache is None:  # the tokens are the sequence: positions 0..T-1, SDPA's causal flag
            check_length(T, self.cfg.max_seq_len)
            cos, sin, mask = self.rope_cos[:T], self.rope_sin[:T], None
        else:  # each row's new tokens go after what it holds (slots), at positions after its left padding
            slots, end = cache.append(T)
            positions = slots if cache.pad is None else (slots - cache.pad[:, None]).clamp_min(0)
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]
            mask = attention_mask(slots, end, cache.pad)

        scale = math.sqrt(self.cfg.d_model) if self.cfg.embed_scale else 1.0
        x = self.embed(idx) * scale
        x0 = x
        if self.bigram_embed is not None:
            before = F.pad(idx[:, :-1], (1, 0), value=-1) if cache is None else cache.previous_tokens(idx, slots)
            bigram = self.bigram_embed(bigram_rows(idx, before, self.cfg.bigram_buckets)) * scale
        for i, block in enumerate(self.blocks):
            if self.resid_lambdas is not None:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            if self.bigram_embed is not None:
                x = x + self.bigram_lambdas[i] * bigram
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, cos, sin, mask, cache, ve)
        if isinstance(logits_to_keep, torch.Tensor):
            x = x[torch.arange(B, device=x.device), logits_to_keep, None]
        else:
            x = x[:, -logits_to_keep:]
        x = self.norm(x)
        head = self.lm_head.weight if self.lm_head is not None else self.embed.weight
        cap = self.cfg.logit_softcap
        if targets is None:
            logits = F.linear(x, head)
            return torch.tanh(logits / cap) * cap if cap else logits
        logits, loss = LinearCrossEntropy.apply(x.reshape(B * T, -1), head, targets.reshape(-1), cap)
        return logits.view(B, T, -1), loss

    @torch.no_grad()
    def resize_token_embeddings(self, vocab_size: int):
        """Grow the embedding and the head to `vocab_size` rows (new tokens, e.g. the chat format's): each new
        row starts as the mean of the existing rows, so a new token begins as an average known one; every other
        weight is unchanged. (The name transformers uses.)"""
        old = self.cfg.vocab_size
        if vocab_size < old:
            raise ValueError(f"cannot shrink the vocabulary from {old} to {vocab_size}")
        for module in (self.embed, self.lm_head, *self.value_embeds.values()):
            if module is not None:
                grown = torch.cat((module.weight, module.weight.mean(0, keepdim=True).expand(vocab_size - old, -1)))
                module.weight = nn.Parameter(grown)
        for module in (self.embed, *self.value_embeds.values()):
            module.num_embeddings = vocab_size
        if self.lm_head is not None:
            self.lm_head.out_features = vocab_size
        self.cfg = dataclasses.replace(self.cfg, vocab_size=vocab_size)

    def muon_splits(self) -> dict:
        """The weights that fuse several projections: parameter name -> their row counts, in order. Muon
        orthogonalizes each projection on its own, and llama.py splits them into Llama's separate weights."""
        splits = {}
        for i, block in enumerate(self.blocks):
            splits[f"blocks.{i}.attn.qkv.weight"] = block.attn.split
            if block.mlp.kind == "swiglu":
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
            n -= sum(e.weight.numel() for e in self.value_embeds.values())
            n -= self.bigram_embed.weight.numel() if self.bigram_embed is not None else 0
        return n

    def summary(self) -> str:
        cfg = self.cfg
        widths = [cfg.ffn_hidden(i) for i in range(cfg.n_layers)]
        on = [name for name in ("embed_scale", "sandwich_norm", "qk_norm", "attn_gate", "zero_init", "depth_init",
                                "tie_embeddings", "value_embeds", "resid_lambdas") if getattr(cfg, name)]
        on += [f"{cfg.mlp} MLP"] * (cfg.mlp != "swiglu") + [f"logit soft-cap {cfg.logit_softcap:g}"] * bool(cfg.logit_softcap)
        on += [f"bigram table {cfg.bigram_buckets:,}"] * bool(cfg.bigram_buckets)
        return (f"Blueberry: {self.num_params() / 1e6:.2f}M params ({self.num_params(False) / 1e6:.2f}M without "
                f"embeddings{' and the bigram table' * bool(cfg.bigram_buckets)}) | {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads / "
                f"{cfg.n_kv_heads} kv, context {cfg.max_seq_len}, vocab {cfg.vocab_size} | "
                f"MLP widths {widths} | {', '.join(on) or 'plain Llama'}")
