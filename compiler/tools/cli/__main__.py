"""`python -m compiler.tools.cli` (and `torchrun ... -m compiler.tools.cli train ...`)."""

from compiler.tools.cli import main

main()
