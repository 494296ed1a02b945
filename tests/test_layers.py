"""The package's layering (docs/ARCHITECTURE.md): every import inside mimkit — module level or inside a function —
goes to the same layer or a lower one. A new upward import fails here with the file, line and the two layers."""

import ast
from pathlib import Path

import pytest

import mimkit

#: lowest first; a module belongs to the first entry that is its name or a package above it
LAYERS: list[tuple[str, ...]] = [
    ("mimkit", "mimkit.errors", "mimkit.progress", "mimkit.config", "mimkit.presets"),
    ("mimkit.data",),
    ("mimkit.masking", "mimkit.models", "mimkit.losses", "mimkit.runtime"),
    ("mimkit.viz",),
    ("mimkit.teacher",),
    ("mimkit.methods",),
    ("mimkit.train",),
    ("mimkit.interop",),
    ("mimkit.eval",),
    ("mimkit.finetune", "mimkit.analysis", "mimkit.bench"),
    ("mimkit.api",),
    ("mimkit.commands", "mimkit.cli", "mimkit.__main__"),
]
SRC = Path(mimkit.__file__).parent


def layer_of(module: str) -> int:
    best, depth = None, -1
    for i, names in enumerate(LAYERS):
        for name in names:  # "mimkit" itself (its __init__) only by name: a new top-level module must be placed
            inside = module.startswith(name + ".") and name != "mimkit"
            if (module == name or inside) and name.count(".") > depth:
                best, depth = i, name.count(".")
    assert best is not None, f"{module} is in no layer of tests/test_layers.py: add it to LAYERS"
    return best


def module_name(path: Path, root: Path = SRC) -> str:
    parts = ["mimkit", *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path):
    """(line, imported module) for every ``import mimkit...`` / ``from mimkit... import`` in the file."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mimkit") and not node.level:
            yield node.lineno, node.module
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("mimkit"):
                    yield node.lineno, alias.name


def upward_imports(root: Path = SRC) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        me = module_name(path, root)
        mine = layer_of(me)
        for line, target in imports(path):
            if target == "mimkit":  # `from mimkit import __version__`
                continue
            theirs = layer_of(target)
            if theirs > mine:
                found.append(f"{path.relative_to(root)}:{line} {me} (layer {mine}) imports {target} (layer {theirs})")
    return found


def test_no_module_imports_a_higher_layer():
    assert upward_imports() == []


def test_the_check_sees_function_level_imports_and_names_the_offender(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "probe.py").write_text("def f():\n    from mimkit.train.engine import Engine\n    return Engine\n")
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "ok.py").write_text("import mimkit.models.vit\nfrom mimkit.errors import MimkitError\n")
    found = upward_imports(tmp_path)
    assert found == ["models/probe.py:2 mimkit.models.probe (layer 2) imports mimkit.train.engine (layer 6)"]
    (tmp_path / "newtop.py").write_text("")  # a new top-level module must be given a layer
    with pytest.raises(AssertionError, match="mimkit.newtop is in no layer"):
        upward_imports(tmp_path)


def test_no_source_file_is_over_500_lines():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > 500}
    assert long == {}
