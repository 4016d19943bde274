"""`amt study`: the variants meta-tuned per seed, the rows evaluated on the same tasks, the paired summary."""

import json

import pytest

from amt.cli import main
from amt.study import VARIANTS, summarize
from test_pipeline import SMALL


def _results(values: dict) -> dict:
    """A results.json with per-task accuracies ``values[(method, domain, cond)]`` (1-shot)."""
    rows = []
    for (method, domain, cond), acc in values.items():
        row = {"method": method, "domain": domain, "in_domain": domain == "a", "n_shot": 1, "condition": cond,
               "accuracies": acc}
        if cond == "adversarial":
            row["attack"] = {"headline": True}
        rows.append(row)
    return {"results": rows, "tuning": {}}


def test_summary_averages_the_paired_differences_over_seeds_per_task():
    seeds = []
    for shift in (0.0, 2.0):  # the row gains 1+shift and 3+shift points on domain b's two tasks
        values = {}
        for m, base in (("PM", 50.0), ("X", 50.0)):
            values[(m, "a", "clean")] = [base, base + 10]
            values[(m, "b", "clean")] = [base + (1 + shift if m == "X" else 0), base + (3 + shift if m == "X" else 0)]
            for d in ("a", "b"):
                values[(m, d, "adversarial")] = [20.0, 30.0]
        seeds.append(_results(values))
    rows = {r["method"]: r for r in summarize(seeds)["rows"]}
    ood = rows["X"]["clean_OOD"]["diff"]
    assert ood["mean"] == pytest.approx(3.0)  # per task over seeds: 2 and 4
    assert ood["low"] < 3.0 < ood["high"] and ood["n_tasks"] == 2
    assert rows["X"]["clean_ID"]["diff"]["mean"] == 0.0 and rows["PM"]["clean_ID"]["mean"] == pytest.approx(55.0)
    assert rows["PM"]["clean_OOD"]["mean"] == pytest.approx(50.0)


def test_study_end_to_end_trains_every_variant_and_summarises(tmp_path, capsys):
    out = tmp_path / "study"
    args = ["study", "--out", str(out), "--set", f"cache_dir={tmp_path / 'cache'}", *SMALL,
            "--set", "pool.eps=[0.004, 0.03]", "--set", "train.val_tasks=2", "--set", "train.n_query=2",
            "--set", "study.seeds=[0, 1]", "--set", "study.episodes=2", "--set", "study.n_tasks=2",
            "--set", "study.adv_tasks=1", "--set", "glyphs.eval_domains=[latin, greek]",
            "--set", "merge.adv_weight_grid=[0, 0.5]", "--set", "merge.objective=constrained"]
    assert main(args) == 0
    for seed in (0, 1):
        assert all((out / f"seed{seed}" / v / "pool.json").is_file() for v in VARIANTS)
    summary = json.loads((out / "study.json").read_text())
    methods = {r["method"] for r in summary["rows"]}
    assert {"PM", "AMT", "AMT, Algorithm 2", "Clean LoRA", "AMT w/o APSV", "Random-ε pool"} <= methods
    assert set(summary["coefficients"]) == {"1", "5"} and len(summary["coefficients"]["1"]) == 2
    assert set(summary["validation_tradeoff"]["1"]) == {"0.0", "0.5"}
    tuning = json.loads((out / "seed0" / "results.json").read_text())["tuning"]
    assert tuning["AMT, Algorithm 2"]["latin"]["1"]["chosen"]["adv_weight"] == 0.0  # the row's own merge settings
    assert "selection" not in tuning["AMT, Algorithm 2"]["latin"]["1"] or \
        tuning["AMT, Algorithm 2"]["latin"]["1"]["selection"]["objective"] == "clean"
    printed = capsys.readouterr().out
    assert "| AMT − PM | 5w1s |" in printed and (out / "tradeoff.png").stat().st_size > 1000
    before = (out / "seed0" / "results.json").read_bytes()
    assert main(args) == 0 and (out / "seed0" / "results.json").read_bytes() == before  # finished seeds are reused
