"""Markdown tables and library versions shared by the bench scripts."""

from __future__ import annotations

import platform


def markdown_table(columns: list[str], rows: list[list[str]]) -> str:
    """A GitHub markdown table: a header row, the separator, then one line per row of already formatted cells."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def ratio(value: float, reference: float) -> str:
    """``value / reference`` as ``0.42x`` (``nan`` against a zero reference)."""
    return f"{value / reference if reference else float('nan'):.2f}x"


def versions(*extra: str) -> str:
    """Python, torch and transformers versions, then ``extra`` packages' (e.g. "peft"), then the machine."""
    import importlib

    import torch
    import transformers

    parts = [f"python {platform.python_version()}", f"torch {torch.__version__}",
             f"transformers {transformers.__version__}"]
    parts += [f"{name} {importlib.import_module(name).__version__}" for name in extra]
    return ", ".join(parts)
