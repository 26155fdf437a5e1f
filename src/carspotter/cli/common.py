"""Shared CLI plumbing: turning library errors into one clear line and a non-zero exit."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer

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
