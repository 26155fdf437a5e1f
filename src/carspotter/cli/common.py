"""Shared CLI plumbing: library errors as one clear line and a non-zero exit; config flags from one table;
the second-look (CAM box / zoom) options that evaluate, predict and serve all take."""

from __future__ import annotations

import functools
import inspect
import logging
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

import typer

if TYPE_CHECKING:
    from carspotter.explain.box import BoxSettings
    from carspotter.explain.zoom import ZoomSettings

F = TypeVar("F", bound=Callable[..., Any])

# Errors that are the user's input, not our bug: print the message (it names the file/field), exit 2.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, FileExistsError, RuntimeError)


def friendly_errors(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except USER_ERRORS as e:
            typer.echo(f"error: {e}", err=True)
            if "--debug" in sys.argv:
                raise
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


class _StdStream(logging.StreamHandler):
    """A handler that writes to whatever sys.stdout / sys.stderr is at the time (test runners swap them)."""

    def __init__(self, err: bool) -> None:
        super().__init__()
        self.err = err

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr if self.err else sys.stdout

    @stream.setter
    def stream(self, _value: object) -> None:
        pass


def setup_logging(level: int = logging.INFO) -> None:
    """The library logs; the CLI shows carspotter's INFO lines (progress) on stdout, warnings on stderr."""
    root = logging.getLogger("carspotter")
    if any(isinstance(h, _StdStream) for h in root.handlers):
        return
    out, err = _StdStream(err=False), _StdStream(err=True)
    out.addFilter(lambda r: r.levelno < logging.WARNING)
    err.setLevel(logging.WARNING)
    for h in (out, err):
        h.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(h)
    root.setLevel(level)


CONFIG_PANEL = "Config fields (short for --set FIELD=VALUE; unset = the preset's value)"


def config_options(fn: F) -> F:
    """Replace `fn`'s `overrides` parameter by one option per `config.ALIASES` entry, so the short flags and
    their mapping onto config fields live in that one table; `fn` gets the flags given as {alias: value}."""
    from carspotter.config import ALIASES

    options = [_alias_option(name, dotted) for name, dotted in ALIASES.items()]
    flag_names = {p.name for p in options}
    sig = inspect.signature(fn, eval_str=True)
    params: list[inspect.Parameter] = []
    for p in sig.parameters.values():
        params.extend(options if p.name == "overrides" else [p])

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        given = {k: kwargs.pop(k) for k in list(kwargs) if k in flag_names}
        overrides = {
            k: str(v.resolve()) if isinstance(v, Path) else v for k, v in given.items() if v is not None
        }
        return fn(*args, overrides=overrides, **kwargs)

    wrapper.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]  # what typer reads
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    return wrapper  # type: ignore[return-value]


def _alias_option(name: str, dotted: str) -> inspect.Parameter:
    """`--img-size` etc.: type and help from the config field (`metadata["help"]`, else its choices)."""
    from carspotter.config import config_field

    f, tp = config_field(dotted)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):  # X | None: the flag takes an X
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    choices = " | ".join(map(str, typing.get_args(tp))) if typing.get_origin(tp) is Literal else ""
    if f.metadata.get("path"):
        tp = Path
    elif tp not in (bool, int, float, str):
        tp = str  # Literal, list, dict: checked (and parsed) by apply_overrides like a --set value
    flag = "--" + name.replace("_", "-")
    decls = [f"{flag}/--no-{name.replace('_', '-')}"] if tp is bool else [flag]
    help_ = f.metadata.get("help") or choices or ""
    option = typer.Option(
        None,
        *decls,
        help=f"{dotted}: {help_}" if help_ else dotted,
        rich_help_panel=CONFIG_PANEL,
        show_default=False,
    )
    return inspect.Parameter(
        name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=option, annotation=tp | None
    )


# The second-look options, declared once for `evaluate`, `predict` and `serve` (`zoom: ZoomFlag = False`).
ZoomFlag = Annotated[
    bool,
    typer.Option("--zoom/--no-zoom", help="Second look, zoomed on the CAM box (the two answers combined)."),
]
ZoomCombine = Annotated[str, typer.Option("--zoom-combine", help="mean | zoom | gate (explain/zoom.py).")]
ZoomMargin = Annotated[
    float | None, typer.Option("--zoom-margin", help="Context around the box for the crop.")
]
BoxThreshold = Annotated[float | None, typer.Option("--box-threshold", help="CAM box threshold (0..1).")]
BoxMargin = Annotated[float | None, typer.Option("--box-margin", help="CAM box margin per side (0..1).")]


def zoom_settings(zoom: bool, combine: str, margin: float | None) -> ZoomSettings | None:
    """The flags as ZoomSettings (its defaults where a flag is unset; None = one look), checked there."""
    from carspotter.explain.zoom import ZoomSettings

    if not zoom:
        return None
    return ZoomSettings(combine) if margin is None else ZoomSettings(combine, margin=margin)


def box_settings(threshold: float | None, margin: float | None) -> BoxSettings:
    """The flags as BoxSettings, keeping its measured defaults for the ones not given."""
    from dataclasses import replace

    from carspotter.explain.box import BoxSettings

    given = {"threshold": threshold, "margin": margin}
    return replace(BoxSettings(), **{k: v for k, v in given.items() if v is not None})
