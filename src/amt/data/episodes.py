"""Episodes (few-shot tasks) and the samplers that draw them.

An :class:`Episode` is a value: support and query images with episode labels ``0..N-1``.
Samplers work on index lists only (which image of which class), take an explicit
``torch.Generator``, and never touch global random state.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from amt.config import VariableEpisodeConfig

log = logging.getLogger(__name__)


class EpisodeError(ValueError):
    """The data cannot supply the requested episode shape; the message gives the numbers."""


@dataclass(frozen=True)
class EpisodeIndices:
    """Which dataset images form an episode.

    ``support_indices`` [S] and ``query_indices`` [Q] index the dataset; ``support_labels`` [S]
    and ``query_labels`` [Q] are episode labels in ``0..N-1``; ``class_ids`` [N] are the dataset
    labels of the episode's classes, in episode-label order.
    """

    support_indices: torch.Tensor
    support_labels: torch.Tensor
    query_indices: torch.Tensor
    query_labels: torch.Tensor
    class_ids: torch.Tensor

    @property
    def n_way(self) -> int:
        return int(self.class_ids.numel())


@dataclass(frozen=True)
class Episode:
    """A few-shot task. Images are float [*, 3, H, W] in [0, 1]; labels int64 in ``0..N-1``."""

    support_images: torch.Tensor
    support_labels: torch.Tensor
    query_images: torch.Tensor
    query_labels: torch.Tensor
    class_ids: torch.Tensor

    @property
    def n_way(self) -> int:
        return int(self.class_ids.numel())

    def to(self, device: torch.device | str) -> Episode:
        return Episode(*(t.to(device) for t in (self.support_images, self.support_labels,
                                                   self.query_images, self.query_labels, self.class_ids)))


class Sampler(Protocol):
    """What :class:`FixedSampler` and :class:`VariableSampler` provide: one episode per call."""

    def sample(self) -> EpisodeIndices: ...


def _eligible(class_indices: Sequence[Sequence[int]], need: int, n_way: int, what: str,
              class_names: Sequence[str] | None = None) -> list[int]:
    """Classes with at least ``need`` images; warn about the others (naming them), fail if fewer than ``n_way``
    remain."""
    keep = [c for c, idx in enumerate(class_indices) if len(idx) >= need]
    dropped = [c for c in range(len(class_indices)) if c not in set(keep)]
    if dropped:
        named = ", ".join(f"{class_names[c] if class_names else c!r} ({len(class_indices[c])})" for c in dropped[:5])
        more = f" and {len(dropped) - 5} more" if len(dropped) > 5 else ""
        log.warning("%s: left out %d of %d classes with fewer than %d images: %s%s", what, len(dropped),
                    len(class_indices), need, named, more)
    if len(keep) < n_way:
        raise EpisodeError(
            f"{what}: only {len(keep)} of {len(class_indices)} classes have at least {need} images, "
            f"but an episode needs {n_way} classes; use fewer ways, shots or queries, or add images"
        )
    return keep


class FixedSampler:
    """N-way K-shot M-query episodes: disjoint support and query images per class.

    Args:
        class_indices: dataset indices of each class (``ImageDataset.indices_by_class()``).
        n_way, n_shot, n_query: episode shape.
        generator: the only source of randomness.
        name: used in warnings and errors; class_names: names of the classes, for the warning about classes
            too small for the episode shape (which are left out).
    """

    def __init__(
        self,
        class_indices: Sequence[Sequence[int]],
        n_way: int,
        n_shot: int,
        n_query: int,
        generator: torch.Generator,
        name: str = "dataset",
        class_names: Sequence[str] | None = None,
    ) -> None:
        if n_way < 1 or n_shot < 1 or n_query < 0:
            raise EpisodeError(f"invalid episode shape n_way={n_way}, n_shot={n_shot}, n_query={n_query}")
        self.class_indices = [torch.as_tensor(list(c), dtype=torch.long) for c in class_indices]
        self.n_way, self.n_shot, self.n_query = n_way, n_shot, n_query
        self.generator = generator
        self.classes = _eligible(class_indices, n_shot + n_query, n_way, name, class_names)

    def sample(self) -> EpisodeIndices:
        g = self.generator
        pick = torch.randperm(len(self.classes), generator=g)[: self.n_way]
        class_ids = torch.tensor([self.classes[i] for i in pick.tolist()], dtype=torch.long)
        support, query = [], []
        for c in class_ids.tolist():
            idx = self.class_indices[c]
            perm = idx[torch.randperm(len(idx), generator=g)[: self.n_shot + self.n_query]]
            support.append(perm[: self.n_shot])
            query.append(perm[self.n_shot:])
        labels = torch.arange(self.n_way)
        return EpisodeIndices(
            torch.cat(support), labels.repeat_interleave(self.n_shot),
            torch.cat(query), labels.repeat_interleave(self.n_query), class_ids,
        )

    def __iter__(self) -> Iterator[EpisodeIndices]:
        while True:
            yield self.sample()


class VariableSampler:
    """Meta-Dataset's variable-way variable-shot episodes (Triantafillou et al., 2020).

    Ways ~ U[min_ways, min(max_ways, C)]; queries per class q = min(max_query_per_class,
    ⌊min_c n_c / 2⌋); support size = min(max_support, Σ_c ⌊β·min(max_support_per_class, n_c − q)⌋ + 1)
    with β ~ U(0, 1); class shares ∝ n_c·exp(U(log ½, log 2)), each class at least one shot and at
    most ``max_support_per_class``.

    Args:
        class_indices: dataset indices of each class (``ImageDataset.indices_by_class()``).
        cfg: way, support and query limits.
        generator: the only source of randomness.
        name: used in warnings and errors.
    """

    def __init__(
        self,
        class_indices: Sequence[Sequence[int]],
        cfg: VariableEpisodeConfig,
        generator: torch.Generator,
        name: str = "dataset",
    ) -> None:
        self.class_indices = [torch.as_tensor(list(c), dtype=torch.long) for c in class_indices]
        self.cfg = cfg
        self.generator = generator
        self.classes = _eligible(class_indices, 2, cfg.min_ways, name)

    def _uniform(self) -> float:
        return float(torch.rand((), generator=self.generator, dtype=torch.float64))

    def sample(self) -> EpisodeIndices:
        cfg, g = self.cfg, self.generator
        max_ways = min(cfg.max_ways, len(self.classes))
        n_way = int(torch.randint(cfg.min_ways, max_ways + 1, (), generator=g))
        pick = torch.randperm(len(self.classes), generator=g)[:n_way]
        class_ids = torch.tensor([self.classes[i] for i in pick.tolist()], dtype=torch.long)
        counts = torch.tensor([len(self.class_indices[c]) for c in class_ids.tolist()])
        n_query = min(cfg.max_query_per_class, int(counts.min()) // 2)
        remaining = counts - n_query
        beta = self._uniform()
        contrib = torch.clamp(remaining, max=cfg.max_support_per_class).double()
        size = min(cfg.max_support, int(torch.floor(beta * contrib + 1).sum()))
        log_ratio = torch.empty(n_way, dtype=torch.float64).uniform_(math.log(0.5), math.log(2.0), generator=g)
        props = counts.double() * log_ratio.exp()
        props = props / props.sum()
        shots = torch.minimum(torch.floor(props * (size - n_way)).long() + 1,
                              remaining.clamp(max=cfg.max_support_per_class))
        support, query, s_lab, q_lab = [], [], [], []
        for label, (c, k) in enumerate(zip(class_ids.tolist(), shots.tolist())):
            idx = self.class_indices[c]
            perm = idx[torch.randperm(len(idx), generator=g)[: k + n_query]]
            support.append(perm[:k])
            query.append(perm[k:])
            s_lab.append(torch.full((k,), label))
            q_lab.append(torch.full((n_query,), label))
        return EpisodeIndices(torch.cat(support), torch.cat(s_lab), torch.cat(query), torch.cat(q_lab), class_ids)

    def __iter__(self) -> Iterator[EpisodeIndices]:
        while True:
            yield self.sample()


def load_episode(dataset: torch.utils.data.Dataset, indices: EpisodeIndices) -> Episode:
    """Read the images of an episode from ``dataset`` (items ``(image [3,H,W], label)``)."""

    def stack(idx: torch.Tensor) -> torch.Tensor:
        return torch.stack([dataset[i][0] for i in idx.tolist()]) if idx.numel() else torch.empty(0)

    return Episode(
        stack(indices.support_indices), indices.support_labels,
        stack(indices.query_indices), indices.query_labels, indices.class_ids,
    )
