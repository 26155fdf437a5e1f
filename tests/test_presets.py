"""Every preset loads, carries the reference study's exact hyperparameters, and runs end to end (reduced)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from carspotter.cli import build_app
from carspotter.config import ConfigError, apply_overrides, dump_config, load_config
from carspotter.presets import list_presets, load_preset

REFERENCE = {
    "seed-t1-resnet50-frozen": 0.424,
    "seed-t2-resnet50-finetune": 0.738,
    "seed-t3-densenet121-progressive": 0.717,
    "seed-s1-cnn-basic": 0.089,
    "seed-s2-cnn-bn-dropout": 0.082,
    "seed-s3-cnn-aug": 0.723,
}
CLASSIFICATION = [
    *REFERENCE,
    "strong-resnet50-448",
    "strong-cnn-scratch",
    "strong-efficientnet-lite0-finetune",
]


def test_all_presets_load_and_take_overrides(tmp_path):
    names = list_presets()
    assert set(CLASSIFICATION) <= set(names)
    for name in names:
        cfg = load_preset(name)
        assert cfg.name == name
        assert cfg.description and "\n" not in cfg.description.strip(), name
        over = apply_overrides(
            cfg,
            {
                "epochs": 1,
                "img_size": 64,
                "pretrained": False,
                "batch_size": 8,
                "device": "cpu",
                "model.dropout": 0.1,
            },
        )
        assert (over.train.epochs, over.data.img_size, over.model.pretrained) == (1, 64, False)
        dump_config(over, tmp_path / f"{name}.yaml")
        assert load_config(tmp_path / f"{name}.yaml") == over
    assert load_preset(tmp_path / "seed-s1-cnn-basic.yaml").train.epochs == 1  # a path works too
    with pytest.raises(ConfigError, match="unknown preset"):
        load_preset("no-such-preset")


def test_reference_hyperparameters_are_exact():
    for name, acc in REFERENCE.items():
        c = load_preset(name)
        assert c.reference == {"accuracy": acc}
        assert (c.optim.name, c.optim.lr, c.data.img_size, c.train.loss) == (
            "adam",
            1e-3,
            224,
            "cross_entropy",
        )
        assert c.train.label_smoothing == 0 and c.optim.weight_decay == 0
    for name in ("seed-t1-resnet50-frozen", "seed-t2-resnet50-finetune", "seed-t3-densenet121-progressive"):
        c = load_preset(name)
        assert (c.data.batch_size, c.train.epochs, c.model.pretrained) == (32, 10, True)
        assert (c.schedule.name, c.schedule.step_size, c.schedule.gamma, c.schedule.warmup_epochs) == (
            "step",
            7,
            0.1,
            0,
        )
    t1, t2, t3 = (load_preset(n) for n in list(REFERENCE)[:3])
    assert (t1.model.arch, t1.model.freeze, t1.model.unfreeze_schedule) == ("resnet50", "backbone", {})
    assert (t2.model.arch, t2.model.freeze, t2.model.dropout) == ("resnet50", "none", 0.5)
    assert t2.data.aug.random_crop and t2.data.aug.hflip and t2.data.aug.rotation > 0
    assert t3.model.arch == "densenet121" and t3.model.unfreeze_schedule[0] == 0
    assert max(t3.model.unfreeze_schedule.items())[1] == -1
    s1, s2, s3 = (load_preset(n) for n in list(REFERENCE)[3:])
    for s in (s1, s2, s3):
        assert (s.model.arch, s.model.pretrained, s.data.batch_size, s.train.epochs) == (
            "scratch_cnn",
            False,
            64,
            40,
        )
    assert len(s1.model.channels) == 3 and not s1.model.batchnorm and s1.model.dropout == 0
    assert not any([s1.data.aug.random_crop, s1.data.aug.hflip, s1.data.aug.color_jitter])
    assert len(s2.model.channels) == 4 and s2.model.batchnorm and s2.model.dropout > 0
    assert not any([s2.data.aug.random_crop, s2.data.aug.hflip, s2.data.aug.color_jitter])
    assert (
        s3.model == s2.model
        and s3.data.aug.random_crop
        and s3.data.aug.hflip
        and s3.data.aug.color_jitter > 0
    )
    st = load_preset("strong-resnet50-448")
    assert (st.data.img_size, st.data.resize_size, st.data.batch_size) == (448, 512, 64)
    assert (st.optim.name, st.optim.lr, st.optim.momentum, st.optim.nesterov, st.optim.weight_decay) == (
        "sgd",
        0.01,
        0.9,
        True,
        5e-4,
    )
    assert (st.schedule.name, st.train.label_smoothing, st.train.epochs) == ("cosine", 0.1, 100)
    assert st.schedule.warmup_epochs > 0 and st.reference == {"accuracy": 0.94}


def test_presets_command_lists_names_and_descriptions():
    res = CliRunner().invoke(build_app(), ["presets"], terminal_width=250)
    assert res.exit_code == 0
    for name in CLASSIFICATION:
        assert name in res.output


@pytest.mark.slow
@pytest.mark.parametrize("name", CLASSIFICATION)
def test_preset_runs_end_to_end_reduced(name, tiny_prepared, tmp_path):
    run = tmp_path / "run"
    args = [
        "train",
        "--preset",
        name,
        "--data",
        str(tiny_prepared),
        "--out",
        str(run),
        "--epochs",
        "1",
        "--img-size",
        "64",
        "--batch-size",
        "8",
        "--no-pretrained",
        "--device",
        "cpu",
        "--no-progress",
        "--set",
        "data.resize_size=72",
    ]
    res = CliRunner().invoke(build_app(), args)
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(build_app(), ["evaluate", str(run), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    m = json.loads((run / "metrics_test.json").read_text())
    assert m["n_images"] == 8 and 0 <= m["accuracy"] <= 1
