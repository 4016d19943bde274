"""Validation during meta-tuning: fixed, seeded validation tasks and the clean ProtoNet accuracy on them."""

from __future__ import annotations

import torch
from torch import nn

from amt.config import TrainConfig
from amt.data.base import ImageDataset
from amt.data.episodes import EpisodeIndices, FixedSampler, load_episode
from amt.head import cosine_logits, prototypes


def validation_tasks(dataset: ImageDataset, cfg: TrainConfig, seed: int) -> list[EpisodeIndices]:
    """Fixed, seeded validation episodes (same for every validation and every member)."""
    sampler = FixedSampler(dataset.indices_by_class(), cfg.n_way, cfg.n_shot, cfg.n_query,
                           torch.Generator().manual_seed(seed), dataset.name + " (validation)")
    return [sampler.sample() for _ in range(cfg.val_tasks)]


@torch.no_grad()
def validate(model: nn.Module, dataset: ImageDataset, tasks: list[EpisodeIndices]) -> float:
    """Mean clean query accuracy (%) of the ProtoNet on ``tasks`` with the current weights."""
    accs = []
    device = next(model.parameters()).device
    for idx in tasks:
        e = load_episode(dataset, idx).to(device)
        n_s = len(e.support_images)
        feats = model(torch.cat([e.support_images, e.query_images]))
        logits = cosine_logits(feats[n_s:], prototypes(feats[:n_s], e.support_labels, e.n_way), 1.0)  # argmax only
        accs.append(float((logits.argmax(-1) == e.query_labels).float().mean()))
    return 100.0 * sum(accs) / max(1, len(accs))
