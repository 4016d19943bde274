import pytest

from amt.config import (ConfigError, DataConfig, ExperimentConfig, from_dict, load_config, parse_override,
                        save_config, to_dict)


def test_embedded_preset_loads_and_round_trips(tmp_path):
    cfg = load_config("configs/embedded.yaml")
    assert cfg.backbone.arch == "amt_glyph_vit"
    assert cfg.data.hflip is False and cfg.data.crop_scale == (0.5, 1.0)
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
