"""Supervised pre-training of a backbone on one domain (`amt pretrain`).

Used to make the embedded backbone: a small ViT trained to classify the training classes of the
glyph benchmark with a cosine classifier, whose features then serve few-shot tasks on unseen
classes and domains. The classifier is thrown away; only the backbone is saved.
"""

from __future__ import annotations

import logging
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from amt.config import PretrainConfig
from amt.data.base import ImageDataset

log = logging.getLogger(__name__)


class CosineClassifier(nn.Module):
    """logits = scale · cos(feature, w_c) for C classes; features [B, D] → logits [B, C]."""

    def __init__(self, dim: int, n_classes: int, scale: float = 16.0, generator: torch.Generator | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_classes, dim, generator=generator) / math.sqrt(dim))
        self.scale = scale

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(features, dim=-1) @ F.normalize(self.weight, dim=-1).T


def lr_at(step: int, cfg: PretrainConfig) -> float:
    """Linear warm-up to ``cfg.lr`` then cosine decay to 0 at ``cfg.steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * min(1.0, t)))


def pretrain(backbone: nn.Module, train: ImageDataset, cfg: PretrainConfig, embed_dim: int) -> dict:
    """Train ``backbone`` (in place) to classify ``train``'s classes; return metrics.

    Args:
        backbone: images [B, 3, H, W] in [0, 1] → features [B, embed_dim].
        train: the training images, with a *training* transform (random crops etc.).
    Returns:
        ``{"steps", "final_loss", "final_train_acc", "seconds"}`` (accuracy in %).
    """
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # transforms in torchvision draw from the global generator
    head = CosineClassifier(embed_dim, len(train.class_names), generator=g)
    params = [p for p in backbone.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    loader = torch.utils.data.DataLoader(
        train, batch_size=cfg.batch_size, sampler=torch.utils.data.RandomSampler(
            train, replacement=True, num_samples=cfg.steps * cfg.batch_size, generator=g),
        num_workers=0, drop_last=True,
    )
    backbone.train()
    start = time.perf_counter()
    ema_loss, ema_acc = None, None
    bar = tqdm(loader, total=cfg.steps, desc="pretrain", dynamic_ncols=True)
    for step, (images, labels) in enumerate(bar):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        logits = head(backbone(images))
        loss = F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"pretraining loss became {loss.item()} at step {step}; lower pretrain.lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        acc = 100.0 * float((logits.argmax(-1) == labels).float().mean())
        ema_loss = loss.item() if ema_loss is None else 0.95 * ema_loss + 0.05 * loss.item()
        ema_acc = acc if ema_acc is None else 0.95 * ema_acc + 0.05 * acc
        if step % 10 == 0:
            bar.set_postfix(loss=f"{ema_loss:.3f}", acc=f"{ema_acc:.1f}", lr=f"{lr_at(step, cfg):.1e}")
    backbone.eval()
    return {"steps": cfg.steps, "final_loss": ema_loss, "final_train_acc": ema_acc,
            "seconds": time.perf_counter() - start}
