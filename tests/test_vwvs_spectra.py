"""Variable-way variable-shot evaluation (paper Table 18) and per-layer spectra (Figs. 2–3): the tasks really vary in
way and shot, every method sees the same ones, the tables show them; the change of the top singular values from the
pre-trained weights is 0 where nothing was trained and not where a member was, per block for fc1, fc2 and attn.proj;
the report's against-severity panel needs several severities."""

import json
from pathlib import Path

import pytest
import torch

from amt.cli import main
from amt.config import (
    LORA_TARGETS,
    AugmentConfig,
    ConfigError,
    DataConfig,
    DomainConfig,
    EvalConfig,
    FinetuneConfig,
    VariableEpisodeConfig,
    load_config,
    parse_override,
)
from amt.data.domains import load_domain
from amt.data.transforms import build_transform
from amt.evaluate import evaluate, shot_cells
from amt.figures import _corruption_figure, _spectra_figure
from amt.lora import active_adapter, adapter_parameters, inject_lora
from amt.methods import BackboneMethod, FinetunedMethod
from amt.report import condition_table, main_table, markdown_table, render_report, shape_table
from amt.results import VWVS, spectral_change
from amt.spectra import SPECTRA_LAYERS, method_spectra

from conftest import assert_same_state, gen, snapshot, tiny_backbone, write_image_folder

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "embedded.yaml"
VARIABLE = VariableEpisodeConfig(min_ways=3, max_ways=9, max_support=40, max_support_per_class=6,
                                 max_query_per_class=3)


def _load(domain, size=32):
    data = DataConfig(resize_ratio=1.0)
    return load_domain(domain, data, build_transform(size, data, AugmentConfig(), train=False))


@pytest.fixture(scope="module")
def vwvs_results(tmp_path_factory):
    """A real variable-way evaluation: PM (a tiny ViT), a second tiny ViT, and PM + test-time fine-tuning tuned on
    variable-way validation tasks (held-out images), on a 12-class folder."""
    root = write_image_folder(tmp_path_factory.mktemp("vwvs") / "d", 12, 12, size=32)
    domain = DomainConfig("colours", str(root))
    cfg = EvalConfig(episodes="variable", variable=VARIABLE, n_tasks=8, corruptions=(), val_tasks=2,
                     holdout_fraction=0.25)
    finetuned = FinetunedMethod(BackboneMethod(tiny_backbone(seed=0), 10.0),
                                FinetuneConfig(steps=1, lr_grid=(0.0, 1e-3)), AugmentConfig(pseudo_per_image=1))
    methods = {"PM": BackboneMethod(tiny_backbone(seed=0), 10.0), "other": BackboneMethod(tiny_backbone(seed=1), 10.0),
               "PM+FT": finetuned}
    return evaluate(methods, [(domain, _load(domain))], cfg)


def test_variable_way_tasks_vary_in_way_and_shot_and_are_the_same_for_every_method(vwvs_results):
    rows = vwvs_results["results"]
    assert {r["n_shot"] for r in rows} == {VWVS} and {r["method"] for r in rows} == {"PM", "other", "PM+FT"}
    ways = rows[0]["task_n_way"]
    shots = [s / w for s, w in zip(rows[0]["task_n_support"], ways)]
    assert len(ways) == len(rows[0]["accuracies"]) == 8
    assert len(set(ways)) > 1 and all(3 <= w <= 9 for w in ways)  # the way varies within the limits
    assert len(set(shots)) > 1  # and so does the shot
    assert all(s <= 40 for s in rows[0]["task_n_support"]) and all(1 <= q <= 3 for q in rows[0]["task_n_query"])
    for r in rows:  # every method on the same tasks, in the same order
        assert (r["task_n_way"], r["task_n_support"]) == (ways, rows[0]["task_n_support"])
        assert r["n_way"] is None and r["n_query"] is None
    assert vwvs_results["protocol"]["episodes"] == "variable" and vwvs_results["protocol"]["shots"] == [VWVS]
    assert vwvs_results["protocol"]["variable"]["max_ways"] == 9
    # the tunable row was tuned on variable-way validation tasks of the same cell
    assert set(vwvs_results["tuning"]["PM+FT"]["colours"]) == {VWVS}
    # the PM+FT row with lr 0 chosen or not: its accuracies differ from another backbone's, paired over the same tasks
    assert rows[0]["accuracies"] != next(r for r in rows if r["method"] == "other")["accuracies"]


def test_tables_show_the_variable_cell_its_task_shapes_and_paired_differences(vwvs_results, tmp_path):
    res = vwvs_results
    ways = res["results"][0]["task_n_way"]
    assert "| PM | vwvs |" in main_table(res) and "| Δ other − PM | vwvs |" in main_table(res)
    assert "| PM | vwvs |" in markdown_table(res)
    table = condition_table(res, "clean", VWVS)
    assert f"Variable-way variable-shot tasks: {min(ways)}–{max(ways)} (mean {sum(ways) / len(ways):.1f}) ways" in table
    pm = next(r for r in res["results"] if r["method"] == "PM")["accuracies"]
    other = next(r for r in res["results"] if r["method"] == "other")["accuracies"]
    diff = sum(a - b for a, b in zip(other, pm)) / len(pm)
    assert f"| Δ other − PM | {diff:+.2f} [" in table  # the paired difference over the same tasks
    shapes = shape_table(res)
    assert f"| colours | 8 | {min(ways)}–{max(ways)} (mean {sum(ways) / len(ways):.1f}) |" in shapes
    path = tmp_path / "results.json"
    path.write_text(json.dumps(res))
    render_report(path, tmp_path / "report")
    names = {p.name for p in (tmp_path / "report").iterdir()}
    assert {"clean_vwvs.csv", "task_shapes.csv", "report.md"} <= names
    report = (tmp_path / "report" / "report.md").read_text()
    assert "variable-way variable-shot tasks (Meta-Dataset's sampler: 3–9 ways" in report
    assert "## Clean, variable-way variable-shot" in report


def test_variable_settings_are_checked():
    with pytest.raises(ConfigError, match="min_ways <= max_ways"):
        shot_cells(EvalConfig(episodes="variable", variable=VariableEpisodeConfig(min_ways=6, max_ways=5)))
    assert shot_cells(EvalConfig(shots=(1, 5))) == [1, 5]
    # docs/paper.md's Table 18 switch on the Meta-Dataset preset: Meta-Dataset's limits by default
    paper = load_config(CONFIG.parent / "paper" / "metadataset.yaml", parse_override("eval.episodes=variable"))
    assert paper.eval.episodes == "variable" and paper.eval.variable == VariableEpisodeConfig()
    assert shot_cells(paper.eval) == [VWVS]


def test_amt_evaluate_variable_way_on_the_embedded_default_end_to_end(tmp_path):
    out = tmp_path / "run"
    small = ["--set", "glyphs.max_source_classes=40", "--set", "glyphs.max_classes_per_domain=34",
             "--set", "glyphs.samples_per_class=8", "--set", "glyphs.eval_domains=[latin, greek]",
             "--set", "eval.n_tasks=2", "--set", "eval.adv_tasks=1", "--set", "eval.eps_sweep=[]",
             "--set", "eval.corruptions=[fog]", "--set", "eval.corruption_tasks=1", "--set", "eval.val_tasks=1",
             "--set", "eval.variable.max_ways=6", "--set", "eval.variable.max_query_per_class=2",
             "--set", "attack.steps=2", "--set", "attack.restarts=1", "--set", "merge.adv_weight_grid=[0.0, 0.5]",
             "--set", "merge.objective=clean", "--set", "augment.pseudo_per_image=1",
             "--set", "methods=[{name: PM}, {name: AMT, pool: 'embedded:glyph_pool', rule: ttm}]"]
    args = ["evaluate", "--config", str(CONFIG), "--out", str(out), "--set", f"cache_dir={tmp_path / 'cache'}",
            "--set", "eval.episodes=variable", *small]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    rows = results["results"]
    assert {r["n_shot"] for r in rows} == {VWVS} and {r["domain"] for r in rows} == {"latin", "greek"}
    assert {r["condition"] for r in rows} == {"clean", "adversarial", "corruption"}  # AA/masking: 1-shot only
    assert all(5 <= w <= 6 for r in rows for w in r["task_n_way"])
    assert set(results["tuning"]["AMT"]["latin"]) == {VWVS}
    # spectra: PM is the pre-trained backbone, the shipped pool's uniform merge moved every layer
    pm, amt = results["spectra"]["PM"]["layers"], results["spectra"]["AMT"]["layers"]
    assert pm.keys() == amt.keys() and all(spectral_change(v) == 0.0 for v in pm.values())
    assert all(abs(spectral_change(v)) > 1e-4 for v in amt.values())
    report = (out / "results.md").read_text()
    assert "| AMT | vwvs |" in report
    assert main(["report", str(out)]) == 0 and (out / "report" / "spectra.png").is_file()


# ---------------------------------------------------------------- spectra


def _pool(seed=0, members=("m0", "m1")):
    model = tiny_backbone(seed=seed)
    inject_lora(model.vit, LORA_TARGETS, list(members), rank=2, init="svd")
    return model


def _train(model, member, steps=3):
    """A few SGD steps of ``member`` alone on a real loss (pull the features of random images towards a direction)."""
    params = adapter_parameters(model, member)
    opt = torch.optim.SGD(params, lr=0.01)
    images = torch.rand(4, 3, 32, 32, generator=gen(3))
    with active_adapter(model, member):
        for _ in range(steps):
            opt.zero_grad()
            (-model(images)[:, :8].sum(1).mean()).backward()
            opt.step()


def test_spectra_change_is_zero_without_training_and_per_block_for_a_trained_member():
    reference = tiny_backbone(seed=0)
    depth = len(reference.vit.blocks)
    expected = {(b, k) for b in range(depth) for k in SPECTRA_LAYERS}
    pm = method_spectra(tiny_backbone(seed=0), (), reference, 4)
    assert {(v["block"], v["kind"]) for v in pm["layers"].values()} == expected
    assert all(v["tuned"] == v["pretrained"] and len(v["tuned"]) == 4 for v in pm["layers"].values())
    model = _pool()
    untrained = method_spectra(model, ("m0", "m1"), reference, 4)  # SVD init: W_res + B0 A0 = W0
    assert all(abs(spectral_change(v)) < 1e-5 for v in untrained["layers"].values())
    assert untrained["weights"] == "uniform merge of 2 pool members"
    _train(model, "m0")
    before = snapshot(model)
    trained = method_spectra(model, ("m0", "m1"), reference, 4)
    assert_same_state(before, model)  # the merge is undone
    assert {(v["block"], v["kind"]) for v in trained["layers"].values()} == expected
    assert all(abs(spectral_change(v)) > 1e-4 for v in trained["layers"].values())  # every block, fc1/fc2/proj
    still = method_spectra(model, ("m1",), reference, 4)  # the member that was not trained
    assert all(abs(spectral_change(v)) < 1e-5 for v in still["layers"].values())
    with pytest.raises(ValueError, match="spectra_top"):
        method_spectra(model, ("m0",), reference, 0)


def test_spectra_figure_plots_the_change_against_the_block_per_layer_kind():
    reference, model = tiny_backbone(seed=0), _pool()
    _train(model, "m0")
    results = {"protocol": {"n_way": 5}, "results": [],
               "spectra": {"PM": method_spectra(tiny_backbone(seed=0), (), reference, 3),
                           "AMT": method_spectra(model, ("m0", "m1"), reference, 3)}}
    fig = _spectra_figure(results)
    axes = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in axes] == list(SPECTRA_LAYERS)
    depth = len(reference.vit.blocks)
    for ax in axes:
        pm, amt = (line for line in ax.get_lines() if line.get_label() in ("PM", "AMT"))
        assert list(pm.get_xdata()) == list(range(1, depth + 1)) and not any(pm.get_ydata())
        assert all(abs(y) > 1e-5 for y in amt.get_ydata())
    old = {"protocol": {"n_way": 5}, "results": [], "spectra": {"AMT": {"blocks.1.mlp.fc1": [3.0, 2.0]}}}
    assert _spectra_figure(old) is None  # results from before per-layer spectra: no figure


def _corruption_rows(severities):
    return {"protocol": {"n_way": 5}, "results": [
        {"method": m, "domain": d, "in_domain": d == "latin", "n_shot": 1, "condition": "corruption",
         "corruption": {"name": n, "severity": s}, "mean": 50.0 + s, "ci95": 1.0, "accuracies": [50.0 + s]}
        for m in ("PM", "AMT") for d in ("latin", "greek") for n in ("fog", "snow") for s in severities]}


@pytest.mark.parametrize("severities, panel", [((3,), False), ((1, 3), True)])
def test_against_severity_panel_only_with_several_severities(severities, panel):
    titles = [ax.get_title() for ax in _corruption_figure(_corruption_rows(severities)).axes]
    assert any("per corruption" in t for t in titles)
    assert any("against severity" in t for t in titles) == panel
