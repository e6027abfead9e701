"""Which data-parallel rank this process is (standard library only: the pre-flight check reads it).

With `trainer.strategy=ddp` Lightning relaunches the `steerexp` command once for every other rank, with LOCAL_RANK
set and `hydra.run.dir=<the run's dir> hydra.job.name=train_ddp_process_<rank> hydra.output_subdir=null`
appended (lightning.fabric's subprocess launcher). Such a process trains its share of every step and nothing
else: rank 0 alone claims and writes the run directory, logs to W&B and evaluates."""
from __future__ import annotations

import os
import sys


def worker_rank() -> int:
    """This process's rank when Lightning relaunched the command for a rank other than 0; 0 otherwise."""
    rank = os.environ.get("LOCAL_RANK", "")
    relaunched = any(a.startswith("hydra.job.name=train_ddp_process_") for a in sys.argv[1:])
    return int(rank) if relaunched and rank.isdigit() else 0
