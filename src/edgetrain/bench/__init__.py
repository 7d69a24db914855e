"""Side-by-side comparison of presets: run (compare.py), table (report.py), pictures
(plots.py)."""

from edgetrain.bench.compare import CompareResult, Row, compare
from edgetrain.bench.report import markdown_table

__all__ = ["compare", "CompareResult", "Row", "markdown_table"]
