"""The `epicycle` command (`epicycle = "compiler.tools.cli:main"`; also `python -m
compiler.tools.cli`): validate, compile and print the schema of specs, list components and node
kinds, train, export and draw.

The app, its error handling and exit codes are in `common.py`; each module below registers its
commands on the app when imported: `specs` (validate, compile), `catalog` (schema, components,
kinds), `train` (train, data), `export`, `viz`. Heavy imports (torch) stay inside the commands,
so `epicycle validate` starts fast.
"""

from __future__ import annotations

# the order of these imports is the order `epicycle --help` lists the commands in
# isort: off
from compiler.tools.cli import specs, catalog, train, export, viz  # noqa: F401
# isort: on

from compiler.tools.cli.common import app, main

__all__ = ["app", "main"]
