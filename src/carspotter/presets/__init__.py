"""Named experiment presets: each `<name>.yaml` here is a saved ExperimentConfig.

`seed-*` reproduce the reference study's runs with its hyperparameters (its top-1 in `reference`);
`strong-*` are stronger recipes.
"""

from __future__ import annotations

from pathlib import Path

from carspotter.config import ConfigError, ExperimentConfig, load_config

PRESET_DIR = Path(__file__).parent


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_path(name: str) -> Path:
    return PRESET_DIR / f"{name}.yaml"


def load_preset(name_or_path: str | Path) -> ExperimentConfig:
    """A preset by name (`seed-t1-resnet50-frozen`) or any ExperimentConfig YAML file by path."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.is_file():
        return load_config(p)
    if not preset_path(str(name_or_path)).is_file():
        raise ConfigError(
            f"unknown preset {str(name_or_path)!r}; known: {', '.join(list_presets())} "
            "(or pass the path of a YAML file)"
        )
    return load_config(preset_path(str(name_or_path)))


def preset_descriptions() -> dict[str, str]:
    return {name: load_preset(name).description for name in list_presets()}
