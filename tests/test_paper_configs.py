"""The paper presets (configs/paper/*.yaml) load and carry the settings documented in docs/paper.md.

Fast: configuration only, no data, weights or models are touched (placeholder paths stay unresolved).
"""

from pathlib import Path

import pytest

from amt.config import VARIANTS, load_config, merge_dicts, parse_override, to_dict, variant_overrides

PAPER = Path(__file__).resolve().parents[1] / "configs" / "paper"
PRESETS = sorted(PAPER.glob("*.yaml"))
NAMES = [p.name for p in PRESETS]
# Sections every preset repeats verbatim (the files are standalone; there is no include mechanism).
SHARED = ("benchmark", "data", "augment", "lora", "head", "pool", "perturb", "train", "attack", "eval", "merge",
          "finetune", "methods", "train_domain")
META_DATASET = ["ilsvrc_2012", "omniglot", "aircraft", "cu_birds", "dtd", "quickdraw", "fungi", "vgg_flower",
                "traffic_sign", "mscoco"]


def _load(name, overrides=None):
    return load_config(PAPER / name, overrides)


def test_expected_presets_exist():
    assert {"dino_vits16.yaml", "metadataset.yaml", "bscdfsl.yaml", "finegrained.yaml", "ibot_vits16.yaml",
            "deit_small.yaml"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_preset_loads_with_paper_settings(name):
    cfg = _load(name)
    assert cfg.benchmark == "custom"
    # backbone: ViT-S/16 at 128 px, local placeholder checkpoint, ImageNet normalisation
    assert cfg.backbone.arch == "vit_small_patch16_224" and cfg.backbone.image_size == 128
    assert cfg.backbone.checkpoint and cfg.backbone.checkpoint.endswith(".pth")
    assert cfg.backbone.mean == pytest.approx((0.485, 0.456, 0.406))
    assert cfg.backbone.std == pytest.approx((0.229, 0.224, 0.225))
    assert round(cfg.backbone.image_size * cfg.data.resize_ratio) == 146
    # LoRA rank 8 on qkv / proj / fc1 / fc2, SVD init
    assert cfg.lora.rank == 8 and cfg.lora.scaling == 1.0 and cfg.lora.init == "svd"
    assert set(cfg.lora.targets) == {"attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"}
    # pool: 4 members, eps {0.01, 0.1, 6, 8}/255, 2 KL steps, step eps/2
    assert len(cfg.pool.eps) == 4
    assert [e * 255 for e in cfg.pool.eps] == pytest.approx([0.01, 0.1, 6.0, 8.0], rel=1e-4)
    assert cfg.pool.step_ratio == 0.5 and cfg.pool.strategy == "separate"
    assert cfg.pool.attack.steps == 2 and cfg.pool.attack.objective == "kl" and cfg.pool.attack.norm == "linf"
    # APSV and the meta-tuning schedule
    assert cfg.train.apsv and cfg.perturb.eta == pytest.approx(1e-4) and cfg.perturb.mode == "relative"
    t = cfg.train
    assert (t.mode, t.apq, t.epochs, t.warmup_epochs, t.episodes_per_epoch) == ("lora", True, 30, 5, 2000)
    assert t.lr == pytest.approx(5e-4) and t.momentum == 0.9 and t.weight_decay == 0.0
    assert t.lambda_adv == 6.0 and (t.n_way, t.n_shot) == (5, 1)
    # evaluation: 600 tasks, PGD-10 l_inf eps 4.5/255 step eps/10, 5-way {1, 5}-shot, 15 queries
    assert cfg.eval.n_tasks == 600 and cfg.eval.adv_tasks == 600 and cfg.eval.adversarial
    assert cfg.eval.shots == (1, 5) and cfg.eval.n_way == 5 and cfg.eval.n_query == 15
    a = cfg.attack
    assert a.norm == "linf" and a.steps == 10 and a.objective == "ce"
    assert a.eps == pytest.approx(4.5 / 255, rel=1e-4) and a.step_size == pytest.approx(a.eps / 10, rel=1e-4)
    assert cfg.merge.top_k == 2 and 1.0 in cfg.merge.rho_grid
    # source domain: Meta-Dataset ImageNet train classes, with a splits file (its "val" classes select members)
    td = cfg.train_domain
    assert td is not None and td.name == "ilsvrc_2012" and td.split == "train"
    assert td.format == "metadataset" and td.in_domain
    # every evaluation domain is well formed
    assert cfg.domains
    assert len({d.name for d in cfg.domains}) == len(cfg.domains)
    for d in cfg.domains:
        assert d.format in ("folder", "csv", "metadataset", "isic", "chestx", "filelist") and d.path
        assert (d.split is None) or d.splits or d.format == "metadataset", f"{d.name}: a split needs a splits file"


@pytest.mark.parametrize("name", NAMES)
def test_shared_sections_identical_across_presets(name):
    base, cfg = to_dict(_load("dino_vits16.yaml")), to_dict(_load(name))
    for key in SHARED:
        assert cfg[key] == base[key], f"{name}: section {key!r} differs from dino_vits16.yaml"


def test_dino_base_preset():
    cfg = _load("dino_vits16.yaml")
    assert Path(cfg.backbone.checkpoint).name == "dino_deitsmall16_pretrain.pth"
    assert [d.name for d in cfg.domains] == ["ilsvrc_2012"] and cfg.domains[0].in_domain


@pytest.mark.parametrize("name", ["metadataset.yaml", "ibot_vits16.yaml", "deit_small.yaml"])
def test_meta_dataset_domains(name):
    cfg = _load(name)
    assert [d.name for d in cfg.domains] == META_DATASET
    assert [d.name for d in cfg.domains if d.in_domain] == ["ilsvrc_2012"]
    assert all(d.split == "test" and d.format == "metadataset" for d in cfg.domains)


def test_bscdfsl_domains():
    cfg = _load("bscdfsl.yaml")
    formats = {d.name: d.format for d in cfg.domains}
    assert formats == {"chestx": "chestx", "isic": "isic", "eurosat": "folder", "cropdisease": "folder"}
    assert not any(d.in_domain for d in cfg.domains)


def test_finegrained_domains():
    cfg = _load("finegrained.yaml")
    assert [d.name for d in cfg.domains] == ["cub", "cars", "places", "plantae"]
    assert not any(d.in_domain for d in cfg.domains)
    assert all(d.format == "filelist" and d.path.endswith("novel.json") for d in cfg.domains)


def test_backbone_variants():
    assert "ibot" in _load("ibot_vits16.yaml").backbone.checkpoint
    assert "deit_small" in _load("deit_small.yaml").backbone.checkpoint


def _leaves(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out |= _leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


EXPECTED_SWITCHES = {  # what each variant changes in the paper preset, and nothing else
    "amt": {},
    "apq_only": {"train.apsv": False},
    "uniform_pool": {"pool.strategy": "uniform"},
    "random_pool": {"pool.strategy": "random"},
    "clean_lora": {"train.apq": False, "train.apsv": False},
    "clean_lora_standard": {"train.apq": False, "train.apsv": False, "lora.init": "standard"},
    "pmf": {"train.mode": "full", "train.apq": False, "train.apsv": False},
    "styleadv": {"train.mode": "full", "train.augment": "styleadv", "train.apq": False, "train.apsv": False},
    "randconv": {"train.augment": "randconv", "train.apq": False, "train.apsv": False},
    "alt": {"train.augment": "alt", "train.apq": False, "train.apsv": False},
    "alt_pool": {"train.augment": "alt", "train.apq": False, "train.apsv": False, "train.alt.steps": [1, 3, 5, 10]},
    "film_pool": {"train.mode": "film", "train.apsv": False},
    "adapter_pool": {"train.mode": "adapter", "train.apsv": False},
    "film": {"train.mode": "film", "train.apsv": False, "pool.strategy": "random", "pool.size": 1},
    "adapter": {"train.mode": "adapter", "train.apsv": False, "pool.strategy": "random", "pool.size": 1},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_changes_exactly_its_switches_in_the_presets(variant):
    base = _leaves(to_dict(_load("metadataset.yaml")))
    cfg = _load("metadataset.yaml", variant_overrides(variant))
    got = _leaves(to_dict(cfg))
    assert {k: v for k, v in got.items() if base[k] != v} == EXPECTED_SWITCHES[variant]
    # variants never touch the attack template, so the pool still attacks with 2 KL steps
    assert cfg.pool.attack.steps == 2 and cfg.pool.attack.objective == "kl"


def test_documented_overrides_parse():
    """The --set lines used in docs/paper.md build valid configurations."""
    sets = [
        "methods=[{name: PM}, {name: AMT, pool: runs/paper/amt_1shot, rule: ttm},"
        " {name: AMT-FT, pool: runs/paper/amt_1shot, rule: ttm, finetune: true}]",
        "eval.shots=[1]",
        "merge.rho_grid=[1.0]",
        "pool.attack.steps=5",
        "eval.eps_sweep=[0.00392157, 0.00784314, 0.0313725]",
        "eval.l2_eps=[0.25, 0.5, 1.0]",
        "eval.corruptions=[all]",
        "train.n_shot=5",
    ]
    overrides: dict = {}
    for s in sets:
        overrides = merge_dicts(overrides, parse_override(s))
    cfg = _load("metadataset.yaml", overrides)
    assert [m.name for m in cfg.methods] == ["PM", "AMT", "AMT-FT"] and cfg.methods[2].finetune
    assert cfg.eval.shots == (1,) and cfg.merge.rho_grid == (1.0,) and cfg.train.n_shot == 5
    assert cfg.pool.attack.steps == 5 and cfg.pool.attack.objective == "kl"  # the rest of the template kept
    assert cfg.eval.corruptions == ("all",) and len(cfg.eval.eps_sweep) == 3


def test_the_expected_switches_cover_every_variant():
    assert set(EXPECTED_SWITCHES) == set(VARIANTS)


@pytest.mark.parametrize("name", NAMES)
def test_presets_resolve_without_touching_the_placeholder_paths(name):
    """`resolve` (what every CLI verb runs first) keeps a custom preset's domains and checkpoint as written;
    the readers and the checkpoint loader are what name a missing file, when a run opens it."""
    from amt.pipeline import resolve

    cfg = _load(name)
    resolved = resolve(cfg)
    assert resolved.domains == cfg.domains and resolved.train_domain == cfg.train_domain
    assert resolved.backbone.checkpoint == cfg.backbone.checkpoint
    assert resolved.precision == "fp32" and resolved.merge.trim_method == "gram"


def test_metadataset_preset_runs_on_a_copy_laid_out_as_the_official_converter_writes_it(tmp_path):
    """configs/paper/metadataset.yaml with its /path/to/metadataset placeholders pointed at tiny converted copies
    (<records>/<dataset>/dataset_spec.json + <class id>.tfrecords, the published spec shapes): the training
    domain's train and validation classes and every evaluation domain load as `amt train` / `amt evaluate` open
    them, and each evaluation domain gives a 5-way episode."""
    import torch

    from amt.data.episodes import FixedSampler, load_episode
    from amt.pipeline import domain_dataset, resolve, validation_sets
    from test_metadataset import bilevel_spec, flat_spec, hierarchical_spec, write_converted

    records = tmp_path / "records"
    specs = {  # a few classes per split, in each source's published shape and split pattern
        "ilsvrc_2012": hierarchical_spec("ilsvrc_2012", {"TRAIN": (6, 3), "VALID": (5, 2), "TEST": (5, 3)}),
        "omniglot": bilevel_spec("omniglot", {"TRAIN": [3, 2], "VALID": [5], "TEST": [2, 3]}),
        "traffic_sign": flat_spec("traffic_sign", (0, 0, 6)),
        "mscoco": flat_spec("mscoco", (0, 5, 5)),
    }
    base = _load("metadataset.yaml")
    for d in base.domains:
        write_converted(records / d.name, specs.get(d.name) or flat_spec(d.name, (5, 5, 5)))
    domains = [dict(to_dict(d), path=str(records / d.name)) for d in base.domains]
    cfg = resolve(_load("metadataset.yaml", {"train_domain": {"path": str(records / "ilsvrc_2012")},
                                             "domains": domains}))
    assert cfg.train_domain.path == str(records / "ilsvrc_2012") and [d.name for d in cfg.domains] == META_DATASET

    train = domain_dataset(cfg, cfg.train_domain, train=True)  # what `amt train` opens
    val = domain_dataset(cfg, cfg.train_domain, split="val")
    assert len(train.class_names) == 6 and len(val.class_names) == 5
    assert train.class_names == sorted(train.class_names)  # ImageNet class ids: sorted WordNet ids of each split
    assert train[0][0].shape == (3, cfg.backbone.image_size, cfg.backbone.image_size)
    assert set(validation_sets(cfg.domains, cfg)) == set(META_DATASET) - {"traffic_sign"}  # no VALID classes
    for d in cfg.domains:  # what `amt evaluate` opens
        ds = domain_dataset(cfg, d)
        sampler = FixedSampler(ds.indices_by_class(), n_way=cfg.eval.n_way, n_shot=1, n_query=2,
                               generator=torch.Generator().manual_seed(0), name=d.name)
        ep = load_episode(ds, sampler.sample())
        assert ep.support_images.shape == (5, 3, 128, 128) and ep.query_images.shape == (10, 3, 128, 128), d.name
