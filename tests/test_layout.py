"""The package layout users and other projects rely on: only `rlft` is importable once installed."""

import ast
import subprocess
import sys
from pathlib import Path


def test_only_rlft_is_on_the_import_path_outside_the_checkout(tmp_path):
    probe = ("import importlib.util as u, rlft.envs, rlft.algorithms; "
             "print(u.find_spec('envs'), u.find_spec('algorithms'), rlft.envs.__name__, rlft.algorithms.__name__)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["None", "None", "rlft.envs", "rlft.algorithms"]


REPO = Path(__file__).resolve().parents[1]
PURE_LAYERS = {"rlft/core": ("rlft.core",), "envs": ("rlft.core", "rlft.envs"),
               "algorithms": ("rlft.core", "rlft.envs", "rlft.algorithms")}  # fmt: skip


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_the_layers_import_only_downwards():
    """rlft/core imports nothing of rlft's above it, envs/ only core, algorithms/ only core and envs; none of them
    imports Ray or wandb (the layer above, rlft/, is the only one that knows Ray, wandb and run folders)."""
    for folder, allowed in PURE_LAYERS.items():
        files = sorted((REPO / folder).glob("*.py"))
        assert files, folder
        for path in files:
            for name in imported_modules(path):
                top = name.split(".")[0]
                assert top not in ("ray", "wandb"), f"{path.relative_to(REPO)} imports {name}"
                if top == "rlft":
                    assert name.startswith(allowed) or name == "rlft", f"{path.relative_to(REPO)} imports {name}"
