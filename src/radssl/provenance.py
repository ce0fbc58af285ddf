"""What every run records beside its outputs: package versions, machine, seed, data fingerprint, wall time."""

from __future__ import annotations

import platform
import sys
from importlib import metadata

PACKAGES = ("radssl", "torch", "torchvision", "lightly", "lightning", "numpy", "scikit-learn", "pydantic")


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that can change a result (plus Python and the platform)."""
    versions = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def device_description(device: object) -> str:
    """A human name for a torch device (GPU model where known)."""
    import torch

    device = torch.device(device)  # type: ignore[arg-type]
    if device.type == "cuda" and torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"{device.type}:{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
