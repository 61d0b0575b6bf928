"""The built-in node kinds, one module each, registered with `compiler.language.kinds.kind`.

* `transformer`: a decoder-only transformer on a token stream.
* `gear`: a transformer whose heads turn at an exact angular velocity along a gear train.
* `fractal`: a transformer holding smaller copies of itself (every sub-model runnable alone).
* `companion`: an observer that reconstructs a host's states through a code of fixed geometry.

Nothing here is imported by the rest of the compiler: the registry loads these modules by name,
as it loads the kinds of other packages from the `epicycle.kinds` entry point.
"""
