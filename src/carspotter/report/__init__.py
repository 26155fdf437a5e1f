"""The experiment report: tables in the reference study's layout, curves, confusion, retrieval examples."""

from carspotter.report.build import build_report

__all__ = ["build_report"]
