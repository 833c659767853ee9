"""`ray submit <cluster.yaml> cluster/launch.py -- key=value ...`: an rlft run driven from the cluster's head node.

`ray submit` copies this file to the head and runs it there with the arguments after `--`; the run joins the
cluster's Ray (RAY_ADDRESS=auto) instead of starting its own, and writes its run folder on the head under ~/runs.
A sweep works the same way: `ray submit <cluster.yaml> cluster/launch.py -- tune <sweep> [key=value ...]`.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("RAY_ADDRESS", "auto")
os.chdir(Path.home())  # run folders land in ~/runs on the head, whatever folder `ray submit` ran this in

if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["tune"]:
        from rlft.tune import main

        main(args[1:])
    else:
        from rlft.run import main

        main(args)
