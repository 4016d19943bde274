"""The configuration dataclasses, one per stage of the pipeline: the only place defaults live. Every field has a
comment with its meaning and unit; string choices are ``Literal`` types, checked when a preset is read
(:mod:`amt.config.io`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

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
    """One image domain on disk, read by the reader of its ``format`` (``amt.data.readers``)."""

    name: str  # short name used in tables
    path: str  # folder: class-folder root | csv: `path,label` file | isic, chestx: dataset folder | filelist: FWT JSON
    # metadataset: path = <root>/<dataset> (converted TFRecords + dataset_spec.json)
    format: Literal["folder", "csv", "isic", "chestx", "filelist", "metadataset"] = "folder"
    splits: str | None = None  # JSON file {"train": [...], "val": [...], "test": [...]} of class names
    split: str | None = None  # which split's classes to use (None: every class)
    in_domain: bool = False  # counted in the in-domain average rather than out-of-domain


@dataclass(frozen=True)
class DataConfig:
    """Image loading and transforms; pixels are float tensors in [0, 1] at ``backbone.image_size``."""

    resize_ratio: float = 256 / 224  # test: resize shorter side to image_size*ratio, then centre-crop
    crop_scale: tuple[float, float] = (0.08, 1.0)  # train: RandomResizedCrop area range
    skip_unreadable: bool = False  # skip (and count) unreadable images instead of failing
    cache_decoded: bool = False  # keep decoded images in memory (worth it for small images only)
    extensions: tuple[str, ...] = (".png", ".jpg", ".jpeg")  # image files recognised in folders


@dataclass(frozen=True)
class AugmentConfig:
    """Image augmentation: the meta-tuning transforms and the test-time pseudo-queries (merge scores, fine-tuning;
    ``pseudo_per_image`` copies of each support image, each augmented with probability ``pseudo_prob``)."""

    hflip: bool = True  # random horizontal flip, p = 0.5 (off for glyphs: a mirrored glyph is another character)
    color_jitter: float = 0.4  # brightness/contrast/saturation factors uniform in [1 - j, 1 + j] (PMF: 0.4)
    pseudo_per_image: int = 4  # pseudo-queries: augmented copies of each support image
    pseudo_prob: float = 0.9  # pseudo-queries: probability that a copy is augmented at all
    translate: float = 0.125  # pseudo-queries: max translation, fraction of the image side (edge replication)


@dataclass(frozen=True)
class VariableEpisodeConfig:
    """Meta-Dataset's variable-way variable-shot episodes (``amt.data.episodes.VariableSampler``)."""

    min_ways: int = 5  # fewest classes
    max_ways: int = 50  # most classes
    max_support: int = 500  # most support images per episode
    max_support_per_class: int = 100  # most support images per class
    max_query_per_class: int = 10  # most query images per class


@dataclass(frozen=True)
class BackboneConfig:
    """A timm ViT and the local checkpoint it is loaded from (never a hub download)."""

    arch: str = "vit_small_patch16_224"  # timm model name, or a project architecture ("amt_glyph_vit")
    checkpoint: str | None = None  # local weights file (.pth/.pt/.safetensors); None needs random_init
    random_init: bool = False  # allow no checkpoint: timm's random init, seed 0 (tests, timing, pre-training)
    # sub-dict of the checkpoint to load ("auto": the first of teacher, model, state_dict, student, ...)
    checkpoint_key: Literal["auto", "teacher", "student", "model", "state_dict", "none"] = "auto"
    image_size: int = 128  # network input side, pixels (images are resized to it); position embeddings follow
    mean: tuple[float, float, float] = IMAGENET_MEAN  # normalisation applied inside the model
    std: tuple[float, float, float] = IMAGENET_STD


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA adapters on the ViT's linear layers."""

    rank: int = 8  # r
    scaling: float = 1.0  # multiplier of B·A
    targets: tuple[str, ...] = LORA_TARGETS  # module-name suffixes that get adapters
    init: Literal["svd", "standard"] = "svd"  # "svd" (PiSSA-style, docs/method.md) | "standard" (random A, zero B)


@dataclass(frozen=True)
class AttackConfig:
    """One pixel-space attack on the query images (``amt.attacks``); defaults = the paper's evaluation.

    Paper evaluation: PGD-10, ℓ∞, ε = 4.5/255, step ε/10, CE objective. Meta-tuning members use
    their own ε_i, step ε_i/2, 2 steps and the KL objective (docs/method.md, "Meta-tuning").
    ``step_size`` is absolute: change it together with ``eps``.
    """

    norm: Literal["linf", "l2"] = "linf"  # threat model (pyramid: "linf" only)
    eps: float = 4.5 / 255  # radius of the ε-ball, pixel units (images in [0, 1]); pyramid: per-level radius
    step_size: float = 0.45 / 255  # step per iteration, pixel units (ℓ∞: ·sign(g); ℓ2: ·g/‖g‖₂ per image)
    steps: int = 10  # PGD iterations (0 = the random start only, or the clean input without it)
    # evaluation: independent random starts; a query counts as robust only if it is classified correctly at every
    # iterate of every restart (the worst case). Training attacks use one start and keep the final iterate.
    restarts: int = 1
    random_start: bool = True  # ℓ∞: δ ~ U[-eps, eps]; ℓ2: δ uniform in the ε-ball
    objective: Literal["ce", "kl"] = "ce"  # "ce" (labels; evaluation) | "kl" (KL(p_clean ‖ p_adv); training)
    pyramid: bool = False  # the authors' multi-scale perturbation instead of per-pixel PGD
    pyramid_grids: tuple[int, ...] = (4, 8, 0)  # pyramid: cells per image side for each level; 0 = per pixel
    pyramid_multipliers: tuple[float, ...] = (20.0, 10.0, 1.0)  # pyramid: multiplier m_s of each level
    # pyramid: ℓ∞ clip of the summed perturbation, pixel units; None = the authors' bound sum(m_s)·eps (31·eps)
    pyramid_total_eps: float | None = None


@dataclass(frozen=True)
class HeadConfig:
    """Cosine ProtoNet head: logits = scale · cos(feature, prototype).

    The paper's offset b in s·(cos + b) adds the same s·b to every class's logit, which changes no softmax,
    cross-entropy or argmax; it is therefore not a parameter here.
    """

    scale: float = 10.0  # logit scale s: initial value in meta-tuning, and PM's; a trained member carries its own


@dataclass(frozen=True)
class EvalConfig:
    """Few-shot evaluation protocol: clean, adversarial and corrupted queries (docs/method.md, "Evaluation").

    Clean accuracy uses ``n_tasks`` tasks; the adversarial and corruption conditions use the first
    ``adv_tasks`` / ``corruption_tasks`` of those same tasks (attacks and corruptions cost far more).
    Methods with hyper-parameters (merge grid, fine-tuning lr) are tuned per domain and shot on ``val_tasks``
    validation tasks.
    """

    n_tasks: int = 600  # tasks per domain and shot setting
    # "fixed": n_way-way K-shot tasks for every K of `shots` | "variable": Meta-Dataset's variable-way
    # variable-shot tasks (shape limits in `variable`; one cell "vwvs" per domain instead of one per shot; Table 18)
    episodes: Literal["fixed", "variable"] = "fixed"
    variable: VariableEpisodeConfig = field(default_factory=VariableEpisodeConfig)  # episodes: variable only
    n_way: int = 5  # classes per task (episodes: fixed)
    shots: tuple[int, ...] = (1, 5)  # K values evaluated (episodes: fixed)
    n_query: int = 15  # queries per class; classes too small are left out (named), fewer only if n_way cannot
    seed: int = 0  # seeds the task generator; every method sees the same tasks
    adversarial: bool = True  # evaluate the headline attack (`attack`) on the queries
    adv_tasks: int = 600  # tasks (of the n_tasks) attacked with the headline attack
    eps_sweep: tuple[float, ...] = (1 / 255, 2 / 255, 8 / 255)  # extra ℓ∞ radii, pixel units
    sweep_step_ratio: float = 0.1  # ℓ∞ sweep: step = ratio · eps (the paper's eps/10)
    l2_eps: tuple[float, ...] = (0.5,)  # ℓ2 radii, pixel units over C·H·W
    l2_step_ratio: float = 1 / 8.5  # ℓ2: step = ratio · eps (the paper's eps/8.5)
    sweep_tasks: int = 100  # tasks (of the n_tasks) for the ε sweep and the ℓ2 attack
    corruptions: tuple[str, ...] = ("all",)  # ImageNet-C names, ("all",) = the 15, () = none
    severities: tuple[int, ...] = (1, 2, 3, 4, 5)  # corruption severities
    corruption_tasks: int = 100  # tasks (of the n_tasks) evaluated under every corruption
    val_tasks: int = 50  # validation tasks per domain and shot for tuning (>= 1 when a method has a grid)
    # a domain without validation classes holds out this fraction of every class's images (fixed, seeded) for
    # its validation tasks; test tasks never use them
    holdout_fraction: float = 0.2
    reference: str | None = "PM"  # method the paired differences are taken against (None: no differences)
    # top singular values per adapted layer whose change from the pre-trained weights is recorded (Figs. 2-3)
    spectra_top: int = 8


@dataclass(frozen=True)
class AutoAttackConfig:
    """AutoAttack for few-shot tasks (``amt.autoattack``), run on the final per-task model, ℓ∞ at the headline ε.

    ``"apgd"``: APGD-CE then APGD-T (targeted DLR, every one of the n_way − 1 other classes as a target);
    ``"standard"``: the reference ensemble, APGD-CE, APGD-T, FAB-T (n_way − 1 targets) and Square. A query
    counts as robust only if no attack of the ensemble flips it.
    """

    version: Literal["none", "apgd", "standard"] = "none"  # "none": not run
    steps: int = 100  # iterations of APGD and FAB (the reference AutoAttack's 100)
    restarts: int = 1  # restarts of APGD-CE (the reference: 1 in "standard")
    square_queries: int = 5000  # queries of the Square attack ("standard")
    n_tasks: int = 100  # tasks (of eval.n_tasks) attacked
    methods: tuple[str, ...] = ()  # evaluated methods attacked (names); () = every method
    shots: tuple[int, ...] = ()  # shot settings attacked (of eval.shots); () = every shot, the "vwvs" cell too


@dataclass(frozen=True)
class MaskingConfig:
    """Gradient-masking checks per method, domain and shot, on the first ``n_tasks`` tasks (``amt.evaluate``).

    Flags in ``results.json`` (true = a sign of masking): robust accuracy rises with ε beyond ``tolerance``;
    not near 0 (above ``tolerance``) at ``large_eps``; ``many_steps`` PGD steps better for the model than the
    headline's beyond ``tolerance``; the black-box Square attack stronger than the white-box attacks beyond
    ``tolerance``; zero input gradients for some query.
    """

    n_tasks: int = 0  # tasks checked (0: no checks)
    large_eps: float = 64 / 255  # ℓ∞ radius at which robust accuracy must be near 0, pixel units
    many_steps: int = 50  # PGD steps of the "more steps" check (the headline attack's step size and ε)
    square_queries: int = 1000  # queries of the black-box Square check
    tolerance: float = 2.0  # accuracy points allowed for noise in every check
    shots: tuple[int, ...] = ()  # shot settings checked (of eval.shots); () = every shot, the "vwvs" cell too


@dataclass(frozen=True)
class MergeConfig:
    """Test-time merging of the pool (rule "ttm", docs/method.md) and singular-value trimming.

    λ, β, ρ and the trimmed layer group are chosen per domain and shot from the ``*_grid`` values on
    validation tasks (``EvalConfig.val_tasks``); untuned (a single grid point, or the Python API without a
    tuning run) the first value of each grid is used, with no trimming unless ``rho_grid`` holds only ρ < 1.
    The pseudo-queries of the member scores are set in ``AugmentConfig``.
    """

    top_k: int = 2  # members merged per task
    lambda_grid: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)  # λ: weight of compactness vs divergence
    beta_grid: tuple[float, ...] = (1.0, 4.0, 8.0, 12.0)  # β: sharpness of u = exp(-β(1 - score))
    rho_grid: tuple[float, ...] = (1.0, 0.9, 0.75, 0.5)  # ρ: fraction of singular values kept (1 = no trim)
    trim_group_grid: tuple[Literal["attn", "mlp", "all"], ...] = ("attn", "mlp", "all")  # groups trimmed when ρ < 1
    trim_method: Literal["gram", "svd"] = "gram"  # "gram" (float64 Gram eigh, fastest) | "svd" (exact SVD)
    # Robustness-aware member scores (beyond the paper; γ = 0 is Algorithm 2 exactly): each member's compactness and
    # divergence also measured on one pseudo-query per support image attacked against it (PGD at the evaluation
    # attack's ε, CE, random start, step 2.5·ε/steps); Algorithm 2 on those scores gives ζ^adv, ζ = (1 − γ)ζ + γζ^adv.
    adv_weight_grid: tuple[float, ...] = (0.0,)  # γ in [0, 1], chosen with λ, β, ρ on validation tasks
    score_steps: int = 2  # PGD steps of the attack on the pseudo-queries (when some γ > 0)
    # What the grid point maximises on validation tasks: "clean" accuracy (the paper) | "robust" accuracy under a
    # selection attack (PGD at the evaluation attack's ε, `select_steps` steps of 2.5·ε/steps, random start, worst
    # case over iterates) | "balance": (1 − robust_weight)·clean + robust_weight·robust | "constrained": the most
    # robust grid point whose clean accuracy is within `clean_tolerance` points of the best clean grid point
    objective: Literal["clean", "robust", "balance", "constrained"] = "clean"
    robust_weight: float = 0.5  # weight of robust accuracy in "balance", in [0, 1]
    clean_tolerance: float = 1.0  # "constrained": clean accuracy points given up at most, on validation tasks
    select_steps: int = 5  # PGD steps of the selection attack ("robust", "balance")
    # rule "linear_classifier" (FLUTE-like, the paper's Table 6): per task, a softmax-linear classifier on the uniformly
    # merged pool's standardised features learns which member each pseudo-query was attacked against (member i's
    # training ε, `score_steps` PGD steps); ζ = its mean probabilities on the clean support images
    classifier_steps: int = 100  # full-batch Adam steps of the member classifier (zero init)
    classifier_lr: float = 0.05  # its Adam learning rate
    classifier_weight_decay: float = 1e-3  # its L2 penalty on the weights (not the bias), per task


@dataclass(frozen=True)
class MethodConfig:
    """One evaluated row: the pre-trained backbone (PM) or a trained pool with a merging rule."""

    name: str = "PM"  # row label in tables
    pool: str | None = None  # directory written by `amt train` (pool.json); None = the bare backbone (PM)
    # with a pool: "ttm" (test-time merging + trimming, Algorithm 2) | "uniform" (weight average) |
    # "logit_avg" (average of the members' logits) | "min_support_ce" (no TTM: one member per task) | "single" |
    # "linear_classifier" (FLUTE-like: ζ from a classifier of which member an attacked image targets; Table 6)
    rule: Literal["ttm", "uniform", "logit_avg", "min_support_ce", "single", "linear_classifier"] = "ttm"
    member_index: int = 0  # the member (0-based position in the pool) used by rule "single"
    finetune: bool = False  # test-time fine-tuning on the support set (AMT-FT, PMF+FT, ATTNSCALE)
    # what test-time fine-tuning trains: "full" (every backbone weight, PMF) | "attnscale" (ATTNSCALE: per-channel
    # scales of every attention's q, k, v and output, and a residual offset per block; the weights stay as they are)
    # | "lora" (test-time LoRA tuning: a fresh rank-`finetune.lora_rank` LoRA on qkv, proj, fc1, fc2, B = 0)
    finetune_params: Literal["full", "attnscale", "lora"] = "full"
    finetune_adversarial: bool = False  # Adv. TTF: also fit pseudo-queries attacked against the model being tuned
    # this row's changes to the experiment's `merge` section (e.g. {adv_weight_grid: [0], objective: clean}: the
    # paper's Algorithm 2 with clean-accuracy selection); {} = the merge section as it is
    merge: dict = field(default_factory=dict)


@dataclass(frozen=True)
class FinetuneConfig:
    """Test-time fine-tuning on the support set: Adam on the backbone (PMF) or on attention scales (ATTNSCALE),
    augmented support images as pseudo-queries; optionally adversarial (Adv. TTF). Rows choose which with
    ``MethodConfig.finetune_params`` and ``finetune_adversarial``."""

    steps: int = 20  # Adam steps per task
    lr: float = 1e-4  # Adam learning rate ("full")
    lr_grid: tuple[float, ...] = (0.0, 1e-5, 1e-4, 1e-3)  # chosen per domain on validation tasks ("full")
    attnscale_lr: float = 1e-2  # Adam learning rate of the attention scales and offsets ("attnscale")
    attnscale_lr_grid: tuple[float, ...] = (0.0, 1e-3, 1e-2, 1e-1)  # chosen per domain on validation tasks
    attnscale_offset: bool = True  # ATTNSCALE: also learn eTT's domain-residual offset after each attention
    lora_rank: int = 8  # test-time LoRA ("lora"): rank of the fresh adapter on every qkv, proj, fc1, fc2
    lora_lr: float = 1e-3  # Adam learning rate of its factors ("lora")
    lora_lr_grid: tuple[float, ...] = (0.0, 1e-4, 1e-3, 1e-2)  # chosen per domain on validation tasks ("lora")
    # Adv. TTF: each step's pseudo-queries are also attacked (PGD on CE against the ProtoNet of the weights being
    # tuned, random start) and the loss is CE(clean) + adv_weight · CE(attacked)
    attack: AttackConfig = field(default_factory=lambda: AttackConfig(eps=4.5 / 255, step_size=2.25 / 255, steps=2))
    adv_weight: float = 1.0  # weight of the attacked pseudo-queries' cross-entropy


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
    """APSV: adversarial perturbation of the trained member's LoRA factors A, B (docs/method.md, step 3).

    Switched on and off by ``TrainConfig.apsv``.
    """

    eta: float = 1e-4  # η1: relative mode, fraction of ‖T‖_F each factor moves by; absolute, step on ∂L/∂T
    # "relative": T += η1·‖T‖·g/‖g‖ per tensor (AWP, the authors' code) | "absolute": T += η1·g (the paper's text)
    mode: Literal["relative", "absolute"] = "relative"


@dataclass(frozen=True)
class PoolConfig:
    """The robust LoRA pool: one member per attack configuration (docs/method.md, Algorithm 1).

    Member i attacks with ``eps[i]`` and step ``step_ratio * eps``; the other attack settings come
    from ``attack``. Strategies: "separate" (member i uses eps[i]; the paper), "uniform" (every member
    uses the mean eps), "random" (every episode draws eps uniformly from the list).
    """

    eps: tuple[float, ...] = (0.01 / 255, 0.1 / 255, 6 / 255, 8 / 255)  # ℓ∞ radii, pixel units; P = len(eps)
    step_ratio: float = 0.5  # attack step = step_ratio * eps (docs/method.md decision: eps/2)
    strategy: Literal["separate", "uniform", "random"] = "separate"  # see the class docstring
    # members trained: 0 = one per ε; "uniform"/"random" may set any number (1: a single module, ε drawn per episode)
    size: int = 0
    attack: AttackConfig = field(
        default_factory=lambda: AttackConfig(steps=2, objective="kl")
    )  # template: norm, steps, objective, random start, pyramid; eps/step_size set per member


@dataclass(frozen=True)
class StyleAdvConfig:
    """StyleAdv (Fu et al., CVPR 2023), ``train.augment: styleadv`` (``amt.styleadv``): one signed-gradient (FGSM)
    step on the style — per image and channel, the mean μ and standard deviation σ over the tokens (over the
    pixels for the RGB image) — driven by the few-shot task loss of the whole episode; the loss adds the task
    CE of the style-attacked episode. Shifts are relative: μ' = μ ± ε·σ, σ' = σ·(1 ± ε)."""

    blocks: tuple[int, ...] = (0, 1)  # 0-based ViT blocks whose output token styles are attacked (the early ones)
    image: bool = True  # also attack the RGB style of the images (then clipped to [0, 1])
    eps: tuple[float, ...] = (0.008, 0.08, 0.8)  # relative radii, one drawn per episode (used for μ and σ)
    weight: float = 1.0  # weight of the style-attacked episode's CE in the loss (clean CE has weight 1)


@dataclass(frozen=True)
class RandConvConfig:
    """RandConv (Xu et al., ICLR 2021), ``train.augment: randconv`` (``amt.query_augment``): the queries filtered
    by one random convolution per episode, taking the adversarial queries' place in the AMT loss."""

    kernel_sizes: tuple[int, ...] = (1, 3, 5, 7)  # odd kernel sizes, one drawn per episode
    mix: bool = True  # blend with the input, x' = a·x + (1 − a)·conv(x), a ~ U(0, 1) per episode


@dataclass(frozen=True)
class ALTConfig:
    """ALT (Gokhale et al., WACV 2023), ``train.augment: alt`` (``amt.query_augment``): per episode a freshly
    initialised 5-layer 3×3 convolutional network (LeakyReLU) is trained by gradient ascent on the task loss of
    the queries it transforms, minus a consistency penalty; its output takes the adversarial queries' place."""

    steps: tuple[int, ...] = (10,)  # adversarial steps, drawn per episode ("ALT-pool": (1, 3, 5, 10))
    lr: float = 5e-5  # Adam learning rate of the ascent (the paper's ALT setting)
    width: int = 16  # channels of the hidden layers
    consistency: float = 1.0  # weight of the penalty mean((x' − x)²) subtracted from the ascended loss
    init_std: float = 0.2  # std of the random init of the weights (around an identity-like residual path)


@dataclass(frozen=True)
class PEFTConfig:
    """The FiLM and Adapter modules of ``train.mode: film | adapter`` (``amt.peft_modules``; paper Table 17)."""

    adapter_bottleneck: int = 64  # hidden width of the bottleneck adapters (AdaptFormer; the paper: 64)
    adapter_scale: float = 0.1  # s: the adapter's output is added as s·up(ReLU(down(x))) (AdaptFormer's 0.1)


@dataclass(frozen=True)
class TrainConfig:
    """Meta-tuning of one pool member (or of the clean baselines): schedule, loss and switches."""

    # "lora": one LoRA member (AMT, clean LoRA) | "full": the backbone (PMF) | "film": per-channel scale and shift
    # after every LayerNorm | "adapter": bottleneck adapters parallel to every MLP (`peft`; Table 17)
    mode: Literal["lora", "full", "film", "adapter"] = "lora"
    # episode augmentation (needs apq off; it replaces the query attack): "randconv" | "alt" (the augmented queries
    # take the adversarial queries' place in the loss; Table 16) | "styleadv" (own step, `styleadv`; Tables 1, 2)
    augment: Literal["none", "styleadv", "randconv", "alt"] = "none"
    styleadv: StyleAdvConfig = field(default_factory=StyleAdvConfig)
    randconv: RandConvConfig = field(default_factory=RandConvConfig)
    alt: ALTConfig = field(default_factory=ALTConfig)
    apq: bool = True  # APQ: adversarial query perturbation on/off (off: clean meta-tuning, one member)
    apsv: bool = True  # APSV: adversarial perturbation of the LoRA factors on/off (`perturb`; LoRA mode only)
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
    keep: Literal["best", "last"] = "best"  # weights written: "best" validation accuracy (paper) | "last" episode
    checkpoint_every: int = 100  # episodes between (atomic) resumable checkpoints
    seed: int = 0  # episodes, attack noise and initialisation; member i uses seed + i


@dataclass(frozen=True)
class StudyConfig:
    """`amt study`: which part of AMT does what, on the embedded benchmark, over several training seeds
    (docs/results.md). Every variant is meta-tuned per seed with the `train`/`pool` recipe, shortened to
    ``episodes`` per member; every seed is evaluated on the same tasks with ``eval``."""

    seeds: tuple[int, ...] = (0, 1, 2)  # train.seed of each repetition
    episodes: int = 120  # meta-tuning episodes per member
    n_tasks: int = 15  # clean tasks per domain and shot (eval.n_tasks)
    adv_tasks: int = 5  # of those, attacked with the headline attack (eval.adv_tasks)


@dataclass(frozen=True)
class DemoConfig:
    """`amt demo`: which pool its AMT row evaluates, and the short meta-tuning run it shows."""

    # the pool of the AMT row: a run directory (`amt train --out`), "embedded:NAME" (src/amt/assets/NAME, made by
    # `make pool`), or None: the demo meta-tunes the whole pool with `train` and `pool` first (minutes)
    pool: str | None = None
    train_member: int = 0  # with a given pool: the member (its ε) of the short meta-tuning run the demo shows
    train_episodes: int = 50  # episodes of that run (its validation: the first and the last episode)


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole run: which data, which backbone, which protocol."""

    benchmark: Literal["glyphs", "custom"] = "glyphs"  # "glyphs" (embedded, generated locally) | "custom" (`domains`)
    cache_dir: str = ".cache/amt"  # where the generated benchmark is written
    glyphs: GlyphConfig = field(default_factory=GlyphConfig)
    domains: tuple[DomainConfig, ...] = ()  # evaluation domains (filled in for the glyph benchmark)
    train_domain: DomainConfig | None = None  # source domain for (meta-)training
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    peft: PEFTConfig = field(default_factory=PEFTConfig)  # FiLM / Adapter modules (train.mode film | adapter)
    head: HeadConfig = field(default_factory=HeadConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    device: str = "auto"  # "auto" (CUDA when available, else CPU) | "cpu" | "cuda" | "cuda:N"
    # backbone autocast: "fp32" | "bf16" (CPU or CUDA) | "fp16" (CUDA, evaluation only)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    attack: AttackConfig = field(default_factory=AttackConfig)  # evaluation attack (the headline PGD)
    autoattack: AutoAttackConfig = field(default_factory=AutoAttackConfig)  # AutoAttack rows (off by default)
    masking: MaskingConfig = field(default_factory=MaskingConfig)  # gradient-masking checks (off by default)
    merge: MergeConfig = field(default_factory=MergeConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    methods: tuple[MethodConfig, ...] = (MethodConfig(),)  # rows evaluated by `amt evaluate`
    perturb: PerturbConfig = field(default_factory=PerturbConfig)  # APSV during meta-tuning (train.apsv)
    pool: PoolConfig = field(default_factory=PoolConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)  # `amt demo` only
    study: StudyConfig = field(default_factory=StudyConfig)  # `amt study` only


# Named meta-tuning variants: baselines and ablations as overrides of the same configuration
# (`amt train --variant NAME`); "amt" is the method itself. Each maps to the switches of TrainConfig,
# PoolConfig and LoRAConfig; nothing else changes between variants.
VARIANTS: dict[str, dict] = {
    "amt": {},  # APQ + APSV, pool of len(pool.eps) members, one ε each, SVD init
    "apq_only": {"train": {"apsv": False}},  # adversarial queries, no weight perturbation
    "uniform_pool": {"pool": {"strategy": "uniform"}},  # every member attacks with the mean ε
    "random_pool": {"pool": {"strategy": "random"}},  # ε drawn from the list every episode
    "clean_lora": {"train": {"apq": False, "apsv": False}},  # one clean LoRA, SVD init
    "clean_lora_standard": {"train": {"apq": False, "apsv": False}, "lora": {"init": "standard"}},
    "pmf": {"train": {"mode": "full", "apq": False, "apsv": False}},  # full backbone, clean
    # StyleAdv (Fu et al.): the full backbone, style-attacked episodes, no query or weight attack
    "styleadv": {"train": {"mode": "full", "augment": "styleadv", "apq": False, "apsv": False}},
    # Table 16: one LoRA, an augmentation in the adversarial queries' place (APSV off)
    "randconv": {"train": {"augment": "randconv", "apq": False, "apsv": False}},
    "alt": {"train": {"augment": "alt", "apq": False, "apsv": False}},
    "alt_pool": {"train": {"augment": "alt", "apq": False, "apsv": False, "alt": {"steps": [1, 3, 5, 10]}}},
    # Table 17: FiLM / Adapter modules instead of LoRA under APQ (APSV perturbs LoRA factors only): a pool of
    # len(pool.eps) members, one ε each, and a single module with ε drawn from the pool every episode
    "film_pool": {"train": {"mode": "film", "apsv": False}},
    "adapter_pool": {"train": {"mode": "adapter", "apsv": False}},
    "film": {"train": {"mode": "film", "apsv": False}, "pool": {"strategy": "random", "size": 1}},
    "adapter": {"train": {"mode": "adapter", "apsv": False}, "pool": {"strategy": "random", "size": 1}},
}
