"""Which torch device a `--device` name means (auto, cpu, cuda, cuda:N), for every layer."""

from __future__ import annotations

import torch

from sftools.errors import SftoolsError


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when torch sees it, else the CPU; asking for CUDA without it is one clear line."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SftoolsError("--device cuda was asked for, but torch sees no CUDA device")
    return device
