"""A private network and process namespace for tests that start Ray heads and an sshd on 127.0.0.1.

Inside it, 127.0.0.1 is a loopback of its own (Ray's default ports are free, nothing is reachable from outside),
`ray stop` sees only the processes started in it, /tmp/ray is a folder of the test's, and everything still
running when the script ends is killed with the namespace. Needs root (CI and the dev machines run as root).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]


def unshare_problem() -> str | None:
    """Why namespaces cannot be made here, or None when they can."""
    if shutil.which("unshare") is None:
        return "the unshare command (util-linux) is not installed"
    probe = subprocess.run(["unshare", "--net", "--pid", "--fork", "--mount-proc", "true"], capture_output=True,
                           text=True)  # fmt: skip
    return None if probe.returncode == 0 else f"unshare --net --pid failed: {probe.stderr.strip()}"


def run_in_sandbox(script: str, root: Path, timeout: float, binds: dict[str, Path] | None = None):
    """Run bash `script` (from the repository root, with the test's venv first on PATH) in fresh namespaces.

    `binds` maps a path inside to a file or folder of the test's, mounted over it only inside (/tmp/ray always)."""
    (root / "ray_tmp").mkdir(exist_ok=True)
    Path("/tmp/ray").mkdir(exist_ok=True)  # the mount point must exist (Ray makes it anyway)
    binds = {"/tmp/ray": root / "ray_tmp", **(binds or {})}
    mounts = [f"mount --bind {outside} {inside}" for inside, outside in binds.items()]
    prologue = "\n".join(["set -euo pipefail", "ip link set lo up", *mounts, f'export PATH="{VENV_BIN}:$PATH"',
                          f"cd {REPO}"])  # fmt: skip
    return subprocess.run(["unshare", "--net", "--pid", "--fork", "--mount-proc", "bash", "-c",
                           prologue + "\n" + script], capture_output=True, text=True, timeout=timeout)  # fmt: skip
