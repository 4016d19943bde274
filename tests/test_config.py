import pytest

from amt.config import (
    ConfigError,
    DataConfig,
    ExperimentConfig,
    from_dict,
    load_config,
    merge_dicts,
    parse_override,
    to_dict,
    variant_overrides,
)
from amt.rundir import save_config


def test_embedded_preset_loads_and_round_trips(tmp_path):
    cfg = load_config("configs/embedded.yaml")
    assert cfg.backbone.arch == "amt_glyph_vit"
    assert cfg.augment.hflip is False and cfg.data.crop_scale == (0.5, 1.0)
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_unknown_key_names_key_and_valid_keys():
    with pytest.raises(ConfigError, match=r"n_taks.*valid keys.*n_tasks"):
        from_dict(ExperimentConfig, {"eval": {"n_taks": 3}})


def test_wrong_type_is_rejected():
    with pytest.raises(ConfigError, match="eval.n_tasks"):
        from_dict(ExperimentConfig, {"eval": {"n_tasks": "many"}})


def test_override_parsing_and_defaults_live_in_dataclasses():
    assert parse_override("eval.n_tasks=7") == {"eval": {"n_tasks": 7}}
    cfg = load_config("configs/embedded.yaml", parse_override("eval.n_tasks=7"))
    assert cfg.eval.n_tasks == 7
    assert to_dict(from_dict(ExperimentConfig, {}))["data"] == to_dict(DataConfig())
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("n_tasks")


def test_missing_config_file_is_clear(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_a_partial_nested_override_keeps_the_fields_default_not_the_types():
    # pool.attack's default is a 2-step KL attack; AttackConfig() is the 10-step CE evaluation attack
    for overrides in ({"pool": {"attack": {"steps": 5}}}, parse_override("pool.attack.objective=ce")):
        cfg = load_config("configs/embedded.yaml", overrides)
        default = ExperimentConfig().pool.attack
        changed = {k for k, v in to_dict(cfg.pool.attack).items() if v != to_dict(default)[k]}
        assert changed == set(next(iter(overrides["pool"]["attack"].items()))[:1])
    assert load_config("configs/embedded.yaml", parse_override("pool.attack.steps=5")).pool.attack.objective == "kl"
    assert load_config("configs/embedded.yaml", parse_override("attack.steps=3")).attack.objective == "ce"


def test_string_choices_are_checked_and_a_renamed_rule_says_its_new_name():
    with pytest.raises(ConfigError, match=r"train.keep: 'best_val' is not one of \['best', 'last'\]"):
        from_dict(ExperimentConfig, {"train": {"keep": "best_val"}})
    with pytest.raises(ConfigError, match="now called 'ttm'"):
        from_dict(ExperimentConfig, {"methods": [{"name": "AMT", "pool": "p", "rule": "amt"}]})
    with pytest.raises(ConfigError, match=r"trim_group_grid\[1\]"):
        from_dict(ExperimentConfig, {"merge": {"trim_group_grid": ["mlp", "ffn"]}})
    with pytest.raises(ConfigError, match="expected a number"):
        from_dict(ExperimentConfig, {"attack": {"eps": "abc"}})
    with pytest.raises(ConfigError, match="expected a number"):
        from_dict(ExperimentConfig, {"attack": {"eps": "4/0"}})


def test_float_fields_take_fractions_and_numeric_text():
    cfg = load_config("configs/embedded.yaml", merge_dicts(parse_override("attack.eps=8/255"),
                                                           parse_override("perturb.eta=1e-4")))
    assert cfg.attack.eps == pytest.approx(8 / 255) and cfg.perturb.eta == pytest.approx(1e-4)
    assert load_config("configs/embedded.yaml", parse_override("eval.eps_sweep=[2/255, 0.5/255]")).eval.eps_sweep \
        == pytest.approx((2 / 255, 0.5 / 255))


def test_variants_switch_apq_and_apsv_in_the_train_section():
    assert variant_overrides("apq_only") == {"train": {"apsv": False}}
    clean = from_dict(ExperimentConfig, variant_overrides("clean_lora"))
    assert not clean.train.apq and not clean.train.apsv


def test_the_default_preset_is_found_from_any_folder(tmp_path, monkeypatch):
    from amt.cli import _config, build_parser

    monkeypatch.chdir(tmp_path)
    assert _config(build_parser().parse_args(["glyphs"])).backbone.arch == "amt_glyph_vit"
    with pytest.raises(ConfigError, match="does not exist"):  # an explicit path is taken as given
        _config(build_parser().parse_args(["glyphs", "--config", "configs/nope.yaml"]))


def test_a_preset_extends_another_and_cycles_are_named(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("eval:\n  n_tasks: 50\n  shots: [1]\nattack:\n  eps: 8/255\n")
    (tmp_path / "sub").mkdir()
    mid = tmp_path / "sub" / "mid.yaml"
    mid.write_text("extends: ../base.yaml\neval:\n  n_tasks: 7\n")
    top = tmp_path / "sub" / "top.yaml"
    top.write_text("extends: mid.yaml\neval:\n  n_query: 3\n")
    cfg = load_config(top)
    assert (cfg.eval.n_tasks, cfg.eval.shots, cfg.eval.n_query) == (7, (1,), 3)  # each level over the one below
    assert cfg.attack.eps == pytest.approx(8 / 255)
    assert load_config(top, {"eval": {"n_tasks": 2}}).eval.n_tasks == 2  # --set over everything
    base.write_text("extends: sub/top.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(top)
    mid.write_text("extends: [base.yaml]\n")
    with pytest.raises(ConfigError, match="extends"):
        load_config(mid)
    mid.write_text("extends: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml does not exist"):
        load_config(mid)
