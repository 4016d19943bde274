"""PMF-style test-time fine-tuning on the support set (AMT-FT; PMF+FT; :class:`amt.methods.FinetunedMethod`).

Per task, starting from the method's per-task model (for AMT: the merged, trimmed weights): ``steps``
Adam steps on every backbone weight, loss = cross-entropy of augmented support images (pseudo-queries,
:func:`amt.merge.pseudo_queries`) against the prototypes of the clean support, computed with the weights
being tuned. Afterwards the queries are classified by cosine ProtoNet with the tuned weights. Every
tuned tensor is restored exactly when the task ends.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from amt.config import AugmentConfig
from amt.head import cosine_logits, prototypes
from amt.merge import pseudo_queries


def _tuned_tensors(model: nn.Module) -> list[nn.Parameter]:
    """Backbone weights tuned at test time: everything but the LoRA factors (merged into the weights)."""
    return [p for n, p in model.named_parameters() if ".lora_A." not in n and ".lora_B." not in n]


@contextmanager
def finetuned(model: nn.Module, support_images: Tensor, support_labels: Tensor, n_way: int, steps: int, lr: float,
              augment: AugmentConfig, generator: torch.Generator, scale: float) -> Iterator[nn.Module]:
    """Fine-tune ``model`` in place on one support set; restore every tuned tensor bit-for-bit on exit.

    ``steps`` Adam steps at learning rate ``lr`` (none if either is 0); ``scale`` is the logit scale of the
    per-task model being tuned; pseudo-queries are drawn from ``generator``.
    """
    params = _tuned_tensors(model)
    saved = [p.detach().clone() for p in params]
    flags = [p.requires_grad for p in params]
    try:
        if steps > 0 and lr > 0:
            for p in params:
                p.requires_grad_(True)
            opt = torch.optim.Adam(params, lr=lr)
            n_s = len(support_images)
            for _ in range(steps):
                pseudo, pseudo_labels = pseudo_queries(support_images, support_labels, augment, generator)
                feats = model(torch.cat([support_images, pseudo]))
                protos = prototypes(feats[:n_s], support_labels, n_way)
                loss = F.cross_entropy(cosine_logits(feats[n_s:], protos, scale), pseudo_labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        for p in params:
            p.requires_grad_(False)
        yield model
    finally:
        with torch.no_grad():
            for p, s, f in zip(params, saved, flags):
                p.copy_(s)
                p.grad = None
                p.requires_grad_(f)
