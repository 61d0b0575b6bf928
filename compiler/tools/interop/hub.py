"""Hub directories: `save_pretrained(model, dir)` / `from_pretrained(dir)` go through
huggingface_hub's `ModelHubMixin`, whose hooks call the project's own checkpoint format
(`compiler.tools.checkpoint`): `model.safetensors` with the spec embedded in its header, `spec.yaml`
beside it, a `config.json` naming the spec's digest and a model card. The spec is the model's
identity, so loading recompiles it and loads the weights strictly; a directory whose files
disagree (an edited `spec.yaml`, a `config.json` of another model) is refused. Local
directories only: a Hub id is refused before any network access.

huggingface_hub is optional: `HubGraphModel` is created, and the Hub imported, on first use.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from compiler.language.diagnostics import SpecError
from compiler.tools.interop._common import _error, _require
from runtime.model import GraphModel

CONFIG = "config.json"
LIBRARY = "epicycle"

MODEL_CARD = """---
{{ card_data }}
---

# {{ spec_name }}

An epicycle model: a YAML graph spec compiled into a PyTorch module.
`spec.yaml` is the model's identity (SHA-256 `{{ spec_sha256 }}`, {{ parameters }} parameters);
`model.safetensors` holds the weights with that spec embedded in its header.

```python
from compiler.tools.interop import from_pretrained

model = from_pretrained("path/to/this/directory")  # recompiles spec.yaml, loads the weights strictly
outputs = model(...)  # a dict of the spec's outputs by name
```
"""


@functools.cache
def _hub_class() -> type:
    """`HubGraphModel`, created on first use so that huggingface_hub stays an optional import."""
    hub = _require("huggingface_hub", "save_pretrained/from_pretrained", "huggingface_hub")

    class HubGraphModel(
        GraphModel,
        hub.ModelHubMixin,
        library_name=LIBRARY,
        tags=["epicycle"],
        model_card_template=MODEL_CARD,
    ):
        """A `GraphModel` with huggingface_hub's `save_pretrained` / `from_pretrained` /
        `push_to_hub`. It holds the very modules of the model it was made from (`from_model`), so
        its `state_dict` has the same names and the two share their weights."""

        @classmethod
        def from_model(cls, model: GraphModel) -> HubGraphModel:
            if isinstance(model, cls):
                return model
            hub_model = cls(
                model.inputs,
                model.federation,
                model.outputs,
                model.wiring,
                dict(model.companions),
                model.companion_wiring,
                model.kinds,
            )
            hub_model.spec, hub_model.spec_text = model.spec, model.spec_text
            hub_model.spec_digest = model.spec_digest
            return hub_model.train(model.training)

        @classmethod
        def from_pretrained(  # type: ignore[override]
            cls, directory: str | Path, *, device: str | None = None, **kwargs: Any
        ) -> HubGraphModel:
            """Load a directory written by `save_pretrained` (local directories only)."""
            path = Path(directory)
            if not path.is_dir():
                raise SpecError(
                    [
                        _error(
                            str(directory),
                            "not a local directory",
                            "from_pretrained reads a directory written by save_pretrained; to use a "
                            "Hub repository, download it first (`hf download REPO --local-dir DIR`)",
                        )
                    ]
                )
            return super().from_pretrained(path, device=device, **kwargs)

        def _save_pretrained(self, save_directory: Path) -> None:
            from compiler.tools.checkpoint import FORMAT, save_checkpoint
            from compiler.tools.outputs import write_file

            save_checkpoint(self, save_directory)
            config = {
                "library": LIBRARY,
                "format": FORMAT,
                "spec_name": self.spec.name,
                "spec_sha256": self.spec_digest,
                "parameters": _parameter_count(self),
            }
            write_file(Path(save_directory) / CONFIG, json.dumps(config, indent=2) + "\n")

        def generate_model_card(self, *args: Any, **kwargs: Any) -> Any:
            kwargs = {
                "spec_name": self.spec.name,
                "spec_sha256": self.spec_digest,
                "parameters": f"{_parameter_count(self):,}",
                **kwargs,
            }
            return super().generate_model_card(*args, **kwargs)

        @classmethod
        def _from_pretrained(
            cls, *, model_id: str, device: str | None = None, config: Any = None, **_: Any
        ) -> HubGraphModel:
            from compiler.tools.checkpoint import (
                SPEC,
                WEIGHTS,
                load_checkpoint,
                read_checkpoint_spec,
            )

            directory = Path(model_id)
            embedded, header = read_checkpoint_spec(directory)
            spec_file = directory / SPEC
            if spec_file.is_file() and spec_file.read_text(encoding="utf-8") != embedded:
                raise SpecError(
                    [
                        _error(
                            str(spec_file),
                            f"this spec differs from the one embedded in {WEIGHTS}, which made the weights",
                            "restore spec.yaml (the embedded spec is the model), or compile the edited "
                            "spec and train it anew",
                        )
                    ]
                )
            if isinstance(config, Mapping) and config.get("spec_sha256") not in (
                None,
                header.get("spec_sha256"),
            ):
                raise SpecError(
                    [
                        _error(
                            str(directory / CONFIG),
                            f"{CONFIG} names spec sha256 {str(config['spec_sha256'])[:12]}, but "
                            f"{WEIGHTS} was made by spec {header.get('spec_sha256', '?')[:12]}",
                            "the directory mixes files of two models; save it again with save_pretrained",
                        )
                    ]
                )
            return cls.from_model(load_checkpoint(directory, device=device))

    return HubGraphModel


def __getattr__(name: str) -> Any:
    # `from compiler.tools.interop.hub import HubGraphModel` builds the class (and imports the Hub) lazily.
    if name == "HubGraphModel":
        return _hub_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def hub_model(model: GraphModel) -> Any:
    """`model` as a `HubGraphModel` sharing its modules: `.save_pretrained`, `.push_to_hub`."""
    return _hub_class().from_model(model)


def save_pretrained(model: GraphModel, directory: str | Path, **kwargs: Any) -> Path:
    """Write `model` to `directory` in the Hub layout (huggingface_hub's `ModelHubMixin`)."""
    hub_model(model).save_pretrained(directory, **kwargs)
    return Path(directory)


def from_pretrained(directory: str | Path, *, device: str | None = None) -> Any:
    """The model saved in `directory`, recompiled from its spec with its weights (strictly)."""
    return _hub_class().from_pretrained(directory, device=device)


def _parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
