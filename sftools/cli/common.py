"""What every command shares: printing a report as text or as one JSON object."""

from __future__ import annotations

import json

import click


def emit(report: dict, as_json: bool, lines: list[str]) -> None:
    if as_json:
        click.echo(json.dumps(report, default=str))
    else:
        for line in lines:
            click.echo(line)


def human_bytes(n: float) -> str:
    """1234567 -> '1.23 MB' (decimal units)."""
    unit = "B"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            break
        n /= 1000
    return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
