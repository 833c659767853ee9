"""The package layout users and other projects rely on: only `rlft` is importable once installed."""

import subprocess
import sys


def test_only_rlft_is_on_the_import_path_outside_the_checkout(tmp_path):
    probe = ("import importlib.util as u, rlft.envs, rlft.algorithms; "
             "print(u.find_spec('envs'), u.find_spec('algorithms'), rlft.envs.__name__, rlft.algorithms.__name__)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["None", "None", "rlft.envs", "rlft.algorithms"]
