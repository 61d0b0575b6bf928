"""On a CUDA GPU: the gallery runs in bf16, compiles with inductor as one graph, and matches the CPU.

These skip without a GPU (CI has none); they are run on the lent GPU machine, see BENCHMARKS.md.
"""

from __future__ import annotations

import pytest
import torch

import compiler
from compiler.passes.check_capabilities import model_capabilities
from tests.conftest import GALLERY
from tests.test_gallery import random_inputs

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("path", GALLERY, ids=lambda p: p.name)
def test_gallery_matches_the_cpu_and_compiles_with_inductor_on_gpu(path):
    torch._dynamo.reset()
    ir = compiler.analyze(path)
    if ir.spec.feedback is not None and ir.spec.feedback.mode == "equilibrium":
        # two solves stopped at a relative residual of 1e-4 differ by about that much over the
        # contraction's 1 / (1 - L): solved tightly, the comparison is of the arithmetic
        ir = compiler.analyze(path, overrides=["feedback.tolerance=1e-7", "feedback.steps=300"])
    cpu = compiler.build_model(ir).eval()
    gpu = compiler.build_model(ir, device="cuda").eval()
    gpu.load_state_dict(cpu.state_dict())
    shortest = min(declared.context for declared in cpu.spec.inputs.values())
    inputs = random_inputs(cpu.spec, batch=4, tokens=min(64, shortest))  # within every context
    with torch.no_grad():
        expected = cpu(**inputs)
        got = gpu(**{k: v.cuda() for k, v in inputs.items()})
    # a `lipschitz` bound scales the loop by a gain measured by power iteration from a random
    # vector, drawn by each device's own generator: the two gains agree to about 1e-3, not exactly
    bounded = ir.spec.feedback is not None and ir.spec.feedback.lipschitz is not None
    close = 5e-3 if bounded else 1e-3
    for name in expected:
        torch.testing.assert_close(got[name].cpu(), expected[name], rtol=close, atol=close)
    limits = model_capabilities(compiler.analyze(path))["fullgraph"]
    if limits:  # the spec says it cannot be one graph, and why (an equilibrium solve)
        pytest.skip("; ".join(limit.reason for limit in limits))
    compiled = torch.compile(gpu, fullgraph=True)
    gpu.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        outputs = compiled(**{k: v.cuda() for k, v in inputs.items()})
        loss = sum(o.float().square().mean() for o in outputs.values())
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in gpu.parameters())
