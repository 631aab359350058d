"""The run's device, checked before anything runs (``flows.execute.validate``)."""

from __future__ import annotations

import torch


def check_device(device: str, remote: bool = False) -> None:
    """Fail before anything runs when the device does not exist here.

    ``auto`` (one GPU per worker when there are GPUs, else the CPU, said once per worker) is
    always valid. With ``remote`` (an existing Dask cluster) only the device string is checked:
    the workers, not this machine, must have it.
    """
    if device == "auto":
        return
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device: {device!r} is not a torch device ({e}); use cpu, cuda or cuda:N") from e
    if remote:
        if dev.type not in ("cpu", "cuda", "mps"):
            raise ValueError(f"device: {device!r} is not supported; use auto, cpu, cuda or cuda:N")
        return
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {device!r} but CUDA is not available on this machine; use device: cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device: {device!r} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device: {device!r} but MPS is not available on this machine; use device: cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device: {device!r} is not supported; use cpu, cuda or cuda:N")
