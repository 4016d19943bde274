"""`amt <verb>`: flags → config → one library call each."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import typing
from pathlib import Path

from amt.config import (
    VARIANTS,
    ConfigError,
    DomainConfig,
    ExperimentConfig,
    load_config,
    merge_dicts,
    parse_override,
    variant_overrides,
)
from amt.rundir import PARTIAL_RESULTS_FILE, RESULTS_FILE

DEFAULT_CONFIG = "configs/embedded.yaml"
# `amt data check --format`: the formats a domain accepts (amt.data.readers.READERS has one reader for each)
DATA_FORMATS = typing.get_args(typing.get_type_hints(DomainConfig)["format"])


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every verb; each sub-parser names its handler in ``run``."""
    parser = argparse.ArgumentParser(prog="amt", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="verb", required=True)

    p = sub.add_parser("demo", help="run the main job on the embedded glyph benchmark and print the table")
    _add_config(p, out_default="runs/demo")
    p.set_defaults(run=cmd_demo)

    p = sub.add_parser("study", help="which part of AMT does what: variants meta-tuned over several seeds, paired "
                                     "differences to PM (docs/results.md)")
    _add_config(p, out_default="runs/study")
    p.set_defaults(run=cmd_study)

    p = sub.add_parser("evaluate", help="few-shot accuracy of PM and trained pools (`methods:`): clean, "
                                        "adversarial, corrupted")
    _add_config(p, out_default="runs/evaluate")
    p.add_argument("--domain", action="append", metavar="PATH",
                   help="evaluate on this folder of class folders of images instead of the preset's domains "
                        "(repeatable; named after the folder; the preset's backbone, data, protocol and merge "
                        "settings are kept; validation tasks use held-out images of each class)")
    p.add_argument("--pool", action="append", metavar="RUN",
                   help="evaluate PM and the pool RUN (`amt train --out`, or embedded:glyph_pool) with rule ttm "
                        "instead of the preset's `methods:` (repeatable)")
    p.set_defaults(run=cmd_evaluate)

    p = sub.add_parser("pretrain", help="supervised pre-training of a backbone on the training domain")
    _add_config(p)
    p.add_argument("--out", required=True, help="output weights file (.safetensors; a .json is written beside)")
    p.set_defaults(run=cmd_pretrain)

    p = sub.add_parser("train", help="meta-tune the LoRA pool (AMT) or a baseline on the training domain")
    _add_config(p, out_default="runs/pool")
    p.add_argument("--variant", default="amt", choices=sorted(VARIANTS),
                   help="method or ablation to train (default: %(default)s); --set applies on top")
    p.add_argument("--member", type=int, action="append", metavar="I",
                   help="train only pool member I, 0-based (repeatable; default: all, one after the other)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out exactly")
    p.add_argument("--stop-after", type=int, metavar="N",
                   help="checkpoint and stop once N episodes are done (continue later with --resume)")
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("predict", help="classify your own images from a few labelled examples per class (CSV)")
    _add_config(p)
    p.add_argument("--support", required=True, metavar="DIR", help="folder with one sub-folder of images per class")
    p.add_argument("--query", required=True, nargs="+", metavar="PATH", help="image files or folders of images")
    p.add_argument("--pool", metavar="RUN", help="a trained pool (or embedded:glyph_pool): AMT; default PM")
    p.add_argument("--robustness", action="store_true",
                   help="add min_eps: the smallest l_inf radius (pixels, bisection) at which PGD flips the prediction")
    p.add_argument("--out", required=True, help="CSV file: path, label, one probability column per class[, min_eps]")
    p.set_defaults(run=cmd_predict)

    p = sub.add_parser("app", help="a browser app: PM and AMT side by side on your own images, and under attack "
                                   "(needs pip install -e '.[app]')")
    _add_config(p)
    p.add_argument("--pool", default="embedded:glyph_pool",
                   help="the pool AMT uses: a run directory or embedded:NAME (default: %(default)s); 'none': PM only")
    p.add_argument("--port", type=int, help="port (default: a free one from 7860 up)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine only)")
    p.set_defaults(run=cmd_app)

    p = sub.add_parser("export-pool", help="copy a finished pool without its training state, with the sha256 of "
                                           "every file (how the shipped pool is made: `make pool`)")
    p.add_argument("run_dir", metavar="run", help="pool directory written by `amt train --out`")
    p.add_argument("dest", help="new folder (or an earlier export, which is replaced)")
    p.set_defaults(run=cmd_export_pool)

    p = sub.add_parser("export", help="write a trained pool as PEFT LoRA adapters (one folder per member, for the "
                                      "unmodified timm backbone) with a model card README.md")
    _add_config(p)
    p.add_argument("--pool", required=True, metavar="RUN", help="pool directory (`amt train --out`) or "
                   "embedded:glyph_pool; --config must name its backbone")
    p.add_argument("--format", default="peft", help="output format (default: %(default)s; the only one)")
    p.add_argument("--out", required=True, metavar="DIR", help="new or empty folder (nothing is overwritten)")
    p.add_argument("--results", metavar="RESULTS_JSON", help="results.json of `amt evaluate`/`amt demo`: its "
                   "clean, robust and corrupted accuracy go into the model card")
    p.set_defaults(run=cmd_export)

    p = sub.add_parser("report", help="render tables (Markdown, CSV) and figures from a run's results.json")
    p.add_argument("run_dir", metavar="run", help="run directory holding results.json (or the results file itself)")
    p.add_argument("--out", help="report directory (default: RUN/report)")
    p.set_defaults(run=cmd_report)

    p = sub.add_parser("data", help="check a dataset copy: `amt data check PATH --format FORMAT`")
    p.add_argument("action", choices=["check"])
    p.add_argument("path", help="the domain's `path` for its format (docs/data.md): folder, CSV or JSON file")
    p.add_argument("--format", default="folder", choices=DATA_FORMATS)
    p.add_argument("--splits", help="class-split JSON file")
    p.add_argument("--split", help="split to check (train / val / test)")
    p.add_argument("--n-way", type=int, default=5)
    p.add_argument("--n-shot", type=int, default=5)
    p.add_argument("--n-query", type=int, default=15)
    p.set_defaults(run=cmd_data)

    p = sub.add_parser("glyphs", help="generate the embedded glyph benchmark and print its folder")
    _add_config(p)
    p.set_defaults(run=cmd_glyphs)
    return parser


def _add_config(p: argparse.ArgumentParser, out_default: str | None = None) -> None:
    p.add_argument("--config", default=DEFAULT_CONFIG, help="YAML preset (default: %(default)s, found from any "
                   "folder of a source checkout)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config value, e.g. --set eval.n_tasks=50 or --set attack.eps=8/255 (repeatable); "
                   f"sections: {', '.join(f.name for f in dataclasses.fields(ExperimentConfig))} "
                   "(their fields: src/amt/config/sections.py)")
    if out_default is not None:
        p.add_argument("--out", default=out_default, help="output directory (default: %(default)s)")


def _shortcut_overrides(args: argparse.Namespace) -> dict:
    """`amt evaluate --domain PATH --pool RUN` as config overrides (domains, methods)."""
    out: dict = {}
    folders = [Path(p) for p in getattr(args, "domain", None) or []]
    if folders:
        missing = [str(p) for p in folders if not p.is_dir()]
        if missing:
            raise ConfigError(f"--domain {missing}: not a folder; give a folder holding one sub-folder of images per "
                              "class (check it with `amt data check PATH`)")
        names = [p.resolve().name for p in folders]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ConfigError(f"--domain: several folders are named {twice}; domains are named after their folder, "
                              "so give them distinct names (or list them under `domains:` in a preset)")
        out["benchmark"] = "custom"
        out["domains"] = [{"name": n, "path": str(p), "format": "folder"} for n, p in zip(names, folders)]
    pools = getattr(args, "pool", None) or []
    if pools:
        rows = [{"name": "PM"}]
        for run in pools:
            name = "AMT" if len(pools) == 1 else f"AMT ({Path(run).name or run})"
            rows.append({"name": name, "pool": run, "rule": "ttm"})
        out["methods"] = rows
    return out


def _config(args: argparse.Namespace) -> ExperimentConfig:
    """The preset of ``--config`` with the variant's overrides, the `evaluate` shortcuts, then every ``--set``."""
    overrides: dict = variant_overrides(args.variant) if getattr(args, "variant", None) else {}
    overrides = merge_dicts(overrides, _shortcut_overrides(args))
    for text in args.set or []:
        overrides = merge_dicts(overrides, parse_override(text))
    path = Path(args.config)
    if args.config == DEFAULT_CONFIG and not path.is_file():  # run from another folder: the checkout's own preset
        path = Path(__file__).resolve().parents[2] / DEFAULT_CONFIG
    return load_config(path, overrides)


def _first_rank() -> bool:
    """True outside torchrun and on its rank 0 (the process that prints and writes)."""
    return int(os.environ.get("RANK", "0")) == 0


# ---------------------------------------------------------------------------------------------- verbs


def cmd_predict(args: argparse.Namespace) -> int:
    import csv
    import io

    from amt.classify import FewShotClassifier, predict_folders
    from amt.rundir import write_text

    clf = FewShotClassifier.from_config(_config(args), pool=args.pool)
    files, out = predict_folders(clf, args.support, args.query, args.robustness)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["path", "label", *(f"p_{c}" for c in out.classes), *(["min_eps"] if args.robustness else [])])
    for i, path in enumerate(files):
        eps = [f"{float(out.min_eps[i]):.6g}"] if out.min_eps is not None else []
        writer.writerow([str(path), out.labels[i], *(f"{p:.6f}" for p in out.probs[i].tolist()), *eps])
    write_text(args.out, buf.getvalue())
    print(f"classified {len(files)} image(s) into {len(out.classes)} classes: {args.out}")
    return 0


def cmd_app(args: argparse.Namespace) -> int:
    from amt.app import serve

    serve(_config(args), None if args.pool.lower() == "none" else args.pool, args.port, args.host)
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from amt.study import run_study

    print(run_study(_config(args), args.out))
    return 0


def cmd_export_pool(args: argparse.Namespace) -> int:
    import shlex

    from amt.rundir import export_pool

    record = export_pool(args.run_dir, args.dest, "amt " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    print(f"exported {len(record['files'])} files to {args.dest}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from amt.export import export_peft
    from amt.pipeline import resolve_assets

    out = export_peft(args.pool, args.out, resolve_assets(_config(args)).backbone, args.results, args.format)
    print(f"exported the PEFT adapters of {args.pool} and a model card to {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from amt.pipeline import run_demo

    print(run_demo(_config(args), args.out))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from amt.pipeline import run_evaluate
    from amt.report import render_report

    run_evaluate(_config(args), args.out)
    if _first_rank():
        print(render_report(Path(args.out) / RESULTS_FILE, Path(args.out) / "report"))
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from amt.pipeline import run_pretrain

    run_pretrain(_config(args), args.out)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from amt.pipeline import run_train
    from amt.report import training_table

    manifest = run_train(_config(args), args.out, members=args.member, resume=args.resume,
                         stop_after=args.stop_after)
    if manifest:  # only the first rank of a torchrun job has it
        print(training_table(manifest))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from amt.report import render_report

    path = Path(args.run_dir)
    if path.is_dir():  # the complete results, else what an interrupted evaluation finished
        path = next((p for p in (path / RESULTS_FILE, path / PARTIAL_RESULTS_FILE) if p.is_file()),
                    path / RESULTS_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass a run directory written by `amt evaluate`/`amt demo`")
    out = Path(args.out) if args.out else path.parent / "report"
    print(render_report(path, out))
    print(f"\nReport: {out / 'report.md'}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from amt.config import DataConfig
    from amt.data.domains import check_domain

    domain = DomainConfig(Path(args.path).stem, args.path, args.format, args.splits, args.split)
    report = check_domain(domain, DataConfig(), args.n_way, args.n_shot, args.n_query)
    counts = sorted(report["per_class"].values())
    print(f"{report['domain']}: {report['classes']} classes, {report['images']} readable images; "
          f"per class min {counts[0]}, median {counts[len(counts) // 2]}, max {counts[-1]}")

    def per_split(counts: dict[str, int]) -> str:
        return " / ".join(f"{k} {n}" for k, n in counts.items())

    splits, published = report["classes_per_split"], report["published_classes_per_split"]
    if splits is None:
        print(f"classes per split: no class splits given; all {report['classes']} classes are used")
    else:
        line = f"classes per split: {per_split(splits)}" + (f" (checked: {domain.split})" if domain.split else "")
        print(line if published is None else f"{line}; published: {per_split(published)}")
    for line in report["problems"]:
        print(f"problem: {line}")
    print("OK" if not report["problems"] else f"{len(report['problems'])} problem(s)")
    return 0 if not report["problems"] else 1


def cmd_glyphs(args: argparse.Namespace) -> int:
    from amt.data.glyphs import build_glyph_benchmark

    cfg = _config(args)
    print(build_glyph_benchmark(cfg.glyphs, cfg.cache_dir))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.INFO if _first_rank() else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from amt.train import TrainingError

    try:
        return args.run(args)
    except (ConfigError, ValueError, FileNotFoundError, TrainingError) as exc:  # DataError is a ValueError
        logging.getLogger("amt").error("%s", exc)
        return 2
    except KeyboardInterrupt:
        logging.getLogger("amt").error("interrupted (Ctrl-C); finished files are kept, a training run continues "
                                       "with --resume")
        return 130


if __name__ == "__main__":
    sys.exit(main())
