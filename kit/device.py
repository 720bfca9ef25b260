"""Where computation runs: the default device, one device per rank, the mixed-precision dtype,
the CPUs this process may use.

    device = default_device()                      # cuda when a GPU is visible, else cpu
    dtype = amp_dtype(device)                      # bf16 on Ampere+, fp16 before, None on CPU
    device = rank_device(None, local_rank=1, world=2)   # cuda:1, or a clear error on one GPU
    cpus = available_cpus()                        # e.g. 4 in a Kaggle GPU notebook

One place decides these for training and inference alike, so a T4 (Kaggle, Colab) never gets
emulated bf16 in one and fp16 in the other.
"""

from __future__ import annotations

import os

import torch

__all__ = [
    "amp_dtype",
    "available_cpus",
    "channels_last",
    "check_gpu",
    "default_device",
    "has_kernels",
    "native_bf16",
    "rank_device",
    "torchrun_place",
    "tune_convolutions",
]


def available_cpus() -> int:
    """How many CPUs this process may run on.

    Its affinity set where the OS keeps one (Linux: a container or ``taskset`` narrows it), else
    all of the machine's.
    """
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_device() -> torch.device:
    """``cuda`` when a GPU is visible, else ``cpu``.

    Raises:
        ValueError: the GPU is one this torch build has no kernels for (`check_gpu`).
    """
    if not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda")
    check_gpu(device)
    return device


def has_kernels(capability: tuple[int, int], arch_list: list[str]) -> bool:
    """Whether a torch build compiled for ``arch_list`` (e.g. ``["sm_70", "sm_75", "compute_90"]``)
    runs on a GPU of compute capability ``capability``.

    A cubin for sm_XY runs on X.Z for Z >= Y (same major version); PTX for compute_XY is compiled
    at load time for any capability >= X.Y.
    """
    for arch in arch_list:
        kind, _, digits = arch.partition("_")
        if not digits.isdigit() or len(digits) < 2:
            continue
        built = (int(digits[:-1]), int(digits[-1]))
        if kind == "sm" and built[0] == capability[0] and built[1] <= capability[1]:
            return True
        if kind == "compute" and built <= tuple(capability):
            return True
    return False


def check_gpu(
    device: str | torch.device,
    capability: tuple[int, int] | None = None,
    arch_list: list[str] | None = None,
    name: str | None = None,
) -> None:
    """Refuse a GPU this torch build has no kernels for, naming the card and the build's archs.

    Without this, such a GPU (a P100, 6.0, under the cu128 builds of Kaggle's image) passes
    ``torch.cuda.is_available()`` and fails at the first convolution with "no kernel image is
    available for execution on the device". The keyword arguments default to what torch reports.
    """
    device = torch.device(device)
    capability = capability or torch.cuda.get_device_capability(device)
    arch_list = torch.cuda.get_arch_list() if arch_list is None else arch_list
    if has_kernels(capability, arch_list):
        return
    name = name or torch.cuda.get_device_name(device)
    raise ValueError(
        f"{device} is a {name} (compute capability {capability[0]}.{capability[1]}), but this "
        f"torch {torch.__version__} has kernels only for {' '.join(arch_list) or 'no GPU'}: "
        "run on the CPU (device='cpu', --device cpu), install a torch built for this GPU, or on "
        "Kaggle ask for a T4 (machine_shape 'NvidiaTeslaT4' in kernel-metadata.json)"
    )


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


def torchrun_place() -> tuple[int, int, int]:
    """(rank, world size, local rank) of this process from torchrun's environment variables
    (RANK, WORLD_SIZE, LOCAL_RANK); (0, 1, 0) when it runs alone."""
    return tuple(int(os.environ.get(name, default)) for name, default in _PLACE)  # type: ignore


_PLACE = (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"))


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
    real = gpus is None  # a count given by the caller (tests) describes no real GPU to check
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
    if real:
        check_gpu(dev)
    return dev


def channels_last(device: torch.device, wanted: bool | None = None) -> bool:
    """Whether to run convolutions on ``device`` in the channels_last memory format.

    ``wanted`` None: on CUDA only, where fp16/bf16 convolutions of NHWC tensors run on the
    tensor cores without a layout change per layer; on the CPU it is given, never the default.
    """
    return device.type == "cuda" if wanted is None else bool(wanted)


def tune_convolutions(device: torch.device) -> None:
    """On CUDA, let cuDNN time its convolution algorithms once per input shape and keep the
    fastest (``torch.backends.cudnn.benchmark``); nothing elsewhere.

    Worth it when the shapes repeat: inference windows all have one size (a slide's last batch
    may be smaller: one more timing), and so do training tiles.
    """
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
