"""StyleAdv (Fu et al., CVPR 2023) on a ViT: style-adversarial meta-tuning, one episode at a time.

The *style* of a feature map is its per-image, per-channel mean μ and standard deviation σ. For the token
features ``[B, T, C]`` after a ViT block they are taken over the T tokens (the class token included); for
the RGB images ``[B, 3, H, W]`` over the pixels. A style shift (δ_μ, δ_σ), both ``[B, 1, C]`` (``[B, 3, 1, 1]``
for images), re-styles a feature map x as

    x' = (x − μ)·(1 + δ_σ) + μ + δ_μ·σ,

so the new mean is μ + δ_μ·σ and the new standard deviation σ·(1 + δ_σ): shifts are relative to the feature's
own spread, which makes one ε meaningful for every block and backbone (our choice; StyleAdv's ResNet features
use absolute radii).

One episode (:func:`styleadv_loss`), the configuration in :class:`amt.config.StyleAdvConfig`:

1. the attack: zero shifts at every attacked level (the RGB images and the outputs of ``blocks``), one forward
   of the whole episode through them, the few-shot task loss (cosine ProtoNet CE of the queries, prototypes
   from the re-styled support), and its gradient with respect to the shifts only (no parameter gradient);
2. one signed-gradient step from the clean style: δ = ε·sign(∇δ), ε drawn per episode from ``eps`` — every
   level at once (StyleAdv attacks its levels progressively, one after the other; one joint step costs one
   backward);
3. the loss CE(clean episode) + ``weight``·CE(style-attacked episode), support and queries both re-styled; its
   backward (by the caller) reaches the trained parameters through both terms.

The forward hooks that apply the shifts are removed in ``finally`` (:func:`restyled`): the model is unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from amt.config import ConfigError, StyleAdvConfig
from amt.data.episodes import Episode
from amt.head import cosine_logits, prototypes

_VAR_EPS = 1e-6  # added to the variance before the square root (constant feature maps)


def style_stats(x: Tensor, dims: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """(μ, σ) of ``x`` over ``dims`` (kept as size-1 dimensions): the style of a feature map."""
    mu = x.mean(dims, keepdim=True)
    return mu, (x.var(dims, keepdim=True, unbiased=False) + _VAR_EPS).sqrt()


def restyle(x: Tensor, d_mu: Tensor, d_sigma: Tensor, dims: tuple[int, ...]) -> Tensor:
    """``x`` with its style moved to (μ + δ_μ·σ, σ·(1 + δ_σ)); the shifts broadcast like μ (zero: ``x`` itself)."""
    mu, sigma = style_stats(x, dims)
    return (x - mu) * (1 + d_sigma) + mu + d_mu * sigma


def _blocks(model: nn.Module) -> nn.Sequential:
    vit = getattr(model, "vit", model)
    blocks = getattr(vit, "blocks", None)
    if blocks is None:
        raise ConfigError(f"StyleAdv attacks ViT blocks: {type(vit).__name__} has no `blocks`")
    return blocks


@contextmanager
def restyled(model: nn.Module, shifts: dict[int, tuple[Tensor, Tensor]]) -> Iterator[nn.Module]:
    """Re-style the token features after the blocks ``shifts`` names (``{block: (δ_μ, δ_σ)}``, each ``[B, 1, C]``)
    with forward hooks; the hooks are removed in ``finally``."""
    blocks = _blocks(model)
    bad = [b for b in shifts if not 0 <= b < len(blocks)]
    if bad:
        raise ConfigError(f"train.styleadv.blocks {bad} out of range: the ViT has blocks 0..{len(blocks) - 1}")
    handles = [blocks[b].register_forward_hook(lambda _m, _i, out, s=s: restyle(out, s[0], s[1], (1,)))
               for b, s in shifts.items()]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


def _zero_shifts(model: nn.Module, images: Tensor, blocks: Sequence[int], image: bool) -> dict:
    """Zero shifts (requiring grad) per level: key -1 for the RGB images, block indices for the token features."""
    width = int(getattr(model, "vit", model).embed_dim)
    n = len(images)
    shapes = ({-1: (n, 3, 1, 1)} if image else {}) | {b: (n, 1, width) for b in blocks}
    return {k: tuple(torch.zeros(s, device=images.device, requires_grad=True) for _ in range(2))
            for k, s in shapes.items()}


def _task_logits(model: nn.Module, episode: Episode, scale: Tensor, shifts: dict | None) -> Tensor:
    """Query logits ``[Q, N]`` of the episode's cosine ProtoNet, under the style ``shifts`` (None: clean)."""
    images = torch.cat([episode.support_images, episode.query_images])
    n_s = len(episode.support_images)
    if shifts is None:
        feats = model(images)
    else:
        if -1 in shifts:
            images = restyle(images, *shifts[-1], (2, 3)).clamp(0, 1)
        with restyled(model, {k: v for k, v in shifts.items() if k >= 0}):
            feats = model(images)
    return cosine_logits(feats[n_s:], prototypes(feats[:n_s], episode.support_labels, episode.n_way), scale)


def adversarial_shifts(model: nn.Module, episode: Episode, scale: Tensor, cfg: StyleAdvConfig,
                       eps: float) -> dict[int, tuple[Tensor, Tensor]]:
    """The FGSM style shifts of an episode: ε·sign(∂CE/∂δ) at every level, from zero (detached)."""
    images = torch.cat([episode.support_images, episode.query_images])
    shifts = _zero_shifts(model, images, cfg.blocks, cfg.image)
    if not shifts:
        raise ConfigError("train.styleadv attacks nothing: set train.styleadv.blocks and/or train.styleadv.image")
    loss = F.cross_entropy(_task_logits(model, episode, scale.detach(), shifts), episode.query_labels)
    leaves = [t for pair in shifts.values() for t in pair]
    grads = torch.autograd.grad(loss, leaves)  # the shifts only: no parameter receives a gradient here
    signed = [eps * g.sign() for g in grads]
    return {k: (signed[2 * i], signed[2 * i + 1]) for i, k in enumerate(shifts)}


def styleadv_loss(model: nn.Module, episode: Episode, scale: Tensor, cfg: StyleAdvConfig,
                  generator: torch.Generator) -> tuple[torch.Tensor, float, float, float]:
    """The loss of one StyleAdv episode, CE(clean) + weight·CE(style-attacked), on the graph (the caller backs it
    up and steps).

    Returns ``(loss, clean CE, style-attacked CE, clean query accuracy %)``; ε is drawn from ``cfg.eps`` with
    ``generator``.
    """
    if not cfg.eps or not all(0 <= e < 1 for e in cfg.eps):
        raise ConfigError(f"train.styleadv.eps={list(cfg.eps)}: relative radii in [0, 1) (σ·(1 − ε) must stay > 0)")
    eps = float(cfg.eps[int(torch.randint(len(cfg.eps), (), generator=generator))])
    shifts = adversarial_shifts(model, episode, scale, cfg, eps)
    clean = _task_logits(model, episode, scale, None)
    ce = F.cross_entropy(clean, episode.query_labels)
    style_ce = F.cross_entropy(_task_logits(model, episode, scale, shifts), episode.query_labels)
    acc = 100.0 * float((clean.argmax(-1) == episode.query_labels).float().mean())
    return ce + cfg.weight * style_ce, float(ce.detach()), float(style_ce.detach()), acc
