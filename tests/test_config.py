import pytest

from carspotter.config import (
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    dump_config,
    load_config,
    parse_set_args,
)


def test_roundtrip(tmp_path):
    cfg = apply_overrides(ExperimentConfig(), {"epochs": 3, "model.unfreeze_schedule": "{0: 0, 2: -1}"})
    p = tmp_path / "c.yaml"
    dump_config(cfg, p)
    back = load_config(p)
    assert back == cfg
    assert back.train.epochs == 3 and back.model.unfreeze_schedule == {0: 0, 2: -1}


def test_unknown_field_is_named(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"train.*epoch"):
        load_config(p)


def test_bad_type_is_named():
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        apply_overrides(ExperimentConfig(), parse_set_args(["train.epochs=many"]))
