"""An equilibrium model costs no torch.compile machinery until it is compiled.

The solver runs eagerly under torch.compile (`torch.compiler.disable`), and that decorator imports
torch._dynamo (71 MB, and seconds on a busy CPU): it is applied at the first traced call, so a process that
only builds, trains or serves an eager equilibrium model never imports dynamo for it. (Message
edges need torch-geometric, which imports torch._dynamo itself: the spec here uses `cross` edges.)
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch._dynamo.testing

from runtime.federation.equilibrium import eager_under_compile
from tests.conftest import ROOT

CROSS_LOOP = """
spec: 1
name: cross-loop
seed: 0
defaults:
  transformer: {width: 16, heads: 2, layers: 1}
inputs:
  tokens: {kind: tokens, vocab: 11, context: 8}
nodes:
  reader: {kind: transformer}
  refiner: {kind: transformer}
edges:
  - {from: reader, to: refiner, kind: cross}
  - {from: refiner, to: reader, kind: cross, delay: 1}
feedback: {steps: 20, mode: equilibrium, solver: anderson}
outputs:
  logits: {from: refiner, kind: lm_head}
"""


def dynamo_imported_after(code: str) -> bool:
    """Whether a fresh interpreter has imported torch._dynamo after running `code`."""
    probe = f"{code}\nimport sys\nprint('torch._dynamo' in sys.modules)"
    proc = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip().splitlines()[-1] == "True"


def test_importing_the_equilibrium_solver_does_not_import_dynamo():
    assert not dynamo_imported_after("import torch")  # the baseline the check relies on
    assert not dynamo_imported_after("import runtime.federation.equilibrium")


def test_building_and_training_an_equilibrium_model_eagerly_does_not_import_dynamo():
    code = (
        "import torch, compiler\n"
        f"model = compiler.build_model(compiler.load_spec_text({CROSS_LOOP!r}))\n"
        "model(torch.randint(0, 11, (2, 8)))['logits'].square().mean().backward()\n"
        "assert model.federation.last_backward_iterations is not None"
    )
    assert not dynamo_imported_after(code)


def _data_dependent(x: torch.Tensor) -> torch.Tensor:
    assert not torch.compiler.is_compiling()  # it runs eagerly, also inside a compiled caller
    return x * 2 + int(x.sum() > 0)


def test_under_compile_the_function_runs_eagerly_behind_a_graph_break():
    eager = eager_under_compile(_data_dependent)
    x = torch.randn(4)

    def caller(x):
        return eager(x.sin()) + 1

    counter = torch._dynamo.testing.CompileCounter()
    torch._dynamo.reset()
    compiled = torch.compile(caller, backend=counter)
    torch.testing.assert_close(compiled(x), caller(x))
    assert counter.frame_count == 2  # the graphs before and after the break
    torch._dynamo.reset()
    with pytest.raises(Exception, match="torch.compiler.disable"):
        torch.compile(caller, backend="eager", fullgraph=True)(x)
    torch._dynamo.reset()
