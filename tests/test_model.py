import math

import pytest
import torch
import torch.nn.functional as F

from config import LLAMA_SWITCHES, ModelConfig
from llama import llama_config, to_llama_state_dict
from model import Blueberry, LinearCrossEntropy

TINY = dict(vocab_size=97, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=48)
LLAMA = dict(**LLAMA_SWITCHES, ffn_mult_first=2.0, ffn_mult_last=2.0)  # the switches and a uniform MLP
# the 2026 recipe switches (issue 29), each changed alone and all together (ReLU² is the default MLP: SwiGLU is the switch)
RECIPE = [dict(mlp="swiglu"), dict(value_embeds=True), dict(resid_lambdas=True), dict(logit_softcap=3.0),
          dict(bigram_buckets=31),
          dict(mlp="relu2", value_embeds=True, resid_lambdas=True, logit_softcap=3.0, bigram_buckets=31, n_layers=4)]


def randomized(model, std=0.2, seed=0):
    """Fresh models start with zero heads/gains; give every weight a value so tests can see it."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std + (1.0 if p.ndim == 1 else 0.0))
    return model.eval()


def tiny(**overrides):
    torch.manual_seed(0)
    return Blueberry(ModelConfig(**{**TINY, **overrides}))


@pytest.mark.parametrize("overrides", [{}, LLAMA, dict(n_kv_heads=4), dict(n_kv_heads=1, tie_embeddings=True), *RECIPE])
def test_causal(overrides):
    model = randomized(tiny(**overrides))
    idx = torch.randint(0, 97, (2, 20))
    changed = idx.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % 97
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=1e-5)
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-3


@pytest.mark.parametrize("overrides", [{}, LLAMA, *RECIPE])
def test_kv_cache_equals_full_recompute(overrides):
    model = randomized(tiny(**overrides))
    idx = torch.randint(0, 97, (3, 40))
    full = model(idx)
    # prompt, then one token at a time
    cache = model.make_cache(3, 48)
    steps = [model(idx[:, :10], cache=cache)] + [model(idx[:, t:t + 1], cache=cache) for t in range(10, 40)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)
    assert cache.pos == 40
    # uneven chunks
    cache = model.make_cache(3, 48)
    chunks = [model(idx[:, a:b], cache=cache) for a, b in [(0, 7), (7, 8), (8, 21), (21, 40)]]
    torch.testing.assert_close(torch.cat(chunks, 1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("overrides", [{}, LLAMA, RECIPE[-1]])
def test_left_padded_batch_in_the_cache_equals_each_row_alone(overrides):
    """Prompts of different lengths share one cache, right-aligned behind left padding: each row's logits,
    for the prompt and for every token decoded after it, are those of the row run alone."""
    model = randomized(tiny(**overrides))
    rows = [torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(n)) for n in (9, 3, 14)]
    width = max(len(r) for r in rows)
    pad = [width - len(r) for r in rows]
    batch = torch.stack([torch.cat((torch.full((p,), 5), r)) for r, p in zip(rows, pad)])
    follow = torch.randint(0, 97, (3, 6))
    cache = model.make_cache(3, 32, pad=pad)
    with torch.no_grad():
        got = [model(batch, cache=cache)] + [model(follow[:, t:t + 1], cache=cache) for t in range(6)]
        for b, r in enumerate(rows):
            alone = model(torch.cat((r, follow[b]))[None])[0]
            torch.testing.assert_close(got[0][b, pad[b]:], alone[:len(r)], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(torch.cat([g[b] for g in got[1:]]), alone[len(r):], rtol=1e-5, atol=1e-5)
        assert all(torch.isfinite(g).all() for g in got)  # padding that sees no real key does not turn into NaN


def test_a_decoding_step_attends_over_the_tokens_so_far_not_the_context(monkeypatch):
    """A one-token step's attention reads the filled part of the cache only, so its cost grows with the
    tokens so far: the same keys under a context of 2,048 as under one of 64."""
    seen = []
    sdpa = F.scaled_dot_product_attention

    def recording(q, k, v, **kwargs):
        seen.append(k.size(-2))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    for context in (64, 2048):
        model = randomized(tiny(max_seq_len=context))
        cache = model.make_cache(1)
        with torch.no_grad():
            model(torch.zeros(1, 10, dtype=torch.long), cache=cache)
            seen.clear()
            model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
            model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
        assert seen == [11] * 3 + [12] * 3  # the keys so far, in each of the 3 layers


def test_cache_overflow_is_a_clear_error():
    model = tiny()
    cache = model.make_cache(1, 16)
    model(torch.zeros(1, 16, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="exceeds the context"):
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        model.make_cache(1, 49)


@pytest.mark.parametrize("overrides", [{}, dict(sandwich_norm=False)])
def test_initial_loss_is_log_vocab_and_blocks_start_as_identity(overrides):
    model = tiny(**overrides)
    idx = torch.randint(0, 97, (2, 16))
    logits, loss = model(idx, idx)
    assert abs(loss.item() - math.log(97)) < 1e-5
    assert logits.abs().max() == 0
    x = torch.randn(2, 16, 64)
    cos, sin = model.rope_cos[:16], model.rope_sin[:16]
    for block in model.blocks:
        torch.testing.assert_close(block(x, cos, sin), x)


def test_zero_init_gradients_are_finite_and_reach_every_block():
    model = tiny()
    idx = torch.randint(0, 97, (2, 16))
    for _ in range(2):  # the head is zero at step 0, so take one SGD step first
        model.zero_grad()
        model(idx, idx)[1].backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.05 * p.grad
    for name, p in model.named_parameters():
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() < 100, name
    assert all(b.post_mlp_norm.weight.grad.abs().sum() > 0 for b in model.blocks)


def test_llama_equivalence():
    transformers = pytest.importorskip("transformers")
    model = randomized(tiny(**LLAMA), std=0.1)
    hf = transformers.LlamaForCausalLM(llama_config(model.cfg)).eval()
    hf.load_state_dict(to_llama_state_dict(model), strict=True)
    idx = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf(idx).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="Llama has no equivalent"):
        to_llama_state_dict(tiny())


def test_attention_matches_a_plain_reference():
    """QK-norm (per head, separate q and k gains), rotate-half RoPE, GQA, causal softmax and the
    sigmoid output gate, written out the textbook way."""
    model = randomized(tiny(), std=0.3)
    attn, cfg = model.blocks[1].attn, model.cfg
    H, Hkv, D, T = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, 12
    x = torch.randn(2, T, cfg.d_model)
    q, k, v, gate = (x @ attn.qkv.weight.t()).split(attn.split, dim=-1)
    q, k, v = (t.view(2, T, -1, D).transpose(1, 2) for t in (q, k, v))

    def rms(t, w):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * w

    def rope(t):
        inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, D, 2).float() / D)
        angles = torch.outer(torch.arange(T).float(), inv_freq).repeat(1, 2)
        rotated = torch.cat((-t[..., D // 2:], t[..., :D // 2]), -1)
        return t * angles.cos() + rotated * angles.sin()

    q, k = rope(rms(q, attn.q_norm.weight)), rope(rms(k, attn.k_norm.weight))
    k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(D)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, T, -1) * torch.sigmoid(gate)
    expected = y @ attn.o_proj.weight.t()
    with torch.no_grad():
        got = attn(x, model.rope_cos[:T], model.rope_sin[:T])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_dropout_acts_in_training_only():
    h = torch.ones(4, 64)
    block = tiny(dropout=0.5).blocks[0]
    assert torch.equal(block.eval().dropout(h), h)
    assert set(block.train().dropout(h).unique().tolist()) == {0.0, 2.0}  # residual dropout: zeros, survivors scaled
    assert torch.equal(tiny().blocks[0].train().dropout(h), h)  # dropout 0
    idx = torch.randint(0, 97, (2, 20))
    model = randomized(tiny(dropout=0.5))
    evaluated = model(idx)
    torch.testing.assert_close(model(idx), evaluated)  # eval: deterministic
    assert not torch.allclose(model.train()(idx).detach(), evaluated)


def test_loss_matches_cross_entropy_with_ignore_index():
    model = randomized(tiny())
    idx = torch.randint(0, 97, (2, 24))
    targets = torch.randint(0, 97, (2, 24))
    targets[0, :5] = -100
    logits, loss = model(idx, targets)
    assert loss.dtype == torch.float32
    ref = F.cross_entropy(logits.view(-1, 97), targets.view(-1), ignore_index=-100)
    torch.testing.assert_close(loss, ref)


def test_fused_cross_entropy_gradients_match_autograd():
    torch.manual_seed(0)
    x = torch.randn(300, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3000, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 3000, (300,))
    t[::7] = -100
    _, loss = LinearCrossEntropy.apply(x, w, t)
    loss.backward()
    grads = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    F.cross_entropy(x @ w.t(), t, ignore_index=-100).backward()
    torch.testing.assert_close(grads[0], x.grad)
    torch.testing.assert_close(grads[1], w.grad)


def test_switches_change_exactly_what_they_should():
    base = tiny()
    n = base.num_params()
    d, hd, nh = 64, 16, 4
    L = 3
    assert n - tiny(attn_gate=False).num_params() == L * d * nh * hd
    assert n - tiny(qk_norm=False).num_params() == L * 2 * hd
    assert n - tiny(sandwich_norm=False).num_params() == L * 2 * d
    assert n - tiny(tie_embeddings=True).num_params() == 97 * d
    assert tiny(tie_embeddings=True).lm_head is None
    assert base.blocks[0].attn.qkv.weight.shape == (nh * hd + 2 * 2 * hd + nh * hd, d)
    assert tiny(attn_gate=False).blocks[0].attn.qkv.weight.shape == (nh * hd + 2 * 2 * hd, d)
    # embed_scale, zero_init, depth_init change values, not shapes
    assert tiny(embed_scale=False).num_params() == n
    assert tiny(zero_init=False).lm_head.weight.abs().sum() > 0
    assert isinstance(tiny(sandwich_norm=False).blocks[0].post_attn_norm, torch.nn.Identity)
    assert tiny(qk_norm=False).blocks[0].attn.q_norm is None


def test_embed_scale_multiplies_input_by_sqrt_d_model():
    a, b = randomized(tiny()), randomized(tiny(embed_scale=False))
    idx = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        b.embed.weight.mul_(8.0)  # sqrt(64)
        b.bigram_embed.weight.mul_(8.0)  # the bigram table is an embedding too
    torch.testing.assert_close(a(idx), b(idx), rtol=1e-5, atol=1e-5)


def test_pyramid_widths_follow_formula():
    cfg = ModelConfig(vocab_size=10, d_model=256, n_layers=8)
    widths = [cfg.ffn_hidden(i) for i in range(8)]
    expected = [64 * math.ceil(256 * (1.25 + 1.75 * i / 7) / 64) for i in range(8)]  # defaults: 1.25 -> 3.0
    assert widths == expected and widths[0] == 320 and widths[-1] == 768
    assert widths == sorted(widths)
    model = Blueberry(cfg)
    assert [b.mlp.down.weight.shape[1] for b in model.blocks] == widths
    uniform = ModelConfig(vocab_size=10, ffn_mult_first=2.0, ffn_mult_last=2.0)
    assert {uniform.ffn_hidden(i) for i in range(8)} == {512}
    assert ModelConfig(vocab_size=10, n_layers=1).ffn_hidden(0) == 320
    assert ModelConfig(vocab_size=10, d_model=100, n_heads=5, n_kv_heads=1, multiple_of=64).ffn_hidden(0) == 128


def test_depth_aware_init_stds_decrease_and_stay_positive():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=10, d_model=256, n_layers=8)
    model = Blueberry(cfg)
    target = [cfg.mlp_init_std(i) for i in range(8)]
    assert target == sorted(target, reverse=True) and min(target) > 0
    assert target[0] == cfg.init_std_first and target[-1] == cfg.init_std_last
    measured = [b.mlp.w_in.weight.std().item() for b in model.blocks]
    for m, t in zip(measured, target):
        assert abs(m - t) < 0.05 * t
    assert {ModelConfig(vocab_size=10, depth_init=False).mlp_init_std(i) for i in range(8)} == {0.02}


@pytest.mark.parametrize("overrides, field", [
    (dict(n_heads=3), "n_heads"), (dict(n_kv_heads=3), "n_kv_heads"), (dict(d_model=24, n_heads=8), "n_heads"),
    (dict(d_model=0), "d_model"), (dict(n_layers=-1), "n_layers"), (dict(ffn_mult_first=0.0), "ffn_mult_first"),
    (dict(ffn_mult_last=-1.0), "ffn_mult_last"), (dict(init_std_last=0.0), "init_std_last"),
    (dict(dropout=1.0), "dropout"),
])
def test_invalid_configs_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"^{field} "):
        ModelConfig(**{**TINY, **overrides})


def test_bf16_autocast_forward_backward_on_cpu():
    model = randomized(tiny()).train()
    idx = torch.randint(0, 97, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(idx, idx)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    _, ref = model(idx, idx)
    assert abs(loss.item() - ref.item()) < 0.05 * ref.item()


def test_summary_mentions_sizes_and_widths():
    text = tiny().summary()
    assert "params" in text and "without embeddings and the bigram table" in text and "[128, 192, 192]" in text
    assert "bigram table 20,480" in text and "bigram" not in tiny(bigram_buckets=0).summary()


@pytest.mark.parametrize("tied", [False, True])
def test_resize_token_embeddings_grows_with_mean_rows_and_keeps_the_rest(tied):
    model = randomized(tiny(tie_embeddings=tied))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    idx = torch.randint(0, 97, (2, 12))
    logits = model(idx)
    model.resize_token_embeddings(101)
    assert model.cfg.vocab_size == 101 and model.embed.weight.shape == (101, 64)
    for name, weight in model.state_dict().items():
        if name in ("embed.weight", "lm_head.weight"):
            assert torch.equal(weight[:97], before[name])
            torch.testing.assert_close(weight[97:], before[name].mean(0).expand(4, -1))
        else:
            assert torch.equal(weight, before[name]), name
    torch.testing.assert_close(model(idx)[..., :97], logits)  # old tokens compute what they did
    assert model(torch.tensor([[100]])).shape == (1, 1, 101)
    with pytest.raises(ValueError, match="shrink"):
        model.resize_token_embeddings(50)


def test_a_config_without_the_recipe_switches_is_todays_model(tmp_path):
    """A config.json written before the switches existed loads with them off (config.RECIPE_OFF, not whatever the
    defaults are by then): the same parameters, initial weights and logits as a model built with them off."""
    import dataclasses
    import json

    import checkpoint
    from config import RECIPE_OFF
    new = {"mlp", "value_embeds", "resid_lambdas", "bigram_buckets", "logit_softcap"}
    assert set(RECIPE_OFF) == new
    old = {k: v for k, v in dataclasses.asdict(ModelConfig(**TINY)).items() if k not in new}
    (tmp_path / checkpoint.CONFIG).write_text(json.dumps({"model": old}))
    cfg = checkpoint.read_config(tmp_path)["model"]
    assert (cfg.mlp, cfg.value_embeds, cfg.resid_lambdas, cfg.bigram_buckets, cfg.logit_softcap) == (
        "swiglu", False, False, 0, 0.0)
    torch.manual_seed(0)
    a = Blueberry(cfg)
    b = tiny(mlp="swiglu", value_embeds=False, resid_lambdas=False, bigram_buckets=0, logit_softcap=0.0)
    names = {"embed.weight", "norm.weight", "lm_head.weight"} | {
        f"blocks.{i}.{n}.weight" for i in range(3) for n in ("pre_attn_norm", "attn.qkv", "attn.q_norm", "attn.k_norm",
                                                             "attn.o_proj", "pre_mlp_norm", "mlp.w_in", "mlp.down",
                                                             "post_attn_norm", "post_mlp_norm")}
    assert set(a.state_dict()) == set(b.state_dict()) == names
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in names)
    a, b = randomized(a), randomized(b)
    idx = torch.randint(0, 97, (2, 20))
    assert torch.equal(a(idx), b(idx)) and torch.equal(a(idx, idx)[1], b(idx, idx)[1])


def test_recipe_switches_at_their_neutral_values_compute_todays_function():
    """Each switch changes only what it names: value embeddings of zero, lambdas (1, 0), a bigram table of zero and
    a huge cap give the same logits as the model without them, from the same weights."""
    base = randomized(tiny(bigram_buckets=0))
    idx = torch.randint(0, 97, (2, 20))
    for overrides in (dict(value_embeds=True), dict(resid_lambdas=True), dict(bigram_buckets=31),
                      dict(logit_softcap=1e6)):
        model = randomized(tiny(**{"bigram_buckets": 0, **overrides}))
        model.load_state_dict(base.state_dict(), strict=False)
        with torch.no_grad():
            for e in model.value_embeds.values():
                e.weight.zero_()
            if model.resid_lambdas is not None:
                model.resid_lambdas.fill_(1.0)
                model.x0_lambdas.zero_()
            if model.bigram_embed is not None:
                model.bigram_embed.weight.zero_()
        torch.testing.assert_close(model(idx), base(idx), rtol=1e-5, atol=1e-5)


def test_value_embeddings_every_other_block_from_the_last_and_on_adamw():
    from config import TrainConfig
    from muon import Muon, build_optimizers
    model = tiny(value_embeds=True, n_layers=4)
    assert sorted(model.value_embeds) == ["1", "3"]
    assert [b.attn.ve_gate is not None for b in model.blocks] == [False, True, False, True]
    assert all(b.attn.ve_gate.weight.abs().sum() == 0 for b in model.blocks[1::2])  # gates start at zero
    assert model.value_embeds["1"].weight.shape == (97, 2 * 16)
    muon, adamw = build_optimizers(model, TrainConfig())
    on_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    assert isinstance(muon, Muon) and id(model.blocks[1].attn.ve_gate.weight) in on_muon
    assert not any(id(e.weight) in on_muon for e in model.value_embeds.values())
    model.resize_token_embeddings(101)  # chat tokens grow the value embeddings too
    assert model.value_embeds["3"].weight.shape == (101, 32) and model(torch.tensor([[100]])).shape == (1, 1, 101)


def test_resid_lambdas_start_as_nanochats_and_train_on_adamw():
    from config import TrainConfig
    from muon import build_optimizers
    model = tiny(resid_lambdas=True)
    torch.testing.assert_close(model.resid_lambdas.detach(), torch.tensor([1.15, 1.10, 1.05]))
    torch.testing.assert_close(model.x0_lambdas.detach(), torch.tensor([0.20, 0.125, 0.05]))
    idx = torch.randint(0, 97, (2, 16))
    assert abs(model(idx, idx)[1].item() - math.log(97)) < 1e-5  # the zero head still starts uniform
    adamw = build_optimizers(model, TrainConfig())[-1]
    assert any(p is model.x0_lambdas for g in adamw.param_groups if g["weight_decay"] == 0 for p in g["params"])


def test_the_bigram_table_reads_each_token_and_the_one_before_and_trains_on_adamw():
    from config import TrainConfig
    from model import bigram_rows
    from muon import build_optimizers
    model = tiny(bigram_buckets=31)
    assert model.bigram_embed.weight.abs().sum() == 0  # starts at zero: the model at step 0 is the one without it
    torch.testing.assert_close(model.bigram_lambdas.detach(), torch.full((3,), 0.1))
    adamw = build_optimizers(model, TrainConfig())[-1]
    assert any(p is model.bigram_embed.weight for g in adamw.param_groups for p in g["params"])
    assert model.num_params(embeddings=False) == tiny(bigram_buckets=0).num_params(embeddings=False) + 3  # lambdas
    idx, before = torch.tensor([[3, 7, 7, 3]]), torch.tensor([[-1, 3, 7, 7]])
    rows = bigram_rows(idx, before, 31)
    assert rows[0, 0] == 30 and (rows[0, 1:] < 30).all()  # the first token has its own row
    assert rows[0, 1] != rows[0, 3]  # (3, 7) and (7, 3) are different pairs
    # pairs of a 65-character vocabulary spread over 20,480 rows, as they would with any vocabulary size
    pairs = torch.cartesian_prod(torch.arange(65), torch.arange(65))
    assert len(bigram_rows(pairs[:, 1], pairs[:, 0], 20480).unique()) > 0.85 * len(pairs)
    randomized(model)
    x = torch.randint(0, 97, (2, 20))
    changed = x.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 97  # seen by attention from 9 on: here by the table at 10 too
    with torch.no_grad():
        model.bigram_embed.weight.zero_()
        plain = model(x) - model(changed)
        model.bigram_embed.weight.normal_()
        assert (model(x) - model(changed) - plain)[:, 10].abs().max() > 1e-3


def test_relu2_mlp_has_one_input_matrix_and_no_muon_split():
    model = randomized(tiny(mlp="relu2"))
    mlp = model.blocks[0].mlp
    assert mlp.w_in.weight.shape == (128, 64) and "blocks.0.mlp.w_in.weight" not in model.muon_splits()
    x = torch.randn(2, 5, 64)
    torch.testing.assert_close(mlp(x), F.relu(x @ mlp.w_in.weight.t()).square() @ mlp.down.weight.t())
    assert tiny(mlp="relu2").num_params() < tiny(mlp="swiglu").num_params()


def test_logit_softcap_bounds_the_logits_and_its_fused_gradients_match_autograd():
    model = randomized(tiny(logit_softcap=2.0), std=0.5)
    idx = torch.randint(0, 97, (2, 16))
    logits, loss = model(idx, idx)
    assert logits.abs().max() <= 2.0 and torch.equal(logits, model(idx))
    torch.testing.assert_close(loss, F.cross_entropy(logits.view(-1, 97), idx.view(-1)))
    torch.manual_seed(0)
    x = torch.randn(300, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3000, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 3000, (300,))
    t[::7] = -100
    LinearCrossEntropy.apply(x, w, t, 3.0)[1].backward()
    grads = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    F.cross_entropy(3.0 * torch.tanh(x @ w.t() / 3.0), t, ignore_index=-100).backward()
    torch.testing.assert_close(grads[0], x.grad)
    torch.testing.assert_close(grads[1], w.grad)


def test_recipe_switches_are_not_llama():
    from config import llama_equivalent
    for overrides in [dict(mlp="relu2"), *RECIPE[1:5]]:  # ReLU², the default, is not Llama's MLP
        cfg = ModelConfig(**TINY, **overrides)
        assert list(overrides)[0] in cfg.non_llama_features()
        assert llama_equivalent(cfg).non_llama_features() == []
    with pytest.raises(ValueError, match="mlp"):
        ModelConfig(**TINY, mlp="gelu")
    with pytest.raises(ValueError, match="logit_softcap"):
        ModelConfig(**TINY, logit_softcap=-1.0)
    with pytest.raises(ValueError, match="bigram_buckets"):
        ModelConfig(**TINY, bigram_buckets=1)
