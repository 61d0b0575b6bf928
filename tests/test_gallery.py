"""Every spec in `specs/` validates, compiles, runs forward and backward, and captures as one graph."""

from __future__ import annotations

import pytest
import torch

import compiler
from compiler.passes.check_capabilities import model_capabilities
from compiler.tools.inputs import random_inputs as compiler_inputs
from tests.conftest import GALLERY, ROOT


def random_inputs(spec, batch: int = 2, tokens: int = 8) -> dict[str, torch.Tensor]:
    return compiler_inputs(spec, batch=batch, tokens=tokens)


def test_the_gallery_is_not_empty():
    assert {p.name for p in GALLERY} >= {"transformer.yaml", "federation.yaml"}


@pytest.mark.parametrize("path", GALLERY, ids=lambda p: p.name)
def test_gallery_spec_compiles_and_trains_a_step(path):
    ir = compiler.analyze(path)
    assert ir.facts.warnings == []
    model = compiler.build_model(ir)
    assert model.spec.name == ir.spec.name and model.spec_digest == ir.loaded.digest
    assert sum(p.numel() for p in model.parameters()) == ir.facts.parameters
    outputs = model(**random_inputs(model.spec))
    loss = sum(o.float().square().mean() for o in outputs.values())
    (loss + model.auxiliary_loss()).backward()  # a training step adds the spec's own terms
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


# Gallery specs made only of parts that other gallery specs hold too (`spec_features`): dynamo
# captures each whole, and the backward of those parts is traced with the others that hold them
# (aot_eager traces forward and backward as one joint graph, two thirds of a capture's time).
# The test below them keeps the claim true as the gallery changes.
TRACED_WITH_OTHERS = {
    "antikythera_recurrent.yaml",
    "federation.yaml",
    "federation_of_federations.yaml",
    "recurrent_gears.yaml",
    "ring.yaml",
}


@pytest.mark.parametrize("path", GALLERY, ids=lambda p: p.name)
def test_gallery_spec_compiles_with_fullgraph(path):
    """`torch.compile(fullgraph=True)` raises on any graph break; aot_eager also traces backward."""
    torch._dynamo.reset()
    ir = compiler.analyze(path)
    limits = model_capabilities(ir)["fullgraph"]
    if limits:  # the spec's parts say why; every other gallery spec must capture
        pytest.skip("; ".join(limit.reason for limit in limits))
    model = compiler.build_model(ir).eval()
    inputs = random_inputs(model.spec)
    expected = model(**inputs)
    backend = "eager" if path.name in TRACED_WITH_OTHERS else "aot_eager"
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    got = compiled(**inputs)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5)
    sum(o.square().mean() for o in got.values()).backward()


def spec_features(spec) -> set[str]:
    """What a validated spec is made of, names aside: `edges/[]/kind=arbor`, `nodes/*/attention/
    kind=sdpa`, `feedback/mode=unroll`, and the presence of every other field (`nodes/*/teeth`):
    every choice of a kind, mode or flag, and which options are set."""
    named = {"nodes", "inputs", "outputs", "perspectives"}  # keys are the user's names
    references = {"name", "source", "to", "from", "input", "perspective", "spec", "seed"}

    def walk(value, path):
        if isinstance(value, dict):
            for key, item in value.items():
                if key not in references and item is not None:
                    yield from walk(item, (*path, "*" if path and path[-1] in named else key))
        elif isinstance(value, list):
            for item in value:
                yield from walk(item, (*path, "[]"))
        elif isinstance(value, (str, bool)) and path[-1] != "ratio":
            yield "/".join(path) + f"={value}"
        else:
            yield "/".join(path)

    return set(walk(spec.model_dump(mode="json", exclude_none=True), ()))


def test_the_specs_compiled_without_a_backward_trace_have_no_part_of_their_own():
    """Every kind, mode and option of a spec in `TRACED_WITH_OTHERS` is in a spec whose fullgraph
    test traces backward too: move a spec out of the set when it gains one of its own."""
    features = {p.name: spec_features(compiler.analyze(p).spec) for p in GALLERY}
    traced = set().union(*(f for name, f in features.items() if name not in TRACED_WITH_OTHERS))
    assert set(features) >= TRACED_WITH_OTHERS
    for name in sorted(TRACED_WITH_OTHERS):
        assert features[name] <= traced, (name, sorted(features[name] - traced))


def test_the_federation_learns_on_cpu():
    """20 AdamW steps on a repeating character pattern: the loss must fall clearly."""
    torch.manual_seed(0)
    model = compiler.build_model(ROOT / "specs" / "federation.yaml")
    text = ("the moon follows the sun; the planets follow both. " * 40).encode()
    data = torch.tensor(list(text)) % 84
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        starts = torch.randint(0, len(data) - 33, (8,))
        batch = torch.stack([data[s : s + 33] for s in starts])
        logits = model(batch[:, :-1])["logits"]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 84), batch[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < 0.75 * sum(losses[:3]) / 3, losses
