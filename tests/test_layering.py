"""The package's layers (../shared/design.md): data flows top to bottom and imports only
point down. A lower layer importing a higher one (at module level or inside a function)
fails here, naming the file, the line and both layers."""

import ast
from pathlib import Path

import pytest

import resnorm

# Highest first. Modules of the same layer may import each other.
LAYERS = [
    ("cli", "__main__"),
    ("lab", "demo", "bench"),
    ("train",),
    ("diagnostics",),
    ("data",),
    ("models",),
    ("blocks",),
    ("norms",),
    ("kernels",),
    ("errors", "_checks", "_io", "_progress"),  # the foundation every layer may use
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}
ROOT = Path(resnorm.__file__).parent


def _layer(module: str) -> str | None:
    """The layer of a dotted module inside resnorm (``resnorm.train.loop`` -> ``train``)."""
    parts = module.split(".")
    if parts[0] != "resnorm" or len(parts) == 1:
        return None
    return parts[1]


def _module_of(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path):
    """(line, imported module) for every import in ``path``, relative ones resolved."""
    module = _module_of(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if node.module is None and node.level:  # from . import x, y: each a module
                for alias in node.names:
                    yield node.lineno, f"{target}.{alias.name}"
            else:
                yield node.lineno, target


def _violations() -> list[str]:
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        mine = _layer(_module_of(path))
        if mine is None:  # resnorm/__init__.py: the public front door re-exports
            continue
        for line, target in _imports(path):
            theirs = _layer(target)
            if (
                theirs is None
                or theirs == mine
                or theirs not in RANK
                and not ((ROOT / f"{theirs}.py").exists() or (ROOT / theirs).is_dir())
            ):
                continue  # outside resnorm, the same layer, or a name of the package root
                # (`from .. import __version__`)
            if RANK[theirs] < RANK[mine]:
                found.append(
                    f"{path.relative_to(ROOT.parent)}:{line}: {mine} imports "
                    f"{target} ({theirs}, a higher layer)"
                )
    return found


def test_every_module_belongs_to_a_layer():
    names = {
        p.stem if p.is_file() else p.name
        for p in ROOT.iterdir()
        if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").exists()
    }
    assert names <= set(RANK), f"modules without a layer: {sorted(names - set(RANK))}"


def test_imports_only_point_down():
    violations = _violations()
    assert not violations, "\n".join(violations)


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The check itself can fail: a norms module importing the lab is caught."""
    fake = tmp_path / "resnorm"
    (fake / "norms").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "norms" / "__init__.py").write_text("")
    (fake / "norms" / "bad.py").write_text("def f():\n    from ..lab import run_lab\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", fake)
    assert _violations() == [
        "resnorm/norms/bad.py:2: norms imports resnorm.lab (lab, a higher layer)"
    ]


@pytest.mark.parametrize(
    "path, expected",
    [("resnorm/train/loop.py", "resnorm.train.loop"), ("resnorm/lab/__init__.py", "resnorm.lab")],
)
def test_module_names(path, expected):
    assert _module_of(ROOT.parent / path) == expected
