"""Image transforms: PIL image → float tensor [3, S, S] in [0, 1] at the network's input side S.

Normalisation (mean, std) belongs to the model, not to these transforms.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from amt.config import AugmentConfig, DataConfig
from amt.data.base import Transform


def build_transform(image_size: int, data: DataConfig, augment: AugmentConfig, train: bool) -> Transform:
    """PIL image → float tensor [3, image_size, image_size] in [0, 1].

    Train: RandomResizedCrop (area ``data.crop_scale``), horizontal flip if ``augment.hflip``, colour
    jitter ``augment.color_jitter`` (as PMF). Test: resize the shorter side to
    ``image_size * data.resize_ratio`` then centre-crop ``image_size``.

    Args:
        image_size: output side, pixels (``BackboneConfig.image_size``).
        data: crop scale (train) and resize ratio (test).
        augment: flip and colour jitter (train only).
        train: random training augmentation, else the deterministic test transform.
    """
    if train:
        ops = [v2.RandomResizedCrop(image_size, scale=data.crop_scale, antialias=True)]
        if augment.hflip:
            ops.append(v2.RandomHorizontalFlip())
        if augment.color_jitter > 0:
            j = augment.color_jitter
            ops.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j))
    else:
        ops = [v2.Resize(round(image_size * data.resize_ratio), antialias=True), v2.CenterCrop(image_size)]
    return v2.Compose([v2.PILToTensor(), *ops, v2.ToDtype(torch.float32, scale=True)])
