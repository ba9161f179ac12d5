"""Docstrings of Python source files: the offline text corpus of the demo and the research scripts."""
from __future__ import annotations

import ast
from pathlib import Path

_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def file_docstrings(path, min_chars: int = 1) -> list[str]:
    """Module, class and function docstrings of one .py file with at least `min_chars` characters,
    in `ast.walk` order; [] for a file that cannot be read or parsed."""
    try:
        tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    except Exception:  # unreadable, not UTF-8, not Python 3: not part of the corpus
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, _DOC_NODES):
            d = ast.get_docstring(node)
            if d and len(d) >= min_chars:
                out.append(d)
    return out
