"""ResNet backbone (torchvision) with FrozenBatchNorm2d, optional DC5 dilation and truncation."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

from dabdetr.config import BACKBONES, check_dilation

STAGES = ("layer1", "layer2", "layer3", "layer4")
STEM = ("conv1", "bn1", "relu", "maxpool")


def _frozen_bn(num_features: int) -> FrozenBatchNorm2d:
    # upstream's FrozenBatchNorm2d uses eps 1e-5, torchvision's default as well
    return FrozenBatchNorm2d(num_features, eps=1e-5)


def _dilate_basic_layer(layer: nn.Sequential) -> None:
    """DC5 for BasicBlock ResNets (18/34), which torchvision refuses to dilate.

    Same scheme as timm's output_stride=16: the first block loses its stride (conv1 and the
    downsample conv), its conv2 and every later 3x3 conv get dilation 2 (padding 2), so the
    output keeps stride 16 with layer4's receptive field.
    """
    first = layer[0]
    first.conv1.stride = (1, 1)
    if first.downsample is not None:
        first.downsample[0].stride = (1, 1)
    convs = [first.conv2] + [c for block in layer[1:] for c in (block.conv1, block.conv2)]
    for conv in convs:
        conv.dilation = (2, 2)
        conv.padding = (2, 2)


def resize_mask(mask: Tensor, size: Sequence[int]) -> Tensor:
    """Padding mask [B, H, W] bool -> [B, h, w] bool by nearest interpolation (as upstream:
    interpolate the float mask, then back to bool)."""
    return F.interpolate(mask[None].float(), size=tuple(size)).to(torch.bool)[0]


def features_per_image(body: Callable[[Tensor], Tensor], images: Tensor, mask: Tensor
                       ) -> tuple[Tensor, Tensor]:
    """`body` on each image's valid (top-left) extent, features pasted into a padded map.

    images: [B, 3, H, W]; mask: [B, H, W] bool, True on padding. Returns (features [B, C, h, w],
    mask [B, h, w] bool). Images of equal size run together; no convolution sees another
    image's padding, so every image gets exactly its single-image features.
    """
    valid = ~mask
    heights = valid.any(dim=2).sum(dim=1).tolist()
    widths = valid.any(dim=1).sum(dim=1).tolist()
    groups: dict[tuple[int, int], list[int]] = {}
    for i, size in enumerate(zip(heights, widths, strict=True)):
        groups.setdefault(size, []).append(i)
    pieces: dict[int, Tensor] = {}
    for (h, w), idx in groups.items():
        pieces.update(zip(idx, body(images[idx, :, :h, :w]), strict=True))
    fh = max(p.shape[-2] for p in pieces.values())
    fw = max(p.shape[-1] for p in pieces.values())
    first = pieces[0]
    features = first.new_zeros(len(pieces), first.shape[0], fh, fw)
    small_mask = torch.ones(len(pieces), fh, fw, dtype=torch.bool, device=images.device)
    for i, feat in pieces.items():
        features[i, :, : feat.shape[-2], : feat.shape[-1]] = feat
        small_mask[i, : feat.shape[-2], : feat.shape[-1]] = False
    return features, small_mask


class Backbone(nn.Module):
    """A torchvision ResNet feeding the transformer one feature map.

    Parameter names follow torchvision (`body.conv1`, `body.layer1.0.bn1`, ...), so torchvision
    ImageNet state dicts and the authors' `backbone.0.body.*` keys map one to one.

    Args:
        name: resnet18 | resnet34 | resnet50 | resnet101.
        dilation: DC5, layer4 dilated instead of strided (stride 16 output).
        norm: "frozen" (FrozenBatchNorm2d, as upstream) or "batch" (trainable BatchNorm2d).
        return_layer: the last stage kept: "layer4", or "layer3"/"layer2" for a truncated,
            lighter ResNet (stride 16 / 8).
        trainable_layers: stages trained, counted from layer4 down as torchvision's
            `trainable_backbone_layers` (upstream: 3, the stem and layer1 frozen).

    forward(images [B, 3, H, W] float, mask [B, H, W] bool True on padding) returns
    (features [B, C, h, w], mask [B, h, w] bool), (h, w) = ceil((H, W) / stride).
    """

    def __init__(self, name: str = "resnet50", dilation: bool = False, norm: str = "frozen",
                 return_layer: str = "layer4", trainable_layers: int = 3) -> None:
        super().__init__()
        if name not in BACKBONES:
            raise ValueError(f"unknown backbone {name!r}; choose one of {BACKBONES}")
        check_dilation(dilation, return_layer)
        norm_layer: Callable[[int], nn.Module] = _frozen_bn if norm == "frozen" else nn.BatchNorm2d
        bottleneck = name in ("resnet50", "resnet101")
        resnet = getattr(torchvision.models, name)(
            weights=None,
            replace_stride_with_dilation=[False, False, dilation and bottleneck],
            norm_layer=norm_layer,
        )
        if dilation and not bottleneck:
            _dilate_basic_layer(resnet.layer4)
        # only what is used: no avgpool/fc, and no later stages when truncated
        keep = STEM + STAGES[: STAGES.index(return_layer) + 1]
        self.body = nn.Sequential()
        for child in keep:
            self.body.add_module(child, getattr(resnet, child))
        last_block = self.body[-1][-1]
        last_conv = last_block.conv3 if hasattr(last_block, "conv3") else last_block.conv2
        self.num_channels = last_conv.out_channels
        self.stride = {"layer2": 8, "layer3": 16}.get(return_layer, 16 if dilation else 32)
        trainable = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
        if trainable_layers == 5:
            trainable.append("bn1")
        for pname, param in self.body.named_parameters():
            if not pname.startswith(tuple(trainable)):
                param.requires_grad_(False)

    def forward(self, images: Tensor, mask: Tensor, pad_invariant: bool = False
                ) -> tuple[Tensor, Tensor]:
        if pad_invariant:
            return features_per_image(self.body, images, mask)
        features = self.body(images)
        return features, resize_mask(mask, features.shape[-2:])

    def stage_outputs(self, images: Tensor, stages: Sequence[str]) -> list[Tensor]:
        """The outputs of the named stages (e.g. ("layer2", "layer3", "layer4")), in order:
        [B, C_l, H / s_l, W / s_l] each, for multi-scale models."""
        wanted = set(stages)
        unknown = wanted - set(self.body._modules)
        if unknown:
            raise ValueError(f"this backbone has no stage {sorted(unknown)}")
        outputs = {}
        x = images
        for name, module in self.body.named_children():
            x = module(x)
            if name in wanted:
                outputs[name] = x
        return [outputs[name] for name in stages]
