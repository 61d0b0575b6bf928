"""Interop: Hub-style directories, torch.export / ONNX export, and GPT-2 weights in a spec.

Optional packages (huggingface_hub, onnx + onnxscript, onnxruntime, transformers) are skipped
with the reason when missing; the dev extra installs them.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import safetensors
import safetensors.torch
import torch
from typer.testing import CliRunner

import compiler
from compiler.tools import interop
from compiler.tools.checkpoint import load_checkpoint, save_checkpoint
from compiler.tools.cli import app
from tests.conftest import ROOT

runner = CliRunner()

LM = """
spec: 1
name: tiny-lm
seed: 3
inputs:
  tokens: {kind: tokens, vocab: 50, context: 16}
nodes:
  body: {kind: transformer, width: 32, heads: 4, layers: 2}
outputs:
  logits: {from: body, kind: lm_head, tie: true}
"""

# Edges, a batched group (moon and mars share a shape), feedback through a delayed edge, and two
# outputs of different kinds.
FEDERATION = """
spec: 1
name: tiny-federation
seed: 0
defaults:
  transformer: {width: 16, heads: 2, layers: 1}
inputs:
  tokens: {kind: tokens, vocab: 50, context: 16}
nodes:
  sun:  {kind: transformer}
  moon: {kind: transformer}
  mars: {kind: transformer}
edges:
  - {from: sun, to: moon, ratio: 254/19}
  - {from: sun, to: mars}
  - {from: moon, to: sun, kind: feedback, delay: 1}
feedback: {steps: 2, mode: unroll}
outputs:
  logits: {from: [sun, moon], kind: lm_head}
  value: {from: mars, kind: regression, width: 2}
"""


def build(write_spec, text: str, name: str = "spec.yaml"):
    return compiler.build_model(write_spec(text, name)).eval()


def assert_same_outputs(got: dict, expected: dict, atol: float = 1e-5) -> None:
    assert list(got) == list(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=atol, atol=atol)


# --------------------------------------------------------------------------- Hub directories


@pytest.fixture
def hub():
    return pytest.importorskip("huggingface_hub", reason="save_pretrained needs huggingface_hub")


def test_save_pretrained_writes_the_checkpoint_format_and_from_pretrained_recompiles_it(
    hub, write_spec, tmp_path
):
    model = build(write_spec, LM)
    directory = interop.save_pretrained(model, tmp_path / "tiny")
    assert {p.name for p in directory.iterdir()} == {
        "model.safetensors",  # weights, the spec embedded in the header
        "spec.yaml",
        "config.json",
        "README.md",  # the mixin's model card
    }
    config = json.loads((directory / "config.json").read_text())
    assert config["spec_sha256"] == model.spec_digest
    assert (directory / "spec.yaml").read_text() == model.spec_text

    loaded = interop.from_pretrained(directory)
    assert isinstance(loaded, interop.HubGraphModel) and isinstance(loaded, type(model))
    assert loaded.spec_digest == model.spec_digest
    tokens = torch.randint(0, 50, (2, 16))
    assert_same_outputs(loaded.eval()(tokens), model(tokens), atol=0)
    # one format: the project's own loader reads the directory too
    assert_same_outputs(load_checkpoint(directory).eval()(tokens), model(tokens), atol=0)
    # and the loaded model has the mixin's methods itself
    loaded.save_pretrained(tmp_path / "again")
    again = interop.HubGraphModel.from_pretrained(tmp_path / "again")
    assert_same_outputs(again.eval()(tokens), model(tokens), atol=0)


def test_hub_model_shares_the_weights_of_the_compiled_model(hub, write_spec):
    model = build(write_spec, LM)
    wrapped = interop.hub_model(model)
    assert list(wrapped.state_dict()) == list(model.state_dict())
    assert all(a is b for a, b in zip(wrapped.parameters(), model.parameters(), strict=True))


def test_from_pretrained_refuses_a_directory_whose_files_disagree(hub, write_spec, tmp_path):
    model = build(write_spec, LM)
    directory = interop.save_pretrained(model, tmp_path / "tiny")
    spec = directory / "spec.yaml"
    spec.write_text(spec.read_text().replace("layers: 2", "layers: 3"))
    with pytest.raises(
        compiler.SpecError, match="differs from the one embedded in model.safetensors"
    ):
        interop.from_pretrained(directory)

    interop.save_pretrained(model, directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "spec_sha256": "0" * 64}))
    with pytest.raises(compiler.SpecError, match="mixes files of two models"):
        interop.from_pretrained(directory)


def test_from_pretrained_never_loads_part_of_the_weights(hub, write_spec, tmp_path):
    model = build(write_spec, LM)
    directory = interop.save_pretrained(model, tmp_path / "tiny")
    weights = directory / "model.safetensors"
    with safetensors.safe_open(str(weights), framework="pt") as handle:
        header = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 - safe_open is no dict
    dropped = "federation.transformers.0.blocks.1.mlp.fc.weight"
    del tensors[dropped]
    safetensors.torch.save_file(tensors, str(weights), metadata=header)
    with pytest.raises(compiler.SpecError, match=f"missing {dropped}"):
        interop.from_pretrained(directory)


def test_from_pretrained_reads_local_directories_only(hub, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("from_pretrained tried the network")

    monkeypatch.setattr(hub.hub_mixin, "hf_hub_download", no_network)
    with pytest.raises(compiler.SpecError, match="not a local directory") as info:
        interop.from_pretrained("someone/some-model")
    assert "hf download" in info.value.format()


# --------------------------------------------------------------------------- torch.export


def test_torch_export_captures_an_lm_with_dynamic_batch_and_tokens(write_spec, tmp_path):
    model = build(write_spec, LM)
    path = interop.save_program(model, tmp_path / "lm.pt2")
    program = torch.export.load(str(path))
    for shape in [(1, 1), (3, 16), (5, 7)]:
        tokens = torch.randint(0, 50, shape)
        assert_same_outputs(program.module()(tokens), model(tokens))
    with pytest.raises(Exception, match="<= 16"):  # the spec's context is a guard of the program
        program.module()(torch.randint(0, 50, (1, 17)))


def test_torch_export_captures_a_federation_with_edges_and_feedback(write_spec):
    model = build(write_spec, FEDERATION)
    program = interop.export_program(model)
    tokens = torch.randint(0, 50, (3, 11))
    got = program.module()(tokens)
    assert set(got) == {"logits", "value"}
    assert_same_outputs(got, model(tokens))


def test_equilibrium_feedback_cannot_be_exported_and_says_why(write_spec):
    path = write_spec(FEDERATION.replace("steps: 2, mode: unroll", "steps: 8, mode: equilibrium"))
    model = compiler.build_model(path)
    with pytest.raises(compiler.SpecError) as info:
        interop.export_program(model, source=str(path))
    text = info.value.format()
    assert text.startswith(f"{path}:1:1: error: torch.export cannot capture this model")
    assert "export the spec with `mode: unroll`" in text


# --------------------------------------------------------------------------- ONNX


@pytest.fixture
def onnx_tools():
    pytest.importorskip("onnxscript", reason="ONNX export needs onnx and onnxscript")
    pytest.importorskip("onnxruntime", reason="checking ONNX files needs onnxruntime")
    return pytest.importorskip("onnx")


@pytest.mark.parametrize("text", [LM, FEDERATION], ids=["lm", "federation"])
def test_onnx_export_runs_in_onnxruntime_like_pytorch(onnx_tools, write_spec, tmp_path, text):
    model = build(write_spec, text)
    path = interop.export_onnx(model, tmp_path / "model.onnx")
    graph = onnx_tools.load(str(path)).graph
    shape = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert [i.name for i in graph.input] == ["tokens"] and shape == ["batch", "tokens"]
    assert [o.name for o in graph.output] == list(model.spec.outputs)
    # another batch and length than the export's example: the dimensions are dynamic
    differences = interop.check_onnx(model, path, (torch.randint(0, 50, (3, 13)),))
    assert set(differences) == set(model.spec.outputs)
    assert max(differences.values()) < 1e-4


# --------------------------------------------------------------------------- the command


def test_export_command_writes_a_program_from_a_checkpoint(write_spec, tmp_path):
    model = build(write_spec, FEDERATION)
    save_checkpoint(model, tmp_path / "run")
    result = runner.invoke(app, ["export", str(tmp_path / "run"), "-o", str(tmp_path / "m.pt2")])
    assert result.exit_code == 0, result.output
    assert "tokens -> logits, value; batch and tokens dynamic" in " ".join(result.stdout.split())
    program = torch.export.load(str(tmp_path / "m.pt2"))
    tokens = torch.randint(0, 50, (2, 5))
    assert_same_outputs(program.module()(tokens), model(tokens))


def test_export_command_errors(write_spec, tmp_path):
    spec = write_spec(LM)
    missing = runner.invoke(app, ["export", str(tmp_path / "nope.yaml"), "-o", "m.onnx"])
    assert missing.exit_code == 1 and "nope.yaml:1:1: error: no such file" in missing.stderr
    suffix = runner.invoke(app, ["export", str(spec), "-o", str(tmp_path / "m.bin")])
    assert suffix.exit_code == 2 and "pass --format onnx or --format pt2" in suffix.stderr
    unknown = runner.invoke(app, ["export", str(spec), "-o", "m.bin", "--format", "tflite"])
    assert unknown.exit_code == 2 and "'tflite' is not one of" in unknown.output
    looping = write_spec(
        FEDERATION.replace("steps: 2, mode: unroll", "steps: 8, mode: equilibrium"), "eq.yaml"
    )
    refused = runner.invoke(app, ["export", str(looping), "-o", str(tmp_path / "eq.pt2")])
    assert refused.exit_code == 1
    # refused by the capability check, at the line that asks for the loop, before tracing starts
    assert refused.stderr.startswith(f"{looping}:16:28: error: cannot export with torch.export")
    assert "def forward" not in refused.output  # torch's dump of the traced graph is not shown


def test_optional_packages_are_not_imported_by_validate():
    code = (
        "import sys; from compiler.tools.cli import app; import compiler.tools.interop\n"
        "try: app(['validate', 'specs/transformer.yaml'])\n"
        "except SystemExit: pass\n"
        "print(sorted(m for m in ('transformers', 'onnxruntime', 'onnx', 'onnxscript', "
        "'huggingface_hub') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip().splitlines()[-1] == "[]"


# --------------------------------------------------------------------------- GPT-2

GPT2_LIKE = """
spec: 1
name: gpt2-tiny
seed: 0
inputs:
  tokens: {kind: tokens, vocab: 50, context: 16}
nodes:
  body:
    kind: transformer
    width: 32
    heads: 4
    layers: 2
    mlp_ratio: 4
    activation: gelu_tanh   # GPT-2's gelu_new
    norm: layernorm         # epsilon 1e-5, as GPT-2's
    position: learned       # wpe
    bias: true
    causal: true
outputs:
  logits: {from: body, kind: lm_head, tie: true}
"""


@pytest.fixture
def transformers():
    return pytest.importorskip("transformers", reason="the GPT-2 comparison needs transformers")


def tiny_gpt2(transformers, tie: bool = True):
    """A random GPT-2 (no download) whose every weight, norm gains and biases included, is
    perturbed away from its initial value, so that a mis-mapped tensor cannot go unnoticed."""
    config = transformers.GPT2Config(
        vocab_size=50,
        n_positions=16,
        n_embd=32,
        n_layer=2,
        n_head=4,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def test_a_gpt2_shaped_node_computes_what_transformers_gpt2_computes(transformers, write_spec):
    hf = tiny_gpt2(transformers)
    model = build(write_spec, GPT2_LIKE)
    written = interop.load_gpt2_weights(model, hf.state_dict(), config=hf.config)
    assert len(written) == 4 + 12 * 2  # wte, wpe, ln_f (2); 12 tensors per layer; head tied
    tokens = torch.randint(0, 50, (3, 16))
    with torch.no_grad():
        hidden = model.federation.transformers[0](model.inputs["tokens"](tokens)[None])[0]
        torch.testing.assert_close(
            hidden, hf.transformer(tokens).last_hidden_state, rtol=1e-5, atol=1e-5
        )
        torch.testing.assert_close(model(tokens)["logits"], hf(tokens).logits, rtol=1e-5, atol=1e-5)


def test_an_untied_gpt2_head_loads_into_an_untied_lm_head(transformers, write_spec):
    hf = tiny_gpt2(transformers, tie=False)
    assert not torch.equal(hf.lm_head.weight, hf.transformer.wte.weight)
    model = build(write_spec, GPT2_LIKE.replace("tie: true", "tie: false"))
    interop.load_gpt2_weights(model, hf.state_dict(), config=hf.config)
    tokens = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens)["logits"], hf(tokens).logits, rtol=1e-5, atol=1e-5)

    tied = build(write_spec, GPT2_LIKE)
    with pytest.raises(compiler.SpecError, match="set `tie: false` on output `logits`"):
        interop.load_gpt2_weights(tied, hf.state_dict())


def test_gpt2_weights_are_refused_by_a_node_that_is_not_gpt2_and_nothing_changes(
    transformers, write_spec
):
    hf = tiny_gpt2(transformers)
    path = write_spec(
        GPT2_LIKE.replace("position: learned ", "position: rope    ").replace(
            "heads: 4", "heads: 2"
        )
    )
    model = compiler.build_model(path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(compiler.SpecError) as info:
        interop.load_gpt2_weights(model, hf.state_dict(), config=hf.config)
    text = info.value.format().replace(f"<{model.spec.name} spec>", "spec.yaml")
    assert "spec.yaml:10:12: error: `heads` is 2, but the GPT-2 config has n_head = 4" in text
    assert (
        "spec.yaml:15:15: error: node `body` has `position: rope`; GPT-2 learns absolute positions"
        in text
    )
    assert "help: set `position: learned` to load GPT-2 weights" in text
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_gpt2_state_dicts_of_another_shape_are_refused_by_name(transformers, write_spec):
    hf = tiny_gpt2(transformers)
    model = build(write_spec, GPT2_LIKE.replace("layers: 2", "layers: 3"))
    with pytest.raises(
        compiler.SpecError, match=r"lacks 12 GPT-2 weight\(s\): h\.2\.attn\.c_attn\.bias"
    ):
        interop.load_gpt2_weights(model, hf.state_dict())
    narrow = build(write_spec, GPT2_LIKE.replace("mlp_ratio: 4", "mlp_ratio: 2"))
    with pytest.raises(
        compiler.SpecError, match=r"`h\.0\.mlp\.c_fc\.weight` has shape \(128, 32\)"
    ):
        interop.load_gpt2_weights(narrow, hf.state_dict())


def test_from_gpt2_writes_the_spec_and_loads_the_weights(transformers):
    hf = tiny_gpt2(transformers)
    model = interop.from_gpt2(hf).eval()
    assert model.spec.nodes["body"].position == "learned"
    tokens = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens)["logits"], hf(tokens).logits, rtol=1e-5, atol=1e-5)


def test_the_gallery_gpt2_small_has_the_shape_of_gpt2_small(transformers):
    with torch.device("meta"):
        reference = transformers.GPT2Model(transformers.GPT2Config()).num_parameters()
    gallery = compiler.analyze(ROOT / "specs" / "gpt2_small.yaml")
    written = compiler.analyze(
        compiler.load_spec_text(interop.gpt2_spec_text(transformers.GPT2Config()))
    )
    assert gallery.facts.parameters == written.facts.parameters == reference == 124_439_808
    body = gallery.graph.nodes["nodes.body"]["config"]
    assert (body.width, body.heads, body.layers, body.inner_width) == (768, 12, 12, 3072)


def test_a_gpt2_config_the_node_cannot_reproduce_is_refused(transformers, write_spec):
    hf = tiny_gpt2(transformers)
    model = build(write_spec, GPT2_LIKE)
    config = {
        **hf.config.to_dict(),
        "layer_norm_epsilon": 1e-6,
        "scale_attn_by_inverse_layer_idx": True,
    }
    with pytest.raises(compiler.SpecError) as info:
        interop.load_gpt2_weights(model, hf.state_dict(), config=config)
    text = info.value.format()
    assert "layer_norm_epsilon = 1e-06; epicycle's LayerNorm uses 1e-05" in text
    assert "scale_attn_by_inverse_layer_idx = True" in text
