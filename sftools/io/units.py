"""Byte sizes as people write them: `5GB` in, `1.23 MB` out. No torch, so the CLI can parse at once."""

from __future__ import annotations

UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000 (decimal units, like diffusers' max_shard_size; KiB/MiB/GiB binary).
    Raises ValueError for anything else, zero, or sizes below one byte."""
    s = text.strip().upper()
    digits = s.rstrip("KMGTIB")
    unit = s[len(digits):]
    try:
        value = float(digits)
    except ValueError:
        value = -1
    if unit not in UNITS or not 0 < value < 1e18 or value * UNITS[unit] < 1:  # also refuses nan and inf
        raise ValueError(f"{text!r} is not a size like 5GB or 500MB")
    return int(value * UNITS[unit])


def human_bytes(n: float) -> str:
    """1234567 -> '1.23 MB' (decimal units)."""
    unit = "B"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            break
        n /= 1000
    return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
