"""U-Net family networks from segmentation_models_pytorch (smp): U-Net, U-Net++ and FPN.

    net = build_net("unet_resnet34")        # kit.model.build_model wraps it: use that
    names = encoder_file_names("resnext50_32x4d")   # torchvision's ImageNet file names

A name is ``{arch}_{encoder}``: ``arch`` one of `ARCHITECTURES`, ``encoder`` any smp encoder
(``resnet34``, ``resnext50_32x4d``, ``efficientnet-b2`` ...) or any timm model as ``tu-NAME``
(``tu-regnety_016``, ``tu-resnest50d``). The top HuBMAP teams used these decoders on such
encoders (DOMAIN.md). Encoders are always built with ``encoder_weights=None``: smp would download
its weights; local files are loaded afterwards (`match_encoder_state`).

segmentation_models_pytorch is imported only when such a network is built (it takes seconds, and
the torchvision models need none of it).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

# kit name -> smp architecture class name.
ARCHITECTURES = {"unet": "Unet", "unetplusplus": "UnetPlusPlus", "fpn": "FPN"}
TIMM_PREFIX = "tu-"
EXAMPLES = ("unet_resnet34", "unetplusplus_resnext50_32x4d", "fpn_resnet50", "unet_tu-regnety_016")
# smp encoders that are torchvision's ResNet/ResNeXt minus ``fc``: torchvision's ImageNet files fit.
TORCHVISION_ENCODER_PREFIXES = ("resnet", "resnext")


def family_help() -> str:
    """One line telling users the names of this family."""
    return (
        f"{{{','.join(ARCHITECTURES)}}}_ENCODER with ENCODER an smp encoder or {TIMM_PREFIX}"
        f"<timm model> (e.g. {', '.join(EXAMPLES)})"
    )


def split_name(name: str) -> tuple[str, str] | None:
    """``(arch, encoder)`` when `name` has the form ``{arch}_{encoder}``, else None.

    Only the form is checked; `check_name` also checks that the encoder exists.
    """
    arch, sep, encoder = name.partition("_")
    if sep and encoder and arch in ARCHITECTURES:
        return arch, encoder
    return None


def check_name(name: str) -> tuple[str, str]:
    """``(arch, encoder)`` of a U-Net family name whose encoder smp (or timm) knows.

    Raises:
        ValueError: not of the form ``{arch}_{encoder}``, or an unknown encoder (named).
    """
    parts = split_name(name)
    if parts is None:
        raise ValueError(f"{name!r} is not a U-Net family name: {family_help()}")
    encoder = parts[1]
    if encoder.startswith(TIMM_PREFIX):
        import timm

        model = encoder.removeprefix(TIMM_PREFIX).split(".")[0]  # "resnet18.a1_in1k": a tag
        if not timm.is_model(model):
            raise ValueError(f"{name!r}: timm has no model {model!r} (timm.list_models lists them)")
    else:
        import segmentation_models_pytorch as smp

        known = smp.encoders.get_encoder_names()
        if encoder not in known:
            raise ValueError(
                f"{name!r}: smp has no encoder {encoder!r}; its encoders: {', '.join(known)}, "
                f"or {TIMM_PREFIX}<timm model>"
            )
    return parts


def build_net(name: str) -> nn.Module:
    """The smp network of `name` with a 1-channel head and randomly initialised weights.

    Shape:
        - Input: float (N, 3, h, w), ImageNet-normalised, h and w multiples of
          `input_multiple(net)`.
        - Output: float logits (N, 1, h, w).
    """
    arch, encoder = check_name(name)
    import segmentation_models_pytorch as smp

    architecture = getattr(smp, ARCHITECTURES[arch])
    # encoder_weights=None: anything else makes smp (or timm) download weights.
    return architecture(encoder_name=encoder, encoder_weights=None, in_channels=3, classes=1)


def input_multiple(net: nn.Module) -> int:
    """What `net`'s input sides must be multiples of: the encoder's output stride (32) where smp
    refuses other sizes (U-Net++, FPN: their decoders add skips scale by scale), else 1 (U-Net
    resizes its skips itself). kit.model.SegmentationModel pads to it."""
    return net.encoder.output_stride if net.requires_divisible_input_shape else 1


def encoder_file_names(encoder: str) -> tuple[str, ...]:
    """File names of local ImageNet weights for `encoder`, searched in this order.

    ResNet/ResNeXt: torchvision's files (the basenames of its weights enums' urls, as
    ``torch.hub`` saves them), e.g. ``resnet34-b627a593.pth``. ``tu-NAME``:
    ``NAME.safetensors`` then ``NAME.pth``, a timm state dict (e.g. ``regnety_016.safetensors``:
    the ``model.safetensors`` of the timm hub repository, renamed). Other smp encoders: none
    (random initialisation).
    """
    if encoder.startswith(TIMM_PREFIX):
        model = encoder.removeprefix(TIMM_PREFIX)
        return (f"{model}.safetensors", f"{model}.pth")
    if encoder.startswith(TORCHVISION_ENCODER_PREFIXES):
        import torchvision.models as tvm

        try:
            weights = tvm.get_model_weights(encoder)
        except ValueError:  # e.g. resnext101_32x16d: smp's, with no torchvision release
            return ()
        return tuple(w.url.rsplit("/", 1)[-1] for w in weights)
    return ()


def encoder_module(net: nn.Module) -> nn.Module:
    """The module holding the encoder's weights: timm's features-only model for ``tu-``."""
    return getattr(net.encoder, "model", net.encoder)


def match_encoder_state(
    net: nn.Module, state: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """Match a classifier's state dict to the encoder of `net` (keys are shared: smp's ResNet
    encoders are torchvision's ResNets without ``fc``, timm's features-only models keep timm's
    names).

    Returns:
        ``(take, unexpected, missing)``: encoder key -> tensor to load; file key -> why it was
        left out; encoder keys no tensor of the file fits (BatchNorm counters excepted), then
        file keys the encoder lacks inside one of its own modules (``layer1.2.conv1.weight``
        of a resnet34 file against a resnet18 encoder): either means the file is of another
        network. A classifier head (``fc.``, ``classifier.``, ``head.``) is unexpected only.
    """
    target = encoder_module(net).state_dict()
    modules = {key.split(".", 1)[0] for key in target}
    take: dict[str, torch.Tensor] = {}
    unexpected: dict[str, str] = {}
    for key, value in state.items():
        if key not in target:
            unexpected[key] = "not in the encoder"
        elif value.shape != target[key].shape:
            unexpected[key] = f"shape {tuple(value.shape)} != {tuple(target[key].shape)}"
        else:
            take[key] = value
    missing = [k for k in target if k not in take and not k.endswith("num_batches_tracked")]
    missing += [k for k in unexpected if k.split(".", 1)[0] in modules]
    return take, unexpected, missing
