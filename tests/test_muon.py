import io
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from config import TrainConfig
from conftest import spawn_gloo
import muon
import newton_schulz
from muon import Muon, build_optimizers, zeropower_via_newtonschulz5
from trainer import set_muon_momentum

# square, wide, tall, and shape groups that batch: two 24x24, and two tall 40x16 with a wide 16x40
SHAPES = [(24, 24), (16, 40), (40, 16), (24, 24), (40, 16)]
FP32, BF16 = torch.float32, torch.bfloat16


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The matrices here are tiny: a second thread only adds synchronization, which stalls on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_params(shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(shape, generator=gen) * 0.1) for shape in shapes]


def clone(params):
    return [nn.Parameter(p.detach().clone()) for p in params]


def run_steps(opt, params, steps, seed=1):
    """Same pseudo-random gradients for every optimizer given the same seed."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()


def with_spectrum(shape, gen, low=0.05):
    """A matrix with singular values spread over [low, 1]: a gradient with a known spectrum."""
    rows, cols = shape[-2:]
    k = min(rows, cols)
    u = torch.linalg.qr(torch.randn(*shape[:-2], rows, k, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(*shape[:-2], cols, k, generator=gen)).Q
    s = torch.logspace(0, torch.tensor(low).log10().item(), k)
    return u @ torch.diag_embed(s.expand(*shape[:-2], k)) @ v.mT


@pytest.fixture
def fp32_torch_muon(monkeypatch):
    """torch.optim.Muon hard-codes bf16 for Newton-Schulz; run its own code in fp32 for tight comparisons.

    copy=True as with the real cast: its iteration divides the result in place.
    """
    monkeypatch.setattr(torch.Tensor, "bfloat16", lambda self: self.to(torch.float32, copy=True))


@pytest.mark.parametrize("adjust_lr", ["original", "match_rms_adamw"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("nesterov", [True, False])
def test_matches_torch_muon_fp32(fp32_torch_muon, adjust_lr, weight_decay, nesterov):
    ours, theirs = make_params(SHAPES), make_params(SHAPES)
    kw = dict(lr=0.02, momentum=0.9, nesterov=nesterov, weight_decay=weight_decay)
    run_steps(Muon(ours, adjust_lr=adjust_lr, ns_dtype=FP32, **kw), ours, steps=4)
    run_steps(torch.optim.Muon(theirs, adjust_lr_fn=adjust_lr, **kw), theirs, steps=4)
    start = make_params(SHAPES)
    for p, q, p0 in zip(ours, theirs, start):
        torch.testing.assert_close(p - p0, q - p0, rtol=1e-5, atol=1e-6)


def test_matches_torch_muon_bf16():
    """Unpatched torch.optim.Muon (bf16 NS) against ours in bf16: both within bf16 rounding of the exact step.

    Ours runs wide matrices on the Gram side (other products, other rounding), so the bar is the
    distance to the fp64 step, against torch.optim.Muon's own distance to it.
    """
    ours, theirs, exact = make_params(SHAPES), make_params(SHAPES), make_params(SHAPES)
    run_steps(Muon(ours, lr=0.02, weight_decay=0.1, ns_dtype=BF16), ours, steps=3)
    run_steps(torch.optim.Muon(theirs, lr=0.02, weight_decay=0.1), theirs, steps=3)
    run_steps(Muon(exact, lr=0.02, weight_decay=0.1, ns_dtype=torch.float64), exact, steps=3)
    start = make_params(SHAPES)
    for p, q, r, p0 in zip(ours, theirs, exact, start):
        step_ours, step_theirs, step_exact = p - p0, q - p0, r - p0
        assert (step_ours - step_exact).norm() <= 0.04 * step_exact.norm()
        assert (step_ours - step_exact).norm() <= 3 * (step_theirs - step_exact).norm()


@pytest.mark.parametrize("shape", [(16, 64), (2, 96, 24)])
def test_gram_side_iteration_is_the_same_iteration(shape):
    """Wide matrices take the rows x rows path: in fp64 it equals the plain iteration to rounding."""
    rows, cols = sorted(shape[-2:])
    assert newton_schulz._gram_flops(rows, cols, 5) < newton_schulz._plain_flops(rows, cols, 5)  # the Gram path is taken
    g = torch.randn(shape, dtype=torch.float64)
    wide = g.mT if shape[-2] > shape[-1] else g
    wide = (wide / wide.norm(dim=(-2, -1), keepdim=True)).reshape(-1, rows, cols)
    plain = newton_schulz._newton_schulz_plain(wide.clone(), 5).reshape(*shape[:-2], rows, cols)
    plain = plain.mT if shape[-2] > shape[-1] else plain
    torch.testing.assert_close(zeropower_via_newtonschulz5(g, dtype=torch.float64), plain, rtol=1e-9, atol=1e-10)


def test_gram_side_iteration_stays_bounded_in_bf16():
    """An ill-conditioned gradient (singular values over four decades) in bf16: without restarts the
    Gram-side iteration inflates the largest singular values several-fold; with them it stays as
    bounded as the plain iteration."""
    g = with_spectrum((64, 512), torch.Generator().manual_seed(0), low=1e-4)
    s = torch.linalg.svdvals(zeropower_via_newtonschulz5(g, dtype=BF16).float())
    assert s.max() < 1.25, s.max()


@pytest.mark.parametrize("dtype", [FP32, BF16])
@pytest.mark.parametrize("shape", [(32, 32), (24, 56), (56, 24), (2, 3, 16, 40)])
def test_singular_values_near_one(dtype, shape):
    g = with_spectrum(shape, torch.Generator().manual_seed(0))
    s = torch.linalg.svdvals(zeropower_via_newtonschulz5(g, dtype=dtype).float())
    assert s.min() > 0.65 and s.max() < 1.25, (s.min(), s.max())


@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_batched_equals_one_by_one(dtype):
    g = torch.randn(2, 3, 20, 36)
    batched = zeropower_via_newtonschulz5(g, dtype=dtype)
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(batched[i, j], zeropower_via_newtonschulz5(g[i, j], dtype=dtype), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(zeropower_via_newtonschulz5(g.mT, dtype=dtype), batched.mT)


@pytest.mark.parametrize("adjust_lr", ["original", "match_rms_adamw"])
def test_muon_split_is_per_piece(fp32_torch_muon, adjust_lr):
    """A fused weight with muon_split steps exactly like its pieces as separate parameters (torch as the oracle)."""
    pieces = [(32, 16), (8, 16), (8, 16), (32, 16)]  # like a fused q, k, v, gate projection
    fused, = make_params([(80, 16)])
    w_in, = make_params([(48, 16)], seed=2)  # SwiGLU's fused (hidden, hidden) input weight
    ours = [fused, w_in]
    rows = [tuple(rows for rows, _ in pieces), (24, 24)]
    theirs = [nn.Parameter(t.detach().clone()) for p, r in zip(ours, rows) for t in p.split(list(r))]
    run_steps(Muon(ours, weight_decay=0.1, adjust_lr=adjust_lr, ns_dtype=FP32, splits=dict(zip(ours, rows))), ours,
              steps=3)
    # the same gradients, cut into the same pieces
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.Muon(theirs, lr=0.02, weight_decay=0.1, adjust_lr_fn=adjust_lr)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=gen) for p in ours]
        for q, g in zip(theirs, [g for r, g in zip(rows, grads) for g in g.split(list(r))]):
            q.grad = g
        opt.step()
    torch.testing.assert_close(torch.cat([q.detach() for q in theirs]), torch.cat([p.detach() for p in ours]),
                               rtol=1e-5, atol=1e-6)


def test_state_dict_round_trip():
    params = make_params(SHAPES)
    opt = Muon(params, momentum=0.9, weight_decay=0.05, splits={params[2]: (24, 16)})
    run_steps(opt, params, steps=2)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    resumed_params = clone(params)
    resumed = Muon(resumed_params, splits={resumed_params[2]: (24, 16)})  # hyperparameters come from the state dict
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    run_steps(opt, params, steps=2, seed=5)
    run_steps(resumed, resumed_params, steps=2, seed=5)
    for p, q in zip(params, resumed_params):
        assert torch.equal(p, q)


def test_bad_parameters_raise_at_construction():
    split = nn.Parameter(torch.zeros(8, 4))
    bad = [nn.Parameter(torch.zeros(8)), nn.Parameter(torch.zeros(2, 3, 4)),
           nn.Parameter(torch.zeros(4, 4, dtype=torch.complex64)),
           nn.Parameter(torch.zeros(4, 4).to_sparse()), split]
    for p in bad:
        with pytest.raises(ValueError):
            Muon([p], splits={split: (4, 3)})  # rows that do not sum to size(0)
    ok = nn.Parameter(torch.zeros(4, 4))
    for kwargs in [dict(adjust_lr="spectral"), dict(momentum=1.0), dict(lr=-1.0), dict(ns_steps=0), dict(weight_decay=-0.1)]:
        with pytest.raises(ValueError):
            Muon([ok], **kwargs)
    opt = Muon([ok])
    with pytest.raises(ValueError):
        opt.add_param_group(dict(params=[nn.Parameter(torch.zeros(3))]))
    assert len(opt.param_groups) == 1


class StandIn(nn.Module):
    """The parameter layout build_optimizers relies on: embed, blocks (a ModuleList), norms, lm_head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(norm=nn.LayerNorm(16), qkv=nn.Linear(16, 48, bias=True),
                                                       proj=nn.Linear(16, 16, bias=False))) for _ in range(2))
        self.norm = nn.LayerNorm(16)
        self.lm_head = nn.Linear(16, 50, bias=False)


def check_grouping(model, cfg):
    optimizers = build_optimizers(model, cfg)
    seen = [p for opt in optimizers for g in opt.param_groups for p in g["params"]]
    assert len(seen) == len({id(p) for p in seen}) == len(list(model.parameters()))
    block_matrices = {id(p) for p in model.blocks.parameters() if p.ndim == 2}
    for opt in optimizers:
        for g in opt.param_groups:
            assert g["initial_lr"] == g["lr"]
            if isinstance(opt, Muon):
                assert {id(p) for p in g["params"]} == block_matrices and g["lr"] == cfg.muon_lr
            else:
                assert isinstance(opt, torch.optim.AdamW) and g["lr"] == cfg.adamw_lr
                assert g["betas"] == (cfg.adamw_beta1, cfg.adamw_beta2) and g["fused"]  # the fused kernel on a CPU too
                assert all(p.ndim >= 2 for p in g["params"]) if g["weight_decay"] else all(p.ndim < 2 for p in g["params"])
                assert g["weight_decay"] in (0.0, cfg.weight_decay)
    kinds = [type(opt) for opt in optimizers]
    assert kinds == ([Muon, torch.optim.AdamW] if cfg.optimizer == "muon" else [torch.optim.AdamW])
    muon_ids = {id(p) for opt in optimizers if isinstance(opt, Muon) for p in opt.param_groups[0]["params"]}
    embed_and_head = [model.embed.weight] + ([model.lm_head.weight] if model.lm_head is not None else [])
    assert all(id(p) not in muon_ids for p in embed_and_head)
    return optimizers


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_build_optimizers_grouping(optimizer):
    model = StandIn()
    optimizers = check_grouping(model, TrainConfig(optimizer=optimizer))
    x = torch.randint(0, 50, (2, 5))
    h = model.embed(x)
    for block in model.blocks:
        h = h + block["proj"](block["qkv"](block["norm"](h))[..., :16])
    model.lm_head(model.norm(h)).square().mean().backward()
    for opt in optimizers:
        opt.step()


@pytest.mark.skipif(not (Path(__file__).parents[1] / "model.py").exists(), reason="model.py not written yet")
def test_build_optimizers_on_blueberry():
    from config import ModelConfig
    from model import Blueberry
    model = Blueberry(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16,
                                  mlp="swiglu"))
    optimizers = check_grouping(model, TrainConfig())
    named = dict(model.named_parameters())
    assert optimizers[0].splits == {id(named[name]): rows for name, rows in model.muon_splits().items()}
    idx = torch.randint(0, 64, (2, 16))
    before = [p.detach().clone() for p in model.parameters()]
    model(idx, targets=idx)[1].backward()
    for opt in optimizers:
        opt.step()
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.skipif(not (Path(__file__).parents[1] / "model.py").exists(), reason="model.py not written yet")
def test_muon_splits_come_from_the_model_by_name(fp32_torch_muon):
    """Wrapping (FSDP2's fully_shard) gives every parameter a new tensor that carries no attribute: the fused weights
    are still orthogonalized per projection, because build_optimizers asks the model by name (torch as the oracle)."""
    from config import ModelConfig
    from model import Blueberry
    model = Blueberry(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16,
                                  mlp="swiglu"))
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            setattr(module, name, nn.Parameter(p.detach().clone()))
    muon_opt = build_optimizers(model, TrainConfig(muon_weight_decay=0.0))[0]
    muon_opt.ns_dtype = FP32
    named = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(0)
    for p in muon_opt.param_groups[0]["params"]:
        p.grad = torch.randn(p.shape, generator=gen)
    for name, rows in model.muon_splits().items():  # qkv+gate (4 pieces) and SwiGLU's gate+up (2) in every block
        p = named[name]
        theirs = [nn.Parameter(t.detach().clone()) for t in p.split(list(rows))]
        for q, g in zip(theirs, p.grad.split(list(rows))):
            q.grad = g.clone()
        torch.optim.Muon(theirs, lr=0.02, momentum=0.95, weight_decay=0.0).step()
        p.expected = torch.cat([q.detach() for q in theirs])
    muon_opt.step()
    for name in model.muon_splits():
        torch.testing.assert_close(named[name].detach(), named[name].expected, rtol=1e-5, atol=1e-6)


def test_momentum_warmup():
    cfg = TrainConfig(muon_momentum=0.95, muon_momentum_warmup_steps=100)
    params = make_params([(4, 4)])
    optimizers = [Muon(params), torch.optim.AdamW(make_params([(4,)]))]
    assert set_muon_momentum(optimizers, 0, cfg) == pytest.approx(0.85)
    assert set_muon_momentum(optimizers, 50, cfg) == pytest.approx(0.90)
    assert set_muon_momentum(optimizers, 500, cfg) == pytest.approx(0.95)
    assert optimizers[0].param_groups[0]["momentum"] == pytest.approx(0.95)
    assert "momentum" not in optimizers[1].param_groups[0]
    assert set_muon_momentum(optimizers, 0, TrainConfig(muon_momentum_warmup_steps=0)) == pytest.approx(0.95)


# Distributed: a group of five 16x16 (three squares and two pieces of the fused weight: the last
# rank's share is padded), a lone tall matrix and a lone 4x16 piece (one rank idles for those).
DIST_SHAPES = [(16, 16), (16, 16), (40, 16), (16, 16), (36, 16)]


def dist_params():
    """The parameters, and the Muon that splits the last one."""
    params = make_params(DIST_SHAPES)
    return params, Muon(params, weight_decay=0.1, splits={params[4]: (16, 4, 16)})


def _dist_worker(rank, world, out_dir):
    import muon
    counted = []
    original = muon.zeropower_via_newtonschulz5

    def counting(G, *args, **kwargs):
        counted.append(G.size(0))
        return original(G, *args, **kwargs)

    muon.zeropower_via_newtonschulz5 = counting
    params, opt = dist_params()
    run_steps(opt, params, steps=3)
    torch.save(dict(params=[p.detach() for p in params], orthogonalized=sum(counted) // 3),
               os.path.join(out_dir, f"rank{rank}.pt"))


def test_distributed_step_matches_single_process(tmp_path):
    spawn_gloo(_dist_worker, 2, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single, opt = dist_params()
    run_steps(opt, single, steps=3)
    for p, q0, q1 in zip(single, ranks[0]["params"], ranks[1]["params"]):
        assert torch.equal(q0, q1)  # every rank ends with identical weights
        torch.testing.assert_close(q0, p.detach(), rtol=0, atol=1e-6)
    # 7 matrices per step (3 squares, the tall one, 3 pieces), each orthogonalized on one rank only
    assert ranks[0]["orthogonalized"] + ranks[1]["orthogonalized"] == 7


# The 2026 variants (issue 29): switches that are off by default, and off take exactly the step above.

def test_recipe_switches_off_take_torch_muons_step(fp32_torch_muon):
    """A TrainConfig without the switches (a run from before them) builds a Muon with them off, and that Muon steps
    as torch.optim.Muon does, also after loading a state dict whose groups lack the switches."""
    import dataclasses
    old = {k: v for k, v in dataclasses.asdict(TrainConfig()).items()
           if k not in ("muon_polar_express", "normuon", "cautious_weight_decay")}
    model = StandIn()
    opt = build_optimizers(model, TrainConfig(**old))[0]
    assert isinstance(opt, Muon)
    assert [opt.defaults[k] for k in ("polar_express", "normuon", "cautious_wd")] == [False, False, False]
    ours, theirs = make_params(SHAPES), make_params(SHAPES)
    opt = Muon(ours, weight_decay=0.1, ns_dtype=FP32, polar_express=False, normuon=False, cautious_wd=False)
    state = opt.state_dict()
    for group in state["param_groups"]:
        for key in ("polar_express", "normuon", "normuon_beta2", "cautious_wd"):
            del group[key]
    opt.load_state_dict(state)
    run_steps(opt, ours, steps=3)
    run_steps(torch.optim.Muon(theirs, lr=0.02, momentum=0.95, weight_decay=0.1), theirs, steps=3)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [FP32, BF16])
@pytest.mark.parametrize("shape", [(32, 32), (24, 56), (56, 24), (64, 512), (2, 3, 16, 40)])
def test_polar_express_lands_singular_values_nearer_one(dtype, shape):
    g = with_spectrum(shape, torch.Generator().manual_seed(0))
    quintic = torch.linalg.svdvals(zeropower_via_newtonschulz5(g, dtype=dtype).float())
    polar = torch.linalg.svdvals(zeropower_via_newtonschulz5(g, dtype=dtype, polar_express=True).float())
    assert polar.min() > 0.84 and polar.max() < 1.16, (polar.min(), polar.max())
    assert (polar - 1).abs().mean() < (quintic - 1).abs().mean()


@pytest.mark.parametrize("shape", [(48, 16), (16, 48), (24, 24)])
def test_normuon_balances_neurons_and_keeps_the_norm(shape):
    u = torch.randn(shape) * torch.logspace(-1, 1, shape[0])[:, None]  # rows of very different sizes
    v = torch.zeros(muon._neuron_shape(shape))
    out = muon.normuon_(u, v, beta2=0.95)
    torch.testing.assert_close(out.norm(), u.norm())
    neurons = out.norm(dim=1) if shape[0] >= shape[1] else out.norm(dim=0)  # rows of tall/square, columns of wide
    torch.testing.assert_close(neurons, neurons.mean().expand_as(neurons), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(v, 0.05 * u.square().mean(dim=1 if shape[0] >= shape[1] else 0, keepdim=True))


def test_normuon_keeps_its_state_per_piece_and_resumes_exactly():
    params = make_params(SHAPES)
    opt = Muon(params, normuon=True, polar_express=True, splits={params[2]: (24, 16)})
    run_steps(opt, params, steps=2)
    assert set(opt.state[params[2]]) == {"momentum_buffer", "normuon_0", "normuon_24"}
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    resumed_params = clone(params)
    resumed = Muon(resumed_params, splits={resumed_params[2]: (24, 16)})
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    run_steps(opt, params, steps=2, seed=5)
    run_steps(resumed, resumed_params, steps=2, seed=5)
    for p, q in zip(params, resumed_params):
        assert torch.equal(p, q)


def test_cautious_weight_decay_decays_only_entries_the_update_moves_toward_zero():
    p = torch.tensor([1.0, 1.0, -1.0, -1.0])
    muon.cautious_decay_(p, torch.tensor([0.5, -0.5, -0.5, 0.5]), 0.1)
    assert p.tolist() == pytest.approx([0.9, 1.0, -0.9, -1.0])
    # in a step: the decayed entries are exactly those where update and weight share a sign
    ours, plain = make_params([(24, 24)]), make_params([(24, 24)])
    run_steps(Muon(ours, lr=0.02, weight_decay=0.5, cautious_wd=True, ns_dtype=FP32), ours, steps=1)
    run_steps(Muon(plain, lr=0.02, weight_decay=0.0, ns_dtype=FP32), plain, steps=1)
    p0 = make_params([(24, 24)])[0].detach()
    update = (p0 - plain[0].detach()) / 0.02
    decayed = update * p0 >= 0
    torch.testing.assert_close(ours[0].detach(), torch.where(decayed, p0 * 0.99, p0) - 0.02 * update)
    assert 0 < decayed.float().mean() < 1


def test_build_optimizers_passes_the_switches():
    cfg = TrainConfig(muon_polar_express=True, normuon=True, cautious_weight_decay=True, muon_weight_decay=0.1)
    opt = build_optimizers(StandIn(), cfg)[0]
    group = opt.param_groups[0]
    assert (group["polar_express"], group["normuon"], group["cautious_wd"], group["weight_decay"]) == (True, True, True, 0.1)
