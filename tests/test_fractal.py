"""Fractal nestings (docs/designs.md, design 001): `kind: fractal`, `levels`, `branching`, `base`.

Level 0 is the full model; level `l` holds `branching**l` sub-models whose weights are the diagonal
blocks of the full model's. Each test below states one promise of the spec kind.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import compiler
from runtime.fractal.transformer import FractalTransformer, level_loss

ROOT = Path(__file__).resolve().parent.parent


def fractal_spec(
    tmp_path: Path, residual: str = "none", base: str = "", extra: str = "", heads: str = "narrow"
) -> Path:
    text = textwrap.dedent(
        f"""\
        spec: 1
        name: fractal-test
        seed: 3
        inputs:
          tokens: {{kind: tokens, vocab: 40, context: 32}}
        nodes:
          lm:
            kind: fractal
            levels: 3
            branching: 2
            residual: {residual}
            heads: {heads}
            base: {{width: 64, layers: 2{base}}}  # heads: 4 unless base says
        {extra}outputs:
          logits: {{from: lm, kind: lm_head, tie: true}}
        """
    )
    path = tmp_path / f"fractal_{residual}.yaml"
    path.write_text(text)
    return path


BASES = {  # (base settings, heads mode)
    "gpt2-like": ("", "narrow"),
    "original (MQA, GeGLU, RMSNorm, theta 100)": (
        ", kv_heads: 1, activation: geglu, norm: rmsnorm, rope_theta: 100",
        "narrow",
    ),
    "biases, layernorm, learned positions": (
        ", bias: true, position: learned, kv_heads: 2, activation: swiglu",
        "narrow",
    ),
    "heads: subset, GQA": (", kv_heads: 4, heads: 8", "subset"),
}


def perturbed(model: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    """Weights away from their init (norm gains of exactly 1 and zero biases hide slicing bugs)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


def tokens(batch: int = 2, n: int = 24, vocab: int = 40) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------ the spec kind


def test_a_fractal_has_the_parameters_of_its_full_model(tmp_path):
    """The sub-models own no weights of their own: they are slices."""
    ir = compiler.analyze(fractal_spec(tmp_path))
    plain = compiler.analyze(small_spec(tmp_path, 64, seed=3))
    assert ir.facts.parameters == plain.facts.parameters


def test_the_full_model_is_an_ordinary_transformer(tmp_path):
    """Level 0 of a fractal is computed exactly as a plain transformer with the same weights."""
    model = perturbed(compiler.build_model(fractal_spec(tmp_path)))
    fractal = model.federation.transformers[0]
    assert isinstance(fractal, FractalTransformer)
    x = torch.randn(1, 2, 24, 64)
    plain = fractal.extract(0, 0)
    torch.testing.assert_close(fractal(x), plain(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("base,heads", list(BASES.values()), ids=list(BASES))
def test_every_sub_model_equals_a_standalone_transformer_of_its_slices(tmp_path, base, heads):
    model = perturbed(compiler.build_model(fractal_spec(tmp_path, base=base, heads=heads)))
    fractal = model.federation.transformers[0]
    x = torch.randn(2, 24, 64)
    every_level = fractal.run(x, fractal.all_windows())
    for level in range(3):
        k, d = 2**level, 64 // 2**level
        for index in range(k):
            standalone = fractal.extract(level, index)
            expected_heads = 8 // k if heads == "subset" else 4
            assert standalone.cfg.width == d and standalone.cfg.heads == expected_heads
            expected = standalone(x[None, ..., index * d : (index + 1) * d])[0]
            torch.testing.assert_close(
                every_level[level][..., index * d : (index + 1) * d], expected, rtol=0, atol=1e-6
            )
            alone = fractal.run(
                x[..., index * d : (index + 1) * d],
                fractal.sub_model_windows(level, index),
                offset=index * d,
            )[-1]
            torch.testing.assert_close(alone, expected, rtol=0, atol=1e-6)


def test_sub_models_of_a_compiled_model_run_alone_with_sliced_embeddings_and_heads(tmp_path):
    model = perturbed(compiler.build_model(fractal_spec(tmp_path, base=BASES["gpt2-like"][0])))
    view = model.fractal()
    ids = tokens()
    every_level = view.all_levels(ids)["logits"]
    assert [tuple(t.shape) for t in every_level] == [(2, 24, k, 40) for k in (1, 2, 4)]
    torch.testing.assert_close(every_level[0][..., 0, :], model(ids)["logits"], rtol=0, atol=1e-6)
    table = model.inputs["tokens"].table.weight
    for level, index in [(1, 1), (2, 2)]:
        d = 64 // 2**level
        sub = view.sub_model(level, index)
        logits = sub(ids)["logits"]
        torch.testing.assert_close(logits, every_level[level][..., index, :], rtol=0, atol=1e-6)
        # the same numbers from a standalone transformer and the sliced (tied) embedding
        cols = slice(index * d, (index + 1) * d)
        standalone = model.federation.transformers[0].extract(level, index)
        state = standalone(torch.nn.functional.embedding(ids, table[:, cols])[None])[0]
        torch.testing.assert_close(logits, state @ table[:, cols].T, rtol=0, atol=1e-6)


def reference_exchange(fractal: FractalTransformer, x: torch.Tensor, residual: str) -> list:
    """The original notebook's loop, written out: every sub-model a standalone transformer stepped
    block by block; after each block, parents gain their children's concatenated streams
    (upstream) or children their slice of the parent's (downstream)."""
    levels = fractal.fractal.levels
    subs = [[fractal.extract(lv, j) for j in range(2**lv)] for lv in range(levels)]
    width = x.shape[-1]
    states = [
        [x[None, ..., j * width // 2**lv : (j + 1) * width // 2**lv] for j in range(2**lv)]
        for lv in range(levels)
    ]
    for b in range(fractal.cfg.layers):
        outs = [
            [subs[lv][j].blocks[b](states[lv][j], subs[lv][j].rotary) for j in range(2**lv)]
            for lv in range(levels)
        ]
        states = [list(level) for level in outs]
        for lv in range(levels):
            for j in range(2**lv):
                if residual == "upstream" and lv + 1 < levels:
                    children = torch.cat(outs[lv + 1][2 * j : 2 * j + 2], dim=-1)
                    states[lv][j] = outs[lv][j] + children
                if residual == "downstream" and lv > 0:
                    d = outs[lv][j].shape[-1]
                    parent = outs[lv - 1][j // 2]
                    states[lv][j] = outs[lv][j] + parent[..., (j % 2) * d : (j % 2 + 1) * d]
    return [
        torch.cat([subs[lv][j].norm_out(states[lv][j]) for j in range(2**lv)], dim=-1)[0]
        for lv in range(levels)
    ]


@pytest.mark.parametrize("residual", ["upstream", "downstream"])
def test_residual_variants_match_a_loop_over_sub_models(tmp_path, residual):
    model = perturbed(compiler.build_model(fractal_spec(tmp_path, residual, BASES["gpt2-like"][0])))
    fractal = model.federation.transformers[0]
    x = torch.randn(2, 24, 64)
    expected = reference_exchange(fractal, x, residual)
    got = fractal.run(x, fractal.all_windows())
    for level in range(3):
        torch.testing.assert_close(got[level], expected[level], rtol=1e-5, atol=1e-5)
    # the compiled model's level 0 is the full model with its exchanges
    torch.testing.assert_close(fractal(x[None])[0], expected[0], rtol=1e-5, atol=1e-5)
    # a sub-model alone runs only what it needs (its descendants or ancestors) and agrees
    view = model.fractal()
    ids = tokens()
    every_level = view.all_levels(ids)["logits"]
    for level, index in [(0, 0), (1, 1), (2, 3)]:
        torch.testing.assert_close(
            view.sub_model(level, index)(ids)["logits"],
            every_level[level][..., index, :],
            rtol=1e-5,
            atol=1e-5,
        )


def test_upstream_feeds_the_large_model_and_downstream_the_small_ones(tmp_path):
    ids = tokens()
    outputs = {
        r: compiler.build_model(fractal_spec(tmp_path, r)).fractal().all_levels(ids)["logits"]
        for r in ("none", "upstream", "downstream")
    }
    assert not torch.allclose(outputs["upstream"][0], outputs["none"][0])
    torch.testing.assert_close(
        outputs["upstream"][2], outputs["none"][2]
    )  # the leaves feed, not fed
    torch.testing.assert_close(outputs["downstream"][0], outputs["none"][0])  # the root feeds
    assert not torch.allclose(outputs["downstream"][2], outputs["none"][2])


# ------------------------------------------------------------------ training and inference


def test_all_levels_train_together_with_the_specs_level_weights(tmp_path):
    path = fractal_spec(tmp_path, extra="")
    path.write_text(path.read_text().replace("residual: none", "level_weights: [1, 0, 2]"))
    model = compiler.build_model(path)
    view = model.fractal()
    assert view.level_weights() == (1.0, 0.0, 2.0)
    ids = tokens(4, 32)
    total, per_level = view.loss(ids[:, 1:], ids[:, :-1])
    torch.testing.assert_close(total, per_level[0] + 2 * per_level[2])
    # each level's mean over its sub-models
    logits = view.all_levels(ids[:, :-1])["logits"][1]
    torch.testing.assert_close(
        per_level[1],
        torch.stack(
            [
                torch.nn.functional.cross_entropy(
                    logits[..., j, :].flatten(0, 1), ids[:, 1:].flatten()
                )
                for j in range(2)
            ]
        ).mean(),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(25):
        total, per_level = view.loss(ids[:, 1:], ids[:, :-1])
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        first = first or [loss.item() for loss in per_level]
    last = [loss.item() for loss in per_level]
    assert last[0] < first[0] - 0.5 and last[2] < first[2] - 0.5
    assert (
        last[1] < first[1]
    )  # weight 0, but level 1's blocks are inside level 0's and train with it


def test_level_loss_with_the_originals_sum_over_sub_models():
    logits = [torch.randn(2, 5, k, 7) for k in (1, 2, 4)]
    targets = torch.randint(0, 7, (2, 5))
    total, per_level = level_loss(logits, targets, (1.0, 2.0, 4.0))
    summed = sum(
        torch.nn.functional.cross_entropy(lg[..., j, :].flatten(0, 1), targets.flatten())
        for lg in logits
        for j in range(lg.shape[-2])
    )
    torch.testing.assert_close(total, summed)
    assert len(per_level) == 3


def test_inference_at_any_level_and_clear_errors_out_of_range(tmp_path):
    model = compiler.build_model(fractal_spec(tmp_path)).eval()
    view = model.fractal()
    assert view.sub_model(2, 3)(tokens())["logits"].shape == (2, 24, 40)
    with pytest.raises(
        ValueError, match=r"level 3 is out of range: this fractal has levels 0\.\.2"
    ):
        view.sub_model(3, 0)
    with pytest.raises(ValueError, match=r"index 2 is out of range: level 1 has sub-models 0\.\.1"):
        view.sub_model(1, 2)
    with pytest.raises(ValueError, match="not a fractal node"):
        model.fractal("nope")


# ------------------------------------------------------------------ model merging


def small_spec(tmp_path: Path, width: int, seed: int) -> Path:
    path = tmp_path / f"small_{width}_{seed}.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            spec: 1
            name: small
            seed: {seed}
            inputs:
              tokens: {{kind: tokens, vocab: 40, context: 32}}
            nodes:
              body: {{kind: transformer, width: {width}, heads: 4, layers: 2}}
            outputs:
              logits: {{from: body, kind: lm_head, tie: true}}
            """
        )
    )
    return path


def test_merging_separately_trained_models_makes_them_the_slices(tmp_path):
    model = compiler.build_model(fractal_spec(tmp_path))
    sources = {
        (2, j): perturbed(compiler.build_model(small_spec(tmp_path, 16, seed=j)), 0.1)
        for j in range(4)
    }
    sources[(1, 1)] = perturbed(compiler.build_model(small_spec(tmp_path, 32, seed=9)), 0.1)
    view = model.fractal()
    view.merge({key: sources[key] for key in [(2, 0), (2, 1)]})  # the level-2 blocks inside (1, 0)
    view.merge({(1, 1): sources[(1, 1)]})
    ids = tokens()
    for key in [(2, 0), (2, 1), (1, 1)]:
        torch.testing.assert_close(
            view.sub_model(*key)(ids)["logits"], sources[key](ids)["logits"], rtol=0, atol=1e-6
        )
    # merging (1, 1) overwrote the blocks of (2, 2) and (2, 3), which live inside it
    inner = view.sub_model(2, 2)(ids)["logits"]
    assert not torch.allclose(inner, sources[(2, 2)](ids)["logits"])


def test_merging_refuses_a_source_of_the_wrong_shape(tmp_path):
    view = compiler.build_model(fractal_spec(tmp_path)).fractal()
    with pytest.raises(ValueError, match=r"sub-model \(2, 0\) has the shape"):
        view.merge({(2, 0): compiler.build_model(small_spec(tmp_path, 32, seed=0))})


# ------------------------------------------------------------------ the gallery spec


def test_the_gallery_fractalformer_has_the_originals_size():
    ir = compiler.analyze(ROOT / "specs" / "fractalformer.yaml")
    assert 0.9e6 < ir.facts.parameters < 1.1e6
    node = ir.spec.nodes["lm"]
    assert (node.levels, node.branching) == (3, 2)


def test_checkpoints_restore_every_sub_model(tmp_path):
    from compiler.tools.checkpoint import load_checkpoint, save_checkpoint

    model = perturbed(compiler.build_model(fractal_spec(tmp_path, "upstream"))).eval()
    loaded = load_checkpoint(save_checkpoint(model, tmp_path / "ckpt")).eval()
    ids = tokens()
    for level, index in [(0, 0), (1, 1), (2, 2)]:
        torch.testing.assert_close(
            loaded.fractal().sub_model(level, index)(ids)["logits"],
            model.fractal().sub_model(level, index)(ids)["logits"],
            rtol=0,
            atol=0,
        )


def test_the_command_runs_one_sub_model_and_locates_a_bad_address():
    from typer.testing import CliRunner

    from compiler.tools.cli import app

    spec = "specs/fractalformer.yaml"
    runner = CliRunner()
    ok = runner.invoke(app, ["compile", str(ROOT / spec), "--level", "2", "--index", "3"])
    assert ok.exit_code == 0, ok.output
    assert "sub-model (2, 3)" in ok.output and "logits (2, 16, 84)" in ok.output
    assert "levels 0..2: 1 x width 128, 2 x width 64, 4 x width 32" in ok.output
    for args, message in [
        (["--level", "3"], "`--level 3` is out of range: fractal `lm` has levels 0..2"),
        (["--level", "1", "--index", "2"], "`--index 2` is out of range: level 1 of fractal `lm`"),
        (["--level", "0", "--fractal", "body"], "`--fractal body` names no fractal node"),
    ]:
        bad = runner.invoke(app, ["compile", str(ROOT / spec), "--no-smoke", *args])
        assert bad.exit_code == 1
        assert f"{ROOT / spec}:" in bad.stderr and message in bad.stderr, bad.stderr
    plain = runner.invoke(app, ["compile", str(ROOT / "specs/transformer.yaml"), "--level", "0"])
    assert plain.exit_code == 1 and "needs a fractal node" in plain.stderr


# ------------------------------------------------------------------ schedules: stacked and blocks

SCHEDULE_CASES = {  # (base settings, heads mode, residual)
    "original (MQA, GeGLU, RMSNorm, RoPE)": (
        ", kv_heads: 1, activation: geglu, norm: rmsnorm, rope_theta: 100",
        "narrow",
        "none",
    ),
    "biases, layernorm, learned positions, upstream": (
        ", bias: true, position: learned, kv_heads: 2, activation: swiglu",
        "narrow",
        "upstream",
    ),
    "heads: subset, GQA, downstream": (", kv_heads: 4, heads: 8", "subset", "downstream"),
    "no positions, GELU": (", position: none, activation: gelu", "narrow", "none"),
}


def with_schedule(path: Path, schedule: str) -> torch.nn.Module:
    text = path.read_text().replace("    heads: ", f"    schedule: {schedule}\n    heads: ", 1)
    torch.manual_seed(0)
    return perturbed(compiler.build_model(compiler.load_spec_text(text)))


@pytest.mark.parametrize("case", list(SCHEDULE_CASES))
def test_stacked_and_blocks_schedules_compute_the_same_levels_and_gradients(tmp_path, case):
    """`schedule: stacked` runs every level in one full-width pass (masked weights, padded heads);
    `blocks` one block-diagonal pass per level. Same function of the same parameters."""
    base, heads, residual = SCHEDULE_CASES[case]
    path = fractal_spec(tmp_path, residual, base, heads=heads)
    models = {s: with_schedule(path, s) for s in ("stacked", "blocks")}
    ids = tokens(3, 20)
    results = {}
    for schedule, model in models.items():
        view = model.fractal()
        levels = view.all_levels(ids)["logits"]
        total, per_level = view.loss(ids.roll(-1, 1), ids)
        total.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results[schedule] = (levels, per_level, grads, model(ids)["logits"])
    stacked, blocks = results["stacked"], results["blocks"]
    for a, b in zip(stacked[0], blocks[0], strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(torch.stack(stacked[1]), torch.stack(blocks[1]))
    for name, grad in stacked[2].items():
        torch.testing.assert_close(grad, blocks[2][name], atol=1e-6, rtol=1e-4, msg=name)
    torch.testing.assert_close(stacked[3], blocks[3], atol=2e-6, rtol=1e-5)  # the full model


def test_the_stacked_schedule_reads_pooled_heads_and_ignores_padding_targets(tmp_path):
    path = fractal_spec(tmp_path)
    text = path.read_text().replace(
        "  logits: {from: lm, kind: lm_head, tie: true}",
        "  logits: {from: lm, kind: lm_head, tie: true}\n  label: {from: lm, kind: classification, classes: 3}",
    )
    path.write_text(text)
    models = {s: with_schedule(path, s) for s in ("stacked", "blocks")}
    ids = tokens(2, 16)
    targets = ids.roll(-1, 1).clone()
    targets[:, -3:] = -100  # ignored, as by F.cross_entropy
    values = {}
    for schedule, model in models.items():
        view = model.fractal()
        pooled = view.all_levels(ids)["label"]
        assert [p.shape for p in pooled] == [(2, k, 3) for k in (1, 2, 4)]
        values[schedule] = (pooled, view.loss(targets, ids, output="logits"))
    for a, b in zip(values["stacked"][0], values["blocks"][0], strict=True):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(values["stacked"][1][0], values["blocks"][1][0])


def test_auto_stacks_small_fractals_on_a_gpu_only(tmp_path):
    """`schedule: auto` (the default) stacks where a step is bound by its number of kernels: small
    widths on a GPU. On the CPU, and for wide models, the fewer FLOPs of `blocks` win."""
    from runtime.fractal.transformer import STACK_WIDTH, FractalConfig

    auto = FractalConfig(levels=3, branching=2)
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    assert auto.stacked(STACK_WIDTH, gpu) and not auto.stacked(2 * STACK_WIDTH, gpu)
    assert not auto.stacked(64, cpu)
    assert FractalConfig(3, 2, schedule="stacked").stacked(4096, cpu)
    assert not FractalConfig(3, 2, schedule="blocks").stacked(64, gpu)
    model = compiler.build_model(fractal_spec(tmp_path))
    assert model.federation.transformers[0].fractal.schedule == "auto"
    # the stacked schedule's index tables are not part of a checkpoint
    assert not [k for k in model.state_dict() if "level_stack" in k]


def test_training_in_the_stacked_schedule_with_dropout(tmp_path):
    path = fractal_spec(tmp_path, base=", dropout: 0.2")
    model = with_schedule(path, "stacked")
    view = model.fractal()
    ids = tokens(4, 32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(20):
        total, per_level = view.loss(ids[:, 1:], ids[:, :-1])
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        first = first or [loss.item() for loss in per_level]
    assert all(b < a - 0.3 for a, b in zip(first, (x.item() for x in per_level), strict=True))
    model.eval()  # no dropout: the schedules agree again
    blocks = with_schedule(path, "blocks")
    blocks.load_state_dict(model.state_dict())
    blocks.eval()
    for a, b in zip(
        view.all_levels(ids)["logits"], blocks.fractal().all_levels(ids)["logits"], strict=True
    ):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)


# ------------------------------------------------------------------ level_batch: split


@pytest.mark.parametrize("schedule", ["stacked", "blocks"])
def test_a_split_batch_trains_each_level_on_its_own_share(tmp_path, schedule):
    """`level_batch: split`: level `l` is trained and scored on the `l`-th share of the batch's
    sequences, in the same step as every other level: each level's loss is that of the shared
    recipe on its share alone."""
    path = fractal_spec(tmp_path, base=", kv_heads: 1, activation: geglu, norm: rmsnorm")
    shared = with_schedule(path, schedule)
    path.write_text(path.read_text().replace("residual: none", "level_batch: split"))
    split = with_schedule(path, schedule)
    split.load_state_dict(shared.state_dict())
    ids = tokens(6, 16)
    targets = ids.roll(-1, 1)
    total, per_level = split.fractal().loss(targets, ids)
    for level in range(3):
        rows = slice(2 * level, 2 * level + 2)
        alone = shared.fractal().loss(targets[rows], ids[rows])[1][level]
        torch.testing.assert_close(per_level[level], alone, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(total, sum(per_level))
    # evaluation scores every level on every sequence, as with shared batches
    split.eval(), shared.eval()
    torch.testing.assert_close(
        torch.stack(split.fractal().loss(targets, ids)[1]),
        torch.stack(shared.fractal().loss(targets, ids)[1]),
    )


def test_a_batch_that_does_not_divide_among_the_levels_drops_no_sequence(tmp_path):
    """7 sequences over 3 levels: shares of 3, 3 and 1 (the last padded with ignored rows)."""
    path = fractal_spec(tmp_path)
    path.write_text(path.read_text().replace("residual: none", "level_batch: split"))
    models = {s: with_schedule(path, s) for s in ("stacked", "blocks")}
    models["stacked"].load_state_dict(models["blocks"].state_dict())
    ids = tokens(7, 16)
    targets = ids.roll(-1, 1)
    losses = {s: m.fractal().loss(targets, ids)[1] for s, m in models.items()}
    torch.testing.assert_close(torch.stack(losses["stacked"]), torch.stack(losses["blocks"]))
    path.write_text(path.read_text().replace("level_batch: split", "level_batch: shared"))
    shared = with_schedule(path, "blocks")
    shared.load_state_dict(models["blocks"].state_dict())
    last = shared.fractal().loss(targets[6:], ids[6:])[1][2]
    torch.testing.assert_close(losses["blocks"][2], last, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="cannot give each of 3 levels a share"):
        models["stacked"].fractal().loss(targets[:2], ids[:2])
    models["stacked"].eval()  # evaluation does not split: any batch works
    assert models["stacked"].fractal().loss(targets[:2], ids[:2])[0].isfinite()


def test_the_stacked_schedule_compiles_as_one_graph(tmp_path):
    """`torch.compile(fullgraph=True)` of a training loss in the stacked schedule: no graph break
    (the head packing's hand-written backward included), the same loss and gradients."""
    torch._dynamo.reset()
    path = fractal_spec(tmp_path, base=", kv_heads: 1, activation: geglu, norm: rmsnorm")
    path.write_text(path.read_text().replace("residual: none", "level_batch: split"))
    model = with_schedule(path, "stacked")
    view = model.fractal()
    ids = tokens(3, 16)
    expected = view.loss(ids.roll(-1, 1), ids)[0]
    expected.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    compiled = torch.compile(
        lambda: view.loss(ids.roll(-1, 1), ids)[0], fullgraph=True, backend="aot_eager"
    )
    got = compiled()
    got.backward()
    torch.testing.assert_close(got, expected)
    for name, grad in grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, msg=name)


@st.composite
def fractal_shapes(draw) -> dict:
    """A valid fractal of random shape: branching 2 or 3, 1-3 levels, narrow or subset heads, any
    grouping of key-value heads, any position, norm, activation, biases and residual exchange."""
    b, levels = draw(st.sampled_from([2, 3])), draw(st.integers(1, 3))
    k = b ** (levels - 1)
    heads_mode = draw(st.sampled_from(["narrow", "subset"]))
    position = draw(st.sampled_from(["rope", "learned", "none"]))
    if heads_mode == "narrow":
        kv = draw(st.sampled_from([1, 2]))
        heads = kv * draw(st.sampled_from([1, 2]))
        head_width = 2 * k * draw(st.integers(1, 2))  # even at the deepest level (RoPE)
    else:
        kv = k * draw(st.sampled_from([1, 2]))
        heads = kv * draw(st.sampled_from([1, 2]))
        head_width = draw(st.sampled_from([4, 8]))
    return {
        "levels": levels,
        "branching": b,
        "heads": heads_mode,
        "residual": draw(st.sampled_from(["none", "upstream", "downstream"])),
        "base": {
            "width": heads * head_width,
            "heads": heads,
            "kv_heads": kv,
            "layers": 1,
            "position": position,
            "norm": draw(st.sampled_from(["layernorm", "rmsnorm"])),
            "activation": draw(st.sampled_from(["gelu", "geglu", "swiglu"])),
            "bias": draw(st.booleans()),
        },
    }


@given(shape=fractal_shapes(), batch=st.integers(1, 3), n=st.integers(1, 8))
@settings(max_examples=25, deadline=None)
def test_any_valid_fractal_runs_the_same_in_both_schedules(shape, batch, n):
    import yaml

    models = {}
    for schedule in ("stacked", "blocks"):
        node = {"kind": "fractal", **shape, "schedule": schedule}
        spec = {
            "spec": 1,
            "name": "fuzzed-fractal",
            "seed": 1,
            "inputs": {"tokens": {"kind": "tokens", "vocab": 11, "context": 8}},
            "nodes": {"lm": node},
            "outputs": {"logits": {"from": "lm", "kind": "lm_head", "tie": True}},
        }
        models[schedule] = perturbed(compiler.build_model(compiler.load_spec_text(yaml.dump(spec))))
    models["stacked"].load_state_dict(models["blocks"].state_dict())
    ids = torch.randint(0, 11, (batch, n), generator=torch.Generator().manual_seed(n))
    got = {s: m.fractal().all_levels(ids)["logits"] for s, m in models.items()}
    assert [g.shape for g in got["stacked"]] == [g.shape for g in got["blocks"]]
    for a, b in zip(got["stacked"], got["blocks"], strict=True):
        torch.testing.assert_close(a, b, atol=5e-6, rtol=1e-5)
