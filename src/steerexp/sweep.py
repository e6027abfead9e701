"""`steerexp-sweep`: look after a sweep, whatever its launcher (basic, gpus, slurm/submitit, ray).

    steerexp-sweep status <sweep dir>                  completed / failed / running / pending / missing jobs
    steerexp-sweep rerun <sweep dir>                   relaunch only the failed and missing jobs
    steerexp-sweep rerun <sweep dir> --devices 2,3     ... on these GPUs (default: the sweep's own)
    steerexp-sweep best <sweep dir>                    the completed jobs ranked by technique/train_objective
    steerexp-sweep best <sweep dir> --by KEY [--max]   ... by another metric of metrics.json

`best` picks among restarts (e.g. `seed=0,1,2,3,4`) by the training objective over every training pair
(`technique/train_objective`, lowest first), which looks at no evaluation seed. Ranking by an evaluation
metric picks on the seeds that metric was measured on; `best` says so when --by names one.

The state comes from `<sweep dir>/.sweep/` and the markers in each job dir: launcher=gpus writes it, and
the Hydra callback of conf/config.yaml (hydra_plugins/steerexp_launchers/sweep_callback.py) for every other
launcher, in the job's own process. A rerun starts each job from its saved spec (the same composed config,
job number and run dir, so a W&B run resumes under its deterministic id) in a fresh process of its own:
over the sweep's device pool for a gpus sweep; one after another, on this process's devices (or over
--devices), for the others (a SLURM or Ray sweep's jobs are rerun here, not on the cluster). Jobs are
"failed" with a FAILED marker in their run dir and "missing" without COMPLETED (killed with the sweep, a
damaged COMPLETED marker, or, for launcher=gpus, never started). A job whose process is alive (its RUNNING
marker, checked) is "running", and a job the live gpus sweep has yet to start is "pending": a rerun refuses
both, with one line each, so a job never runs twice into one directory. Code is imported anew, so a fix in
the package applies to the rerun; the config does not change. Exit code 1 if any job is still not completed
afterwards (running and pending ones included), 2 when the directory is not a sweep or its state is damaged
(one line saying which).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from hydra_plugins.steerexp_launchers import sweepstate


def _devices(text: str | None):
    return None if text is None else [d for d in text.split(",") if d.strip()]


def _no_jobs(sweep_dir: Path) -> int:
    print(f"sweep {sweep_dir}: no job has started (the sweep was stopped before its first job, or is starting "
          "now): relaunch it with steerexp -m ...")
    return 1


def status(sweep_dir: Path) -> int:
    jobs = sweepstate.read(sweep_dir)
    if not jobs:
        return _no_jobs(sweep_dir)
    for job in jobs:
        print(f"#{job.num:<4} {job.state:<9} {' '.join(job.overrides)}" + (f"   {job.detail}" if job.detail else ""))
    print(sweepstate.summary(sweep_dir, jobs))
    return 0 if all(j.state == sweepstate.COMPLETED for j in jobs) else 1


def rerun(sweep_dir: Path, devices=None, jobs_per_device: int | None = None) -> int:
    jobs = sweepstate.read(sweep_dir)
    if not jobs:
        return _no_jobs(sweep_dir)
    busy = [j for j in jobs if j.busy]
    for job in busy:
        print(f"steerexp-sweep: {job.busy}; not rerunning it", file=sys.stderr)
    todo = [j for j in jobs if j.rerunnable]
    if not todo:
        if busy:
            print(f"sweep {sweep_dir}: nothing to rerun now ({len(busy)} jobs still running or pending)")
            return 1
        print(f"sweep {sweep_dir}: all {len(jobs)} jobs completed; nothing to rerun")
        return 0

    def announce() -> None:  # after the checks, before the jobs run
        print(f"rerunning {len(todo)} of {len(jobs)} jobs: " + ", ".join(f"#{j.num}" for j in todo), flush=True)

    sweepstate.rerun(sweep_dir, todo, devices, jobs_per_device, announce=announce)
    jobs = sweepstate.read(sweep_dir)
    print(sweepstate.summary(sweep_dir, jobs))
    return 0 if all(j.state == sweepstate.COMPLETED for j in jobs) else 1


def best(sweep_dir: Path, by: str = "technique/train_objective", largest: bool = False) -> int:
    """Print the completed jobs ranked by `by` (lowest first unless `largest`); the first is the pick."""
    import json
    import math

    jobs = sweepstate.read(sweep_dir)
    scored = []
    for job in jobs:
        metrics_file = job.run_dir / "metrics.json"
        if job.state != sweepstate.COMPLETED or not metrics_file.is_file():
            continue
        try:
            value = json.loads(metrics_file.read_text()).get(by)
        except (ValueError, AttributeError):  # a damaged file: that job is not ranked, and we say so
            print(f"steerexp-sweep: job #{job.num}'s {metrics_file} is damaged (not a JSON object of metrics): "
                  "not ranked", file=sys.stderr)
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            scored.append((value, job))
    if not scored:
        raise ValueError(f"no completed job of {sweep_dir} has a finite number (not a bool) for {by!r} in its "
                         "metrics.json")
    seed_free = by.startswith(("technique/train_objective", "delta_norm/", "params/"))  # read no evaluation seed
    if not seed_free:
        print(f"steerexp-sweep: {by} may be measured on the evaluation seeds; a pick by it is a pick on those "
              "seeds (judge the pick on other seeds)", file=sys.stderr)
    settings = [{o.split("=")[0]: o for o in job.overrides if o.split("=")[0] != "seed"} for _, job in scored]
    differ = sorted(k for k in set().union(*settings) if len({s.get(k) for s in settings}) > 1)
    if differ and seed_free:
        print(f"steerexp-sweep: the jobs differ in {', '.join(differ)}, not only in seed; training objectives of "
              "different settings (term weights, budgets) are not on one scale: rank restarts of one setting",
              file=sys.stderr)
    scored.sort(key=lambda t: -t[0] if largest else t[0])
    for rank, (value, job) in enumerate(scored):
        mark = "best" if rank == 0 else "    "
        print(f"{mark} #{job.num:<4} {by}={value:.6g}  {' '.join(job.overrides)}  {job.run_dir}")
    skipped = len(jobs) - len(scored)
    if skipped:
        print(f"({skipped} of {len(jobs)} jobs not ranked: not completed, or no {by})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="steerexp-sweep", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_status = sub.add_parser("status", help="list the jobs of a sweep: completed, failed, running, pending or missing")
    p_status.add_argument("sweep_dir", type=Path)
    p_rerun = sub.add_parser("rerun", help="relaunch only the failed and missing jobs of a sweep")
    p_rerun.add_argument("sweep_dir", type=Path)
    p_rerun.add_argument(
        "--devices", default=None, help="comma-separated CUDA_VISIBLE_DEVICES values (default: the sweep's)"
    )
    p_rerun.add_argument("--jobs-per-device", type=int, default=None)
    p_best = sub.add_parser("best", help="rank the completed jobs by a metric (default: the training objective)")
    p_best.add_argument("sweep_dir", type=Path)
    p_best.add_argument("--by", default="technique/train_objective", help="a key of the jobs' metrics.json")
    p_best.add_argument("--max", action="store_true", help="the largest value is best (default: the smallest)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s")
    if not args.sweep_dir.is_dir():
        print(f"steerexp-sweep: {args.sweep_dir} is not a directory: give the sweep's dir, e.g. "
              "outputs/multirun/<date>/<time>", file=sys.stderr)
        return 2
    try:
        if args.command == "status":
            return status(args.sweep_dir)
        if args.command == "best":
            return best(args.sweep_dir, args.by, args.max)
        return rerun(args.sweep_dir, _devices(args.devices), args.jobs_per_device)
    except (OSError, ValueError) as err:  # not a sweep, its state damaged or unreadable: one line, no traceback
        lines = str(err).splitlines() or [type(err).__name__]
        print(f"steerexp-sweep: {lines[0]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
