"""Test-time fine-tuning on the support set (AMT-FT, PMF+FT, ATTNSCALE, Adv. TTF; :class:`amt.methods.FinetunedMethod`).

Per task, starting from the method's per-task model (for AMT: the merged, trimmed weights): ``steps`` Adam
steps, loss = cross-entropy of augmented support images (pseudo-queries, :func:`amt.merge.pseudo_queries`)
against the prototypes of the clean support, computed with the parameters being tuned. What is tuned
(:data:`TUNED`):

- ``"full"`` (PMF): every backbone weight (the LoRA factors are merged into the weights by then);
- ``"attnscale"`` (ATTNSCALE, Basu et al., AAAI 2024, the paper's [59]): the weights stay fixed; every
  block's attention gets learnable per-channel multiplicative scales on its q, k, v projections (the output
  channels of the fused ``attn.qkv``: ``diag(s_qkv)·W_qkv``, bias included) and on its output projection
  (``attn.proj``), all initialised to 1, plus (``attnscale_offset``) eTT's domain-residual offset: a vector
  added to the attention output, initialised to 0. These live in forward hooks for the task only.

Adversarial test-time fine-tuning (Adv. TTF, the paper's Table 3): every step also attacks the pseudo-queries
(``FinetuneConfig.attack``: PGD on their cross-entropy against the ProtoNet of the parameters being tuned) and
adds ``adv_weight`` · CE(attacked pseudo-queries) to the loss.

Afterwards the queries are classified by cosine ProtoNet with the tuned model. Every tuned weight is
restored exactly, and the scale hooks removed, when the task ends.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from amt.attacks import adversarial_queries
from amt.config import AttackConfig, AugmentConfig, FinetuneConfig
from amt.head import cosine_logits, prototypes
from amt.merge import pseudo_queries

TUNED = ("full", "attnscale")
"""What test-time fine-tuning trains: every backbone weight, or ATTNSCALE's attention scales."""

ATTENTION_LAYERS = ("attn.qkv", "attn.proj")  # module-name suffixes whose outputs ATTNSCALE scales


def _tuned_tensors(model: nn.Module) -> list[nn.Parameter]:
    """Backbone weights tuned at test time: everything but the LoRA factors (merged into the weights)."""
    return [p for n, p in model.named_parameters() if ".lora_A." not in n and ".lora_B." not in n]


@contextmanager
def attention_scaled(model: nn.Module, offset: bool = True) -> Iterator[list[nn.Parameter]]:
    """ATTNSCALE's parameters on ``model`` for the duration of the context; yields them (trainable).

    Every module named ``*.attn.qkv`` (output ``[..., 3D]``) gets a scale vector ``[3D]`` and every ``*.attn.proj``
    (output ``[..., D]``) a scale ``[D]`` and, with ``offset``, an offset ``[D]``: a forward hook maps the output
    ``y`` to ``s ⊙ y (+ o)``, which is ``W ← diag(s)·W, b ← s ⊙ b (+ o)`` without touching the weights. Scales
    start at 1, offsets at 0 (the model's function is unchanged until tuned). The hooks are removed on exit;
    the parameters are not registered in the model, so its ``state_dict`` never changes.
    """
    layers = [(n, m) for n, m in model.named_modules() if n.endswith(ATTENTION_LAYERS) and hasattr(m, "out_features")]
    if not layers:
        raise ValueError(f"ATTNSCALE found no attention projections (modules named *{' or *'.join(ATTENTION_LAYERS)})")
    params: list[nn.Parameter] = []
    handles = []
    try:
        for name, module in layers:
            device = next(module.parameters()).device
            scale = nn.Parameter(torch.ones(module.out_features, device=device))
            shift = (nn.Parameter(torch.zeros(module.out_features, device=device))
                     if offset and name.endswith("attn.proj") else None)
            params += [scale] + ([shift] if shift is not None else [])

            def hook(_m: nn.Module, _inp: tuple, out: Tensor, s: Tensor = scale, o: Tensor | None = shift) -> Tensor:
                return out * s + o if o is not None else out * s

            handles.append(module.register_forward_hook(hook))
        yield params
    finally:
        for h in handles:
            h.remove()


def attacked_pseudo_queries(model: nn.Module, support_images: Tensor, support_labels: Tensor, n_way: int,
                            pseudo: Tensor, pseudo_labels: Tensor, scale: float, attack: AttackConfig,
                            generator: torch.Generator) -> Tensor:
    """Adv. TTF's attacked pseudo-queries ``[M, 3, H, W]`` in [0, 1]: ``attack`` (PGD in its threat model) on the
    pseudo-queries ``[M, 3, H, W]``, maximising the cross-entropy of their labels ``[M]`` (or KL, per
    ``attack.objective``) under the cosine ProtoNet of ``model`` as it is now (prototypes of the clean support,
    no gradient), random start from ``generator``."""
    with torch.no_grad():
        protos = prototypes(model(support_images), support_labels, n_way)
    return adversarial_queries(attack, lambda x: cosine_logits(model(x), protos, scale), pseudo, labels=pseudo_labels,
                               generator=generator, model=model)


def _step_loss(model: nn.Module, support_images: Tensor, support_labels: Tensor, n_way: int, cfg: FinetuneConfig,
               augment: AugmentConfig, generator: torch.Generator, scale: float, adversarial: bool) -> Tensor:
    """One step's loss: CE of fresh pseudo-queries (+ ``adv_weight`` · CE of their attacked copies)."""
    pseudo, pseudo_labels = pseudo_queries(support_images, support_labels, augment, generator)
    m = len(pseudo)
    if adversarial:
        attacked = attacked_pseudo_queries(model, support_images, support_labels, n_way, pseudo, pseudo_labels,
                                           scale, cfg.attack, generator)
        pseudo = torch.cat([pseudo, attacked])
    n_s = len(support_images)
    feats = model(torch.cat([support_images, pseudo]))
    protos = prototypes(feats[:n_s], support_labels, n_way)
    logits = cosine_logits(feats[n_s:], protos, scale)
    loss = F.cross_entropy(logits[:m], pseudo_labels)
    if adversarial:
        loss = loss + cfg.adv_weight * F.cross_entropy(logits[m:], pseudo_labels)
    return loss


@contextmanager
def finetuned(model: nn.Module, support_images: Tensor, support_labels: Tensor, n_way: int, cfg: FinetuneConfig,
              lr: float, augment: AugmentConfig, generator: torch.Generator, scale: float, tuned: str = "full",
              adversarial: bool = False) -> Iterator[nn.Module]:
    """Fine-tune ``model`` on one support set ``[S, 3, H, W]`` (labels ``[S]`` in ``0..n_way-1``); undo it on exit.

    ``cfg.steps`` Adam steps at learning rate ``lr`` (none if either is 0) on what ``tuned`` names
    (:data:`TUNED`); ``scale`` is the logit scale of the per-task model being tuned; ``adversarial``: Adv. TTF.
    Pseudo-queries and attack starts are drawn from ``generator``. "full" restores every tuned weight
    bit-for-bit; "attnscale" never changes a weight and removes its hooks.
    """
    if tuned not in TUNED:
        raise ValueError(f"unknown fine-tuning target {tuned!r}; choose one of {TUNED}")
    weights = _tuned_tensors(model)
    saved = [p.detach().clone() for p in weights] if tuned == "full" else []
    flags = [p.requires_grad for p in weights]
    try:
        with attention_scaled(model, cfg.attnscale_offset) if tuned == "attnscale" else _no_extra() as extra:
            params = extra if tuned == "attnscale" else weights
            if cfg.steps > 0 and lr > 0:
                for p in params:
                    p.requires_grad_(True)
                opt = torch.optim.Adam(params, lr=lr)
                for _ in range(cfg.steps):
                    loss = _step_loss(model, support_images, support_labels, n_way, cfg, augment, generator, scale,
                                      adversarial)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
            for p in params:
                p.requires_grad_(False)
            yield model
    finally:
        with torch.no_grad():
            for p, s in zip(weights, saved):
                p.copy_(s)
            for p, f in zip(weights, flags):
                p.grad = None
                p.requires_grad_(f)


@contextmanager
def _no_extra() -> Iterator[list[nn.Parameter]]:
    yield []
