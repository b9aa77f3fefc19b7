"""The package layers point one way: a module imports only its own layer and those below.

    5  cli, commands, quickstart,       entry points, the notebooks' helpers
       quickstart_report, notebook, testing
    4  train, eval, infer               loops, metrics, serving
    3  data, io                         corpora and pipelines; weight files
    2  codec, lm                        the models
    1  nn, kernels, parallel            layers, kernels, mesh and rules
    0  config modules                   typed dataclasses and what they need: `*/config.py`,
                                        `sfm.config`, `sfm.typed`, `sfm.errors`, `sfm.host`,
                                        `sfm.lm.layout`

Config modules import only other config modules, so loading a preset needs no framework. The
imports are read with `ast` (none of the code runs), function-level imports included.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sfm"
LAYERS = {
    "cli": 5, "commands": 5, "quickstart": 5, "quickstart_report": 5, "notebook": 5,
    "testing": 5, "__main__": 5,
    "train": 4, "eval": 4, "infer": 4,
    "data": 3, "io": 3,
    "codec": 2, "lm": 2,
    "nn": 1, "kernels": 1, "parallel": 1,
}  # fmt: skip
CONFIG_MODULES = {"sfm", "sfm.config", "sfm.errors", "sfm.host", "sfm.lm.layout", "sfm.typed"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    """The layer of an sfm module (0 for config modules, 5 for `__main__` entry points)."""
    parts = module.split(".")
    if parts[-1] == "__main__":
        return LAYERS["cli"]
    if module in CONFIG_MODULES or parts[-1] == "config" or len(parts) == 1:
        return 0
    if parts[1] not in LAYERS:
        raise AssertionError(f"{module}: sfm.{parts[1]} has no layer; add it to LAYERS")
    return LAYERS[parts[1]]


def _is_main_guard(node: ast.AST) -> bool:
    """`if __name__ == "__main__":`: entry-point code, which may call the CLI."""
    test = getattr(node, "test", None)
    return (
        isinstance(node, ast.If)
        and isinstance(test, ast.Compare)
        and isinstance(test.left, ast.Name)
        and test.left.id == "__name__"
    )


def _nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of `tree` except those under a `__main__` guard."""
    out, todo = [], [tree]
    while todo:
        node = todo.pop()
        out.append(node)
        todo += [n for n in ast.iter_child_nodes(node) if not _is_main_guard(n)]
    return out


def sfm_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of an sfm module in the file, at any depth (except
    under `if __name__ == "__main__":`)."""
    found = []
    for node in _nodes(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("sfm")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "sfm":  # `from sfm import quickstart`: submodules
                found += [(node.lineno, f"sfm.{a.name}") for a in node.names]
            elif node.module.startswith("sfm."):
                found.append((node.lineno, node.module))
    return found


def violations() -> list[str]:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = module_name(path)
        for line, target in sfm_imports(path):
            if layer(target) > layer(here):
                problems.append(
                    f"{path.relative_to(ROOT)}:{line}: {here} (layer {layer(here)}) imports "
                    f"{target} (layer {layer(target)})"
                )
    return problems


def test_every_import_points_down_or_sideways() -> None:
    assert violations() == []


def test_the_check_catches_an_upward_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from sfm.train.loop import train\n")
    assert sfm_imports(bad) == [(2, "sfm.train.loop")]
    assert layer("sfm.lm.model") < layer("sfm.train.loop")
    assert layer("sfm.train.config") == layer("sfm.lm.layout") == 0


# Loads every preset the way `sfm train` does and prints `sfm --help` and `sfm train --help`,
# then lists what got imported.
LIGHT_SCRIPT = """
import contextlib, io, os, sys
from pathlib import Path
before = dict(os.environ)
import sfm, sfm.cli, sfm.config
for path in sorted(Path("configs").rglob("*.yaml")):
    sfm.config.load_config(path)
with contextlib.redirect_stdout(io.StringIO()):
    assert sfm.cli.main(["--help"]) == 0 and sfm.cli.main(["train", "--help"]) == 0
changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))
heavy = [m for m in ("jax", "flax", "grain", "tensorflow_datasets", "torch") if m in sys.modules]
print(changed, heavy)
"""


def test_presets_and_help_import_no_framework_and_change_no_process_state() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "NPROC")}
    cmd = [sys.executable, "-c", LIGHT_SCRIPT]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[] []"
