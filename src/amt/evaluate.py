"""Few-shot evaluation: accuracy over seeded tasks per domain and shot setting, mean and 95% CI.

A *method* is any callable ``predict(episode) -> query logits [Q, N]``; every method of a run is
evaluated on exactly the same tasks (the task stream depends only on the seed, the domain name and
the shot count), so methods can be compared task by task.
"""

from __future__ import annotations

import json
import logging
import math
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from amt.backbone import Backbone
from amt.config import DomainConfig, EvalConfig, HeadConfig
from amt.data.datasets import ImageDataset
from amt.data.episodes import Episode, FixedSampler, load_episode
from amt.head import protonet_logits

log = logging.getLogger(__name__)

Predict = Callable[[Episode], torch.Tensor]


def task_seed(seed: int, domain: str, n_shot: int) -> int:
    """Stable seed of the task stream of one (domain, shot) pair (independent of Python's hash salt)."""
    return zlib.crc32(f"{seed}/{domain}/{n_shot}".encode()) & 0x7FFFFFFF


def mean_ci95(accuracies: Sequence[float]) -> tuple[float, float]:
    """Mean and 95% confidence half-width 1.96·std/√T of per-task accuracies (same unit as input)."""
    t = torch.tensor(list(accuracies), dtype=torch.float64)
    if t.numel() == 0:
        return float("nan"), float("nan")
    std = float(t.std(unbiased=False)) if t.numel() > 1 else 0.0
    return float(t.mean()), 1.96 * std / math.sqrt(t.numel())


@torch.no_grad()
def extract_features(backbone: torch.nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Features [B, D] of images [B, 3, H, W] in [0, 1], in chunks of ``batch_size``."""
    return torch.cat([backbone(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


class ProtoNetPredictor:
    """PM: a frozen backbone with the cosine ProtoNet head (no meta-tuning)."""

    def __init__(self, backbone: Backbone, head: HeadConfig, batch_size: int = 256) -> None:
        self.backbone, self.head, self.batch_size = backbone, head, batch_size

    @torch.no_grad()
    def __call__(self, episode: Episode) -> torch.Tensor:
        self.backbone.eval()
        device = next(self.backbone.parameters()).device
        images = torch.cat([episode.support_images, episode.query_images]).to(device)
        feats = extract_features(self.backbone, images, self.batch_size)
        n_s = len(episode.support_images)
        return protonet_logits(
            feats[:n_s], episode.support_labels.to(device), feats[n_s:], episode.n_way,
            self.head.scale, self.head.bias,
        )


def query_budget(dataset: ImageDataset, n_way: int, n_shot: int, n_query: int) -> int:
    """Queries per class the domain can afford: ``n_query``, or fewer where classes are small.

    Classes with fewer than ``n_shot + 1`` images are left out (with a warning) by the sampler; the
    budget is then capped by the smallest remaining class so every class gives the same count.
    """
    sizes = sorted((len(c) for c in dataset.indices_by_class() if len(c) > n_shot), reverse=True)
    if len(sizes) < n_way:
        return n_query  # the sampler raises the explanatory error
    return max(1, min(n_query, sizes[-1] - n_shot))


def evaluate_domain(
    methods: Mapping[str, Predict],
    dataset: ImageDataset,
    n_way: int,
    n_shot: int,
    n_query: int,
    n_tasks: int,
    generator: torch.Generator,
    desc: str = "",
) -> dict[str, list[float]]:
    """Per-task query accuracy (%) of every method on ``n_tasks`` tasks drawn once and shared."""
    sampler = FixedSampler(dataset.indices_by_class(), n_way, n_shot, n_query, generator, dataset.name)
    accs: dict[str, list[float]] = {m: [] for m in methods}
    for _ in tqdm(range(n_tasks), desc=desc, leave=False, dynamic_ncols=True):
        episode = load_episode(dataset, sampler.sample())
        for name, predict in methods.items():
            logits = predict(episode)
            correct = (logits.argmax(-1).cpu() == episode.query_labels).float().mean()
            accs[name].append(100.0 * float(correct))
    return accs


def evaluate(
    methods: Mapping[str, Predict],
    domains: Sequence[tuple[DomainConfig, ImageDataset]],
    cfg: EvalConfig,
) -> dict:
    """Evaluate every method on every domain and shot setting of ``cfg``.

    Returns a JSON-ready dict: ``{"protocol": {...}, "results": [{"method", "domain", "in_domain",
    "n_shot", "n_query", "n_tasks", "mean", "ci95", "accuracies"}, ...]}``; accuracies in %.
    """
    rows = []
    start = time.perf_counter()
    for domain, dataset in domains:
        for shot in cfg.shots:
            n_query = query_budget(dataset, cfg.n_way, shot, cfg.n_query)
            if n_query < cfg.n_query:
                log.warning("%s %d-shot: classes are small, using %d queries per class instead of %d",
                            domain.name, shot, n_query, cfg.n_query)
            g = torch.Generator().manual_seed(task_seed(cfg.seed, domain.name, shot))
            accs = evaluate_domain(methods, dataset, cfg.n_way, shot, n_query, cfg.n_tasks, g,
                                   desc=f"{domain.name} {cfg.n_way}w{shot}s")
            for method, a in accs.items():
                mean, ci = mean_ci95(a)
                rows.append(dict(method=method, domain=domain.name, in_domain=domain.in_domain, n_way=cfg.n_way,
                                 n_shot=shot, n_query=n_query, n_tasks=len(a), mean=mean, ci95=ci, accuracies=a))
                log.info("%-10s %-18s %d-shot: %.2f ± %.2f", method, domain.name, shot, mean, ci)
    return {
        "protocol": {"n_way": cfg.n_way, "shots": list(cfg.shots), "n_query": cfg.n_query,
                     "n_tasks": cfg.n_tasks, "seed": cfg.seed},
        "seconds": time.perf_counter() - start,
        "results": rows,
    }


def write_results(results: dict, out_dir: str | Path) -> Path:
    """Write ``results.json`` and the Markdown table ``results.md`` into ``out_dir``; return the JSON path."""
    from amt.report import markdown_table

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(path)
    (out_dir / "results.md").write_text(markdown_table(results) + "\n")
    return path
