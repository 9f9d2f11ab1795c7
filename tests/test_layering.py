"""Imports run one way: a module imports only from its own folder or the folders below it.

The order, lowest first, is ``LAYERS``; the top-level modules (``finetune.py``,
``__init__.py``) and any folder not in the list sit above all of them. Every import counts,
those inside functions included: a deferred import is still a dependency.
"""

import ast
from pathlib import Path

import symnoise_megatron

LAYERS = ("common", "noise", "data", "model", "runtime", "checkpoint", "evaluation", "training", "commands")
PACKAGE = "symnoise_megatron"
ROOT = Path(symnoise_megatron.__file__).parent
TOP = len(LAYERS)


def layer_of(parts) -> int:
    """The rank of the module named by ``parts`` (inside the package, without its name)."""
    return LAYERS.index(parts[0]) if parts and parts[0] in LAYERS else TOP


def module_parts(path: Path):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def imported_modules(path: Path):
    """(line, dotted name inside the package) of every package import in ``path``."""
    parts = module_parts(path)
    package = parts if path.name == "__init__.py" else parts[:-1]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    yield node.lineno, alias.name.split(".")[1:]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] + (node.module.split(".") if node.module else [])
            elif node.module == PACKAGE or (node.module or "").startswith(PACKAGE + "."):
                base = node.module.split(".")[1:]
            else:
                continue
            for alias in node.names:
                # ``from symnoise_megatron import data`` names a folder; ``import __version__`` the package.
                candidate = base + [alias.name]
                is_module = (ROOT.joinpath(*candidate).is_dir()
                             or ROOT.joinpath(*candidate).with_suffix(".py").is_file())
                yield node.lineno, candidate if is_module else base


def upward_imports():
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        own = TOP if path.parent == ROOT else layer_of(module_parts(path))
        for line, target in sorted(set((line, tuple(target)) for line, target in imported_modules(path))):
            if layer_of(target) > own:
                name = ".".join([PACKAGE, *target])
                found.append(f"{path.relative_to(ROOT.parent)}:{line} imports {name} "
                             f"({LAYERS[own] if own < TOP else 'top'} < "
                             f"{LAYERS[layer_of(target)] if layer_of(target) < TOP else 'top'})")
    return found


def test_no_module_imports_from_a_layer_above_it():
    upward = upward_imports()
    assert not upward, "imports that run upward (order: " + " < ".join(LAYERS) + " < top-level):\n" + "\n".join(upward)


def test_the_walk_sees_function_level_and_relative_imports(tmp_path, monkeypatch):
    folder = tmp_path / PACKAGE / "noise"
    folder.mkdir(parents=True)
    (tmp_path / PACKAGE / "__init__.py").write_text("")
    (folder / "__init__.py").write_text("")
    (tmp_path / PACKAGE / "training").mkdir()
    (tmp_path / PACKAGE / "training" / "__init__.py").write_text("")
    (tmp_path / PACKAGE / "training" / "loop.py").write_text("")
    (folder / "low.py").write_text("def f():\n    from ..training import loop\n    from symnoise_megatron.training.loop import x\n")
    monkeypatch.setitem(globals(), "ROOT", tmp_path / PACKAGE)
    upward = upward_imports()
    assert len(upward) == 2 and all("noise/low.py" in line and "training.loop" in line for line in upward), upward
