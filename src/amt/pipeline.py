"""The runs behind the CLI verbs: resolve a config, build data and model, call the library, write a run dir.

A run directory (:mod:`amt.rundir`) holds the resolved configuration (``config.yaml``) next to its results.
Results are written atomically at the end of a successful run, so a failed run never replaces earlier results.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shlex
import sys
import time
from importlib import resources
from pathlib import Path

import torch

from amt.backbone import build_backbone, check_perturbations, precision_dtype
from amt.checkpoints import fingerprint, save_backbone
from amt.config import (
    ConfigError,
    DomainConfig,
    ExperimentConfig,
    MergeConfig,
    MethodConfig,
    from_dict,
    merge_dicts,
    to_dict,
    variant_overrides,
)
from amt.data.base import ImageDataset
from amt.data.domains import load_domain, validation_set
from amt.data.transforms import build_transform
from amt.distributed import close_distributed, init_distributed, is_main, world
from amt.evaluate import Interrupted, evaluate, write_results
from amt.methods import BackboneMethod, FinetunedMethod, Method, PoolMethod
from amt.rundir import (
    CONFIG_FILE,
    MANIFEST_FILE,
    PARTIAL_RESULTS_FILE,
    RESULTS_FILE,
    atomic_write,
    check_writable,
    read_manifest,
    run_lock,
    save_config,
    write_json,
)

log = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"


def embedded_asset(name: str) -> Path:
    """Path of a file shipped inside the package (``src/amt/assets``)."""
    return Path(str(resources.files("amt") / "assets" / name))


def pool_path(ref: str) -> str:
    """A method's ``pool``: ``embedded:NAME`` is the pool shipped in ``src/amt/assets/NAME`` (checked against its
    export record); anything else is a run directory, returned as it is."""
    if not ref.startswith(EMBEDDED_PREFIX):
        return ref
    from amt.rundir import check_export

    path = embedded_asset(ref[len(EMBEDDED_PREFIX):])
    if not path.is_dir():
        raise ConfigError(f"embedded pool {ref!r} is not shipped (looked for {path}); make it with `make pool` "
                          "(see src/amt/assets/README.md)")
    check_export(path)
    return str(path)


def resolve(cfg: ExperimentConfig) -> ExperimentConfig:
    """Fill in what a preset leaves implicit: the generated benchmark's domains, shipped checkpoints."""
    if cfg.benchmark == "glyphs":
        from amt.data.glyphs import build_glyph_benchmark, glyph_domains

        root = build_glyph_benchmark(cfg.glyphs, cfg.cache_dir)
        train, domains = glyph_domains(root)
        if cfg.glyphs.eval_domains:
            unknown = sorted(set(cfg.glyphs.eval_domains) - {d.name for d in domains})
            if unknown:
                raise ConfigError(f"glyphs.eval_domains: unknown domain(s) {unknown}; the benchmark has "
                                  f"{[d.name for d in domains]}")
            domains = tuple(d for d in domains if d.name in cfg.glyphs.eval_domains)
        cfg = dataclasses.replace(cfg, train_domain=cfg.train_domain or train, domains=cfg.domains or domains)
    elif cfg.benchmark != "custom":
        raise ConfigError(f"benchmark must be 'glyphs' or 'custom', got {cfg.benchmark!r}")
    if not cfg.domains:
        raise ConfigError("no evaluation domains: list them under `domains:` (name, path, format, splits, split)")
    return resolve_assets(cfg)


def resolve_assets(cfg: ExperimentConfig) -> ExperimentConfig:
    """Shipped files named ``embedded:NAME`` (the backbone checkpoint, method pools) as paths."""
    ckpt = cfg.backbone.checkpoint
    if ckpt and ckpt.startswith(EMBEDDED_PREFIX):
        path = embedded_asset(ckpt[len(EMBEDDED_PREFIX):] + ".safetensors")
        if not path.is_file():
            raise ConfigError(f"embedded checkpoint {ckpt!r} is not shipped (looked for {path}); "
                              f"recreate it with `amt pretrain` (see src/amt/assets/README.md)")
        cfg = dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, checkpoint=str(path)))
    methods = tuple(dataclasses.replace(m, pool=pool_path(m.pool)) if m.pool else m for m in cfg.methods)
    return dataclasses.replace(cfg, methods=methods)


def resolve_device(name: str) -> torch.device:
    """``cfg.device`` as a torch device: "auto" is CUDA when available (under torchrun, this rank's GPU)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={name!r} but CUDA is not available here; use device=cpu (or auto)")
        if device.index is None and "LOCAL_RANK" in os.environ:
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def domain_dataset(cfg: ExperimentConfig, domain: DomainConfig, train: bool = False,
                   split: str | None = None) -> ImageDataset:
    """``domain`` read at the backbone's input size, with training or evaluation transforms."""
    transform = build_transform(cfg.backbone.image_size, cfg.data, cfg.augment, train)
    return load_domain(domain, cfg.data, transform, split)


def build_methods(cfg: ExperimentConfig) -> tuple[dict[str, Method], str]:
    """The evaluated rows of ``cfg.methods``, each on its own copy of the configured backbone, and the
    backbone's fingerprint."""
    from amt.rundir import load_pool

    methods: dict[str, Method] = {}
    backbone_fp = None
    for m in cfg.methods:
        if m.name in methods:
            raise ConfigError(f"two evaluated methods are named {m.name!r}; give each a distinct `name`")
        if m.finetune and m.rule == "logit_avg" and m.pool is not None:
            raise ConfigError(f"{m.name}: test-time fine-tuning needs one model per task; rule 'logit_avg' has several")
        backbone = build_backbone(cfg.backbone).eval()
        backbone_fp = backbone_fp or fingerprint(backbone.vit)
        if m.pool is None:
            method = BackboneMethod(backbone, cfg.head.scale)
        else:
            pool = load_pool(backbone, m.pool, backbone_fp)
            merge = from_dict(MergeConfig, merge_dicts(to_dict(cfg.merge), m.merge)) if m.merge else cfg.merge
            method = (PoolMethod(backbone, pool, m.rule, merge, cfg.augment, m.member_index, cfg.attack)
                      if pool.names
                      else BackboneMethod(backbone, pool.scales[0]))  # PMF: a meta-tuned full backbone
        if m.finetune:
            method = FinetunedMethod(method, cfg.finetune, cfg.augment, m.finetune_params, m.finetune_adversarial)
        elif m.finetune_params != "full" or m.finetune_adversarial:
            raise ConfigError(f"{m.name}: finetune_params/finetune_adversarial describe test-time fine-tuning; "
                              "set finetune: true on the row")
        methods[m.name] = method
    return methods, backbone_fp


def pool_spectra(methods: dict[str, Method], reference: torch.nn.Module, top: int) -> dict:
    """Per evaluated method: the top ``top`` singular values of every block's mlp.fc1, mlp.fc2 and attn.proj weight
    (a pool: its uniform merge) next to those of the pre-trained ``reference`` backbone (:mod:`amt.spectra`;
    paper Figs. 2–3). A method without a model is left out."""
    from amt.spectra import method_spectra

    return {name: method_spectra(method.model, method.pool_names, reference, top)
            for name, method in methods.items() if getattr(method, "model", None) is not None}


def validation_sets(domains: list[DomainConfig], cfg: ExperimentConfig) -> dict[str, ImageDataset]:
    """Per domain name: the dataset of its validation classes, for the domains that have at least n_way of them
    (the others hold out images of their test classes: :func:`amt.evaluate.evaluate`)."""
    transform = build_transform(cfg.backbone.image_size, cfg.data, cfg.augment, train=False)
    fewest = cfg.eval.variable.min_ways if cfg.eval.episodes == "variable" else cfg.eval.n_way
    out = {}
    for d in domains:
        val = validation_set(d, cfg.data, transform, fewest)
        if val is not None:
            out[d.name] = val
    return out


def run_evaluate(cfg: ExperimentConfig, out_dir: str | Path) -> dict:
    """Evaluate ``cfg.methods`` (PM and trained pools) on every domain: clean, adversarial, corrupted."""
    out_dir = Path(out_dir)
    check_writable(out_dir)  # before the work, not after it
    with run_lock(out_dir, "amt evaluate"):
        try:
            return _evaluate_run(cfg, out_dir)
        except Interrupted as exc:
            if is_main():
                path = out_dir / PARTIAL_RESULTS_FILE
                write_json(path, exc.results)
                log.warning("%s; the finished cells are in %s (amt report %s)", exc.results["partial"], path, path)
            raise


def _evaluate_run(cfg: ExperimentConfig, out_dir: Path) -> dict:
    cfg = resolve(cfg)
    torch.manual_seed(cfg.eval.seed)
    started = init_distributed()  # under torchrun: tasks are shared out across ranks and gathered
    try:
        device = resolve_device(cfg.device)
        methods, backbone_fp = build_methods(cfg)
        fine_tuned = any(m.finetune for m in cfg.methods)
        dtype = precision_dtype(cfg.precision, device, training=fine_tuned)
        if cfg.eval.adversarial and cfg.attack.norm == "linf":
            check_perturbations(dtype, (cfg.attack.eps, *cfg.eval.eps_sweep), cfg.backbone.std)
        for method in methods.values():
            method.model.to(device).autocast_dtype = dtype
        domains = [(d, domain_dataset(cfg, d)) for d in cfg.domains]
        tunable = any(m.tunable for m in methods.values())
        validation = validation_sets(cfg.domains, cfg) if tunable else {}
        results = evaluate(methods, domains, cfg.eval, cfg.attack if cfg.eval.adversarial else None, validation,
                           device=device, autoattack=cfg.autoattack, masking=cfg.masking)
        results["device"] = str(device)
        results["precision"] = cfg.precision
        results["processes"] = world()[0]
        results["backbone"] = {"arch": cfg.backbone.arch, "checkpoint": cfg.backbone.checkpoint,
                               "fingerprint": backbone_fp}
        results["methods"] = [to_dict(m) for m in cfg.methods]
        results["spectra"] = pool_spectra(methods, build_backbone(cfg.backbone).eval(), cfg.eval.spectra_top)
        if is_main():
            write_results(results, out_dir)
            save_config(cfg, out_dir / CONFIG_FILE)
    finally:
        if started:
            close_distributed()
    return results


def run_pretrain(cfg: ExperimentConfig, out: str | Path) -> dict:
    """Pre-train the configured backbone on the training domain; write ``out`` (.safetensors) + ``.json``."""
    from amt.pretrain import pretrain

    cfg = resolve(dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, checkpoint=None,
                                                                         random_init=True)))
    if cfg.train_domain is None:
        raise ConfigError("pretraining needs `train_domain`")
    out = Path(out).with_suffix(".safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.pretrain.seed)
    backbone = build_backbone(cfg.backbone)
    train = domain_dataset(cfg, cfg.train_domain, train=True)
    metrics = pretrain(backbone, train, cfg.pretrain, backbone.embed_dim)
    with atomic_write(out) as tmp:
        save_backbone(backbone, tmp)
    info = {
        "arch": cfg.backbone.arch, "image_size": cfg.backbone.image_size,
        "mean": list(cfg.backbone.mean), "std": list(cfg.backbone.std),
        "fingerprint": fingerprint(backbone.vit), "metrics": metrics,
        "train_domain": cfg.train_domain.name, "train_classes": len(train.class_names),
        "pretrain": to_dict(cfg.pretrain), "data": to_dict(cfg.data), "augment": to_dict(cfg.augment),
        "glyphs": to_dict(cfg.glyphs),
        "command": "amt " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "torch": torch.__version__,
    }
    write_json(out.with_suffix(".json"), info)
    log.info("wrote %s (fingerprint %s)", out, info["fingerprint"])
    return info


def with_variant(cfg: ExperimentConfig, name: str) -> ExperimentConfig:
    """``cfg`` with the overrides of meta-tuning variant ``name`` (:data:`amt.config.VARIANTS`)."""
    return from_dict(ExperimentConfig, merge_dicts(to_dict(cfg), variant_overrides(name)))


def shortened(cfg: ExperimentConfig, variant: str, episodes: int, val_every: int,
              seed: int | None = None) -> ExperimentConfig:
    """``cfg`` with meta-tuning variant ``variant`` cut to one epoch of ``episodes`` episodes (warm-up at most a
    tenth of it), validated every ``val_every`` episodes and at the end, one checkpoint at the end; ``seed``:
    another ``train.seed``. The demo's short run and the study's pools."""
    vcfg = with_variant(cfg, variant)
    train = dataclasses.replace(vcfg.train, epochs=1, episodes_per_epoch=episodes, val_every=val_every,
                                checkpoint_every=episodes, warmup_epochs=min(vcfg.train.warmup_epochs, 0.1),
                                seed=vcfg.train.seed if seed is None else seed)
    return dataclasses.replace(vcfg, train=train)


def run_demo(cfg: ExperimentConfig, out_dir: str | Path) -> str:
    """The main job on the embedded default: PM and AMT (test-time merged, trimmed pool) evaluated on clean,
    adversarial and corrupted queries in and out of domain, with paired differences, and the report.

    With ``demo.pool`` set (the embedded default ships its pool), AMT is that pool and the demo shows meta-tuning
    at work in a short run of one member (``demo.train_member``, ``demo.train_episodes``) into ``out/short_run``;
    with ``demo.pool: null`` it meta-tunes the whole pool into ``out/amt`` (reused when finished with the same
    settings). Returns the printed text."""
    from amt.report import render_report, training_table

    start = time.perf_counter()
    out = Path(out_dir)
    tables = []
    if cfg.demo.pool:
        pool = pool_path(cfg.demo.pool)
        if not 0 <= cfg.demo.train_member < len(cfg.pool.eps):
            raise ConfigError(f"demo.train_member={cfg.demo.train_member}: the pool has {len(cfg.pool.eps)} members")
        if cfg.demo.train_episodes > 0:
            n = cfg.demo.train_episodes  # validated halfway and at the end
            manifest = run_train(shortened(cfg, "amt", n, max(1, n // 2)), out / "short_run",
                                 members=[cfg.demo.train_member], resume=True)
            tables.append(f"Meta-tuning, a short run of member {cfg.demo.train_member} ({out / 'short_run'}; the "
                          f"evaluated pool was trained with `make pool`):\n\n{training_table(manifest)}")
        tables.append(f"The evaluated AMT pool ({cfg.demo.pool}):\n\n{training_table(read_manifest(Path(pool)))}")
    else:
        pool = str(out / "amt")
        manifest = run_train(with_variant(cfg, "amt"), pool, resume=True)
        tables.append(f"Meta-tuning the AMT pool ({pool}):\n\n{training_table(manifest)}")
    methods = (MethodConfig("PM"), MethodConfig("AMT", pool=pool, rule="ttm"))
    run_evaluate(dataclasses.replace(cfg, methods=methods), out)
    tables.append(render_report(out / RESULTS_FILE, out / "report"))
    tables.append(f"Full report: {out / 'report' / 'report.md'}")
    log.info("demo finished in %.0f s; results in %s", time.perf_counter() - start, out)
    return "\n\n".join(tables)


def run_train(
    cfg: ExperimentConfig,
    out_dir: str | Path,
    members: list[int] | None = None,
    resume: bool = False,
    stop_after: int | None = None,
) -> dict:
    """Meta-tune the pool (or one baseline) on the training domain; returns the pool manifest.

    Writes ``out_dir/pool.json`` (backbone and W_res fingerprints, configuration, one record per member) and
    per member ``member{i}/`` with ``weights.safetensors``, ``state.pt``, ``metrics.jsonl``, ``member.json``
    (:mod:`amt.rundir`). ``members``: 0-based indices to train (default: all, one after the other).
    """
    from amt.lora import inject_lora, residual_fingerprint
    from amt.peft_modules import PEFT_MODES, inject_peft
    from amt.rundir import (
        MEMBER_RECORD_FILE,
        check_fingerprint,
        member_dir,
        member_names,
        read_manifest,
        write_manifest,
    )
    from amt.train import MemberSpec, MetaTuning, check_settings, member_record, train_member

    settings = MetaTuning(cfg.train, cfg.pool, cfg.perturb, cfg.head)
    check_settings(settings, world()[0])  # before anything is generated or written
    cfg = resolve(cfg)
    if cfg.train_domain is None:
        raise ConfigError("meta-tuning needs `train_domain`")
    out = Path(out_dir)
    backbone = build_backbone(cfg.backbone).eval()
    fp = fingerprint(backbone.vit)
    if (out / MANIFEST_FILE).exists():
        check_fingerprint(read_manifest(out), fp, out)
    header = {"backbone_fingerprint": fp, "mode": cfg.train.mode, "config": to_dict(cfg)}
    if cfg.train.mode == "lora":
        names: list[str | None] = list(member_names(len(cfg.pool.eps), cfg.train.apq, cfg.pool.size))
        inject_lora(backbone.vit, cfg.lora.targets, names, cfg.lora.rank, cfg.lora.scaling, cfg.lora.init,
                    generator=torch.Generator().manual_seed(cfg.train.seed))
        header["residual_fingerprint"] = residual_fingerprint(backbone.vit)
    elif cfg.train.mode in PEFT_MODES:  # FiLM / Adapter pools (Table 17): no frozen residual to fingerprint
        names = list(member_names(len(cfg.pool.eps), cfg.train.apq, cfg.pool.size))
        inject_peft(backbone.vit, cfg.train.mode, names, cfg.peft,
                    generator=torch.Generator().manual_seed(cfg.train.seed))
    else:
        names = [None]
    indices = list(range(len(names))) if members is None else members
    bad = [i for i in indices if not 0 <= i < len(names)]
    if bad:
        raise ConfigError(f"--member {bad} out of range: this pool has {len(names)} member(s) (0..{len(names) - 1})")
    train_set = domain_dataset(cfg, cfg.train_domain, train=True)
    val_set = domain_dataset(cfg, cfg.train_domain, split="val")
    device = resolve_device(cfg.device)
    dtype = precision_dtype(cfg.precision, device, training=True)
    check_perturbations(dtype, cfg.pool.eps if cfg.train.apq else (), cfg.backbone.std,
                        cfg.perturb.eta if cfg.train.apsv and cfg.perturb.mode == "relative" else None)
    check_writable(out)
    with run_lock(out, "amt train"):
        started = init_distributed()
        backbone.to(device)
        backbone.autocast_dtype = dtype
        main_rank = is_main()
        try:
            if main_rank:
                save_config(cfg, out / CONFIG_FILE)
            for i in indices:
                spec = MemberSpec(i, names[i], member_dir(out, i))
                summary = train_member(backbone, spec, train_set, val_set, settings, resume=resume,
                                       stop_after=stop_after)
                if main_rank:
                    write_json(spec.out_dir / MEMBER_RECORD_FILE, member_record(spec, cfg.pool, cfg.train, summary))
                    log.info("member %d: %d episodes, best validation %.2f%% at episode %d", i,
                             summary["episodes"], summary["best"]["val_acc"], summary["best"]["episode"])
            manifest = write_manifest(out, header) if main_rank else {}
        finally:
            if started:
                close_distributed()
    return manifest
