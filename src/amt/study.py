"""`amt study`: which part of AMT does what, on the embedded benchmark, over several training seeds.

Per training seed (``study.seeds``), every variant of :data:`VARIANTS` is meta-tuned with the configuration's
recipe shortened to ``study.episodes`` per member, then the rows of :func:`study_rows` — the paper's Table 4
components (APQ, APSV, RLP, TTM, STr), Table 8's pool strategies, the paper's merge rule against the
robustness-aware one, clean LoRA — are evaluated on the same tasks (clean and the headline attack). The summary
gives each row's paired difference to PM: per task, the difference averaged over the seeds; a 95% CI over the
tasks of each domain; domains of a kind combined (:func:`amt.stats.combine`). Everything is written under
``out`` (one folder per seed, reused when finished) and summarised in ``study.json``, ``study.md`` and
``tradeoff.png``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from amt.config import ExperimentConfig, MethodConfig
from amt.results import domains_of, select, tuned
from amt.rundir import RESULTS_FILE, read_json, write_json, write_text
from amt.stats import Estimate, combine, estimate

log = logging.getLogger(__name__)

VARIANTS = ("amt", "apq_only", "uniform_pool", "random_pool", "clean_lora")  # meta-tuned per seed
CONDITIONS = (("clean", "Clean"), ("adversarial", "PGD"))


def study_rows(run: Path, cfg: ExperimentConfig) -> tuple[MethodConfig, ...]:
    """The evaluated rows for the pools trained in ``run`` (one folder per variant)."""
    amt = str(run / "amt")
    middle = len(cfg.pool.eps) // 2
    return (
        MethodConfig("PM"),
        MethodConfig("Clean LoRA", pool=str(run / "clean_lora"), rule="single"),
        MethodConfig("AMT", pool=amt),  # the merge section as configured (robustness-aware on the embedded default)
        MethodConfig("AMT, Algorithm 2", pool=amt, merge={"adv_weight_grid": [0.0], "objective": "clean"}),
        MethodConfig("AMT w/o TTM", pool=amt, rule="min_support_ce"),
        MethodConfig("AMT w/o STr", pool=amt, merge={"rho_grid": [1.0]}),
        MethodConfig(f"AMT w/o RLP (one LoRA, ε {cfg.pool.eps[middle] * 255:.3g}/255)", pool=amt, rule="single",
                     member_index=middle),
        MethodConfig("AMT w/o APSV", pool=str(run / "apq_only")),
        MethodConfig("Uniform-ε pool", pool=str(run / "uniform_pool")),
        MethodConfig("Random-ε pool", pool=str(run / "random_pool")),
    )


def _eval_cfg(cfg: ExperimentConfig, run: Path) -> ExperimentConfig:
    ev = dataclasses.replace(cfg.eval, n_tasks=cfg.study.n_tasks, adv_tasks=cfg.study.adv_tasks, eps_sweep=(),
                             l2_eps=(), corruptions=())
    return dataclasses.replace(cfg, methods=study_rows(run, cfg), eval=ev,
                               autoattack=dataclasses.replace(cfg.autoattack, version="none"),
                               masking=dataclasses.replace(cfg.masking, n_tasks=0))


def run_study(cfg: ExperimentConfig, out_dir: str | Path) -> str:
    """Train, evaluate and summarise (see the module docstring); returns the Markdown summary."""
    from amt.pipeline import resolve, run_evaluate, run_train, shortened

    start = time.perf_counter()
    out = Path(out_dir)
    cfg = resolve(cfg)
    results = []
    for seed in cfg.study.seeds:
        run = out / f"seed{seed}"
        for variant in VARIANTS:
            log.info("study: seed %d, meta-tuning %s", seed, variant)
            n = cfg.study.episodes
            run_train(shortened(cfg, variant, n, n, seed=100 * seed), run / variant, resume=True)
        if not (run / RESULTS_FILE).is_file():
            run_evaluate(_eval_cfg(cfg, run), run)
        results.append(read_json(run / RESULTS_FILE, "study results"))
    summary = summarize(results)
    summary["seconds"] = time.perf_counter() - start
    summary["seeds"] = list(cfg.study.seeds)
    summary["episodes"] = cfg.study.episodes
    write_json(out / "study.json", summary)
    text = study_markdown(summary)
    write_text(out / "study.md", text + "\n")
    tradeoff_figure(summary, out / "tradeoff.png")
    log.info("study finished in %.0f s; %s", summary["seconds"], out / "study.md")
    return text


def _per_task(results: dict, method: str, domain: str, shot: int, cond: str) -> list[float]:
    """Per-task accuracies of one row (adversarial: the headline attack)."""
    for r in select(results, cond, shot):
        if (r["method"], r["domain"]) == (method, domain):
            return r["accuracies"]
    raise KeyError((method, domain, shot, cond))


def summarize(per_seed: list[dict], reference: str = "PM") -> dict:
    """Per row, shot, condition and domain kind: mean accuracy and the paired difference to ``reference``."""
    first = per_seed[0]
    domains = domains_of(first["results"])
    methods = list(dict.fromkeys(r["method"] for r in first["results"]))
    shots = sorted({r["n_shot"] for r in first["results"]})
    rows = []
    for method in methods:
        for shot in shots:
            row: dict = {"method": method, "n_shot": shot}
            for cond, _ in CONDITIONS:
                for kind, in_domain in (("ID", True), ("OOD", False)):
                    names = [d for d, i in domains.items() if i == in_domain]
                    means, diffs = [], []
                    for d in names:
                        acc = [_per_task(res, method, d, shot, cond) for res in per_seed]
                        ref = [_per_task(res, reference, d, shot, cond) for res in per_seed]
                        means.append(sum(sum(a) / len(a) for a in acc) / len(acc))
                        per_task = [sum(a[t] - r[t] for a, r in zip(acc, ref)) / len(acc) for t in range(len(acc[0]))]
                        diffs.append(estimate(per_task))
                    if names:
                        d: Estimate = combine(diffs)
                        row[f"{cond}_{kind}"] = {"mean": sum(means) / len(means), "diff": d.as_dict()}
            rows.append(row)
    return {"reference": reference, "rows": rows, "coefficients": _coefficients(per_seed),
            "validation_tradeoff": _validation_tradeoff(per_seed)}


def _coefficients(per_seed: list[dict], method: str = "AMT") -> dict:
    """Mean merge coefficient ζ per member of ``method``'s test tasks, per shot (over domains and seeds)."""
    out: dict = {}
    for res in per_seed:
        for m, _, shot, info in tuned(res):
            if m == method:
                out.setdefault(shot, []).extend(info.get("coefficients", []))
    return {shot: [sum(z[i] for z in zs) / len(zs) for i in range(len(zs[0]))] for shot, zs in out.items() if zs}


def _validation_tradeoff(per_seed: list[dict], method: str = "AMT") -> dict:
    """Per shot and γ: validation clean and robust accuracy of ``method``'s grid (mean over domains and seeds;
    the grid points with that γ and the first other settings)."""
    acc: dict = {}
    for res in per_seed:
        for m, _, shot, info in tuned(res):
            if m != method:
                continue
            seen = set()
            for v in info.get("validation", []):
                gamma = v["params"].get("adv_weight", 0.0)
                if "robust_acc" not in v or gamma in seen:
                    continue
                seen.add(gamma)
                acc.setdefault(shot, {}).setdefault(gamma, []).append((v["acc"], v["robust_acc"]))
    return {shot: {str(g): [sum(c for c, _ in xs) / len(xs), sum(r for _, r in xs) / len(xs)]
                   for g, xs in sorted(per_g.items())} for shot, per_g in acc.items()}


def _cell(entry: dict | None, reference: bool) -> str:
    if entry is None:
        return "—"
    if reference:
        return f"{entry['mean']:.2f}"
    d = entry["diff"]
    return f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]{'*' if d['significant'] else ''}"


def study_markdown(summary: dict) -> str:
    """The study table: the reference's accuracy, every other row's paired difference to it."""
    ref = summary["reference"]
    cols = [(cond, kind, f"{label} {kind}") for cond, label in CONDITIONS for kind in ("ID", "OOD")]
    lines = ["| row | shot | " + " | ".join(c[2] for c in cols) + " |", "|" + "---|" * (2 + len(cols))]
    for row in summary["rows"]:
        cells = [_cell(row.get(f"{cond}_{kind}"), row["method"] == ref) for cond, kind, _ in cols]
        name = row["method"] if row["method"] == ref else f"{row['method']} − {ref}"
        lines.append(f"| {name} | 5w{row['n_shot']}s | " + " | ".join(cells) + " |")
    seeds = summary.get("seeds", [])
    lines += ["", f"{ref}: accuracy (%). Other rows: paired difference to {ref} over the same tasks, per task averaged "
              f"over {len(seeds)} training seeds {seeds}, [95% CI] over tasks with the domains of a kind combined; "
              "* where the CI excludes 0. PGD: the headline attack of the configuration."]
    return "\n".join(lines)


def tradeoff_figure(summary: dict, path: Path) -> Path:
    """Clean vs robust out-of-domain accuracy of every row (test tasks), and the robustness-aware rule's
    validation trade-off over γ, one panel per shot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from amt.rundir import atomic_write

    shots = sorted({r["n_shot"] for r in summary["rows"]})
    fig, axes = plt.subplots(2, len(shots), figsize=(5.2 * len(shots), 8.4), squeeze=False)
    for j, shot in enumerate(shots):
        ax = axes[0][j]
        for row in (r for r in summary["rows"] if r["n_shot"] == shot):
            x, y = row["clean_OOD"]["mean"], row["adversarial_OOD"]["mean"]
            ax.scatter([x], [y], s=28)
            ax.annotate(row["method"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set(title=f"test tasks, 5-way {shot}-shot, OOD", xlabel="clean accuracy (%)", ylabel="PGD accuracy (%)")
        ax = axes[1][j]
        curve = summary["validation_tradeoff"].get(str(shot), {})
        if curve:
            gammas = list(curve)
            xs, ys = [curve[g][0] for g in gammas], [curve[g][1] for g in gammas]
            ax.plot(xs, ys, marker="o")
            for g, x, y in zip(gammas, xs, ys):
                ax.annotate(f"γ={float(g):g}", (x, y), fontsize=8, xytext=(3, 3), textcoords="offset points")
        ax.set(title=f"validation, 5-way {shot}-shot: AMT over γ (selection attack)", xlabel="clean accuracy (%)",
               ylabel="robust accuracy (%)")
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path
