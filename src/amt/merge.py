"""Test-time merging of the robust LoRA pool (docs/method.md, "Test-time merging"), singular-value trimming.

Per task, from the support set only:

1. pseudo-queries: ``pseudo_per_image`` augmented copies of every support image (random flip, colour
   jitter, translation up to ``translate`` of the side; each copy augmented with probability ``pseudo_prob``)
   — needed because with one shot a support image *is* its prototype;
2. for every member i (its adapter active): prototypes p_{i,c} from the clean support, then
   C_i = mean cosine of the pseudo-queries to their own prototype (compactness) and
   V_i = mean over pseudo-queries of the mean cosine to the N−1 other prototypes (divergence);
3. score_i = λ·C_i − (1−λ)·V_i, u_i = exp(−β(1 − score_i)); keep the top-k, ζ = u / Σ_topk u;
4. W' = W_res + Σ ζ_i B_i A_i in every adapted layer (:func:`amt.lora.merged`, restored bit-for-bit);
5. singular-value trimming of W' on the chosen layer group: keep the top ρ fraction of singular values.

The rules that use these pieces, and the per-task models, are in :mod:`amt.methods`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from amt.config import AugmentConfig, MergeConfig
from amt.head import cosine_logits, prototypes
from amt.lora import active_adapter, lora_layers, merged

log = logging.getLogger(__name__)

TRIM_GROUPS: dict[str, tuple[str, ...]] = {  # layer groups for trimming, by module-name suffix
    "none": (),
    "attn": ("attn.qkv", "attn.proj"),
    "mlp": ("mlp.fc1", "mlp.fc2"),
    "all": ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"),
}


# ----------------------------------------------------------------------------------------------
# Pseudo-queries and member scores
# ----------------------------------------------------------------------------------------------


def pseudo_queries(images: Tensor, labels: Tensor, cfg: AugmentConfig,
                   generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Augmented copies of the support images ``[S, 3, H, W]`` in [0, 1] → ``([S·m, 3, H, W], [S·m])``,
    m = ``cfg.pseudo_per_image``.

    Each copy is augmented with probability ``cfg.pseudo_prob``: horizontal flip (if ``cfg.hflip``, p = 0.5),
    brightness/contrast/saturation factors uniform in [1 − j, 1 + j] (j = ``cfg.color_jitter``), and an
    integer translation of up to ``cfg.translate`` of the side with edge replication.
    """
    m = cfg.pseudo_per_image
    if m < 1:
        raise ValueError(f"augment.pseudo_per_image must be >= 1, got {m}")
    x = images.repeat(m, 1, 1, 1)
    y = labels.repeat(m)
    n, _, h, w = x.shape
    rand = lambda *shape: torch.rand(*shape, generator=generator).to(x.device)  # noqa: E731
    on = (rand(n) < cfg.pseudo_prob).view(n, 1, 1, 1)
    out = x
    if cfg.hflip:
        flip = (rand(n) < 0.5).view(n, 1, 1, 1)
        out = torch.where(flip, out.flip(-1), out)
    j = cfg.color_jitter
    if j > 0:
        factor = lambda: (1 + j * (2 * rand(n) - 1)).view(n, 1, 1, 1)  # noqa: E731
        out = (out * factor()).clamp(0, 1)  # brightness
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        out = ((out - mean) * factor() + mean).clamp(0, 1)  # contrast
        gray = out.mean(dim=1, keepdim=True)
        out = ((out - gray) * factor() + gray).clamp(0, 1)  # saturation
    shift = int(round(cfg.translate * min(h, w)))
    if shift > 0:
        padded = F.pad(out, (shift, shift, shift, shift), mode="replicate")
        dx = torch.randint(0, 2 * shift + 1, (n,), generator=generator).tolist()
        dy = torch.randint(0, 2 * shift + 1, (n,), generator=generator).tolist()
        out = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    return torch.where(on, out, x), y


@dataclass
class MemberScores:
    """Per-member support statistics of one task (each ``[P]``)."""

    compactness: Tensor  # C_i: mean cosine of pseudo-queries to their own prototype
    divergence: Tensor  # V_i: mean cosine of pseudo-queries to the other prototypes
    support_ce: Tensor  # cross-entropy of the pseudo-queries at the member's logit scale ("no TTM" rule)


@torch.no_grad()
def member_scores(
    model: nn.Module, names: Sequence[str], scales: Sequence[float], support_images: Tensor, support_labels: Tensor,
    n_way: int, pseudo_images: Tensor, pseudo_labels: Tensor,
) -> MemberScores:
    """C_i, V_i and the pseudo-query CE of every member (one forward of support + pseudo-queries each).

    ``scales[i]`` is member i's logit scale, used only for its cross-entropy.
    """
    if n_way < 2:
        raise ValueError("merging needs at least 2 classes per task (V_i averages over the other classes)")
    c, v, ce = [], [], []
    n_s = len(support_images)
    images = torch.cat([support_images, pseudo_images])
    for name, scale in zip(names, scales, strict=True):
        with active_adapter(model, name):
            feats = model(images)
        protos = prototypes(feats[:n_s], support_labels, n_way)
        cos = cosine_logits(feats[n_s:], protos, 1.0)  # [M, N]
        own = cos.gather(1, pseudo_labels[:, None]).squeeze(1)
        c.append(own.mean())
        v.append(((cos.sum(1) - own) / (n_way - 1)).mean())
        ce.append(F.cross_entropy(scale * cos, pseudo_labels))
    return MemberScores(torch.stack(c), torch.stack(v), torch.stack(ce))


def merge_coefficients(scores: MemberScores, lambda_: float, beta: float, top_k: int) -> Tensor:
    """ζ ``[P]``: score = λC − (1−λ)V, u = exp(−β(1 − score)), top-k kept and normalised, zeros elsewhere."""
    score = lambda_ * scores.compactness - (1 - lambda_) * scores.divergence
    u = torch.exp(-beta * (1 - score.double()))
    k = max(1, min(top_k, len(u)))
    keep = torch.topk(u, k).indices
    zeta = torch.zeros_like(u)
    zeta[keep] = u[keep] / u[keep].sum()
    return zeta.float()


# ----------------------------------------------------------------------------------------------
# Trimming
# ----------------------------------------------------------------------------------------------


TRIM_METHODS = ("gram", "svd")


@torch.no_grad()
def trim_weight(weight: Tensor, rho: float, method: str = "gram") -> Tensor:
    """Best rank-⌈ρ·min(out, in)⌉ approximation of ``weight`` ``[..., out, in]`` (batched over leading dims):
    the top singular values kept.

    ``method="gram"`` (default): with n = min(out, in), the top-k right (or left) singular vectors V_k are the
    top eigenvectors of the n×n Gram matrix, and W V_k V_kᵀ = U_k S_k V_kᵀ exactly; an n×n symmetric
    eigendecomposition in float64 is several times cheaper than the SVD of W, on the CPU and on a GPU
    (``benchmarks/trim.py``, 48 ViT-S layers: 2.4× on this 2-core CPU, 5.5× on an H200, where it also beats a
    float32 ``eigh`` and an ``eigh`` moved to the host). ``"svd"``: exact SVD, taken on the tall orientation
    (faster than the wide one). Both agree to float64 rounding.
    """
    if not 0 < rho <= 1:
        raise ValueError(f"trim fraction rho must be in (0, 1], got {rho}")
    if method not in TRIM_METHODS:
        raise ValueError(f"trim method must be one of {TRIM_METHODS}, got {method!r}")
    wide = weight.shape[-2] < weight.shape[-1]
    w = (weight.mT if wide else weight).double()  # tall: [..., m, n], m >= n
    keep = max(1, math.ceil(rho * w.shape[-1]))
    if method == "svd":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        low = (u[..., :keep] * s[..., None, :keep]) @ vh[..., :keep, :]
    else:
        gram = w.mT @ w
        _, vecs = torch.linalg.eigh(gram)  # ascending eigenvalues = squared singular values
        v = vecs[..., -keep:]
        low = (w @ v) @ v.mT
    return (low.mT if wide else low).to(weight.dtype)


def trimmed_layers(model: nn.Module, group: str) -> dict[str, nn.Module]:
    if group not in TRIM_GROUPS:
        raise ValueError(f"unknown trim layer group {group!r}; choose one of {sorted(TRIM_GROUPS)}")
    suffixes = TRIM_GROUPS[group]
    return {n: layer for n, layer in lora_layers(model).items() if any(n.endswith(s) for s in suffixes)}


@torch.no_grad()
def trim_(model: nn.Module, rho: float, group: str, method: str = "gram") -> None:
    """Trim the merged weights of the layers in ``group`` in place (they must be merged: unmerge restores).

    Layers of one weight shape are trimmed in one batched call (ViT-S: 4 shapes for 48 layers).
    ``method``: one of :data:`TRIM_METHODS`.
    """
    if rho >= 1 or group == "none":
        return
    by_shape: dict[tuple, list[nn.Module]] = {}
    for name, layer in trimmed_layers(model, group).items():
        if not layer.merged:
            raise RuntimeError(f"trim_: layer {name} is not merged; trim inside `merged_task`, which restores it")
        by_shape.setdefault(tuple(layer.weight.shape), []).append(layer)
    for layers in by_shape.values():
        trimmed = trim_weight(torch.stack([layer.weight for layer in layers]), rho, method)
        for layer, w in zip(layers, trimmed):
            layer.weight.copy_(w)


@contextmanager
def merged_task(model: nn.Module, coefficients: dict[str, float], rho: float = 1.0, group: str = "none",
                method: str = "gram") -> Iterator[nn.Module]:
    """W' = W_res + Σ ζᵢ ΔWᵢ, trimmed to the top ρ singular values on ``group``; exact restore on exit."""
    with merged(model, coefficients):
        trim_(model, rho, group, method)
        yield model


# ----------------------------------------------------------------------------------------------
# Hyper-parameters
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MergeParams:
    """The per-domain, per-shot hyper-parameters of rule "ttm" (candidates: :func:`merge_grid`)."""

    lambda_: float  # λ: weight of compactness against divergence
    beta: float  # β: sharpness of u = exp(−β(1 − score))
    rho: float  # ρ: fraction of singular values kept (1: no trimming)
    trim_group: str  # layer group trimmed (a key of TRIM_GROUPS; "none" when ρ = 1)

    def as_dict(self) -> dict:
        return {"lambda": self.lambda_, "beta": self.beta, "rho": self.rho, "trim_group": self.trim_group}


def merge_grid(cfg: MergeConfig) -> list[MergeParams]:
    """Candidate hyper-parameters in order: every (λ, β) with no trimming (if ``rho_grid`` holds 1), then
    with every (ρ < 1, layer group). The first candidate is the untuned default."""
    if not (cfg.lambda_grid and cfg.beta_grid and cfg.rho_grid):
        raise ValueError("merge.lambda_grid, beta_grid and rho_grid need at least one value each")
    trims = ([(1.0, "none")] if any(r >= 1 for r in cfg.rho_grid) else []) + [
        (r, g) for r in cfg.rho_grid if r < 1 for g in cfg.trim_group_grid]
    return [MergeParams(lam, beta, rho, group) for lam in cfg.lambda_grid for beta in cfg.beta_grid
            for rho, group in trims]


@torch.no_grad()
def merged_spectra(model: nn.Module, coefficients: dict[str, float], layers: Sequence[str]) -> dict[str, list[float]]:
    """Singular values (descending) of W' = W_res + Σ ζᵢ ΔWᵢ for the LoRA layers named in ``layers``
    (the paper's Fig. 2/3 compares such spectra with and without APSV)."""
    all_layers = lora_layers(model)
    missing = [n for n in layers if n not in all_layers]
    if missing:
        raise ValueError(f"no LoRA layer {missing}; LoRA layers are {list(all_layers)[:8]}...")
    with merged(model, coefficients):
        return {n: torch.linalg.svdvals(all_layers[n].weight.double()).tolist() for n in layers}
