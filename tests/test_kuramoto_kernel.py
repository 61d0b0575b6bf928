"""`epicycle::lattice_phase_pairs` (issue 23): the lattice layer's Kuramoto chain and phase pairs as
one Triton kernel forward and two backward, equal to the reference ops of `lattice.py`
(`kuramoto_phases`, `phase_features`, as `slot_terms` lays them out) in values and in the
gradients of all five parameters.

Two kinds of test. The op's tests run everywhere: on the CPU without Triton the op is the
reference ops in float32, so they check its float32 arithmetic, its dtypes, its autograd and
compile registration (`opcheck`, `torch.compile(fullgraph=True)`). The kernel tests call the
kernels themselves and skip without Triton; with `TRITON_INTERPRET=1` (and Triton importable) they
run through Triton's interpreter on CPU tensors, where the op's tests then run the kernels too, and
with CUDA on the GPU:

    pip install triton && TRITON_INTERPRET=1 python -m pytest -q tests/test_kuramoto_kernel.py
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from runtime.attention import kuramoto_kernel as kernel
from runtime.attention.lattice import (
    LatticeConfig,
    LatticeOscillators,
    kuramoto_phases,
    phase_features,
)

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
KERNELS = kernel.triton is not None and (torch.cuda.is_available() or INTERPRETING)
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETING else "cpu"
needs_kernels = pytest.mark.skipif(
    not KERNELS, reason="needs Triton with CUDA, or TRITON_INTERPRET=1 and Triton importable"
)

LATTICES = [(2, 2), (4, 4), (3, 5)]  # 3x5: 15 cells, padded to a block of 16
TOKENS = 300  # two token blocks for 4 cells (blocks of 256), three for 16 (blocks of 128)
DT, TOKEN_FREQUENCY, HEAD_WIDTH = 0.1, 0.1, 16


@pytest.fixture(autouse=True, scope="module")
def interpreter_loop_bounds():
    """Triton 3.5's interpreter holds a scalar argument as a 1-element array and takes `int()` of
    it for a loop bound, which numpy 2 refuses; `.item()` is what it means. Compiled kernels
    never meet this."""
    if not (INTERPRETING and kernel.triton is not None):
        yield
        return
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patched(tensor):
        original(tensor)
        tensor.__index__ = lambda self: int(self.handle.data.item())

    interpreter._patch_lang_tensor = patched
    yield
    interpreter._patch_lang_tensor = original


def oscillators(shape, boundary="periodic", members=1, dtype=torch.float32) -> tuple:
    """A layer's seven oscillator tensors with its parameters moved off their uniform start, so
    every gradient is non-trivial."""
    cfg = LatticeConfig(shape=shape, boundary=boundary, coupling=0.7, range=1.5)
    torch.manual_seed(0)
    layer = LatticeOscillators(cfg, members)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return tuple(t.detach().to(DEVICE) for t in layer.oscillator_tensors())


def cast(tensors: tuple, dtype: torch.dtype) -> tuple:
    """The five parameters and the distances in `dtype` (the neighbour mask stays boolean)."""
    return tuple(t.to(dtype) for t in tensors[:6]) + tensors[6:]


def sizes(substeps: int, tokens: int = TOKENS) -> tuple:
    return DT, substeps, TOKEN_FREQUENCY, tokens, HEAD_WIDTH


def reference(tensors: tuple, substeps: int, tokens: int = TOKENS) -> tuple:
    """`(pairs, theta)` as `slot_terms` computes them, in float64."""
    phase, omega, coupling, log_range, strength, distance, neighbour = cast(tensors, torch.float64)
    theta = kuramoto_phases(phase, omega, coupling, log_range, distance, neighbour, DT, substeps)
    query, key = phase_features(theta, omega, strength, TOKEN_FREQUENCY, tokens, HEAD_WIDTH)
    return torch.cat((query, key), 1).transpose(1, 2), theta


def upstream(pairs: torch.Tensor, theta: torch.Tensor) -> tuple:
    probe = torch.Generator(device=pairs.device).manual_seed(1)
    return tuple(torch.randn(t.shape, generator=probe, device=t.device) for t in (pairs, theta))


def reference_gradients(tensors: tuple, grads: tuple, substeps: int, with_theta=True) -> list:
    """The five parameters' float64 gradients of `<pairs, grads[0]> (+ <theta, grads[1]>)`."""
    parameters = [t.double().requires_grad_() for t in tensors[:5]]
    pairs, theta = reference((*parameters, *tensors[5:]), substeps)
    loss = (pairs * grads[0].double()).sum()
    if with_theta:
        loss = loss + (theta * grads[1].double()).sum()
    return list(torch.autograd.grad(loss, parameters))


def float32_reference_gradients(tensors: tuple, grads: tuple, substeps: int, with_theta=True):
    """The same gradients through the eager reference ops in float32, on the tensors' device."""
    parameters = [t.float().requires_grad_() for t in tensors[:5]]
    phase, omega, coupling, log_range, strength = parameters
    distance, neighbour = tensors[5:]
    theta = kuramoto_phases(phase, omega, coupling, log_range, distance, neighbour, DT, substeps)
    query, key = phase_features(theta, omega, strength, TOKEN_FREQUENCY, TOKENS, HEAD_WIDTH)
    pairs = torch.cat((query, key), 1).transpose(1, 2)
    loss = (pairs * grads[0]).sum() + ((theta * grads[1]).sum() if with_theta else 0)
    return list(torch.autograd.grad(loss, parameters))


def assert_gradients_close(actual: list, exact: list, float32_ops: list) -> None:
    """Each gradient within 1e-5 of the exact (float64) one's scale, or no further from it than
    twice the float32 reference ops are: the coupling's and the range's gradients are sums over
    the lattice's phase gaps and tokens whose terms cancel, and there float32 itself (the eager
    ops' as much as the kernels') is a few 1e-5 off."""
    for got, wanted, peer in zip(actual, exact, float32_ops, strict=True):
        scale = wanted.abs().max().item()
        peer_error = (peer.double() - wanted).abs().max().item() / scale
        assert_close(got, wanted, relative=max(1e-5, 2 * peer_error))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, relative: float = 1e-5) -> None:
    """Equal to `relative` of the expected tensor's scale (elements near 0 have no relative
    precision of their own)."""
    expected = expected.to(actual.dtype)
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=relative, atol=relative * scale)


def op_values_and_gradients(tensors: tuple, substeps: int) -> tuple:
    parameters = [t.clone().requires_grad_() for t in tensors[:5]]
    pairs, theta = kernel.lattice_phase_pairs(*parameters, *tensors[5:], *sizes(substeps))
    grads = upstream(pairs, theta)
    torch.autograd.backward((pairs, theta), grads)
    return pairs.detach(), theta.detach(), grads, [p.grad for p in parameters]


cases = pytest.mark.parametrize(
    "shape, boundary, substeps",
    [(s, b, n) for s in LATTICES for b in ("periodic", "open") for n in (1, 8)],
)


@pytest.mark.parametrize("shape", LATTICES)
@pytest.mark.parametrize("boundary", ["periodic", "open"])
def test_the_op_equals_the_reference_in_values_and_gradients(shape, boundary):
    """Through autograd, on whichever path the device takes (the kernels' own tests below run
    every case of members and substeps)."""
    members, substeps = 3, 8
    tensors = oscillators(shape, boundary, members)
    pairs, theta, grads, gradients = op_values_and_gradients(tensors, substeps)
    expected_pairs, expected_theta = reference(tensors, substeps)
    assert pairs.shape == (members, TOKENS, 2 * math.prod(shape), 2)
    assert_close(pairs, expected_pairs)
    assert_close(theta, expected_theta)
    assert_gradients_close(
        gradients,
        reference_gradients(tensors, grads, substeps),
        float32_reference_gradients(tensors, grads, substeps),
    )


@needs_kernels
@cases
@pytest.mark.parametrize("members", [1, 3])
def test_the_kernels_equal_the_reference(shape, boundary, substeps, members):
    tensors = oscillators(shape, boundary, members)
    pairs, theta = kernel.kernel_forward(tensors, sizes(substeps))
    expected_pairs, expected_theta = reference(tensors, substeps)
    assert_close(pairs, expected_pairs)
    assert_close(theta, expected_theta)
    grads = upstream(pairs, theta)
    gradients = kernel.kernel_backward(*grads, tensors, sizes(substeps))
    assert_gradients_close(
        gradients,
        reference_gradients(tensors, grads, substeps),
        float32_reference_gradients(tensors, grads, substeps),
    )


@needs_kernels
def test_the_backward_kernels_take_no_gradient_for_theta():
    """A caller that uses the pairs only passes `grad_theta=None` and no zeros are made for it."""
    tensors = oscillators((3, 5), members=3)
    grads = upstream(*reference(tensors, 8))
    gradients = kernel.kernel_backward(grads[0], None, tensors, sizes(8))
    assert_gradients_close(
        gradients,
        reference_gradients(tensors, grads, 8, with_theta=False),
        float32_reference_gradients(tensors, grads, 8, with_theta=False),
    )


@needs_kernels
def test_the_kernels_take_16x16_lattices_and_refuse_larger_ones():
    tensors = oscillators((16, 16), members=1)
    pairs, theta = kernel.kernel_forward(tensors, sizes(2, tokens=20))
    expected_pairs, expected_theta = reference(tensors, 2, tokens=20)
    assert_close(pairs, expected_pairs)
    assert_close(theta, expected_theta)
    with pytest.raises(ValueError, match="at most 256 lattice cells, got 289"):
        kernel.kernel_forward(oscillators((17, 17)), sizes(1))


@pytest.mark.skipif(
    kernel.triton is None or INTERPRETING, reason="needs Triton, compiling (not interpreting)"
)
@pytest.mark.parametrize(
    "cells, dtype, scalars",
    [(15, "bf16", "triton"), (256, "fp32", "triton"), (16, "bf16", "inductor")],
)
def test_the_kernels_compile_for_an_h200_without_one(cells, dtype, scalars):
    """Triton's interpreter runs code that compiling refuses (it caught a loop variable reused
    as a tuple target): every kernel is compiled here for sm_90 down to its cubin, and its sines
    are the precise ones (no `sin.approx`: the angles reach `nu * tokens`). Inductor, launching
    them inside a compiled model, types their scalars as float64 and int64 (Triton's own launcher
    as float32 and int32); they compile either way."""
    triton = kernel.triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cells_block, tokens_block, warps, adjoint_warps = kernel._blocks(cells)
    sizes = {"BH": cells_block, "BT": tokens_block}
    for fn, num_warps, constexprs in (
        (kernel._forward_kernel, warps, sizes),
        (kernel._partials_kernel, warps, sizes),
        (kernel._adjoint_kernel, adjoint_warps, {"BH": cells_block, "HAS_GRAD_THETA": True}),
    ):
        signature = {name: _argument_type(name, dtype, scalars) for name in fn.arg_names}
        source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={
            "num_warps": num_warps
        })  # fmt: skip
        assert compiled.asm["cubin"] and "sin.approx" not in compiled.asm["ptx"]


@pytest.mark.skipif(
    kernel.triton is None or INTERPRETING, reason="needs Triton, compiling (not interpreting)"
)
def test_inductor_reads_that_the_kernels_write_only_their_outputs():
    """Inside a compiled model inductor launches the kernels itself, and reads which arguments
    they write from their Triton IR: an input it takes as written is cloned before the launch and
    copied back after it (with pointers passed into helper functions, six inputs were, twelve
    extra launches each backward). Analysed here for sm_90 without a GPU."""
    from types import SimpleNamespace
    from unittest import mock

    from torch._higher_order_ops import triton_kernel_wrap
    from triton.backends.compiler import GPUTarget

    hopper = SimpleNamespace(get_current_target=lambda: GPUTarget("cuda", 90, 32))
    cells_block, tokens_block, *_ = kernel._blocks(16)
    expected = {
        kernel._forward_kernel: {"pairs_ptr", "theta_ptr"},
        kernel._partials_kernel: {"partials_ptr"},
        kernel._adjoint_kernel: {f"d_{n}_ptr" for n in ("phase", "omega", "coupling", "log_range",
                                                         "strength")} | {"history_ptr"},
    }  # fmt: skip
    with mock.patch.object(type(kernel.triton.runtime.driver), "active", hopper):
        for fn, outputs in expected.items():
            arguments = {
                name: _analysis_argument(name, cells_block, tokens_block) for name in fn.arg_names
            }
            assert _written(triton_kernel_wrap, fn, arguments) == outputs, fn


def _written(triton_kernel_wrap, fn, arguments) -> set[str]:
    """The arguments inductor takes `fn` to write (`identify_mutated_tensors` in older torch)."""
    if hasattr(triton_kernel_wrap, "identify_accessed_tensors"):
        accessed = triton_kernel_wrap.identify_accessed_tensors(fn, arguments, {})
        return {write.name for write in accessed.read_writes.writes}
    return set(triton_kernel_wrap.identify_mutated_tensors(fn, arguments, {}))


def _analysis_argument(name: str, cells_block: int, tokens_block: int):
    """A value of the kernels' argument `name` for Triton's type specialisation: tensors' sizes
    do not matter to the analysis, their dtypes and the constants do."""
    constants = {"BH": cells_block, "BT": tokens_block, "HAS_GRAD_THETA": True}
    if name in constants:
        return constants[name]
    if name in ("H", "tokens", "substeps", "blocks"):
        return 16
    if name in ("dt", "token_frequency", "sqrt_width"):
        return 0.1
    dtypes = {
        "neighbour_ptr": torch.bool,
        "partials_ptr": torch.float32,
        "history_ptr": torch.float32,
    }
    return torch.zeros(2, dtype=dtypes.get(name, torch.bfloat16))


def _argument_type(name: str, dtype: str, scalars: str) -> str:
    if name in ("BH", "BT", "HAS_GRAD_THETA"):
        return "constexpr"
    if name in ("H", "tokens", "substeps", "blocks"):
        return "i32" if scalars == "triton" else "i64"
    if name == "neighbour_ptr":
        return "*i1"
    if name in ("partials_ptr", "history_ptr"):
        return "*fp32"
    if name.endswith("_ptr"):
        return f"*{dtype}"
    return "fp32" if scalars == "triton" else "fp64"


def test_bf16_parameters_give_bf16_outputs_and_gradients_close_to_fp32():
    """The op computes in float32 whatever its inputs: positions are exact float32 indices (a
    bf16 index of token 999 would be 1000, a whole turn of `nu` off)."""
    tensors = cast(oscillators((3, 5), members=3), torch.bfloat16)
    pairs, theta, grads, gradients = op_values_and_gradients(tensors, 8)
    assert pairs.dtype == theta.dtype == torch.bfloat16
    assert all(g.dtype == torch.bfloat16 for g in gradients)
    expected_pairs, expected_theta = reference(tensors, 8)  # the bf16 values, in float64
    assert_close(pairs, expected_pairs, relative=1e-2)
    assert_close(theta, expected_theta, relative=1e-2)
    for actual, expected in zip(gradients, reference_gradients(tensors, grads, 8), strict=True):
        assert_close(actual, expected, relative=2e-2)


def test_theta_alone_can_be_differentiated():
    """No gradient flows into the pairs, and none is made up for them."""
    tensors = oscillators((3, 5), "open", members=3)
    parameters = [t.clone().requires_grad_() for t in tensors[:5]]
    pairs, theta = kernel.lattice_phase_pairs(*parameters, *tensors[5:], *sizes(4))
    _, grad_theta = upstream(pairs, theta)
    torch.autograd.backward(theta, grad_theta)
    no_pairs = torch.zeros_like(pairs)
    expected = reference_gradients(tensors, (no_pairs, grad_theta), 4)
    for parameter, wanted in zip(parameters[:4], expected[:4], strict=True):
        assert_close(parameter.grad, wanted)
    assert parameters[4].grad.abs().max() == 0  # the pairs' amplitude does not move theta


def test_a_fixed_frequency_buffer_gets_no_gradient():
    tensors = oscillators((2, 2), members=3)
    parameters = [t.clone().requires_grad_(i != 1) for i, t in enumerate(tensors[:5])]
    pairs, theta = kernel.lattice_phase_pairs(*parameters, *tensors[5:], *sizes(4))
    pairs.sum().backward()
    assert parameters[1].grad is None
    assert all(p.grad is not None for i, p in enumerate(parameters) if i != 1)


def test_torch_compile_fullgraph_traces_the_op_forward_and_backward():
    """The op is opaque to the compiler: traced through its fake implementation, its backward a
    custom op too (`aot_eager` runs the traced graphs with eager kernels, needing no C compiler)."""
    tensors = oscillators((4, 4), members=3)

    def loss(*parameters):
        pairs, theta = kernel.lattice_phase_pairs(*parameters, *tensors[5:], *sizes(8))
        return (pairs * pairs.detach().cos()).sum() + theta.sin().sum()

    def gradients(fn):
        parameters = [t.clone().requires_grad_() for t in tensors[:5]]
        return torch.autograd.grad(fn(*parameters), parameters)

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    for actual, expected in zip(gradients(compiled), gradients(loss), strict=True):
        assert_close(actual, expected)


def test_opcheck():
    tensors = oscillators((3, 5), "open", members=3)
    parameters = [t.clone().requires_grad_() for t in tensors[:5]]
    arguments = (*parameters, *tensors[5:], *sizes(3, tokens=40))
    torch.library.opcheck(kernel.lattice_phase_pairs, arguments)


def test_available_means_the_kernels_run_for_that_device():
    assert kernel.available(torch.zeros(1)) == (kernel.triton is not None and INTERPRETING)
    if torch.cuda.is_available():
        assert kernel.available(torch.zeros(1, device="cuda")) == (kernel.triton is not None)
