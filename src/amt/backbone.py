"""timm ViT backbones, built locally: architectures, normalisation inside the model, precision.

The backbone maps float images in [0, 1], shape ``[B, 3, H, W]``, to features ``[B, D]``;
normalisation (``(x - mean) / std``) is its first operation, so attacks and ε live in pixel units.

Architectures come from the :data:`ARCHS` registry (project architectures, e.g. the embedded
``amt_glyph_vit``) or, for any other name, from ``timm.create_model(name, pretrained=False)``: nothing
is ever downloaded. Weights come from a local file through :func:`amt.checkpoints.load_checkpoint`
(strict; DINO, iBOT, DeiT, timm and safetensors forms), called by :func:`build_backbone`.

timm module names are kept intact (``blocks.N.attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``)
because LoRA injection matches them by suffix.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import timm
import torch
from timm.layers import Format, nchw_to
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from amt.checkpoints import load_checkpoint
from amt.config import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LORA_TARGETS,
    BackboneConfig,
    ConfigError,
)

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Architectures
# ----------------------------------------------------------------------------------------------


class ConvStemEmbed(nn.Module):
    """Convolutional patch embedding (hybrid ViT stem) with timm's ``embed_layer`` call signature.

    ``log2(patch_size)`` stride-2 3×3 convs (GroupNorm + GELU) halve the image each time, then a 1×1
    conv ``proj`` maps to ``embed_dim``: a ``[B, 3, H, W]`` image becomes ``[B, (H/p)·(W/p), D]``
    tokens (or ``[B, H/p, W/p, D]`` with ``output_fmt="NHWC"``, used by timm's dynamic image size).
    GroupNorm rather than BatchNorm: no running statistics, so a forward pass in train mode neither
    changes the backbone's state nor mixes support and query images.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 32,
        patch_size: int = 8,
        in_chans: int = 3,
        embed_dim: int = 96,
        norm_layer: Callable[[int], nn.Module] | None = None,
        flatten: bool = True,
        output_fmt: str | None = None,
        bias: bool = True,
        strict_img_size: bool = True,
        dynamic_img_pad: bool = False,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        n_stages = int(math.log2(patch_size)) if patch_size > 1 else 0
        if 2**n_stages != patch_size or n_stages < 1:
            raise ValueError(f"ConvStemEmbed needs patch_size a power of two >= 2 (stride-2 stages), got {patch_size}")
        if dynamic_img_pad:
            raise ValueError("ConvStemEmbed does not support dynamic_img_pad; use an image size divisible by the patch")
        dd = {"device": device, "dtype": dtype}
        self.patch_size = (patch_size, patch_size)
        self.img_size, self.grid_size, self.num_patches = self._grid(img_size)
        self.flatten = flatten if output_fmt is None else False
        self.output_fmt = Format(output_fmt) if output_fmt is not None else Format.NCHW
        self.strict_img_size = strict_img_size
        self.dynamic_img_pad = False
        widths = [max(embed_dim // 2 ** (n_stages - 1 - i), 8) for i in range(n_stages)]
        layers: list[nn.Module] = []
        c_in = in_chans
        for w in widths:
            layers += [
                nn.Conv2d(c_in, w, kernel_size=3, stride=2, padding=1, bias=False, **dd),
                nn.GroupNorm(min(8, w), w, **dd),
                nn.GELU(),
            ]
            c_in = w
        self.stem = nn.Sequential(*layers)
        self.proj = nn.Conv2d(c_in, embed_dim, kernel_size=1, bias=bias, **dd)
        self.norm = norm_layer(embed_dim, **dd) if norm_layer else nn.Identity()

    def _grid(self, img_size: int | tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int], int]:
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if size[0] % self.patch_size[0] or size[1] % self.patch_size[1]:
            raise ValueError(f"image size {size} must be divisible by the conv stem's patch size {self.patch_size}")
        grid = (size[0] // self.patch_size[0], size[1] // self.patch_size[1])
        return size, grid, grid[0] * grid[1]

    def set_input_size(self, img_size: int | tuple[int, int] | None = None, patch_size: int | None = None) -> None:
        """Change the expected image size (timm's ``VisionTransformer.set_input_size`` calls this)."""
        if patch_size is not None and tuple(timm.layers.to_2tuple(patch_size)) != self.patch_size:
            raise ValueError("ConvStemEmbed cannot change its patch size; build a new model instead")
        if img_size is not None:
            self.img_size, self.grid_size, self.num_patches = self._grid(img_size)

    def feat_ratio(self, as_scalar: bool = True) -> int | tuple[int, int]:
        """Downsampling factor from pixels to tokens."""
        return max(self.patch_size) if as_scalar else self.patch_size

    def dynamic_feat_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        """Token grid for an image of ``img_size`` pixels."""
        return img_size[0] // self.patch_size[0], img_size[1] // self.patch_size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` → ``[B, N, D]`` tokens (flattened) or ``[B, H/p, W/p, D]``."""
        h, w = x.shape[-2:]
        if self.strict_img_size and (h, w) != self.img_size:
            raise ValueError(f"input is {h}x{w} pixels but the model was built for {self.img_size}; set image_size")
        if h % self.patch_size[0] or w % self.patch_size[1]:
            raise ValueError(f"input {h}x{w} is not divisible by the patch size {self.patch_size}")
        x = self.proj(self.stem(x))
        if self.flatten:
            x = x.flatten(2).transpose(1, 2)
        elif self.output_fmt != Format.NCHW:
            x = nchw_to(x, self.output_fmt)
        return self.norm(x)


def amt_glyph_vit(image_size: int = 32) -> VisionTransformer:
    """The embedded benchmark's backbone: a ~0.5M-parameter hybrid ViT for 32×32 glyph images.

    Conv stem to a 4×4 token grid (8×8-pixel patches at 32 px), embed_dim 96, depth 4, 3 heads,
    MLP ratio 4, no class token, mean pooling of the patch tokens followed by LayerNorm.
    """
    return VisionTransformer(
        img_size=image_size,
        patch_size=8,
        num_classes=0,
        global_pool="avg",
        class_token=False,
        embed_dim=96,
        depth=4,
        num_heads=3,
        mlp_ratio=4.0,
        embed_layer=ConvStemEmbed,
    )


def vit_tiny_test(image_size: int = 64) -> VisionTransformer:
    """A very small standard ViT for tests: patch 16, embed_dim 48, depth 2, 3 heads, CLS pooling."""
    return VisionTransformer(
        img_size=image_size, patch_size=16, num_classes=0, embed_dim=48, depth=2, num_heads=3, mlp_ratio=4.0
    )


# Project architectures: name -> builder(image_size) -> VisionTransformer with num_classes=0.
# Any other name is looked up in timm (pretrained=False).
ARCHS: dict[str, Callable[[int], VisionTransformer]] = {
    "amt_glyph_vit": amt_glyph_vit,
    "vit_tiny_test": vit_tiny_test,
}


def build_vit(arch: str, image_size: int) -> VisionTransformer:
    """Randomly initialised ViT without classifier (``num_classes=0``) for ``image_size``-pixel inputs.

    ``arch`` is a key of :data:`ARCHS` or a timm model name; timm is never asked to download.
    """
    if arch in ARCHS:
        vit = ARCHS[arch](image_size)
    elif timm.is_model(arch):
        try:
            vit = timm.create_model(arch, pretrained=False, num_classes=0, img_size=image_size)
        except TypeError as e:  # non-ViT timm models reject img_size
            raise ValueError(
                f"timm arch {arch!r} cannot be built as a VisionTransformer at img_size={image_size} ({e}); "
                f"amt needs a timm ViT (e.g. vit_small_patch16_224) or one of {sorted(ARCHS)}"
            ) from e
    else:
        raise ValueError(
            f"unknown backbone arch {arch!r}: use a project architecture {sorted(ARCHS)} or a timm ViT name "
            f"(e.g. vit_small_patch16_224; list them with timm.list_models('vit_*'))"
        )
    if not isinstance(vit, VisionTransformer):
        raise ValueError(
            f"arch {arch!r} builds a timm {type(vit).__name__}, not a VisionTransformer; amt needs a ViT "
            f"(LoRA targets {', '.join(LORA_TARGETS)})"
        )
    return vit


class Backbone(nn.Module):
    """Normalisation followed by a timm ViT: images in [0, 1] → features.

    Attributes:
        vit: the timm ``VisionTransformer`` (``num_classes=0``); module names are timm's.
        embed_dim: feature size D.
        mean, std: buffers ``[1, 3, 1, 1]`` applied as ``(images - mean) / std``.
        autocast_dtype: None (float32), ``torch.bfloat16`` or ``torch.float16``: the ViT then runs under
            ``torch.autocast`` of the images' device type (weights stay float32; features come out
            float32). Set from ``ExperimentConfig.precision`` by :func:`precision_dtype`.
    """

    def __init__(
        self,
        vit: VisionTransformer,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        if not isinstance(vit.head, nn.Identity):
            raise ValueError(
                "Backbone needs a ViT without classifier: build it with num_classes=0 (see build_vit)"
            )
        self.vit = vit
        self.embed_dim = int(vit.num_features)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.autocast_dtype: torch.dtype | None = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Features ``[B, D]`` of float images ``[B, 3, H, W]`` in [0, 1].

        The feature is the final-norm CLS token for ``global_pool='token'`` and the pooled (then
        normed) patch tokens for ``'avg'``, i.e. timm's pre-logits output.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"Backbone expects images [B, 3, H, W], got shape {tuple(images.shape)}")
        x = (images - self.mean) / self.std
        if self.autocast_dtype is None:
            return self.vit(x)
        with torch.autocast(images.device.type, dtype=self.autocast_dtype):
            feats = self.vit(x)
        return feats.float()


PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def precision_dtype(precision: str, device: torch.device, training: bool = False) -> torch.dtype | None:
    """The autocast dtype of ``ExperimentConfig.precision`` on ``device`` (None: plain float32).

    bf16 runs on CPU and CUDA. fp16 runs on CUDA, for evaluation only: training and test-time
    fine-tuning would need loss scaling against underflowing gradients, which bf16 (same exponent range
    as float32) does not.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"precision='fp16' needs a CUDA device (got {device}); use precision=bf16 on the CPU")
    if precision == "fp16" and training:
        raise ConfigError("precision='fp16' is for evaluation only (no loss scaling in training or fine-tuning); "
                         "use precision=bf16 or fp32")
    return PRECISIONS[precision]


ROUNDING = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
"""Relative rounding error of each autocast dtype (half its spacing at 1: 8 and 11 significant bits)."""


def check_perturbations(dtype: torch.dtype | None, input_eps: Sequence[float] = (), input_std: Sequence[float] = (1.0,),
                        weight_eta: float | None = None) -> None:
    """Refuse an autocast ``dtype`` that would round the method's perturbations away.

    Under bf16 autocast the images (after normalisation, |x| up to about 1/std) and the weights enter every
    matrix product rounded to 8 significant bits, so an input perturbation of ε/std below one rounding step
    (2·2⁻⁸ at magnitude 1) or an APSV weight step of ``weight_eta`` of a tensor's norm below the relative
    rounding (2⁻⁸) mostly vanishes: at ε = 0.01/255 about 7% of the normalised input elements change at all.

    Args:
        input_eps: attack radii on the images, pixel units ([0, 1] images); input_std: the normalisation std.
        weight_eta: APSV's relative step (``perturb.eta`` in relative mode), or None without APSV.
    Raises ``ConfigError`` naming the values and the fix (precision=fp32).
    """
    if dtype is None:
        return
    rounding = ROUNDING[dtype]
    small = [e for e in input_eps if 0 < e / min(input_std) < 2 * rounding]
    name = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    if small:
        raise ConfigError(f"precision={name} rounds normalised inputs to steps of about {2 * rounding:.2g}, so attack "
                          f"radii {[f'{e * 255:.3g}/255' for e in small]} would mostly vanish; use precision=fp32 "
                          "for these radii")
    if weight_eta is not None and weight_eta < rounding:
        raise ConfigError(f"precision={name} rounds weights to a relative {rounding:.2g}, so the APSV step "
                          f"perturb.eta={weight_eta:g} would mostly vanish; use precision=fp32 (or switch APSV off)")


def build_backbone(cfg: BackboneConfig) -> Backbone:
    """Build ``cfg.arch`` at ``cfg.image_size`` and, if ``cfg.checkpoint`` is set, load it strictly
    (:func:`amt.checkpoints.load_checkpoint`).

    Without a checkpoint the weights are timm's random init drawn with seed 0 (the global RNG state is
    left as it was), so every command builds the same random backbone and pools trained on it load back; that
    must be asked for (``cfg.random_init``): a forgotten checkpoint is an error, not a silent random ViT.
    """
    if not cfg.checkpoint and not cfg.random_init:
        raise ConfigError(f"backbone.checkpoint is not set for {cfg.arch}: give the local weights file "
                          "(--set backbone.checkpoint=PATH), or set backbone.random_init=true for random weights")
    if cfg.checkpoint:
        vit = build_vit(cfg.arch, cfg.image_size)
        load_checkpoint(vit, cfg.checkpoint, key=cfg.checkpoint_key)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            vit = build_vit(cfg.arch, cfg.image_size)
        logger.warning("backbone %s has random weights (backbone.checkpoint is not set; seed 0)", cfg.arch)
    return Backbone(vit, cfg.mean, cfg.std)
