"""Tests for runtime/optim.py: the FAM optimizer, its handlers and classifier, and WarmupCosine."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from runtime.optim import (
    FAM,
    HANDLERS,
    WarmupCosine,
    classify_name,
    fam_param_groups,
)

# ----------------------------------------------------------------------------- helpers


def alternating(n: int) -> torch.Tensor:
    """(-1)^i: all spectral power in the Nyquist bin (the highest frequency)."""
    return 1.0 - 2.0 * (torch.arange(n) % 2).float()


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.qkv = nn.Linear(d, 3 * d)  # attention by name: "qkv"
        self.mlp = nn.Linear(d, d)  # default: the original's bug made this "attention"
        self.norm = nn.LayerNorm(d)


class Net(nn.Module):
    def __init__(self, vocab: int = 16, d: int = 16) -> None:
        super().__init__()
        self.token_embed = nn.Embedding(vocab, d)
        self.mixer = nn.MultiheadAttention(d, 2, batch_first=True)  # attention by type only
        self.conv = nn.Conv1d(d, d, 3, padding=1)
        self.stem = nn.Conv1d(d, d, 1)  # conv by type only
        self.block = Block(d)
        self.head = nn.Linear(d, 1)
        self.frozen = nn.Linear(d, d)
        self.frozen.requires_grad_(False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.token_embed(tokens)
        x = x + self.mixer(x, x, x, need_weights=False)[0]
        x = x + self.conv(self.stem(x.transpose(1, 2))).transpose(1, 2)
        x = x + self.block.mlp(torch.relu(self.block.norm(x)))
        return self.head(x.mean(dim=1)).squeeze(-1)


def toy_task(seed: int = 0, batch: int = 32, length: int = 8, vocab: int = 16):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, length), generator=g)
    values = torch.randn(vocab, generator=g)
    return tokens, values[tokens].mean(dim=1) * 3.0


def quadratic_grads(params, targets, scales):
    for p, c, d in zip(params, targets, scales, strict=True):
        p.grad = d * (p.detach() - c)


# ----------------------------------------------------------------------------- momentum


@pytest.mark.parametrize("decoupled", [False, True])
def test_plain_ema_momentum_before_fam_start(decoupled):
    """Before fam_start_step FAM is exactly m = a*m + (1-a)*g, p -= lr*m (with weight decay)."""
    g = torch.Generator().manual_seed(1)
    shapes = [(600,), (10, 30), (4,)]
    params = [torch.randn(s, generator=g, requires_grad=True) for s in shapes]
    ref = [p.detach().clone() for p in params]
    lr, a, wd = 0.05, 0.8, 0.01
    opt = FAM(params, lr=lr, alpha=a, weight_decay=wd, decoupled_weight_decay=decoupled)
    opt_steps = opt.defaults["fam_start_step"]
    assert opt_steps == 100
    moms = [torch.zeros_like(r) for r in ref]
    for _ in range(12):
        grads = [torch.randn(s, generator=g) for s in shapes]
        for p, gr in zip(params, grads, strict=True):
            p.grad = gr.clone()
        opt.step()
        for r, m, gr in zip(ref, moms, grads, strict=True):
            if decoupled:
                r.mul_(1.0 - lr * wd)
            else:
                gr = gr.add(r, alpha=wd)
            m.mul_(a).add_(gr, alpha=1.0 - a)
            r.add_(m, alpha=-lr)
    for p, r in zip(params, ref, strict=True):
        assert torch.equal(p.detach(), r)
    assert all("bands" not in opt.state[p] for p in params)


# ----------------------------------------------------------------------------- handlers


def bands_with(**mass: float) -> torch.Tensor:
    """An 8-band vector with the given mass at named band indices (b0..b7), normalised to 1."""
    v = torch.zeros(8)
    for key, value in mass.items():
        v[int(key[1:])] = value
    return v / v.sum()


@pytest.mark.parametrize(
    ("handler", "bands", "alpha", "expected"),
    [
        # default: high half (bands 4..7) > 0.3 -> min(0.95, alpha + 0.05)
        ("default", bands_with(b0=0.69, b5=0.31), 0.9, 0.95),
        ("default", bands_with(b0=0.71, b5=0.29), 0.9, 0.9),
        ("default", bands_with(b0=0.5, b7=0.5), 0.8, 0.85),
        # conv: mid (bands 2..5) > 0.4 -> min(0.97, alpha + 0.07); else high quarter (6, 7) > 0.3
        ("conv", bands_with(b0=0.59, b3=0.41), 0.9, 0.97),
        ("conv", bands_with(b0=0.29, b3=0.39, b7=0.32), 0.9, 0.95),
        ("conv", bands_with(b0=0.8, b3=0.1, b7=0.1), 0.9, 0.9),
        # attention: argmax < 2 -> max(0.85, alpha - 0.05); argmax > 6 -> min(0.98, alpha + 0.08)
        ("attention", bands_with(b1=0.4, b4=0.3, b7=0.3), 0.9, 0.85),
        ("attention", bands_with(b1=0.3, b4=0.3, b7=0.4), 0.9, 0.98),
        ("attention", bands_with(b1=0.3, b4=0.4, b7=0.3), 0.9, 0.9),
        ("attention", bands_with(b6=1.0), 0.9, 0.9),
        # embedding: high quarter > 0.2 -> min(0.98, alpha + 0.08)
        ("embedding", bands_with(b0=0.79, b6=0.21), 0.9, 0.98),
        ("embedding", bands_with(b0=0.81, b6=0.19), 0.9, 0.9),
        ("embedding", bands_with(b0=0.5, b7=0.5), 0.8, 0.88),
        # caps never lower and floors never raise (the original's min/max could invert the rule)
        ("default", bands_with(b7=1.0), 0.97, 0.97),
        ("attention", bands_with(b0=1.0), 0.5, 0.5),
        ("attention", bands_with(b0=1.0), 0.87, 0.85),
    ],
)
def test_handler_rules(handler, bands, alpha, expected):
    got = HANDLERS[handler].momentum(bands, alpha)
    assert got.shape == ()
    assert got.item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("handler", sorted(HANDLERS))
@pytest.mark.parametrize("length", [7, 100, 257, 1000, 4096])
@pytest.mark.parametrize("n_bands", [1, 3, 8, 13])
def test_bands_partition_all_bins(handler, length, n_bands):
    """Every bin lands in exactly one band, so band powers sum to 1 (the original dropped tails)."""
    h = HANDLERS[handler]
    n_bins = length // 2 + 1
    edges = h.band_edges(n_bins, n_bands)
    assert len(edges) == n_bands + 1 and edges[0] == 0 and edges[-1] == n_bins
    assert all(a <= b for a, b in zip(edges, edges[1:], strict=False))
    sample = torch.randn(length, generator=torch.Generator().manual_seed(length))
    powers = h.band_powers(sample, n_bands)
    assert powers.shape == (n_bands,)
    assert powers.sum().item() == pytest.approx(1.0, abs=1e-5)
    # the highest-frequency bin is counted (the original lost it whenever the split did not divide)
    assert h.band_powers(alternating(length - length % 2), n_bands)[-1].item() == pytest.approx(
        1.0, abs=1e-5
    )


@pytest.mark.parametrize(
    ("handler", "smooth_expected"),
    [("default", 0.9), ("conv", 0.9), ("embedding", 0.9), ("attention", 0.85)],
)
@pytest.mark.parametrize("numel", [1024, 3 * 4096])  # whole gradient / sampled gradient
def test_gradient_frequency_sets_momentum(handler, smooth_expected, numel):
    """Alternating-sign gradients raise momentum; a smooth (constant) gradient keeps the base
    alpha (attention lowers it: its dominant band is the lowest). Also through the fixed sample."""
    raised = {"default": 0.95, "conv": 0.95, "embedding": 0.98, "attention": 0.98}[handler]
    for grad, expected in ((alternating(numel), raised), (torch.ones(numel), smooth_expected)):
        p = torch.zeros(numel // 64, 64, requires_grad=True)
        opt = FAM([{"params": [p], "handler": handler}], lr=0.0, alpha=0.9, fam_start_step=2)
        for step in range(1, 5):
            p.grad = grad.reshape(p.shape).clone()
            opt.step()
            assert ("effective_alpha" in opt.state[p]) == (step > 2)
        assert opt.state[p]["effective_alpha"].item() == pytest.approx(expected, abs=1e-6)
        assert opt.effective_momentum() == {handler: pytest.approx(expected, abs=1e-6)}
        assert ("sample_idx" in opt.state[p]) == (numel > 4096)


def test_adapted_momentum_is_used_in_the_update():
    """Once adapted, the EMA uses the effective alpha: m = a_eff*m + (1-a_eff)*g."""
    p = torch.zeros(512, requires_grad=True)
    opt = FAM([p], lr=0.1, alpha=0.9, fam_start_step=1)
    g = alternating(512)
    m = torch.zeros(512)
    for a in (0.9, 0.95, 0.95):  # step 1 plain, then adapted (high-frequency -> 0.95)
        p.grad = g.clone()
        opt.step()
        m = a * m + (1 - a) * g
    torch.testing.assert_close(opt.state[p]["exp_avg"], m)


# ----------------------------------------------------------------------------- classification


def test_classifier_assigns_handlers_by_module_and_name():
    """Regression for the original's self-comparing name test, which made every group `attention`."""
    model = Net()
    groups = fam_param_groups(model, lr=0.01, alpha=0.8)
    kinds = {n: g["handler"] for g in groups for n in g["param_names"]}
    assert kinds["token_embed.weight"] == "embedding"
    for name in ("mixer.in_proj_weight", "mixer.out_proj.weight", "block.self_attn.in_proj_bias"):
        assert kinds[name] == "attention"
    assert kinds["block.qkv.weight"] == "attention"
    for name in ("conv.weight", "conv.bias", "stem.weight"):
        assert kinds[name] == "conv"
    for name in ("block.mlp.weight", "block.norm.weight", "head.weight", "head.bias"):
        assert kinds[name] == "default"
    assert "frozen.weight" not in kinds
    assert all(g["lr"] == 0.01 and g["alpha"] == 0.8 for g in groups)
    assert sum(len(g["params"]) for g in groups) == len(kinds)
    opt = FAM(groups)
    assert [g["handler"] for g in opt.param_groups] == [g["handler"] for g in groups]
    assert opt.param_groups[0]["param_names"] == groups[0]["param_names"]

    custom = fam_param_groups(model, classify=lambda name, p: "conv" if p.ndim > 1 else "default")
    assert {g["handler"]: len(g["params"]) for g in custom}["conv"] == sum(
        p.ndim > 1 for p in model.parameters() if p.requires_grad
    )


def test_classify_name_keywords():
    assert classify_name("layers.0.self_attn.out_proj.weight") == "attention"
    assert classify_name("encoder.Attention.w") == "attention"
    assert classify_name("h.0.mha.bias") == "attention"
    assert classify_name("embed_tokens.weight") == "embedding"
    assert classify_name("lookup_table") == "embedding"
    assert classify_name("positions") == "embedding"
    assert classify_name("features.conv2.weight") == "conv"
    assert classify_name("encoder.mlp.fc1.weight") == "default"
    assert classify_name("layers.0.ffn.weight") == "default"


def test_groups_named_pairs_and_explicit_handlers():
    model = Net()
    opt = FAM(model.named_parameters(), lr=0.01)
    kinds = {n: g["handler"] for g in opt.param_groups for n in g["param_names"]}
    assert kinds["block.mlp.weight"] == "default"
    assert kinds["block.self_attn.in_proj_weight"] == "attention"
    assert kinds["token_embed.weight"] == "embedding"

    # a dict group without handler takes its names' kind; the original would say "attention"
    p = nn.Parameter(torch.zeros(3))
    assert FAM([{"params": [p], "param_names": ["mlp.fc.weight"]}]).param_groups[0]["handler"] == (
        "default"
    )
    assert FAM([p]).param_groups[0]["handler"] == "default"
    with pytest.raises(ValueError, match=r"attention.*conv.*default.*embedding"):
        FAM([{"params": [p], "handler": "rnn"}])
    q = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="mixes parameter kinds"):
        FAM([{"params": [p, q], "param_names": ["attn.w", "mlp.w"]}])
    with pytest.raises(ValueError, match="unknown FAM option"):
        fam_param_groups(model, learning_rate=0.1)
    with pytest.raises(ValueError, match="known handlers"):
        fam_param_groups(model, classify=lambda name, p: "rnn")


# ----------------------------------------------------------------------------- training


def test_minimises_quadratic():
    g = torch.Generator().manual_seed(3)
    x = torch.zeros(1024, requires_grad=True)
    target = torch.randn(1024, generator=g)
    scale = 0.5 + 1.5 * torch.rand(1024, generator=g)
    opt = FAM([x], lr=0.2, alpha=0.9, fam_start_step=10)

    def loss() -> float:
        return 0.5 * (scale * (x.detach() - target) ** 2).sum().item()

    start = loss()
    for _ in range(300):
        quadratic_grads([x], [target], [scale])
        opt.step()
    assert "effective_alpha" in opt.state[x]  # the adaptive path ran
    assert start > 100
    assert loss() < 1e-3  # optimum is 0


def test_trains_small_model():
    torch.manual_seed(0)
    model = Net()
    tokens, target = toy_task()
    opt = FAM(fam_param_groups(model, lr=0.1, alpha=0.9, fam_start_step=20, min_size=64))
    losses = []
    for _ in range(80):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(tokens), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.2 * losses[0]
    analysed = opt.effective_momentum()
    assert {"attention", "conv", "embedding"} <= analysed.keys()
    assert all(0.85 - 1e-6 <= a <= 0.98 + 1e-6 for a in analysed.values())


def test_closure_returns_loss():
    x = torch.ones(4, requires_grad=True)
    opt = FAM([x], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (x**2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == pytest.approx(4.0)
    assert torch.all(x < 1)


def run(model: nn.Module, opt: FAM, sched: WarmupCosine | None, steps: int) -> None:
    tokens, target = toy_task(seed=5)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(tokens), target).backward()
        opt.step()
        if sched is not None:
            sched.step()


def make(seed: int = 0):
    torch.manual_seed(0)
    model = Net()
    model.big = nn.Parameter(torch.zeros(9000))  # > sample_size: sampled analysis
    opt = FAM(
        fam_param_groups(
            model, lr=0.05, fam_start_step=3, min_size=64, sample_size=1024, weight_decay=1e-3
        ),
        seed=seed,
    )
    sched = WarmupCosine(opt, warmup_steps=3, total_steps=12, min_lr=0.005)
    return model, opt, sched


def with_big_grad(model: Net):
    hook = model.head.register_forward_hook(
        lambda mod, inp, out: out + 1e-3 * (model.big * torch.linspace(-1, 1, 9000)).sum()
    )
    return hook


def test_state_dict_resume_is_bit_exact():
    model_a, opt_a, sched_a = make()
    with_big_grad(model_a)
    run(model_a, opt_a, sched_a, 12)

    model_b, opt_b, sched_b = make()
    with_big_grad(model_b)
    run(model_b, opt_b, sched_b, 6)
    saved = copy.deepcopy(
        {"model": model_b.state_dict(), "opt": opt_b.state_dict(), "sched": sched_b.state_dict()}
    )
    model_c, opt_c, sched_c = make()
    with_big_grad(model_c)
    model_c.load_state_dict(saved["model"])
    opt_c.load_state_dict(saved["opt"])
    sched_c.load_state_dict(saved["sched"])
    run(model_c, opt_c, sched_c, 6)

    assert "sample_idx" in opt_c.state[model_c.big]
    for (name, pa), pc in zip(model_a.named_parameters(), model_c.parameters(), strict=True):
        assert torch.equal(pa, pc), name
        for key in ("exp_avg", "bands"):
            if key in opt_a.state[pa]:
                assert torch.equal(opt_a.state[pa][key], opt_c.state[pc][key]), (name, key)
    assert opt_a.param_groups[0]["lr"] == opt_c.param_groups[0]["lr"]


def test_same_seed_same_run_and_fixed_sample():
    runs = []
    for seed in (0, 0, 1):
        model, opt, _ = make(seed)
        with_big_grad(model)
        run(model, opt, None, 8)
        runs.append((model, opt))
    (ma, oa), (mb, ob), (mc, oc) = runs
    for pa, pb in zip(ma.parameters(), mb.parameters(), strict=True):
        assert torch.equal(pa, pb)
    idx_a, idx_c = oa.state[ma.big]["sample_idx"], oc.state[mc.big]["sample_idx"]
    assert torch.equal(idx_a, ob.state[mb.big]["sample_idx"])
    assert not torch.equal(idx_a, idx_c)
    for idx in (idx_a, idx_c):  # 16 whole, increasing, 64-aligned runs inside the tensor
        assert idx.numel() == 1024 and idx.unique().numel() == 1024
        assert torch.all(idx[1:] > idx[:-1]) and idx.max() < 9000
        runs_ = idx.reshape(16, 64)
        assert torch.all(runs_[:, 0] % 64 == 0)
        assert torch.equal(runs_ - runs_[:, :1], torch.arange(64).expand(16, 64))


def test_low_precision_params_keep_float32_band_state():
    p = torch.zeros(512, dtype=torch.bfloat16, requires_grad=True)
    opt = FAM([p], fam_start_step=0)
    p.grad = torch.randn(512).to(torch.bfloat16)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    q = torch.zeros(512, dtype=torch.bfloat16, requires_grad=True)
    opt2 = FAM([q], fam_start_step=0)
    opt2.load_state_dict(saved)
    assert opt2.state[q]["bands"].dtype == torch.float32
    assert torch.equal(opt2.state[q]["bands"], opt.state[p]["bands"])
    assert opt2.state[q]["exp_avg"].dtype == torch.bfloat16


def test_step_never_reads_tensors_on_the_host(monkeypatch):
    """No .item()/bool()/float() on tensors inside step: no host sync per parameter."""
    model, opt, _ = make()
    with_big_grad(model)
    run(model, opt, None, 4)  # past fam_start_step, analysis state exists

    def forbidden(*args, **kwargs):
        raise AssertionError("host read of a tensor inside FAM.step")

    tokens, target = toy_task(seed=5)
    opt.zero_grad()
    nn.functional.mse_loss(model(tokens), target).backward()
    for attr in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, attr, forbidden)
    opt.step()
    monkeypatch.undo()
    assert "effective_alpha" in opt.state[model.big]


def test_skips_params_without_grad_and_rejects_sparse():
    a = torch.ones(3, requires_grad=True)
    b = torch.ones(3, requires_grad=True)
    opt = FAM([a, b], lr=0.1)
    a.grad = torch.ones(3)
    opt.step()
    assert torch.equal(b.detach(), torch.ones(3)) and b not in opt.state
    assert opt.state[a]["step"] == 1

    emb = nn.Embedding(10, 4, sparse=True)
    opt = FAM(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()


# ----------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": -1.0}, "lr"),
        ({"lr": math.nan}, "lr"),
        ({"alpha": 1.0}, "alpha"),
        ({"alpha": -0.1}, "alpha"),
        ({"beta": 1.0}, "beta"),
        ({"eps": -1e-8}, "eps"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"n_bands": 0}, "n_bands"),
        ({"n_bands": 2.5}, "n_bands"),
        ({"fam_start_step": -1}, "fam_start_step"),
        ({"min_size": -1}, "min_size"),
        ({"sample_size": 32, "sample_chunk": 64}, "sample_size"),
        ({"sample_chunk": 0}, "sample_chunk"),
        ({"seed": -3}, "seed"),
        ({"decoupled_weight_decay": 1}, "decoupled_weight_decay"),
    ],
)
def test_fam_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FAM([torch.zeros(2, requires_grad=True)], **kwargs)


def test_fam_rejects_bad_group_options():
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="alpha"):
        FAM([{"params": [p], "alpha": 1.5}])
    opt = FAM([p])
    with pytest.raises(ValueError, match="n_bands"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "n_bands": 0})
    assert len(opt.param_groups) == 1
    with pytest.raises(ValueError, match="complex"):
        FAM([torch.zeros(2, dtype=torch.complex64, requires_grad=True)])


# ----------------------------------------------------------------------------- schedule


def scheduled_lrs(sched: WarmupCosine, opt: torch.optim.Optimizer, steps: int) -> list[float]:
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(steps):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


def test_warmup_plateau_cosine_then_flat():
    base, start, low = 0.1, 0.01, 0.001
    opt = FAM([torch.zeros(2, requires_grad=True)], lr=base)
    sched = WarmupCosine(opt, 4, 10, warmup_start_lr=start, min_lr=low, decay_start=6)
    lrs = scheduled_lrs(sched, opt, 14)
    assert lrs[0] == pytest.approx(start)  # warmup start
    assert lrs[2] == pytest.approx((start + base) / 2)  # halfway up
    assert lrs[4] == pytest.approx(base)  # warmup end
    assert lrs[5] == pytest.approx(base)  # plateau
    assert lrs[6] == pytest.approx(base)  # decay starts at cos(0)
    assert lrs[8] == pytest.approx((base + low) / 2)  # mid-cosine
    assert lrs[9] == pytest.approx(low + (base - low) * (1 + math.cos(0.75 * math.pi)) / 2)
    assert lrs[10] == pytest.approx(low)  # end
    assert lrs[11:] == pytest.approx([low] * 4)  # past the end: flat, not rising
    assert all(b <= a + 1e-12 for a, b in zip(lrs[6:], lrs[7:], strict=False))
    assert sched.lr_at(8) == pytest.approx([lrs[8]])


def test_default_decay_start_and_groups():
    p, q = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    opt = torch.optim.SGD([{"params": [p], "lr": 0.2}, {"params": [q], "lr": 0.04}])
    sched = WarmupCosine(opt, warmup_steps=2, total_steps=6)
    assert sched.get_last_lr() == [0.0, 0.0]
    for _ in range(4):
        opt.step()
        sched.step()
    assert sched.get_last_lr() == pytest.approx([0.1, 0.02])  # mid-cosine at (2 + 6) / 2
    resumed = WarmupCosine(opt, warmup_steps=2, total_steps=6)
    resumed.load_state_dict(sched.state_dict())
    opt.step()
    resumed.step()
    assert resumed.get_last_lr() == pytest.approx(sched.lr_at(5))


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((5, 4), {}, "warmup_steps"),
        ((-1, 4), {}, "warmup_steps"),
        ((0, 0), {}, "total_steps"),
        ((2, 10), {"decay_start": 1}, "decay_start"),
        ((2, 10), {"decay_start": 11}, "decay_start"),
        ((2, 10), {"min_lr": 0.5}, "min_lr"),
        ((2, 10), {"min_lr": -0.1}, "min_lr"),
        ((2, 10), {"warmup_start_lr": -1.0}, "warmup_start_lr"),
        ((2, 10), {"warmup_start_lr": 0.2}, "warmup_start_lr"),
    ],
)
def test_scheduler_rejects_bad_arguments(args, kwargs, match):
    opt = FAM([torch.zeros(2, requires_grad=True)], lr=0.1)
    with pytest.raises(ValueError, match=match):
        WarmupCosine(opt, *args, **kwargs)
