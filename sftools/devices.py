"""Which torch device a `--device` name means (auto, cpu, cuda, cuda:N), for every layer.

The name check needs no torch, so settings objects can validate it at once (a usage error); the
device itself is resolved when work starts.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from sftools.errors import SettingsError, SftoolsError

if TYPE_CHECKING:
    import torch

DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device_name(name: str) -> None:
    if not DEVICE.fullmatch(name):
        raise SettingsError(f"--device {name!r} is not one of auto, cpu, cuda, cuda:N")


def resolve_device(name: str) -> "torch.device":
    """`auto` is CUDA when torch sees it, else the CPU; a CUDA device torch does not see is one line."""
    import torch

    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index or 0) >= count:
            raise SftoolsError(f"--device {name} was asked for, but torch sees {count} CUDA device(s)")
    return device
