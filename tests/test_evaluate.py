import json
import math
from contextlib import contextmanager

import pytest
import torch

from amt.config import AugmentConfig, ConfigError, DataConfig, DomainConfig, EvalConfig
from amt.data.domains import load_domain
from amt.data.transforms import build_transform
from amt.evaluate import evaluate, mean_ci95, query_budget, task_seed, write_results
from amt.head import cosine_logits, prototypes
from amt.methods import BackboneMethod, Method, TaskRecord
from amt.report import markdown_table

from conftest import write_image_folder


def _load(domain, size, split=None):
    data = DataConfig(resize_ratio=1.0)
    return load_domain(domain, data, build_transform(size, data, AugmentConfig(), train=False), split)


def test_mean_ci95_formula():
    mean, ci = mean_ci95([50.0, 70.0, 60.0, 80.0])
    std = math.sqrt(((50 - 65) ** 2 + (70 - 65) ** 2 + (60 - 65) ** 2 + (80 - 65) ** 2) / 4)
    assert mean == pytest.approx(65.0) and ci == pytest.approx(1.96 * std / 2)
    assert mean_ci95([42.0]) == (42.0, 0.0)


def test_task_seed_is_stable_and_distinct():
    assert task_seed(0, "greek", 1) == task_seed(0, "greek", 1)
    assert len({task_seed(0, "greek", 1), task_seed(0, "greek", 5), task_seed(1, "greek", 1),
                task_seed(0, "latin", 1)}) == 4


class _Features(Method):
    """A method from a fixed feature map (cosine ProtoNet on top)."""

    def __init__(self, f):
        self.f = f

    @contextmanager
    def adapt(self, support_images, support_labels, n_way, generator):
        protos = prototypes(self.f(support_images), support_labels, n_way)
        yield (lambda x: cosine_logits(self.f(x), protos, 10.0)), TaskRecord()


class _Chance(_Features):
    @contextmanager
    def adapt(self, support_images, support_labels, n_way, generator):
        yield (lambda x: torch.zeros(len(x), n_way)), TaskRecord()


_mean_colour = _Features(lambda x: x.mean(dim=(2, 3)))  # reliable on the colour-coded test folders
_chance = _Chance(None)


def test_evaluate_shares_tasks_and_a_small_class_only_costs_its_own_place(tmp_path, caplog):
    root = write_image_folder(tmp_path / "d", 6, [12, 12, 12, 12, 12, 8])
    ds = _load(DomainConfig("d", str(root), in_domain=True), 8)
    assert query_budget(ds.indices_by_class(), 5, 1, 15) == 11  # five classes afford 11 queries: class_05 is left out
    assert query_budget(ds.indices_by_class(), 6, 1, 15) == 7  # all six classes are needed: 8 - 1 queries
    cfg = EvalConfig(n_tasks=6, n_way=5, shots=(1, 5), n_query=15, corruptions=())
    domain = DomainConfig("d", str(root), in_domain=True)
    res = evaluate({"colour": _mean_colour, "chance": _chance}, [(domain, ds)], cfg)
    rows = {(r["method"], r["n_shot"]): r for r in res["results"]}
    # no validation classes: 20% of every class is held out for validation (12 -> 9 and 8 -> 6 test images);
    # the five 9-image classes set the query count, and the 6-image class is left out, by name
    assert rows[("colour", 1)]["n_query"] == 8 and rows[("colour", 5)]["n_query"] == 4
    assert "left out 1 of 6 classes with fewer than 9 images: 'class_05' (6)" in caplog.text
    assert rows[("colour", 5)]["mean"] > 90.0  # classes are separable by colour
    assert rows[("chance", 1)]["mean"] == pytest.approx(20.0)  # argmax of ties picks class 0: 1/5 of queries
    assert "using 8 queries per class" in caplog.text
    again = evaluate({"colour": _mean_colour}, [(DomainConfig("d", str(root), in_domain=True), ds)], cfg)
    assert again["results"][0]["accuracies"] == rows[("colour", 1)]["accuracies"]
    path = write_results(res, tmp_path / "run")
    assert json.loads(path.read_text())["results"][0]["n_tasks"] == 6
    table = (tmp_path / "run" / "results.md").read_text()
    assert "| colour | 5w1s |" in table and "8 queries per class" in table
    assert markdown_table(res) in table


# ---------------------------------------------------------------------------- attacks through the evaluator


@pytest.fixture(scope="module")
def glyph_greek(tmp_path_factory):
    """Greek glyph test and validation classes of a small generated benchmark, and the shipped backbone."""
    from amt.backbone import Backbone, build_vit
    from amt.checkpoints import load_checkpoint
    from amt.config import GlyphConfig
    from amt.data.glyphs import build_glyph_benchmark, glyph_domains
    from amt.pipeline import embedded_asset

    root = build_glyph_benchmark(GlyphConfig(max_source_classes=14, max_classes_per_domain=16),
                                 tmp_path_factory.mktemp("glyphs"))
    greek = [d for d in glyph_domains(root)[1] if d.name == "greek"][0]
    model = Backbone(build_vit("amt_glyph_vit", 32), (0.5,) * 3, (0.5,) * 3)
    load_checkpoint(model.vit, embedded_asset("glyph_vit.safetensors"))
    return greek, _load(greek, 32), _load(greek, 32, split="val"), model


def _robust(glyph_greek, eps_list, steps=10, n_tasks=6):
    from amt.config import AttackConfig

    greek, ds, _, model = glyph_greek
    cfg = EvalConfig(n_tasks=n_tasks, shots=(1,), n_query=5, corruptions=(), eps_sweep=tuple(eps_list), l2_eps=(),
                     adv_tasks=n_tasks, sweep_tasks=n_tasks)
    attack = AttackConfig(eps=eps_list[0], step_size=eps_list[0] / 10, steps=steps)
    res = evaluate({"PM": BackboneMethod(model, 10.0)}, [(greek, ds)], cfg, attack)
    rows = [r for r in res["results"] if r["condition"] == "adversarial"]
    return {r["attack"]["eps"]: r["mean"] for r in rows}, [r for r in res["results"] if r["condition"] == "clean"][0]


def test_gradient_masking_sanity_robust_accuracy_falls_with_eps_and_vanishes_at_large_eps(glyph_greek):
    eps = [1 / 255, 4 / 255, 16 / 255, 64 / 255]
    acc, clean = _robust(glyph_greek, eps)
    series = [clean["mean"]] + [acc[e] for e in eps]
    assert all(b <= a + 2.0 for a, b in zip(series, series[1:])), series  # never rises beyond noise
    assert series[1] > 50.0 and acc[64 / 255] < 5.0, series


def test_gradient_masking_sanity_more_steps_do_not_help_the_model(glyph_greek):
    few, _ = _robust(glyph_greek, [4 / 255], steps=5)
    many, _ = _robust(glyph_greek, [4 / 255], steps=40)
    assert many[4 / 255] <= few[4 / 255] + 2.0


class _Tunable(_Features):
    """A tunable method that records the images of the validation tasks it is tuned on."""

    tunable = True

    def __init__(self, f):
        super().__init__(f)
        self.tuned_on = []

    def tune(self, tasks, rng):
        self.tuned_on += [torch.cat([e.support_images, e.query_images]) for e in tasks]
        return {"chosen": {}}


class _Recording(torch.utils.data.Dataset):
    """A dataset view that records the image files read through it."""

    def __init__(self, dataset):
        self.dataset, self.read = dataset, set()
        self.name, self.class_names = dataset.name, dataset.class_names

    def indices_by_class(self):
        return self.dataset.indices_by_class()

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        self.read.add(self.dataset.samples[i][0])
        return self.dataset[i]


def _images_read_by_tuning_and_testing(glyph_greek):
    greek, test_set, val_set, _ = glyph_greek
    test, val = _Recording(test_set), _Recording(val_set)
    method = _Tunable(lambda x: x.mean(dim=(2, 3)))
    cfg = EvalConfig(n_tasks=20, n_way=2, shots=(1, 5), n_query=5, corruptions=(), val_tasks=20)  # 2 val classes
    evaluate({"m": method}, [(greek, test)], cfg, None, {"greek": val})
    assert len(method.tuned_on) == 2 * cfg.val_tasks  # tuned for each shot on its own tasks
    return val.read, test.read


def _test_images(test_set, cfg):
    from amt.data.episodes import FixedSampler

    out = set()
    for shot in cfg.shots:
        s = FixedSampler(test_set.indices_by_class(), cfg.n_way, shot, query_budget(test_set, cfg.n_way, shot,
                         cfg.n_query), torch.Generator().manual_seed(task_seed(cfg.seed, "greek", shot)), "greek")
        for _ in range(cfg.n_tasks):
            idx = s.sample()
            out |= {test_set.samples[i][0] for i in torch.cat([idx.support_indices, idx.query_indices]).tolist()}
    return out


def test_tuning_never_reads_a_test_image_when_the_domain_has_validation_classes(glyph_greek):
    greek, test_set, val_set, _ = glyph_greek
    assert not set(test_set.class_names) & set(val_set.class_names)  # a validation split: other classes
    tuning, testing = _images_read_by_tuning_and_testing(glyph_greek)
    assert tuning and testing and not tuning & testing


def test_validation_tasks_are_not_test_tasks_without_validation_classes(glyph_greek):
    from amt.data.episodes import FixedSampler
    from amt.evaluate import validation_seed

    _, test_set, _, _ = glyph_greek

    def stream(seed):  # the support sets of the first 100 tasks of a task stream on the test classes
        s = FixedSampler(test_set.indices_by_class(), 5, 1, 5, torch.Generator().manual_seed(seed), "greek")
        return {tuple(s.sample().support_indices.tolist()) for _ in range(100)}

    for shot in (1, 5):
        assert not stream(task_seed(0, "greek", shot)) & stream(validation_seed(0, "greek", shot))


def test_zero_validation_tasks_with_a_grid_is_an_error(tmp_path):
    root = write_image_folder(tmp_path / "d", 6, 12)
    ds = _load(DomainConfig("d", str(root)), 8)
    cfg = EvalConfig(n_tasks=2, shots=(1,), n_query=3, corruptions=(), val_tasks=0)
    with pytest.raises(ConfigError, match="val_tasks=0"):
        evaluate({"m": _Tunable(lambda x: x.mean(dim=(2, 3)))}, [(DomainConfig("d", str(root)), ds)], cfg)
    res = evaluate({"colour": _mean_colour}, [(DomainConfig("d", str(root)), ds)], cfg)  # nothing to tune: fine
    assert res["results"] and not res["tuning"]


def test_tuning_runs_per_shot_on_that_shots_tasks(tmp_path):
    root = write_image_folder(tmp_path / "d", 6, 12)
    ds = _load(DomainConfig("d", str(root)), 8)
    method = _Tunable(lambda x: x.mean(dim=(2, 3)))
    cfg = EvalConfig(n_tasks=2, shots=(1, 5), n_query=3, corruptions=(), val_tasks=3, holdout_fraction=0.5)
    res = evaluate({"m": method}, [(DomainConfig("d", str(root)), ds)], cfg)
    # 6 held-out images per class: 1-shot tasks have 3 queries per class, 5-shot tasks 1
    assert [len(x) for x in method.tuned_on] == [5 * 1 + 5 * 3] * 3 + [5 * 5 + 5 * 1] * 3
    assert set(res["tuning"]["m"]["d"]) == {"1", "5"}


def test_bf16_autocast_on_cpu_keeps_accuracy(glyph_greek):
    """CPU bf16 autocast (``precision: bf16``): float32 features, same clean and PGD accuracy within noise."""
    from amt.config import AttackConfig

    greek, ds, _, model = glyph_greek
    cfg = EvalConfig(n_tasks=30, shots=(1,), n_query=5, corruptions=(), eps_sweep=(), l2_eps=(), adv_tasks=8)
    attack = AttackConfig(eps=4 / 255, step_size=0.4 / 255, steps=10)
    runs = {}
    try:
        for dtype in (None, torch.bfloat16):
            model.autocast_dtype = dtype
            with torch.no_grad():
                feats = model(ds[0][0][None])
            assert feats.dtype == torch.float32
            runs[dtype] = {r["condition"]: r for r in evaluate({"PM": BackboneMethod(model, 10.0)}, [(greek, ds)],
                                                               cfg, attack)["results"]}
    finally:
        model.autocast_dtype = None
    fp32, bf16 = runs[None], runs[torch.bfloat16]
    assert fp32["clean"]["mean"] > 60.0
    assert abs(bf16["clean"]["mean"] - fp32["clean"]["mean"]) <= 1.5, (fp32["clean"]["mean"], bf16["clean"]["mean"])
    same = sum(a == b for a, b in zip(fp32["clean"]["accuracies"], bf16["clean"]["accuracies"]))
    assert same >= 0.8 * cfg.n_tasks
    assert bf16["adversarial"]["mean"] < bf16["clean"]["mean"] - 5.0  # the attack still finds gradients
    assert abs(bf16["adversarial"]["mean"] - fp32["adversarial"]["mean"]) <= 6.0


def test_precision_choices_are_checked():
    from amt.backbone import precision_dtype
    from amt.config import ConfigError

    assert precision_dtype("fp32", torch.device("cpu")) is None
    assert precision_dtype("bf16", torch.device("cpu"), training=True) is torch.bfloat16
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        precision_dtype("fp16", torch.device("cpu"))
    with pytest.raises(ConfigError, match="evaluation only"):
        precision_dtype("fp16", torch.device("cuda"), training=True)
    with pytest.raises(ConfigError, match="must be one of"):
        precision_dtype("fp8", torch.device("cpu"))


def test_sweep_and_l2_attacks_take_their_steps_from_the_config():
    from amt.config import AttackConfig
    from amt.evaluate import conditions

    attack = AttackConfig(eps=4 / 255, step_size=0.4 / 255, steps=10)
    conds = conditions(EvalConfig(eps_sweep=(8 / 255,), l2_eps=(0.5,), corruptions=()), attack)
    by_norm = {(c.attack.norm, c.role == "headline"): c.attack for c in conds if c.kind == "adversarial"}
    assert by_norm[("l2", False)].step_size == pytest.approx(0.5 / 8.5)  # the paper's ℓ2 step
    assert by_norm[("linf", False)].step_size == pytest.approx(0.8 / 255)  # ε/10
    assert by_norm[("linf", True)] == attack
    custom = conditions(EvalConfig(eps_sweep=(), l2_eps=(1.0,), l2_step_ratio=0.25, corruptions=()), attack)
    assert [c.attack.step_size for c in custom if c.attack is not None and c.attack.norm == "l2"] == [0.25]


def test_masking_checks_run_only_in_their_shot_settings(glyph_greek):
    from amt.config import AttackConfig, MaskingConfig

    greek, ds, val, model = glyph_greek
    cfg = EvalConfig(n_tasks=2, shots=(1, 5), n_query=3, corruptions=(), eps_sweep=(), l2_eps=(), adv_tasks=1)
    attack = AttackConfig(eps=8 / 255, step_size=2 / 255, steps=2)
    res = evaluate({"PM": BackboneMethod(model, 10.0)}, [(greek, ds)], cfg, attack,
                   masking=MaskingConfig(n_tasks=1, many_steps=3, square_queries=4, shots=(1,)))
    roles = {(r["n_shot"], r["condition"], (r.get("attack") or {}).get("role")) for r in res["results"]}
    assert {role for shot, _, role in roles if shot == 1} == {None, "headline", "large_eps", "many_steps", "square"}
    assert {role for shot, _, role in roles if shot == 5} == {None, "headline"}  # clean and the headline attack
    assert (1, "gradient", None) in roles and (5, "gradient", None) not in roles
    assert list(res["masking"]["PM"]["greek"]) == ["1"]
