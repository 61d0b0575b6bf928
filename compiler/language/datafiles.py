"""What a declaration of training data means before any file is opened: the formats, which one a
path's suffix selects, and the combinations that cannot be honoured (a tokenizer for arrays, a
dtype for a `.npy` that names its own). The spec model (`train.data`) and the data readers
(`compiler.tools.training.datasets`) both ask here, so validation and training refuse the same
things with the same words, and validation imports neither numpy nor torch."""

from __future__ import annotations

from pathlib import PurePath

FORMATS = ("text", "tokens", "npz", "safetensors", "parquet", "csv")
SUFFIXES = {
    ".npy": "tokens",
    ".bin": "tokens",
    ".npz": "npz",
    ".safetensors": "safetensors",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
}  # any other suffix is read as text, as `--data` always read any UTF-8 file
TOKEN_DTYPES = ("uint16", "uint32")


def format_of(path: str, format: str | None) -> str:
    return format or SUFFIXES.get(PurePath(path).suffix.lower(), "text")


def declaration_conflict(
    path: str,
    format: str | None,
    tokenizer: str | None,
    dtype: str | None,
    arrays: dict[str, str] | None = None,
) -> str | None:
    """Why this declaration cannot be honoured, or None."""
    if format is not None and format not in FORMATS:
        return f"unknown data format `{format}`; one of {', '.join(FORMATS)}"
    chosen = format_of(path, format)
    if tokenizer is not None and chosen != "text":
        return f"a `tokenizer` reads text, and this data is `{chosen}`"
    if dtype is not None:
        if dtype not in TOKEN_DTYPES:
            return f"unknown token dtype `{dtype}`; one of {', '.join(TOKEN_DTYPES)}"
        if chosen != "tokens" or PurePath(path).suffix.lower() == ".npy":
            return "`dtype` is for raw `.bin` token arrays (a `.npy` file stores its own)"
    if arrays and chosen in ("text", "tokens"):
        return f"`arrays` maps the arrays of example files, and this data is a `{chosen}` stream"
    return None
