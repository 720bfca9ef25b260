"""Where computation runs: the default device, one device per rank, the mixed-precision dtype.

    device = default_device()                      # cuda when a GPU is visible, else cpu
    dtype = amp_dtype(device)                      # bf16 on Ampere+, fp16 before, None on CPU
    device = rank_device(None, local_rank=1, world=2)   # cuda:1, or a clear error on one GPU

One place decides these for training and inference alike, so a T4 (Kaggle, Colab) never gets
emulated bf16 in one and fp16 in the other.
"""

from __future__ import annotations

import torch

__all__ = ["amp_dtype", "default_device", "native_bf16", "rank_device"]


def default_device() -> torch.device:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def native_bf16(capability: tuple[int, int]) -> bool:
    """Whether a GPU of this compute capability runs bf16 in hardware (Ampere, 8.0, and newer).

    ``torch.cuda.is_bf16_supported()`` also answers True on a T4 (7.5) or P100 (6.0), through
    software emulation: autocast then runs slow emulated kernels, and cuDNN has no bf16
    convolutions there (pytorch/pytorch#148322, ``including_emulation``).
    """
    return tuple(capability) >= (8, 0)


def amp_dtype(
    device: str | torch.device, enabled: bool = True, capability: tuple[int, int] | None = None
) -> torch.dtype | None:
    """The autocast dtype for ``device``: bf16 with native support, else fp16; None off CUDA.

    fp16 needs a gradient scaler in training (`torch.amp.GradScaler`); bf16 does not.

    Args:
        device: where the model runs.
        enabled: False turns mixed precision off (None is returned).
        capability: the GPU's (major, minor) compute capability; default: asked of ``device``.
    """
    device = torch.device(device)
    if not enabled or device.type != "cuda":
        return None
    if capability is None:
        capability = torch.cuda.get_device_capability(device)
    return torch.bfloat16 if native_bf16(capability) else torch.float16


def rank_device(
    device: str | torch.device | None, local_rank: int = 0, world: int = 1, gpus: int | None = None
) -> torch.device:
    """The device of process ``local_rank`` of ``world`` (torchrun's LOCAL_RANK, WORLD_SIZE).

    ``device`` None: ``cuda:{local_rank}`` when a GPU is visible, else ``cpu``; "cuda" without an
    index means ``cuda:{local_rank}``; an explicit index is kept.

    Raises:
        ValueError: the rank's GPU does not exist (e.g. two ranks on a one-GPU machine), naming
            the ranks and the GPUs found.
    """
    gpus = torch.cuda.device_count() if gpus is None else gpus
    if device is None:
        device = "cuda" if gpus > 0 else "cpu"
    dev = torch.device(device)
    if dev.type != "cuda":
        return dev
    if dev.index is None:
        dev = torch.device("cuda", local_rank)
    if dev.index >= gpus:
        found = (
            f"{gpus} GPU"
            + ("" if gpus == 1 else "s")
            + (f" (cuda:0..cuda:{gpus - 1})" if gpus else "")
        )
        raise ValueError(
            f"rank {local_rank} of {world} needs {dev}, but this machine has {found}: "
            f"start at most {gpus} processes (torchrun --nproc_per_node {max(gpus, 1)}) "
            "or pass --device cpu"
        )
    return dev
