"""What every benchmark script shares: the name of the device it measured on."""
from __future__ import annotations

import platform
from pathlib import Path

import torch


def device_name(device) -> str:
    """The GPU's name for a CUDA device, else the CPU model (from /proc/cpuinfo where it exists)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
