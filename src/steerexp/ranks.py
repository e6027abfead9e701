"""Which data-parallel rank this process is (standard library only: the pre-flight check reads it).

With `trainer.strategy=ddp` Lightning relaunches the `steerexp` command once for every other rank, with LOCAL_RANK
set and `hydra.run.dir=<the run's dir> hydra.job.name=train_ddp_process_<rank> hydra.output_subdir=null`
appended (lightning.fabric's subprocess launcher). Such a process trains its share of every step and nothing
else: rank 0 alone claims and writes the run directory, logs to W&B and evaluates.

Lightning builds that command from sys.argv, which is the run's own command line only for a single run; for a
sweep's job (`-m`, or a launcher=gpus worker) `relaunch_command` builds the job's own
(steerexp.trainer.ranks_of_this_run hands it to Lightning). The module imports only the standard library; Hydra
only inside `relaunch_command`."""
from __future__ import annotations

import os
import sys


def worker_rank() -> int:
    """This process's rank when Lightning relaunched the command for a rank other than 0; 0 otherwise."""
    rank = os.environ.get("LOCAL_RANK", "")
    relaunched = any(a.startswith("hydra.job.name=train_ddp_process_") for a in sys.argv[1:])
    return int(rank) if relaunched and rank.isdigit() else 0


# the console script's entry point (pyproject: steerexp = "steerexp.cli:main"), run by the interpreter of this run
ENTRY = "import sys; from steerexp.cli import main; sys.exit(main())"
# what the relaunch sets itself, or what would make it something other than one run
_NOT_CARRIED = frozenset({"hydra.mode", "hydra.run.dir", "hydra.job.name", "hydra.output_subdir"})


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def quoted(value) -> str:
    """`value` as a quoted Hydra override value: any path (spaces, commas, `=`, quotes) reads back unchanged.
    Hydra halves the backslashes only before a quote and at the end of a quoted string."""
    import re

    text = str(value)
    return '"' + re.sub(r'(\\*)("|$)', lambda m: m.group(1) * 2 + ('\\"' if m.group(2) else ""), text) + '"'


def relaunch_command(local_rank: int, settings: dict | None = None) -> tuple[list[str], str] | None:
    """The command that starts data-parallel rank `local_rank` of the Hydra job running in this process, and the
    folder to start it in; None when the job was not composed from steerexp's configs (another Hydra app).

    The job's own single run, whatever launched it: `steerexp` (its entry point, by this interpreter) with the
    job's config name and `--config-dir`, its overrides (hydra.overrides.task, then the hydra.* ones that shape
    a run: search path, logging, env_set, ...; a sweep's job has only its own values here, never the sweep's
    lists), `settings` (key -> value, e.g. the checkpoint the run resumes from when the run, not the command
    line, chose it), then `hydra.run.dir=<the job's output dir> hydra.job.name=train_ddp_process_<rank>
    hydra.output_subdir=null`, as Lightning's own relaunch appends them: `worker_rank` reads them, the
    pre-flight leaves the directory to rank 0, and a single run is no sweep job (no sweep markers, no job dir).
    It starts in the original working directory."""
    from hydra.core.hydra_config import HydraConfig

    from steerexp import conf_dir

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    sources = list(hc.runtime.config_sources)
    main = [s for s in sources if s.provider == "main"]
    if not main or main[0].schema != "file" or os.path.realpath(str(main[0].path)) != os.path.realpath(conf_dir()):
        return None
    settings = {k: v for k, v in (settings or {}).items() if v is not None}
    command = [sys.executable, "-c", ENTRY, "--config-name", str(hc.job.config_name)]
    extra_dirs = [str(s.path) for s in sources if s.provider == "command-line" and s.schema == "file"]
    if extra_dirs:
        command += ["--config-dir", extra_dirs[0]]  # (Hydra takes one)
    command += [o for o in hc.overrides.task if _key(o) not in settings]
    command += [o for o in hc.overrides.hydra if _key(o) not in _NOT_CARRIED]
    command += [f"{k}={quoted(v)}" for k, v in settings.items()]
    command += [f"hydra.run.dir={quoted(hc.runtime.output_dir)}", f"hydra.job.name=train_ddp_process_{local_rank}",
                "hydra.output_subdir=null"]
    return command, str(hc.runtime.cwd)
