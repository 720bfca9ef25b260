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
