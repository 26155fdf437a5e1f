"""The `carspotter` command line. The library never parses arguments; only this package does.

Each concern registers its commands from its own module, so the files stay short.
"""

from __future__ import annotations

import typer

from carspotter.cli import data_cmds, export_cmds, report_cmds, retrieval_cmds, serve_cmds, train_cmds


def build_app() -> typer.Typer:
    app = typer.Typer(
        name="carspotter",
        help="Fine-grained car classification and retrieval (Stanford Cars).",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=False,
    )
    for mod in (data_cmds, train_cmds, retrieval_cmds, report_cmds, serve_cmds, export_cmds):
        mod.register(app)
    return app


def legacy_argv(argv: list[str]) -> list[str]:
    """`evaluate … --knn 7` (before --knn became a flag taking the run's preset) → `--knn --k 7`."""
    out: list[str] = []
    for i, a in enumerate(argv):
        out.append(a)
        if a == "--knn" and i + 1 < len(argv) and argv[i + 1].isdigit():
            out.append("--k")
    return out


def main() -> None:
    import sys

    from carspotter.cli.common import setup_logging

    setup_logging()
    sys.argv[1:] = legacy_argv(sys.argv[1:])
    build_app()()
