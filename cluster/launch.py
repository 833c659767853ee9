"""`ray submit <cluster.yaml> cluster/launch.py -- key=value ...`: an rlft run driven from the cluster's head node.

`ray submit` copies this file to the head and runs it there with the arguments after `--`; the run joins the
cluster's Ray (RAY_ADDRESS=auto) instead of starting its own, and writes its run folder under $RLFT_RUNS/runs
(default: the head's home). With worker nodes, RLFT_RUNS has to name storage every node mounts at the same path (the
learners write their checkpoints there; a learner that does not see the run folder stops the run with one line).
A sweep works the same way: `ray submit <cluster.yaml> cluster/launch.py -- tune <sweep> [key=value ...]`.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("RAY_ADDRESS", "auto")
# run folders land in $RLFT_RUNS/runs (default ~/runs), whatever folder `ray submit` ran this in
os.chdir(os.environ.get("RLFT_RUNS") or Path.home())

if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["tune"]:
        from rlft.tune import main

        main(args[1:])
    else:
        from rlft.run import main

        main(args)
