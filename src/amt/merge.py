"""Test-time merging of the robust LoRA pool (docs/method.md, "Test-time merging"), singular-value trimming.

Per task, from the support set only:

1. pseudo-queries: ``pseudo_per_image`` augmented copies of every support image (random flip, colour
   jitter, translation up to ``translate`` of the side; each copy augmented with probability ``pseudo_prob``)
   — needed because with one shot a support image *is* its prototype;
2. for every member i (its adapter active): prototypes p_{i,c} from the clean support, then
   C_i = mean cosine of the pseudo-queries to their own prototype (compactness) and
   V_i = mean over pseudo-queries of the mean cosine to the N−1 other prototypes (divergence);
   robustness-aware (beyond the paper, γ > 0): C_i^adv, V_i^adv on the pseudo-queries attacked against member i;
3. score_i = λ·C_i − (1−λ)·V_i, u_i = exp(−β(1 − score_i)); keep the top-k, ζ = u / Σ_topk u (Algorithm 2);
   robustness-aware: ζ^adv the same from C^adv, V^adv, and ζ ← (1−γ)·ζ + γ·ζ^adv (γ = 0: Algorithm 2);
   the linear-classifier rule instead: ζ = the mean output on the support set of a classifier of which member
   each attacked pseudo-query was attacked against (:func:`classifier_coefficients`);
4. W' = W_res + Σ ζ_i B_i A_i in every adapted layer (:func:`amt.lora.merged`, restored bit-for-bit);
5. singular-value trimming of W' on the chosen layer group: keep the top ρ fraction of singular values.

The rules that use these pieces, and the per-task models, are in :mod:`amt.methods`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from amt.attacks import adversarial_queries
from amt.config import AttackConfig, AugmentConfig, MergeConfig
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
    adv_compactness: Tensor | None = None  # C_i on the pseudo-queries attacked against member i (None: not measured)
    adv_divergence: Tensor | None = None  # V_i on the same attacked pseudo-queries


def _compactness_divergence(cos: Tensor, labels: Tensor, n_way: int) -> tuple[Tensor, Tensor]:
    """(C, V) from cosines ``[M, N]`` of M pseudo-queries to the N prototypes."""
    own = cos.gather(1, labels[:, None]).squeeze(1)
    return own.mean(), ((cos.sum(1) - own) / (n_way - 1)).mean()


def member_scores(
    model: nn.Module, names: Sequence[str], scales: Sequence[float], support_images: Tensor, support_labels: Tensor,
    n_way: int, pseudo_images: Tensor, pseudo_labels: Tensor, attack: AttackConfig | None = None,
    generator: torch.Generator | None = None,
) -> MemberScores:
    """C_i, V_i and the pseudo-query CE of every member (one forward of support + pseudo-queries each).

    ``scales[i]`` is member i's logit scale (its cross-entropy, and the attack's logits). With ``attack`` (the
    robustness-aware scores), the first S pseudo-queries — one augmented copy of each support image, S = support
    size, which keeps the cost at one small attack per member — are also attacked against each member (CE on its
    cosine ProtoNet with clean-support prototypes, random start from ``generator``) and C_i^adv, V_i^adv measured
    on them.
    """
    if n_way < 2:
        raise ValueError("merging needs at least 2 classes per task (V_i averages over the other classes)")
    c, v, ce, c_adv, v_adv = [], [], [], [], []
    n_s = len(support_images)
    images = torch.cat([support_images, pseudo_images])
    for name, scale in zip(names, scales, strict=True):
        with active_adapter(model, name):
            with torch.no_grad():
                feats = model(images)
                protos = prototypes(feats[:n_s], support_labels, n_way)
                cos = cosine_logits(feats[n_s:], protos, 1.0)  # [M, N]
            for out, value in zip((c, v), _compactness_divergence(cos, pseudo_labels, n_way)):
                out.append(value)
            ce.append(F.cross_entropy(scale * cos, pseudo_labels))
            if attack is not None:
                probes, probe_labels = pseudo_images[:n_s], pseudo_labels[:n_s]
                x_adv = adversarial_queries(attack, lambda x, p=protos, s=scale: cosine_logits(model(x), p, s),
                                            probes, labels=probe_labels, generator=generator)
                with torch.no_grad():
                    cos_adv = cosine_logits(model(x_adv), protos, 1.0)
                for out, value in zip((c_adv, v_adv), _compactness_divergence(cos_adv, probe_labels, n_way)):
                    out.append(value)
    adv = (torch.stack(c_adv), torch.stack(v_adv)) if attack is not None else (None, None)
    return MemberScores(torch.stack(c), torch.stack(v), torch.stack(ce), *adv)


def short_attack(attack: AttackConfig, steps: int) -> AttackConfig:
    """The cheap attacks of the robustness-aware rule — on the pseudo-queries of the member scores, and for the
    robust validation accuracy that chooses the merge settings: PGD in ``attack``'s threat model (norm, ε),
    ``steps`` steps of 2.5·ε/steps (Madry et al.; one step: FGSM from a random start), CE, one run."""
    return dataclasses.replace(attack, step_size=2.5 * attack.eps / max(1, steps), steps=steps, restarts=1,
                               random_start=True, objective="ce", pyramid=False)


def _top_k_weights(compactness: Tensor, divergence: Tensor, lambda_: float, beta: float, top_k: int) -> Tensor:
    """Algorithm 2's ζ ``[P]`` from one set of scores: u = exp(−β(1 − (λC − (1−λ)V))), top-k normalised."""
    score = lambda_ * compactness - (1 - lambda_) * divergence
    u = torch.exp(-beta * (1 - score.double()))
    k = max(1, min(top_k, len(u)))
    keep = torch.topk(u, k).indices
    zeta = torch.zeros_like(u)
    zeta[keep] = u[keep] / u[keep].sum()
    return zeta


def merge_coefficients(scores: MemberScores, lambda_: float, beta: float, top_k: int,
                       adv_weight: float = 0.0) -> Tensor:
    """ζ ``[P]``: Algorithm 2 — score = λC − (1−λ)V, u = exp(−β(1 − score)), top-k kept and normalised, zeros
    elsewhere. With γ = ``adv_weight`` > 0 (robustness-aware) the same rule on the adversarial scores gives ζ^adv,
    and ζ = (1−γ)·ζ + γ·ζ^adv: γ is the share of the weight that goes by robustness (up to 2·top_k members)."""
    zeta = _top_k_weights(scores.compactness, scores.divergence, lambda_, beta, top_k)
    if adv_weight > 0:
        if scores.adv_compactness is None or scores.adv_divergence is None:
            raise ValueError("adv_weight > 0 needs the adversarial member scores (member_scores with an attack)")
        adv = _top_k_weights(scores.adv_compactness, scores.adv_divergence, lambda_, beta, top_k)
        zeta = (1 - adv_weight) * zeta + adv_weight * adv
    return zeta.float()


# ----------------------------------------------------------------------------------------------
# The linear-classifier rule (FLUTE-like; the paper's Table 6)
# ----------------------------------------------------------------------------------------------


def fit_member_classifier(feats: Tensor, members: Tensor, n_members: int, cfg: MergeConfig) -> Tensor:
    """Softmax-linear classifier of which member produced each sample; returns the probability function's weights.

    ``feats`` ``[M, D]`` (already standardised), ``members`` ``[M]`` in ``0..n_members-1``. Full-batch Adam
    (``cfg.classifier_steps`` steps, ``cfg.classifier_lr``) from zero weights on the mean cross-entropy
    + ``cfg.classifier_weight_decay``·‖W‖²; deterministic. Returns ``[D + 1, P]``: weights, then the bias row.
    """
    with torch.enable_grad():
        weight = torch.zeros(feats.shape[1] + 1, n_members, dtype=feats.dtype, device=feats.device, requires_grad=True)
        opt = torch.optim.Adam([weight], lr=cfg.classifier_lr)
        x = torch.cat([feats.detach(), torch.ones_like(feats[:, :1])], 1)
        for _ in range(cfg.classifier_steps):
            loss = F.cross_entropy(x @ weight, members) + cfg.classifier_weight_decay * weight[:-1].pow(2).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return weight.detach()


def member_probabilities(weight: Tensor, feats: Tensor) -> Tensor:
    """``[M, P]`` probabilities of the classifier ``weight`` ``[D + 1, P]`` on standardised features ``[M, D]``."""
    return torch.softmax(feats @ weight[:-1] + weight[-1], dim=-1)


@torch.no_grad()
def classifier_coefficients(
    model: nn.Module, names: Sequence[str], scales: Sequence[float], support_images: Tensor, support_labels: Tensor,
    pseudo_images: Tensor, pseudo_labels: Tensor, attacks: Sequence[AttackConfig], cfg: MergeConfig,
    generator: torch.Generator,
) -> Tensor:
    """ζ ``[P]`` of rule "linear_classifier": the mean member probabilities of the clean support images.

    Per task: the pseudo-queries ``[M, 3, H, W]`` are attacked against every member i (``attacks[i]``, CE on the
    member's cosine ProtoNet with clean-support prototypes, at its logit scale ``scales[i]``), giving P·M samples
    labelled i; their features under the uniformly merged pool (the one feature space every member shares),
    standardised by the samples' per-dimension mean and std, train :func:`fit_member_classifier`; its mean
    probabilities on the support images ``[S, 3, H, W]`` (same features and standardisation) are ζ. Every member
    gets a weight (no top-k, no trimming).
    """
    n_way = int(support_labels.max()) + 1
    samples = []
    for name, scale, attack in zip(names, scales, attacks, strict=True):
        with active_adapter(model, name):
            protos = prototypes(model(support_images), support_labels, n_way)
            samples.append(adversarial_queries(attack, lambda x, p=protos, s=scale: cosine_logits(model(x), p, s),
                                               pseudo_images, labels=pseudo_labels, generator=generator))
    with merged(model, {n: 1.0 / len(names) for n in names}):
        feats = model(torch.cat(samples))
        support_feats = model(support_images)
    mean, std = feats.mean(0), feats.std(0).clamp_min(1e-6)
    members = torch.arange(len(names), device=feats.device).repeat_interleave(len(pseudo_images))
    weight = fit_member_classifier((feats - mean) / std, members, len(names), cfg)
    return member_probabilities(weight, (support_feats - mean) / std).mean(0).float().cpu()


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
    adv_weight: float = 0.0  # γ: weight of the adversarial member scores (0: Algorithm 2)

    def as_dict(self) -> dict:
        return {"lambda": self.lambda_, "beta": self.beta, "rho": self.rho, "trim_group": self.trim_group,
                "adv_weight": self.adv_weight}


def merge_grid(cfg: MergeConfig) -> list[MergeParams]:
    """Candidate hyper-parameters in order: for every γ, every (λ, β) with no trimming (if ``rho_grid`` holds 1),
    then with every (ρ < 1, layer group). The first candidate is the untuned default."""
    if not (cfg.lambda_grid and cfg.beta_grid and cfg.rho_grid and cfg.adv_weight_grid):
        raise ValueError("merge.lambda_grid, beta_grid, rho_grid and adv_weight_grid need at least one value each")
    bad = [g for g in cfg.adv_weight_grid if not 0 <= g <= 1]
    if bad:
        raise ValueError(f"merge.adv_weight_grid values must be in [0, 1] (0: Algorithm 2), got {bad}")
    trims = ([(1.0, "none")] if any(r >= 1 for r in cfg.rho_grid) else []) + [
        (r, g) for r in cfg.rho_grid if r < 1 for g in cfg.trim_group_grid]
    return [MergeParams(lam, beta, rho, group, gamma) for gamma in cfg.adv_weight_grid for lam in cfg.lambda_grid
            for beta in cfg.beta_grid for rho, group in trims]
