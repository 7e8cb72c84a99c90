"""Options that contradict each other, worded once.

The settings find them before the model loads (exit 2); the components find them again where only
the loaded model tells (weights stored quantized in their own files) and for library callers.
"""

from __future__ import annotations


def reset_conflict(reset: str, quantized: bool, cache_weights: bool) -> str | None:
    """Why `--reset reset` cannot serve these weights with this `--cache-weights`; None when it can."""
    if quantized and reset not in ("auto", "adapter"):
        return f"--reset {reset} cannot restore 4-bit weights; use --reset adapter (or auto)"
    if not cache_weights and reset in ("gpu-cache", "host-cache"):
        return f"--reset {reset} keeps a cache, but --cache-weights is false; drop one of the two"
    return None


def row_norm_conflict(row_norm: str, adapter_because: str | None) -> str | None:
    """Why `--row-norm row_norm` cannot serve edits made through the adapter (`adapter_because` says
    why they are: `--reset adapter`, 4-bit weights); None when it can, or when there is no adapter."""
    if row_norm != "full" or adapter_because is None:
        return None
    return (
        f"--row-norm full changes every row's scale and cannot be expressed as an adapter ({adapter_because}); "
        "use none or pre"
    )
