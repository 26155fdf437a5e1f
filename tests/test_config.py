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


def test_every_alias_names_a_field_and_is_a_train_flag():
    from typer.testing import CliRunner

    from carspotter.cli import build_app
    from carspotter.config import ALIASES, config_field

    for dotted in ALIASES.values():
        config_field(dotted)  # raises on a stale alias
    text = CliRunner().invoke(build_app(), ["train", "--help"], env={"COLUMNS": "200"}).output
    for name, dotted in ALIASES.items():
        assert f"--{name.replace('_', '-')} " in text and dotted in text, name


def test_train_flags_set_the_fields_aliases_name(tmp_path, monkeypatch):
    """The short flags come from config.ALIASES alone: each sets its field, typed like it; --set still wins."""
    from typer.testing import CliRunner

    from carspotter.cli import build_app
    from carspotter.engine import train as train_mod
    from carspotter.presets import load_preset

    seen = {}

    def fake_fit(cfg, data_dir, out, **kw):
        seen["cfg"] = cfg
        return {"run_dir": str(out), "epochs_completed": 0, "select_metric": None, "best_epoch": None,
                "best_value": None, "last": {}, "wall_time_s": 0.0}  # fmt: skip

    monkeypatch.setattr(train_mod, "fit", fake_fit)
    (tmp_path / "w.pt").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    base = ["train", "--preset", "seed-t1-resnet50-frozen", "--data", "d", "--out", "o"]
    flags = [
        "--epochs", "2", "--img-size", "48", "--crop-mode", "squash", "--batch-size", "3",
        "--backbone", "resnet18", "--weights", "w.pt", "--no-pretrained", "--lr", "0.01",
        "--device", "cpu", "--seed", "7", "--amp", "bf16", "--tta", "flip", "--num-workers", "1",
        "--set", "train.seed=8",
    ]  # fmt: skip
    r = CliRunner().invoke(build_app(), [*base, *flags])
    assert r.exit_code == 0, r.output
    c = seen["cfg"]
    assert (c.train.epochs, c.data.img_size, c.data.crop_mode, c.data.batch_size) == (2, 48, "squash", 3)
    assert (c.model.arch, c.model.weights, c.model.pretrained) == ("resnet18", str(tmp_path / "w.pt"), False)
    assert (c.optim.lr, c.train.device, c.train.seed, c.train.amp) == (0.01, "cpu", 8, "bf16")
    assert (c.eval.tta, c.data.num_workers) == ("flip", 1)
    assert CliRunner().invoke(build_app(), base).exit_code == 0
    assert seen["cfg"] == load_preset("seed-t1-resnet50-frozen")  # no flag: the preset as saved
    r = CliRunner().invoke(build_app(), [*base, "--epochs", "two"])
    assert r.exit_code != 0  # typed like the field
