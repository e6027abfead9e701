"""Where the time of a short run goes, and the three start-up targets of issue 18, measured in one run.

    python benchmarks/startup.py                # the breakdown and the targets (median of 3 runs each)
    python benchmarks/startup.py --repeat 5     # more runs per figure
    python benchmarks/startup.py --json out.json

Each figure is a real `steerexp` process (the console script's own code path), timed from spawn to
exit by this script. Inside the child, timers wrap the phases of steerexp.run (no change to the
code measured):

    start + imports    spawn -> run() entered: the interpreter, every import, Hydra's compose, validation
    model load         steerexp.generators.from_pretrained (every family), less its fingerprint
    fingerprint        every FrozenGenerator.fingerprint() (at load and after the run)
    build rest         the technique and evaluators (steerexp.run.build less the model load)
    training           steerexp.run.train (the training loop with its checkpoints)
    evaluation         steerexp.run.evaluate
    writing            the rest of run(): deltas, metrics.json, logger (W&B finish), checkpoints dir
    exit               run() returned -> the process exited (printing, interpreter teardown)

Targets (issue 18, on the 2-core development machine):
    fixed overhead per run     <= 4 s   wall minus training and evaluation, of `evaluator=[] logger=none
                                        technique.steps=10`
    `steerexp --help`          <= 1 s
    400-step TI run            <= 15 s  wall of `steerexp evaluator=[] logger=none` (technique.steps=400)

The machine is shared: the load average is printed next to every figure; compare figures taken under the
same load. `--pythonpath DIR` measures another checkout's code with the same interpreter (e.g. a
`git archive` of an older commit's tree: PYTHONPATH=DIR/src comes first), which is how the README's
before/after table was made.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PHASES = ("start + imports", "model load", "fingerprint", "build rest", "training", "evaluation", "writing", "exit")

# the child: time the phases of steerexp.run from the inside, then run the console script's main()
CHILD = r"""
import json, sys, time
phases_file = sys.argv.pop(1)
t, c = {}, {}  # wall and CPU (this process) seconds per phase
def timed(owner, name, key):
    inner = getattr(owner, name)
    def wrapper(*args, **kwargs):
        start, cpu = time.time(), time.process_time()
        try:
            return inner(*args, **kwargs)
        finally:
            t[key] = t.get(key, 0.0) + time.time() - start
            c[key] = c.get(key, 0.0) + time.process_time() - cpu
    setattr(owner, name, wrapper)
import steerexp.run as R
from steerexp.generators.frozen import FrozenGenerator as G
for owner, name, key in ((R, "run", "run"), (R, "build", "build"), (R, "train", "training"),
                         (R, "evaluate", "evaluation"), (G, "fingerprint", "fingerprint")):
    timed(owner, name, key)
import steerexp.generators as GS
load = GS.from_pretrained  # every family's loader (load_generator calls it)
def from_pretrained(*args, **kwargs):
    start, cpu = time.time(), time.process_time()
    try:
        return load(*args, **kwargs)
    finally:
        t["load"] = t.get("load", 0.0) + time.time() - start
        c["load"] = c.get("load", 0.0) + time.process_time() - cpu
GS.from_pretrained = from_pretrained
run = R.run
def entered(*args, **kwargs):
    t["entered"], c["entered"] = time.time(), time.process_time()
    try:
        return run(*args, **kwargs)
    finally:
        t["returned"], c["returned"] = time.time(), time.process_time()
R.run = entered
import atexit
atexit.register(lambda: open(phases_file, "w").write(json.dumps({"wall": t, "cpu": c})))
from steerexp.cli import main
main()
"""


def load_average() -> float:
    return os.getloadavg()[0]


def child_env(pythonpath: str | None) -> dict:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", WANDB_MODE="disabled")
    env.pop("PYTHONWARNINGS", None)
    if pythonpath:
        env["PYTHONPATH"] = str(Path(pythonpath) / "src")
    return env


def timed_run(args: list[str], workdir: Path, pythonpath: str | None) -> dict:
    """One `steerexp <args>` in a fresh process: wall seconds and the phases."""
    phases_file = workdir / f"phases-{time.monotonic_ns()}.json"
    run_dir = workdir / f"run-{time.monotonic_ns()}"
    cmd = [sys.executable, "-c", CHILD, str(phases_file), *args, f"hydra.run.dir={run_dir}"]
    load, cpu = load_average(), children_cpu()
    spawned = time.time()
    out = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, env=child_env(pythonpath))
    exited = time.time()
    cpu = children_cpu() - cpu
    if out.returncode != 0:
        raise SystemExit(f"steerexp {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    recorded = json.loads(phases_file.read_text())
    wall = split(recorded["wall"], start=spawned, end=exited)
    cpu_phases = split(recorded["cpu"], start=0.0, end=cpu)  # the child's CPU clock starts at 0 with the process
    return {"wall": exited - spawned, "cpu": cpu, "phases": wall, "cpu_phases": cpu_phases, "load": load}


def split(t: dict, start: float, end: float) -> dict:
    """The phases of one run from the child's timers (wall or CPU clock) and the run's start and end."""
    model = t.get("load", 0.0)
    fingerprint = t.get("fingerprint", 0.0)
    inside = t["returned"] - t["entered"]
    phases = {
        "start + imports": t["entered"] - start,
        "model load": model - min(fingerprint, model),
        "fingerprint": fingerprint,
        "build rest": t.get("build", 0.0) - model,
        "training": t.get("training", 0.0),
        "evaluation": t.get("evaluation", 0.0),
        "exit": end - t["returned"],
    }
    phases["writing"] = inside - sum(v for k, v in phases.items() if k not in ("start + imports", "exit"))
    return phases


def timed_help(pythonpath: str | None, workdir: Path) -> dict:
    load, cpu = load_average(), children_cpu()
    start = time.time()
    out = subprocess.run([sys.executable, "-c", "from steerexp.cli import main; main()", "--help"], cwd=workdir,
                         capture_output=True, text=True, env=child_env(pythonpath))
    assert out.returncode == 0 and "Configuration groups" in out.stdout, out.stderr[-2000:]
    return {"wall": time.time() - start, "cpu": children_cpu() - cpu, "load": load}


def children_cpu() -> float:
    """CPU seconds (user + system) of the finished child processes so far: one run's is the difference."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def median_run(runs: list[dict]) -> dict:
    return {
        "wall": statistics.median(r["wall"] for r in runs),
        "cpu": statistics.median(r["cpu"] for r in runs),
        "phases": {k: statistics.median(r["phases"][k] for r in runs) for k in PHASES} if "phases" in runs[0] else {},
        "cpu_phases": ({k: statistics.median(r["cpu_phases"][k] for r in runs) for k in PHASES}
                       if "cpu_phases" in runs[0] else {}),
        "load": statistics.mean(r["load"] for r in runs),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--steps", type=int, default=400, help="technique.steps of the long TI run")
    ap.add_argument("--pythonpath", default=None, help="measure the checkout in this folder (its src/ first)")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    opts = ap.parse_args()

    base = ["evaluator=[]", "logger=none"]
    with tempfile.TemporaryDirectory(prefix="steerexp-startup-") as tmp:
        work = Path(tmp)
        timed_help(opts.pythonpath, work)  # warm the file cache: every figure below is a warm start
        short, long_, helps = [], [], []
        for _ in range(opts.repeat):  # interleaved, so that a change in the machine's load hits all three
            helps.append(timed_help(opts.pythonpath, work))
            short.append(timed_run(base + ["technique.steps=10"], work, opts.pythonpath))
            long_.append(timed_run(base + [f"technique.steps={opts.steps}"], work, opts.pythonpath))
    short_m, long_m, help_m = median_run(short), median_run(long_), median_run(helps)

    print(f"steerexp start-up ({'code in ' + opts.pythonpath if opts.pythonpath else 'this checkout'}; "
          f"median of {opts.repeat}; {os.cpu_count()} CPUs; torch threads: default)")
    print(f"\n{'phase (seconds)':<18} {'10 steps':>9} {f'{opts.steps} steps':>10}   {'cpu: 10':>8} {opts.steps:>6}")
    for k in PHASES:
        print(f"{k:<18} {short_m['phases'][k]:9.2f} {long_m['phases'][k]:10.2f}   "
              f"{short_m['cpu_phases'][k]:8.2f} {long_m['cpu_phases'][k]:6.2f}")
    print(f"{'wall':<18} {short_m['wall']:9.2f} {long_m['wall']:10.2f}")
    print(f"{'cpu (user+sys)':<18} {short_m['cpu']:9.2f} {long_m['cpu']:10.2f}   (wall columns left, CPU right)")
    print(f"{'load average':<18} {short_m['load']:9.2f} {long_m['load']:10.2f}")
    fixed = short_m["wall"] - short_m["phases"]["training"] - short_m["phases"]["evaluation"]
    fixed_cpu = short_m["cpu"] - short_m["cpu_phases"]["training"] - short_m["cpu_phases"]["evaluation"]
    per_step = (long_m["phases"]["training"] - short_m["phases"]["training"]) / (opts.steps - 10)
    targets = [
        ("fixed overhead per run", fixed, 4.0),
        ("steerexp --help", help_m["wall"], 1.0),
        (f"{opts.steps}-step TI run, no evaluators", long_m["wall"], 15.0),
    ]
    print(f"\n{'target':<36} {'seconds':>8} {'goal':>6}")
    for name, value, goal in targets:
        print(f"{name:<36} {value:8.2f} {goal:6.1f}  {'ok' if value <= goal else 'MISSED':6s}")
    print(f"cpu seconds of the same: fixed {fixed_cpu:.2f}, --help {help_m['cpu']:.2f}, {opts.steps}-step run "
          f"{long_m['cpu']:.2f} (on an idle machine a one-thread run's wall is close to its CPU time)")
    print(f"training per step: {1000 * per_step:.1f} ms wall; load average during --help: {help_m['load']:.2f}")
    if opts.json:
        Path(opts.json).write_text(json.dumps({"short": short_m, "long": long_m, "help": help_m, "fixed": fixed,
                                               "fixed_cpu": fixed_cpu,
                                               "per_step_s": per_step, "repeat": opts.repeat,
                                               "pythonpath": opts.pythonpath}, indent=1))


if __name__ == "__main__":
    main()
