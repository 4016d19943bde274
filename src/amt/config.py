"""Configuration: frozen dataclasses per stage, the only place defaults live.

Every field carries a comment with its meaning and unit. Presets are YAML files (``configs/``)
whose keys mirror these dataclasses; unknown keys are an error naming the key and the valid ones.
The resolved configuration is written next to every result (:func:`save_config`).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LORA_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


@dataclass(frozen=True)
class GlyphConfig:
    """The embedded glyph benchmark (rendered from matplotlib's bundled fonts)."""

    seed: int = 0  # drives class splits, font choice per sample and distortions
    image_size: int = 32  # rendered image side, pixels
    samples_per_class: int = 20  # images written per character class
    min_fonts: int = 6  # a character is a class only if this many font files draw it with ink
    val_fraction: float = 0.15  # fraction of each domain's classes in the validation split
    test_fraction: float = 0.15  # fraction of the training domain's classes held out as in-domain test
    max_classes_per_domain: int = 150  # cap on classes kept per out-of-domain domain (keeps generation fast)
    max_source_classes: int = 1000  # cap on classes of the source (Latin) domain, before its train/val/test split
    min_ink_pixels: int = 12  # a (font, character) counts only with this many dark pixels at 64 px per em
    eval_domains: tuple[str, ...] = ()  # evaluated domains (Latin test classes included if listed); () = all


@dataclass(frozen=True)
class DomainConfig:
    """One image domain on disk, read by the reader of its ``format`` (``amt.data.datasets``)."""

    name: str  # short name used in tables
    path: str  # folder: class-folder root | csv: `path,label` file | isic, chestx: dataset folder | filelist: FWT JSON
    format: str = "folder"  # "folder" | "csv" | "isic" | "chestx" | "filelist" | "metadataset" (path = <root>/<dataset>)
    splits: str | None = None  # JSON file {"train": [...], "val": [...], "test": [...]} of class names
    split: str | None = None  # which split's classes to use (None: every class)
    in_domain: bool = False  # counted in the in-domain average rather than out-of-domain


@dataclass(frozen=True)
class DataConfig:
    """Image loading and transforms; pixels are float tensors in [0, 1]."""

    image_size: int = 128  # network input side, pixels
    resize_ratio: float = 256 / 224  # test: resize shorter side to image_size*ratio, then centre-crop
    crop_scale: tuple[float, float] = (0.08, 1.0)  # train: RandomResizedCrop area range
    color_jitter: float = 0.4  # train: brightness/contrast/saturation jitter strength (PMF: 0.4)
    hflip: bool = True  # train: random horizontal flip (off for glyphs: flips change characters)
    skip_unreadable: bool = False  # skip (and count) unreadable images instead of failing
    cache_decoded: bool = False  # keep decoded images in memory (worth it for small images only)
    extensions: tuple[str, ...] = (".png", ".jpg", ".jpeg")  # image files recognised in folders


@dataclass(frozen=True)
class EpisodeConfig:
    """Episode shape: fixed N-way K-shot M-query, or Meta-Dataset's variable-way variable-shot."""

    n_way: int = 5  # classes per episode (fixed mode)
    n_shot: int = 1  # support images per class (fixed mode)
    n_query: int = 15  # query images per class (fixed mode; reduced where a class is too small)
    variable: bool = False  # Meta-Dataset variable-way variable-shot sampling
    min_ways: int = 5  # variable mode: fewest classes
    max_ways: int = 50  # variable mode: most classes
    max_support: int = 500  # variable mode: most support images per episode
    max_support_per_class: int = 100  # variable mode: most support images per class
    max_query_per_class: int = 10  # variable mode: most query images per class


@dataclass(frozen=True)
class BackboneConfig:
    """A timm ViT and the local checkpoint it is loaded from (never a hub download)."""

    arch: str = "vit_small_patch16_224"  # timm model name, or a project architecture ("amt_glyph_vit")
    checkpoint: str | None = None  # local weights file (.pth/.pt/.safetensors); None = random init
    checkpoint_key: str = "auto"  # sub-dict to load: "auto", "teacher", "student", "model", "state_dict", "none"
    image_size: int = 128  # input side, pixels; position embeddings are resized to it
    mean: tuple[float, float, float] = IMAGENET_MEAN  # normalisation applied inside the model
    std: tuple[float, float, float] = IMAGENET_STD


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA adapters on the ViT's linear layers."""

    rank: int = 8  # r
    scaling: float = 1.0  # multiplier of B·A
    targets: tuple[str, ...] = LORA_TARGETS  # module-name suffixes that get adapters
    init: str = "svd"  # "svd" (PiSSA-style, METHOD.md) | "standard" (random A, zero B)


@dataclass(frozen=True)
class AttackConfig:
    """One pixel-space attack on the query images (``amt.attacks``); defaults = the paper's evaluation.

    Paper evaluation: PGD-10, ℓ∞, ε = 4.5/255, step ε/10, CE objective. Meta-tuning members use
    their own ε_i, step ε_i/2, 2 steps and the KL objective (METHOD.md, Algorithm 1).
    ``step_size`` is absolute: change it together with ``eps``.
    """

    norm: str = "linf"  # "linf" | "l2" threat model (pyramid: "linf" only)
    eps: float = 4.5 / 255  # radius of the ε-ball, pixel units (images in [0, 1]); pyramid: per-level radius
    step_size: float = 0.45 / 255  # step per iteration, pixel units (ℓ∞: ·sign(g); ℓ2: ·g/‖g‖₂ per image)
    steps: int = 10  # PGD iterations (0 = the random start only, or the clean input without it)
    random_start: bool = True  # ℓ∞: δ ~ U[-eps, eps]; ℓ2: δ uniform in the ε-ball
    objective: str = "ce"  # "ce" (labels; evaluation) | "kl" (KL(p_clean ‖ p_adv), label-free; training)
    pyramid: bool = False  # the authors' multi-scale perturbation instead of per-pixel PGD
    pyramid_grids: tuple[int, ...] = (4, 8, 0)  # pyramid: cells per image side for each level; 0 = per pixel
    pyramid_multipliers: tuple[float, ...] = (20.0, 10.0, 1.0)  # pyramid: multiplier m_s of each level
    # pyramid: ℓ∞ clip of the summed perturbation, pixel units; None = the authors' bound sum(m_s)·eps (31·eps)
    pyramid_total_eps: float | None = None


@dataclass(frozen=True)
class HeadConfig:
    """Cosine ProtoNet head: logits = scale * (cos + bias)."""

    scale: float = 10.0  # initial logit scale s
    bias: float = 0.0  # cosine offset b


@dataclass(frozen=True)
class EvalConfig:
    """Few-shot evaluation protocol: clean, adversarial and corrupted queries (METHOD.md, "Evaluation").

    Clean accuracy uses ``n_tasks`` tasks; the adversarial and corruption conditions use the first
    ``adv_tasks`` / ``corruption_tasks`` of those same tasks (attacks and corruptions cost far more).
    """

    n_tasks: int = 600  # tasks per domain and shot setting
    n_way: int = 5  # classes per task
    shots: tuple[int, ...] = (1, 5)  # K values evaluated
    n_query: int = 15  # queries per class (fewer where a class is small; reported)
    seed: int = 0  # seeds the task generator; every method sees the same tasks
    batch_size: int = 256  # images per backbone forward when extracting features
    adversarial: bool = True  # evaluate the headline attack (`attack`) on the queries
    adv_tasks: int = 600  # tasks (of the n_tasks) attacked with the headline attack
    eps_sweep: tuple[float, ...] = (1 / 255, 2 / 255, 8 / 255)  # extra ℓ∞ radii, pixel units (step eps/10)
    l2_eps: tuple[float, ...] = (0.5,)  # ℓ2 radii, pixel units over C·H·W (step eps/4)
    sweep_tasks: int = 100  # tasks (of the n_tasks) for the ε sweep and the ℓ2 attack
    corruptions: tuple[str, ...] = ("all",)  # ImageNet-C names, ("all",) = the 15, () = none
    severities: tuple[int, ...] = (1, 2, 3, 4, 5)  # corruption severities
    corruption_tasks: int = 100  # tasks (of the n_tasks) evaluated under every corruption
    val_tasks: int = 50  # validation tasks per domain for choosing merge hyper-parameters


@dataclass(frozen=True)
class MergeConfig:
    """Test-time merging of the pool (METHOD.md, Algorithm 2) and singular-value trimming.

    ``lambda_``, ``beta``, ``rho`` and ``trim_layers`` are chosen per domain from the ``*_grid`` values on
    validation tasks (``EvalConfig.val_tasks``) unless the grid has a single point.
    """

    top_k: int = 2  # members merged per task
    lambda_grid: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)  # λ: weight of compactness vs divergence
    beta_grid: tuple[float, ...] = (1.0, 4.0, 8.0, 12.0)  # β: sharpness of u = exp(-β(1 - score))
    rho_grid: tuple[float, ...] = (1.0, 0.9, 0.75, 0.5)  # ρ: fraction of singular values kept (1 = no trim)
    trim_layers_grid: tuple[str, ...] = ("attn", "mlp", "all")  # layer groups trimmed when ρ < 1
    trim_method: str = "gram"  # "gram" (float64 Gram eigh, fastest) | "svd" (exact SVD): amt.merge.trim_weight
    pseudo_per_image: int = 4  # augmented copies of each support image used as pseudo-queries
    aug_prob: float = 0.9  # probability that a pseudo-query is augmented at all
    translate: float = 0.125  # max translation, fraction of the image side
    hflip: bool = True  # random horizontal flip in the augmentation (off for glyphs)
    color_jitter: float = 0.4  # brightness/contrast/saturation jitter strength


@dataclass(frozen=True)
class MethodConfig:
    """One evaluated row: the pre-trained backbone (PM) or a trained pool with a merging rule."""

    name: str = "PM"  # row label in tables
    pool: str | None = None  # directory written by `amt train` (pool.json); None = the bare backbone (PM)
    rule: str = "amt"  # with a pool: "amt" (merge + trim, Algorithm 2) | "uniform" (weight average) |
    #                    "logit_avg" | "min_support_ce" (no TTM: one member per task) | "single"
    member: int = 0  # the member used by rule "single"
    finetune: bool = False  # PMF-style test-time fine-tuning on the support set (AMT-FT, PMF+FT)


@dataclass(frozen=True)
class FinetuneConfig:
    """PMF-style test-time fine-tuning: Adam on the backbone, augmented support images as pseudo-queries."""

    steps: int = 20  # Adam steps per task
    lr: float = 1e-4  # Adam learning rate
    lr_grid: tuple[float, ...] = (0.0, 1e-5, 1e-4, 1e-3)  # chosen per domain on validation tasks


@dataclass(frozen=True)
class PretrainConfig:
    """Supervised pre-training of the embedded backbone (`amt pretrain`)."""

    steps: int = 1500  # optimiser steps
    batch_size: int = 128  # images per step
    lr: float = 2e-3  # AdamW peak learning rate
    weight_decay: float = 0.05  # AdamW weight decay
    warmup_steps: int = 100  # linear warm-up steps, then cosine decay to 0
    label_smoothing: float = 0.1  # cross-entropy label smoothing
    seed: int = 0  # initialisation and batch order


@dataclass(frozen=True)
class PerturbConfig:
    """APSV: adversarial perturbation of the trained member's LoRA factors A, B (METHOD.md step 3)."""

    enabled: bool = True  # APSV on/off (ablation switch)
    eta: float = 1e-4  # η1: relative mode, fraction of ‖T‖_F each factor moves by; absolute, step on ∂L/∂T
    mode: str = "relative"  # "relative": T += η1·‖T‖·g/‖g‖ per tensor (AWP, authors' code) | "absolute": T += η1·g


@dataclass(frozen=True)
class PoolConfig:
    """The robust LoRA pool: one member per attack configuration (METHOD.md, Algorithm 1).

    Member i attacks with ``eps[i]`` and step ``step_ratio * eps``; the other attack settings come
    from ``attack``. Strategies: "separate" (member i uses eps[i]; the paper), "uniform" (every member
    uses the mean eps), "random" (every episode draws eps uniformly from the list).
    """

    eps: tuple[float, ...] = (0.01 / 255, 0.1 / 255, 6 / 255, 8 / 255)  # ℓ∞ radii, pixel units; P = len(eps)
    step_ratio: float = 0.5  # attack step = step_ratio * eps (METHOD.md decision: eps/2)
    strategy: str = "separate"  # "separate" | "uniform" | "random"
    attack: AttackConfig = field(
        default_factory=lambda: AttackConfig(steps=2, objective="kl")
    )  # template: norm, steps, objective, random start, pyramid; eps/step_size set per member


@dataclass(frozen=True)
class TrainConfig:
    """Meta-tuning of one pool member (or of the clean baselines): schedule, loss and switches."""

    mode: str = "lora"  # "lora": train one LoRA member (AMT, clean LoRA) | "full": the whole backbone (PMF)
    apq: bool = True  # adversarial query perturbation on/off (off: clean meta-tuning)
    epochs: int = 30  # epochs of `episodes_per_epoch` episodes
    episodes_per_epoch: int = 2000  # optimiser steps per epoch (the paper: one episode per step)
    episodes_per_step: int = 1  # episodes whose gradients are averaged per step; split across DDP ranks
    warmup_epochs: float = 5  # linear warm-up from warmup_lr to lr, in epochs
    lr: float = 5e-4  # SGD peak learning rate, cosine-decayed to min_lr
    warmup_lr: float = 1e-6  # learning rate at the first episode
    min_lr: float = 1e-6  # learning rate at the end of the cosine
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 0.0  # SGD weight decay
    lambda_adv: float = 6.0  # weight of KL(p_clean ‖ p_adv) in the loss (TRADES β)
    train_scale: bool = True  # the head's logit scale s is trained too
    n_way: int = 5  # training episode shape
    n_shot: int = 1
    n_query: int = 15
    val_every: int = 500  # episodes between validations on the validation classes
    val_tasks: int = 100  # fixed, seeded validation tasks per validation
    keep: str = "best"  # weights written as the member: "best" validation accuracy (paper) | "last" episode
    checkpoint_every: int = 100  # episodes between (atomic) resumable checkpoints
    seed: int = 0  # episodes, attack noise and initialisation; member i uses seed + i


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole run: which data, which backbone, which protocol."""

    benchmark: str = "glyphs"  # "glyphs" (embedded, generated locally) or "custom" (use `domains`)
    cache_dir: str = ".cache/amt"  # where the generated benchmark is written
    glyphs: GlyphConfig = field(default_factory=GlyphConfig)
    domains: tuple[DomainConfig, ...] = ()  # evaluation domains (filled in for the glyph benchmark)
    train_domain: DomainConfig | None = None  # source domain for (meta-)training
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    device: str = "auto"  # "auto" (CUDA when available, else CPU) | "cpu" | "cuda" | "cuda:N"
    precision: str = "fp32"  # backbone autocast: "fp32" | "bf16" (CPU or CUDA) | "fp16" (CUDA, evaluation only)
    attack: AttackConfig = field(default_factory=AttackConfig)  # evaluation attack (the headline PGD)
    merge: MergeConfig = field(default_factory=MergeConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    methods: tuple[MethodConfig, ...] = (MethodConfig(),)  # rows evaluated by `amt evaluate`
    perturb: PerturbConfig = field(default_factory=PerturbConfig)  # APSV during meta-tuning
    pool: PoolConfig = field(default_factory=PoolConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# Named meta-tuning variants: baselines and ablations as overrides of the same configuration
# (`amt train --variant NAME`); "amt" is the method itself. Each maps to the switches of TrainConfig,
# PerturbConfig, PoolConfig and LoRAConfig; nothing else changes between variants.
VARIANTS: dict[str, dict] = {
    "amt": {},  # APQ + APSV, pool of len(pool.eps) members, one ε each, SVD init
    "apq_only": {"perturb": {"enabled": False}},  # adversarial queries, no weight perturbation
    "uniform_pool": {"pool": {"strategy": "uniform"}},  # every member attacks with the mean ε
    "random_pool": {"pool": {"strategy": "random"}},  # ε drawn from the list every episode
    "clean_lora": {"train": {"apq": False}, "perturb": {"enabled": False}},  # one clean LoRA, SVD init
    "clean_lora_standard": {"train": {"apq": False}, "perturb": {"enabled": False}, "lora": {"init": "standard"}},
    "pmf": {"train": {"mode": "full", "apq": False}, "perturb": {"enabled": False}},  # full backbone, clean
}


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names it and the fix."""


def _build(cls: type, data: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a mapping, recursing into nested dataclasses and tuples."""
    if dataclasses.is_dataclass(cls):
        if isinstance(data, cls):
            return data
        if not isinstance(data, dict):
            raise ConfigError(f"{where or 'config'}: expected a mapping for {cls.__name__}, got {data!r}")
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ConfigError(
                f"{where or 'config'}: unknown key(s) {unknown} for {cls.__name__}; valid keys are {names}"
            )
        kwargs = {k: _build(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
        return cls(**kwargs)
    origin = typing.get_origin(cls)
    args = typing.get_args(cls)
    if origin is typing.Union or (origin is not None and type(None) in args):
        if data is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _build(inner[0], data, where)
    if origin is tuple:
        if not isinstance(data, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {data!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_build(args[0], v, f"{where}[{i}]") for i, v in enumerate(data))
        if len(args) != len(data):
            raise ConfigError(f"{where}: expected {len(args)} values, got {list(data)!r}")
        return tuple(_build(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, data)))
    if cls is float and isinstance(data, (int, float)) and not isinstance(data, bool):
        return float(data)
    if cls in (int, str, bool) and not isinstance(data, cls):
        raise ConfigError(f"{where}: expected {cls.__name__}, got {data!r}")
    if cls is int and isinstance(data, bool):
        raise ConfigError(f"{where}: expected int, got {data!r}")
    return data


def from_dict(cls: type, data: dict) -> Any:
    """Build config dataclass ``cls`` from a (possibly partial) nested mapping."""
    return _build(cls, data, "")


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples become lists) suitable for YAML/JSON."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        return v

    return conv(cfg)


def variant_overrides(name: str) -> dict:
    """The overrides of meta-tuning variant ``name`` (see :data:`VARIANTS`)."""
    if name not in VARIANTS:
        raise ConfigError(f"unknown variant {name!r}; choose one of {sorted(VARIANTS)}")
    return VARIANTS[name]


def load_config(path: str | Path, overrides: dict | None = None) -> ExperimentConfig:
    """Read a YAML preset into an :class:`ExperimentConfig`, then apply nested ``overrides``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; presets live in configs/ (e.g. configs/embedded.yaml)")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    if overrides:
        data = merge_dicts(data, overrides)
    return from_dict(ExperimentConfig, data)


def merge_dicts(base: dict, new: dict) -> dict:
    """Recursively merge ``new`` into a copy of ``base``."""
    out = dict(base)
    for k, v in new.items():
        out[k] = merge_dicts(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> dict:
    """Turn ``"eval.n_tasks=50"`` into ``{"eval": {"n_tasks": 50}}`` (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. eval.n_tasks=50)")
    key, value = text.split("=", 1)
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = yaml.safe_load(value)
    return out


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved configuration as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
