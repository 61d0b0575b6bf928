"""epicycle's runtime: the modules a compiled spec is made of, with no knowledge of YAML.

"Design 000" ... "design 004" in docstrings and comments name the sections of docs/designs.md.
"""
