"""The package layers of mora_dist (docs/design.md): every import between packages points down.

A package may import only packages of a lower rank; same rank = independent. An upward import or a
circle fails here with the file and the import named."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / "mora_dist"
RANK = {"kernels": 0, "utils": 0, "compat": 0, "metrics": 0, "optim": 0,
        "adapters": 1, "models": 1, "parallel": 2, "checkpoint": 3, "training": 4, "export": 5}


def _imports(path: pathlib.Path):
    for node in ast.walk(ast.parse(path.read_text())):
        names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else (
            [a.name for a in node.names] if isinstance(node, ast.Import) else [])
        for name in names:
            if name.startswith("mora_dist."):
                yield node.lineno, name.split(".")[1]


def test_every_package_has_a_layer():
    pkgs = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert pkgs == set(RANK), f"packages without a layer or layers without a package: {pkgs ^ set(RANK)}"


def test_imports_point_down():
    bad = []
    for f in sorted(ROOT.rglob("*.py")):
        rel = f.relative_to(ROOT)
        if len(rel.parts) < 2:
            continue
        pkg = rel.parts[0]
        for line, tgt in _imports(f):
            if tgt != pkg and tgt in RANK and RANK[tgt] >= RANK[pkg]:
                bad.append(f"mora_dist/{rel}:{line} imports mora_dist.{tgt} (layer {RANK[tgt]} >= {pkg}'s {RANK[pkg]})")
    assert not bad, "\n".join(bad)
