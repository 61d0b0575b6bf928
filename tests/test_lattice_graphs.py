"""The lattice layer's CUDA-graph region (issue 23): `slot_terms` depends on the parameters and on
sizes only, so an eager layer on a GPU captures its forward and backward once and replays them.
The replays equal the reference ops in fp32 (to 1e-5, values and gradients) however the
parameters change: in place (an optimizer step, `load_state_dict`) or re-assigned; with
gradients accumulated over passes; in evaluation without gradients; and a capture that cannot be
made falls back with a warning. The add of the phase pairs into the projection, the layer's other
eager saving, is checked on the CPU.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from runtime.attention import lattice
from runtime.attention.lattice import LatticeConfig
from runtime.transformer import Transformer, TransformerConfig
from tests.test_lattice_fused import lattice_model, slot_arguments, values_and_gradients

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def exact_float32_matmuls():
    """fp32 comparisons at 1e-5 need fp32 matmuls (a CUDA training run in the process may have
    turned TF32 on)."""
    kept = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = kept


def graphed(model: Transformer):
    """`fused_slot_terms` replaying CUDA graphs kept for the model's lattice layer."""
    attn = model.blocks[0].attn
    return lambda *args: lattice.fused_slot_terms(*args, region="graphs", owner=attn)


def captures(model: Transformer) -> lattice._LayerGraphs:
    return lattice._GRAPHS[model.blocks[0].attn]


def assert_all_close(got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    """To 1e-5, of each tensor's scale where that is above 1: the graphs run the fused Kuramoto
    kernels on a GPU, whose float32 sums differ from the reference ops' in the last bits, and a
    model's gradients of scale 10 carry that as 1e-5 absolute."""
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        scale = max(1.0, e.abs().max().item())
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5 * scale)


def assert_graphs_equal_reference(model: Transformer, tokens: int) -> None:
    expected = values_and_gradients(lattice.slot_terms, model, tokens, differentiate_theta=False)
    got = values_and_gradients(graphed(model), model, tokens, differentiate_theta=False)
    assert_all_close(got, expected)


@cuda
@pytest.mark.parametrize(
    ("members", "width", "bias"),
    [(1, 64, False), (2, 60, True)],  # width 60: heads of 15, an odd content width of 13
)
def test_the_replayed_graphs_equal_the_reference_ops(members, width, bias):
    model = lattice_model(members, width, bias, "cuda")
    assert_graphs_equal_reference(model, 300)
    assert_graphs_equal_reference(model, 300)  # the second call replays the first capture
    (capture,) = captures(model).captures.values()
    assert capture.backward_graph is not None and captures(model).recaptures == 0


@cuda
def test_the_graphs_read_parameters_changed_in_place():
    """An optimizer step and `load_state_dict` write into the captured tensors: the next replay
    computes from the new values, with no new capture."""
    model = lattice_model(2, 64, True, "cuda")
    assert_graphs_equal_reference(model, 40)
    capture = next(iter(captures(model).captures.values()))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    optimizer.step()  # the gradients of the last comparison
    assert_graphs_equal_reference(model, 40)
    other = lattice_model(2, 64, True, "cuda")
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    model.load_state_dict(other.state_dict())
    assert_graphs_equal_reference(model, 40)
    assert next(iter(captures(model).captures.values())) is capture


@cuda
def test_a_reassigned_or_converted_parameter_is_captured_anew():
    model = lattice_model(1, 64, False, "cuda")
    assert_graphs_equal_reference(model, 40)
    attn = model.blocks[0].attn
    attn.qkv.weight = nn.Parameter(attn.qkv.weight.detach() * 2)
    assert_graphs_equal_reference(model, 40)
    model.double()  # the same Parameter objects, new `.data`
    assert_graphs_equal_reference(model, 40)
    assert captures(model).recaptures == 2


@cuda
def test_gradients_accumulate_over_two_backward_passes():
    """`.grad` from None over two backward passes: the replayed backward hands out fresh
    gradients (`make_graphed_callables` hands out its own memory, and the second pass doubles)."""
    model = lattice_model(1, 64, True, "cuda")
    x = torch.randn(1, 3, 64, 64, device="cuda")  # (members, batch, tokens, width)
    assert_all_close(*gradients_over_two_passes(model, x, ("graphs", "reference")))


def gradients_over_two_passes(model: Transformer, x: torch.Tensor, regions: tuple) -> list:
    """Per region, every parameter's `.grad` after two backward passes from None."""
    results = []
    for region in regions:
        model.blocks[0].attn.region = region
        model.zero_grad(set_to_none=True)
        for scale in (1.0, 3.0):
            (scale * model(x).square().sum()).backward()
        results.append([p.grad.clone() for p in model.parameters()])
    return results


@cuda
def test_each_autocast_state_has_its_own_capture():
    """bf16 parameters, as the benchmark holds them: under autocast some of the chain's ops run in
    fp32, so a capture keeps the caller's autocast state (without its weight cache) and a pass
    outside autocast gets a capture of its own."""
    model = lattice_model(1, 64, True, "cuda").to(torch.bfloat16)
    assert_graphs_equal_reference(model, 40)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert_graphs_equal_reference(model, 40)
    assert [key[2] for key in captures(model).captures] == [False, torch.bfloat16]


@cuda
def test_two_passes_through_one_layer_before_one_backward():
    """As a fractal schedule reuses a layer: two replays of one capture, then both backwards."""
    model = lattice_model(1, 64, False, "cuda")
    results = []
    for fn in (graphed(model), lattice.slot_terms):
        model.zero_grad(set_to_none=True)
        first, second = fn(*slot_arguments(model, 32)), fn(*slot_arguments(model, 32))
        loss = (first[0] * 2).sum() + first[2].square().sum() + second[2].sin().sum()
        loss.backward()
        results.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert_all_close(*results)


@cuda
def test_evaluation_without_gradients_replays_a_forward_graph_only():
    """`eval_substeps` Kuramoto updates, no gradients: a capture of its own, with no backward."""
    cfg = TransformerConfig(
        width=64,
        heads=4,
        layers=1,
        context=64,
        attention=LatticeConfig(shape=(2, 2), coupling=0.7, substeps=4, eval_substeps=9),
    )
    torch.manual_seed(0)
    model = Transformer(cfg).to("cuda").eval()
    attn = model.blocks[0].attn
    x = torch.randn(1, 2, 48, 64, device="cuda")
    outputs = {}
    with torch.no_grad():
        for region in ("graphs", "graphs", "reference"):
            attn.region = region
            outputs[region] = model(x)
    torch.testing.assert_close(outputs["graphs"], outputs["reference"], rtol=1e-5, atol=1e-5)
    (capture,) = captures(model).captures.values()
    assert capture.backward_graph is None and capture.sizes[4] == 9


@cuda
def test_inside_another_capture_the_reference_ops_are_recorded_with_a_warning():
    """A whole eager model captured by its user: the layer cannot capture inside that capture, so
    its reference ops go into the user's graph, and it says so."""
    model = lattice_model(1, 64, False, "cuda").eval()
    x = torch.randn(1, 2, 32, 64, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            model(x)  # warm-up, as CUDA graphs ask
        torch.cuda.current_stream().wait_stream(side)
        warned = pytest.warns(RuntimeWarning, match="another CUDA graph capture")
        with warned, torch.cuda.graph(graph):
            y = model(x)
        x.copy_(torch.randn_like(x))
        graph.replay()
        model.blocks[0].attn.region = "reference"
        torch.testing.assert_close(y, model(x), rtol=1e-5, atol=1e-5)


class EagerReplay:
    """A CUDA graph stood in for on the CPU: `replay` runs the captured function again and copies
    its results into the first run's outputs (a backward's "replay" differentiates the first
    forward's retained graph, so it holds while the parameters keep their values)."""

    def __init__(self, run):
        self.run = run
        self.outputs = run()

    def replay(self):
        with torch.no_grad():
            fresh = self.run()
        if isinstance(fresh, dict):  # the backward's flat gradients, by dtype
            fresh, static = list(fresh.values()), list(self.outputs.values())
        else:
            static = self.outputs
        for old, new in zip(static, fresh, strict=True):
            if old is not None:
                old.detach().copy_(new)


@pytest.fixture
def cpu_graphs(monkeypatch):
    """`GraphedSlotTerms` on the CPU, its CUDA graphs and streams stood in for: the capture,
    replay, key and gradient logic, checked where no GPU is."""

    class Stream:
        def wait_stream(self, other):
            pass

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", Stream)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)

    def capture(run, pool):
        graph = EagerReplay(run)
        return graph, graph.outputs

    monkeypatch.setattr(lattice, "capture_graph", capture)
    monkeypatch.setattr(lattice, "_eager_on_a_gpu", lambda x: True)


@pytest.mark.parametrize(("members", "width", "bias"), [(1, 64, False), (2, 60, True)])
def test_the_capture_logic_replays_reuses_and_recaptures(cpu_graphs, members, width, bias):
    model = lattice_model(members, width, bias)
    attn = model.blocks[0].attn

    def replayed(*args):
        return lattice.graphed_slot_terms(attn, *args)

    for _ in range(2):  # a capture, then a replay of it
        expected = values_and_gradients(lattice.slot_terms, model, 24, differentiate_theta=False)
        assert_all_close(values_and_gradients(replayed, model, 24, False), expected)
    buffers = {
        p.grad.untyped_storage().data_ptr() for p in model.parameters() if p.grad is not None
    }
    assert len(buffers) == 1  # views of one fresh buffer: no copy per parameter
    with torch.no_grad():
        assert_all_close(
            [t for t in replayed(*slot_arguments(model, 24)) if t is not None],
            [t for t in lattice.slot_terms(*slot_arguments(model, 24)) if t is not None],
        )
    assert {
        key[1]: g.backward_graph is not None for key, g in captures(model).captures.items()
    } == {
        True: True,
        False: False,
    }
    attn.lattice.coupling.data = attn.lattice.coupling.data * 0.5  # same object, new memory
    expected = values_and_gradients(lattice.slot_terms, model, 24, differentiate_theta=False)
    assert_all_close(values_and_gradients(replayed, model, 24, False), expected)
    assert captures(model).recaptures == 1 and len(captures(model).captures) == 1


def test_parameters_that_move_every_call_turn_graphs_off_with_a_warning(cpu_graphs):
    model = lattice_model(1, 64, False)
    attn = model.blocks[0].attn
    for _ in range(lattice._MAX_RECAPTURES + 1):
        attn.qkv.weight = nn.Parameter(attn.qkv.weight.detach().clone())
        assert lattice.graphed_slot_terms(attn, *slot_arguments(model, 8)) is not None
    attn.qkv.weight = nn.Parameter(attn.qkv.weight.detach().clone())
    with pytest.warns(RuntimeWarning, match="parameters moved 5 times"):
        assert lattice.graphed_slot_terms(attn, *slot_arguments(model, 8)) is None


def test_a_layer_holds_a_bounded_number_of_captures(cpu_graphs):
    """One capture per length: a loop over growing lengths stops capturing at `_MAX_CAPTURES`,
    says so, and runs the compiled region for the lengths beyond."""
    model = lattice_model(1, 64, False)
    attn = model.blocks[0].attn
    for tokens in range(1, lattice._MAX_CAPTURES + 1):
        assert lattice.graphed_slot_terms(attn, *slot_arguments(model, tokens)) is not None
    with pytest.warns(RuntimeWarning, match="holds 8 captures already"):
        assert lattice.graphed_slot_terms(attn, *slot_arguments(model, 99)) is None
    assert lattice.graphed_slot_terms(attn, *slot_arguments(model, 3)) is not None  # still kept


@pytest.mark.parametrize(("members", "width", "bias"), [(1, 64, False), (2, 60, True)])
def test_the_captured_backward_reads_no_parameter_memory(members, width, bias):
    """What the captured function saves for its backward is its own memory, so parameters whose
    memory moves between a forward and its backward (FSDP resharding) do no harm; the reference
    function saves a parameter (`coupling`) and a buffer (`neighbour`) as they are."""
    weight, bias_, oscillators, *sizes = slot_arguments(lattice_model(members, width, bias), 24)
    held = {t.untyped_storage().data_ptr() for t in (weight, bias_, *oscillators) if t is not None}

    def saved_memory(fn) -> set[int]:
        saved = set()

        def pack(t):
            saved.add(t.untyped_storage().data_ptr())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(weight, bias_, oscillators, *sizes)
        return saved & held

    assert saved_memory(lattice.slot_terms_on_copies) == set()
    assert len(saved_memory(lattice.slot_terms)) == 2


def test_saved_tensor_hooks_keep_the_layer_off_graphs():
    """Activation checkpointing and offloading pack what autograd saves: a capture would pack its
    own tensors, so the layer names the reason and runs the compiled region."""
    model = lattice_model(1, 64, False)
    tensors = (
        model.blocks[0].attn.qkv.weight,
        None,
        *model.blocks[0].attn.lattice.oscillator_tensors(),
    )
    assert lattice.graph_unavailable_reason(tensors) is None
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        assert "saved-tensor hooks" in lattice.graph_unavailable_reason(tensors)


@pytest.mark.parametrize(("members", "width"), [(1, 64), (2, 60)])
def test_adding_the_phase_pairs_equals_the_add_through_a_view(members, width):
    """`_AddPhasePairs` (one autograd node) against the in-place add into a view of the projection
    that autograd differentiates itself: the same values and gradients."""
    heads, hw = 4, width // 4
    cw = hw - lattice.PHASE_DIMS
    shape = (members, -1, 24, 3 * heads, hw)
    torch.manual_seed(0)
    source = torch.randn(members, 3 * 24, 3 * heads * hw, requires_grad=True)
    pairs = torch.randn(members, 24, 2 * heads, 2, requires_grad=True)
    probe = torch.randn(members, 3 * 24, 3 * heads * hw)
    results = []
    for add in ("function", "view"):
        source.grad = pairs.grad = None
        qkv = source * 1.0  # a projection's output: not a view
        if add == "function":
            qkv = lattice._AddPhasePairs.apply(qkv, pairs, shape, cw)
        else:
            lattice._phase_slots(qkv.view(shape)[..., : 2 * heads, :], cw).add_(pairs[:, None])
        (qkv * probe).sum().backward()
        results.append([qkv.detach(), source.grad, pairs.grad])
    for got, expected in zip(*results, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize(("members", "width", "bias"), [(1, 64, False), (2, 60, True)])
def test_a_training_pass_projects_through_the_graphs_in_one_node(cpu_graphs, members, width, bias):
    """On the graphs path a training pass replays the forward graph, projects and adds the phase
    pairs in one autograd node, whose backward writes the projection's gradients into the backward
    graph's inputs: the same values and gradients (of the input and of every parameter) as the
    reference slot terms, projection and pair add, at a capture and at its replay."""
    model = lattice_model(members, width, bias)
    attn = model.blocks[0].attn
    tokens = 24
    torch.manual_seed(1)
    x = torch.randn(members, 3, tokens, width, requires_grad=True)
    heads = (members, -1, tokens, 3 * attn.heads, attn.head_width)
    args = slot_arguments(model, tokens)

    def reference() -> torch.Tensor:
        weight, bias_, pairs, _ = lattice.slot_terms(*args)
        qkv = lattice.project(x, weight, bias_, members)
        return lattice._AddPhasePairs.apply(qkv, pairs, heads, attn.content_width)

    def graphed() -> torch.Tensor:
        graphs = lattice.slot_terms_graphs(attn, *args)
        assert graphs is not None and graphs.train
        return lattice.graphed_projection(graphs, x, heads, *args)

    def values_and_gradients(projection) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        x.grad = None
        qkv = projection().reshape(members, -1, 3 * attn.heads * attn.head_width)
        qkv.view(heads)[..., : 2 * attn.heads, :].mul_(2.0)  # in place, as RoPE turns q and k
        probe = torch.randn(qkv.shape, generator=torch.Generator().manual_seed(2))
        (qkv * probe).sum().backward()
        grads = [p.grad for p in model.blocks[0].attn.parameters() if p.grad is not None]
        return [qkv.detach(), x.grad, *grads]

    expected = values_and_gradients(reference)
    for _ in range(2):  # a capture, then a replay of it
        assert_all_close(values_and_gradients(graphed), expected)


def test_a_model_accumulates_gradients_over_two_passes_through_the_graphs(cpu_graphs):
    """The whole layer on the graphs path (its projection in one node with the replays, RoPE
    turning q and k in place after it): `.grad` from None over two backward passes equals the
    reference ops', and the pass did replay a capture."""
    model = lattice_model(1, 64, True)
    results = gradients_over_two_passes(model, torch.randn(1, 3, 64, 64), ("graphs", "reference"))
    assert len(captures(model).captures) == 1
    assert_all_close(*results)
