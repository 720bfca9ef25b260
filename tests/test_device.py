"""One decision for device and mixed precision, shared by training and inference."""

from __future__ import annotations

import pytest
import torch

from kit import device as kd


@pytest.mark.parametrize(
    "capability, expected",
    [
        ((6, 0), torch.float16),  # P100: bf16 only emulated
        ((7, 0), torch.float16),  # V100
        ((7, 5), torch.float16),  # T4 (Kaggle, Colab): is_bf16_supported() says True, emulated
        ((8, 0), torch.bfloat16),  # A100
        ((8, 6), torch.bfloat16),
        ((9, 0), torch.bfloat16),  # H100 / H200
    ],
)
def test_bf16_only_with_native_support(capability, expected):
    assert kd.amp_dtype("cuda:0", capability=capability) == expected


def test_amp_asks_the_gpu_for_its_capability(monkeypatch):
    asked = []

    def capability(device):
        asked.append(device)
        return (7, 5)

    # Emulated bf16 "support" must not decide: only the compute capability does.
    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert kd.amp_dtype(torch.device("cuda", 1)) == torch.float16
    assert asked == [torch.device("cuda", 1)]


def test_no_amp_off_cuda_or_when_disabled():
    assert kd.amp_dtype("cpu") is None
    assert kd.amp_dtype("cpu", capability=(9, 0)) is None
    assert kd.amp_dtype("cuda", enabled=False, capability=(9, 0)) is None


def test_rank_device_maps_local_ranks_to_gpus():
    assert kd.rank_device(None, 0, 1, gpus=0) == torch.device("cpu")
    assert kd.rank_device(None, 1, 2, gpus=2) == torch.device("cuda", 1)
    assert kd.rank_device("cuda", 1, 2, gpus=2) == torch.device("cuda", 1)
    assert kd.rank_device("cuda:0", 1, 2, gpus=2) == torch.device("cuda", 0)  # explicit index
    assert kd.rank_device("cpu", 1, 2, gpus=2) == torch.device("cpu")  # gloo on the CPU


def test_more_ranks_than_gpus_is_a_clear_error():
    with pytest.raises(ValueError, match=r"rank 1 of 2 needs cuda:1, but this machine has 1 GPU"):
        kd.rank_device(None, 1, 2, gpus=1)
    with pytest.raises(ValueError, match=r"has 0 GPUs.*--device cpu"):
        kd.rank_device("cuda", 0, 1, gpus=0)


BUILD = ["sm_70", "sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]  # torch 2.10 cu128


@pytest.mark.parametrize(
    "capability, arch_list, ok",
    [
        ((7, 5), BUILD, True),  # T4
        ((8, 9), BUILD, True),  # L4: sm_86 cubins run on 8.9
        ((6, 0), BUILD, False),  # P100: no sm_6x, no PTX
        ((6, 1), ["sm_60"], True),
        ((9, 0), ["sm_80", "compute_80"], True),  # PTX compiled at load time for newer GPUs
        ((7, 5), ["sm_80", "compute_80"], False),  # PTX never runs on older GPUs
        ((10, 0), ["sm_90"], False),  # another major version, no PTX
    ],
)
def test_has_kernels(capability, arch_list, ok):
    assert kd.has_kernels(capability, arch_list) is ok


def test_a_gpu_without_kernels_is_refused_by_name():
    with pytest.raises(ValueError) as caught:
        kd.check_gpu("cuda:0", capability=(6, 0), arch_list=BUILD, name="Tesla P100-PCIE-16GB")
    message = str(caught.value)
    assert "Tesla P100-PCIE-16GB (compute capability 6.0)" in message
    assert "sm_70 sm_75 sm_80 sm_86 sm_90 sm_100 sm_120" in message
    assert "NvidiaTeslaT4" in message and "--device cpu" in message
    kd.check_gpu("cuda:0", capability=(7, 5), arch_list=BUILD, name="Tesla T4")  # no error


def test_default_device_refuses_a_gpu_without_kernels(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (6, 0))
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: list(BUILD))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla P100")
    with pytest.raises(ValueError, match="Tesla P100"):
        kd.default_device()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert kd.default_device() == torch.device("cuda")
