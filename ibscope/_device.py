"""Device selection shared by every command: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ibscope.errors import UsageError

if TYPE_CHECKING:
    import torch


def resolve_device(device: str | torch.device | None = "auto"):
    """``auto`` (CUDA if available, else CPU), ``cpu`` or ``cuda:N`` -> torch.device."""
    import torch

    if isinstance(device, torch.device):
        return device
    d = str(device or "auto").strip().lower()
    if d == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if d == "cpu":
        return torch.device("cpu")
    if d == "cuda" or d.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: no CUDA device is available on this machine.",
                             hint="Use --device cpu (or auto).")
        try:
            dev = torch.device(d)
        except RuntimeError:
            raise UsageError(f"--device expects auto, cpu or cuda:N. Got {device!r}.") from None
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s).")
        return dev
    raise UsageError(f"--device expects auto, cpu or cuda:N. Got {device!r}.")
