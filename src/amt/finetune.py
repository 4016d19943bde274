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
  added to the attention output, initialised to 0. These live in forward hooks for the task only;
- ``"lora"`` (test-time LoRA tuning, the paper's Table 17): the weights stay fixed; a fresh LoRA of rank
  ``lora_rank`` on every ``attn.qkv``, ``attn.proj``, ``mlp.fc1`` and ``mlp.fc2`` (A kaiming-uniform from the
  task's generator, B = 0, so the model is unchanged until tuned) adds ``(x Aᵀ) Bᵀ`` to each output through a
  forward hook for the task only.

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

TUNED = ("full", "attnscale", "lora")
"""What test-time fine-tuning trains: every backbone weight, ATTNSCALE's attention scales, or a fresh LoRA."""

ATTENTION_LAYERS = ("attn.qkv", "attn.proj")  # module-name suffixes whose outputs ATTNSCALE scales
LORA_LAYERS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")  # module-name suffixes test-time LoRA adapts


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


@contextmanager
def lora_added(model: nn.Module, rank: int, generator: torch.Generator) -> Iterator[list[nn.Parameter]]:
    """A fresh LoRA on every linear layer named ``*`` + one of :data:`LORA_LAYERS` for the context; yields its
    factors (trainable), ``[A [rank, in], B [out, rank]]`` per layer.

    A forward hook adds ``(x Aᵀ) Bᵀ`` to the layer's output; A is kaiming-uniform (bound 1/√in) drawn from
    ``generator``, B starts at 0, so the function is unchanged until tuned. The hooks are removed on exit and the
    factors are never registered in the model (its ``state_dict`` and weights never change).
    """
    layers = [m for n, m in model.named_modules() if n.endswith(LORA_LAYERS) and hasattr(m, "in_features")]
    if not layers:
        raise ValueError(f"test-time LoRA found no layers named *{' or *'.join(LORA_LAYERS)}")
    if rank < 1:
        raise ValueError(f"finetune.lora_rank must be >= 1, got {rank}")
    params: list[nn.Parameter] = []
    handles = []
    try:
        for module in layers:
            device = next(module.parameters()).device
            bound = 1 / module.in_features**0.5
            a = (torch.rand(rank, module.in_features, generator=generator) * 2 - 1) * bound
            lora_a = nn.Parameter(a.to(device))
            lora_b = nn.Parameter(torch.zeros(module.out_features, rank, device=device))
            params += [lora_a, lora_b]

            def hook(_m: nn.Module, inp: tuple, out: Tensor, a: Tensor = lora_a, b: Tensor = lora_b) -> Tensor:
                return out + F.linear(F.linear(inp[0], a), b)

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
    bit-for-bit; "attnscale" and "lora" never change a weight and remove their hooks.
    """
    if tuned not in TUNED:
        raise ValueError(f"unknown fine-tuning target {tuned!r}; choose one of {TUNED}")
    weights = _tuned_tensors(model)
    saved = [p.detach().clone() for p in weights] if tuned == "full" else []
    flags = [p.requires_grad for p in weights]
    try:
        with _added(model, tuned, cfg, generator) as extra:
            params = weights if tuned == "full" else extra
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
def _added(model: nn.Module, tuned: str, cfg: FinetuneConfig, generator: torch.Generator,
           ) -> Iterator[list[nn.Parameter]]:
    """The task's extra parameters of ``tuned``: ATTNSCALE's scales, a fresh LoRA, or none ("full")."""
    if tuned == "attnscale":
        with attention_scaled(model, cfg.attnscale_offset) as params:
            yield params
    elif tuned == "lora":
        with lora_added(model, cfg.lora_rank, generator) as params:
            yield params
    else:
        yield []
