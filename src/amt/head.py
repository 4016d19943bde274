"""Cosine ProtoNet head as stateless functions (PMF; docs/method.md, "Model").

Prototype p_c = mean support feature of class c; logits = scale · cos(f(x), p_c). The paper's offset b in
scale · (cos + b) adds the same constant to every class's logit and so changes no softmax, cross-entropy or
argmax: it is not a parameter here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def prototypes(support_features: torch.Tensor, support_labels: torch.Tensor, n_way: int) -> torch.Tensor:
    """Mean feature per class.

    Args:
        support_features: [S, D].
        support_labels: [S] int64 in ``0..n_way-1``; every class must occur.
    Returns:
        [n_way, D] prototypes (unnormalised means).
    """
    one_hot = F.one_hot(support_labels, n_way).to(support_features.dtype)  # [S, N]
    counts = one_hot.sum(0)
    if bool((counts == 0).any()):
        missing = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"classes {missing} have no support example; every class needs at least one")
    return (one_hot.T @ support_features) / counts[:, None]


def cosine_logits(features: torch.Tensor, protos: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """Scaled cosine similarity: features [Q, D] × prototypes [N, D] → [Q, N] logits = scale · cos (|·| ≤ scale)."""
    cos = F.normalize(features, dim=-1, eps=1e-8) @ F.normalize(protos, dim=-1, eps=1e-8).T
    return scale * cos


def protonet_logits(
    support_features: torch.Tensor,
    support_labels: torch.Tensor,
    query_features: torch.Tensor,
    n_way: int,
    scale: float | torch.Tensor,
) -> torch.Tensor:
    """Query logits [Q, N] from support features [S, D], labels [S] and query features [Q, D]."""
    return cosine_logits(query_features, prototypes(support_features, support_labels, n_way), scale)
