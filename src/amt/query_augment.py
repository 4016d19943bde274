"""Query augmentations that take the adversarial queries' place in meta-tuning (paper Table 16): RandConv and ALT.

With ``train.augment`` "randconv" or "alt" (and APQ off) a training episode's loss is still
L = CE(clean queries) + λ_adv·KL(p_clean ‖ p_aug) (:func:`amt.train.meta_loss`), with the augmented queries
instead of the PGD ones; the support set stays clean, as under APQ. Every augmentation here maps query images
``[Q, 3, H, W]`` in [0, 1] to images of the same shape in [0, 1], detached, drawing all its randomness from the
episode's ``torch.Generator``; it never leaves a gradient on the model's parameters.

- :func:`randconv` (Xu et al., ICLR 2021): one random convolution per episode — kernel size drawn from
  ``kernel_sizes``, weights N(0, 1/(3·k²)) — min–max rescaled per image to [0, 1], then (``mix``) blended with
  the input by a ~ U(0, 1).
- :func:`alt` (Gokhale et al., WACV 2023): a freshly initialised network of five 3×3 convolutions (LeakyReLU
  between them) acting as a residual, x' = clip(x + g_φ(x), 0, 1); φ takes ``steps`` Adam steps (learning rate
  ``lr``) that *ascend* KL(p_clean ‖ p(x')) − consistency·mean((x' − x)²), the task loss against the model
  with the episode's prototypes held fixed. "ALT-pool": ``steps`` holds several counts, one drawn per episode.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from amt.config import ALTConfig, ConfigError, RandConvConfig, TrainConfig

LogitsFn = Callable[[Tensor], Tensor]  # query images [Q, 3, H, W] → logits [Q, N] (prototypes fixed)
QueryAugment = Callable[[LogitsFn, Tensor, Tensor, torch.Generator], Tensor]  # (fn, queries, clean logits, gen)


def _pick(values: tuple, generator: torch.Generator) -> int | float:
    return values[int(torch.randint(len(values), (), generator=generator))]


@torch.no_grad()
def randconv(images: Tensor, cfg: RandConvConfig, generator: torch.Generator) -> Tensor:
    """RandConv of ``images`` ``[B, 3, H, W]`` in [0, 1]: one random k×k convolution for the whole batch."""
    if not cfg.kernel_sizes or any(k < 1 or k % 2 == 0 for k in cfg.kernel_sizes):
        raise ConfigError(f"train.randconv.kernel_sizes={list(cfg.kernel_sizes)}: odd sizes >= 1 (e.g. [1, 3, 5, 7])")
    k = int(_pick(cfg.kernel_sizes, generator))
    weight = torch.randn(3, 3, k, k, generator=generator) / (3 * k * k) ** 0.5
    out = F.conv2d(images, weight.to(images), padding=k // 2)
    low = out.amin((1, 2, 3), keepdim=True)
    high = out.amax((1, 2, 3), keepdim=True)
    out = (out - low) / (high - low).clamp_min(1e-8)
    if cfg.mix:
        a = float(torch.rand((), generator=generator))
        out = a * images + (1 - a) * out
    return out.clamp(0, 1)


def _alt_weights(cfg: ALTConfig, device: torch.device, generator: torch.Generator) -> list[Tensor]:
    """Five 3×3 conv kernels 3 → width → … → 3: He-normal, the last one scaled to ``init_std``."""
    chans = [3, cfg.width, cfg.width, cfg.width, cfg.width, 3]
    weights = []
    for i, (c_in, c_out) in enumerate(zip(chans[:-1], chans[1:])):
        std = (cfg.init_std if i == len(chans) - 2 else 2 ** 0.5) / (9 * c_in) ** 0.5
        weights.append((torch.randn(c_out, c_in, 3, 3, generator=generator) * std).to(device).requires_grad_(True))
    return weights


def alt_transform(images: Tensor, weights: list[Tensor]) -> Tensor:
    """x' = clip(x + g_φ(x), 0, 1) for the network whose kernels are ``weights`` (LeakyReLU 0.2 between them)."""
    h = images
    for i, w in enumerate(weights):
        h = F.conv2d(h, w, padding=1)
        if i < len(weights) - 1:
            h = F.leaky_relu(h, 0.2)
    return (images + h).clamp(0, 1)


def alt_objective(logits_fn: LogitsFn, images: Tensor, augmented: Tensor, clean_logits: Tensor,
                  consistency: float) -> Tensor:
    """What ALT's network ascends: KL(p_clean ‖ p(x')) − consistency·mean((x' − x)²)."""
    kl = F.kl_div(F.log_softmax(logits_fn(augmented), -1), F.log_softmax(clean_logits, -1),
                  reduction="batchmean", log_target=True)
    return kl - consistency * (augmented - images).pow(2).mean()


def alt(logits_fn: LogitsFn, images: Tensor, clean_logits: Tensor, cfg: ALTConfig,
        generator: torch.Generator) -> Tensor:
    """ALT-augmented ``images`` ``[Q, 3, H, W]`` in [0, 1] (detached); ``clean_logits`` ``[Q, N]`` detached."""
    if not cfg.steps or any(s < 0 for s in cfg.steps):
        raise ConfigError(f"train.alt.steps={list(cfg.steps)}: step counts >= 0, one drawn per episode")
    steps = int(_pick(cfg.steps, generator))
    weights = _alt_weights(cfg, images.device, generator)
    opt = torch.optim.Adam(weights, lr=cfg.lr, maximize=True)
    for _ in range(steps):
        objective = alt_objective(logits_fn, images, alt_transform(images, weights), clean_logits, cfg.consistency)
        grads = torch.autograd.grad(objective, weights)  # the network only: the model's .grad stays untouched
        for w, g in zip(weights, grads):
            w.grad = g
        opt.step()
    with torch.no_grad():
        return alt_transform(images, weights)


def query_augment(cfg: TrainConfig) -> QueryAugment | None:
    """The augmentation of ``cfg.augment`` as ``(logits_fn, queries, clean_logits, generator) → queries``, or None
    ("none"; "styleadv" has its own step, :mod:`amt.styleadv`)."""
    if cfg.augment == "randconv":
        return lambda _fn, x, _clean, gen: randconv(x, cfg.randconv, gen)
    if cfg.augment == "alt":
        return lambda fn, x, clean, gen: alt(fn, x, clean, cfg.alt, gen)
    if cfg.augment in ("none", "styleadv"):
        return None
    raise ConfigError(f"train.augment must be 'none', 'styleadv', 'randconv' or 'alt', got {cfg.augment!r}")
