"""Where the time of a short run goes, and the three start-up targets of issue 18, measured in one run.

    python benchmarks/startup.py                # the breakdown and the targets (median of 3 runs each)
    python benchmarks/startup.py --repeat 5     # more runs per figure
    python benchmarks/startup.py --json out.json
    python benchmarks/startup.py --main-job     # also the README's main job (evaluators, W&B): where its time goes

Each figure is a real `steerexp` command (the console script's own code path, a fresh process), timed
from spawn to exit by this script. Inside the run, timers wrap the phases of steerexp.run (no change to
the code measured; a module the process imports first):

    start + imports    spawn -> run() entered: the interpreter, every import, Hydra's compose, validation
    model load         steerexp.generators.from_pretrained (every family), less its fingerprint
    fingerprint        every FrozenGenerator.proof_record() (the unchanged-proof, at load and after the run)
    build rest         the technique and evaluators (steerexp.run.build less the model load)
    training           steerexp.run.train (the training loop with its checkpoints)
    evaluation         steerexp.run.evaluate
    writing            the rest of run(): deltas, metrics.json, logger (W&B finish), checkpoints dir
    exit               run() returned -> the command exited (printing, the exit handlers)

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

# the phase timers: a module the child imports before steerexp.cli; it wraps the phases of steerexp.run and
# writes them, at the run's exit, to the file named by BENCH_PHASES_FILE
TIMERS = r"""
import atexit, json, os, time
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
import steerexp.generators as GS
from steerexp.generators.frozen import FrozenGenerator as G
for owner, name, key in ((R, "build", "build"), (R, "train", "training"), (R, "evaluate", "evaluation"),
                         (G, "proof_record", "fingerprint"), (GS, "from_pretrained", "load")):
    timed(owner, name, key)  # from_pretrained: every family's loader (load_generator calls it)
run = R.run
def entered(*args, **kwargs):
    t["entered"], c["entered"] = time.time(), time.process_time()
    try:
        return run(*args, **kwargs)
    finally:
        t["returned"], c["returned"] = time.time(), time.process_time()
R.run = entered
def write():
    if os.environ.get("BENCH_PHASES_FILE") and "returned" in t:
        open(os.environ["BENCH_PHASES_FILE"], "w").write(json.dumps({"wall": t, "cpu": c}))
atexit.register(write)
"""
COLD = "import bench_phase_timers; from steerexp.cli import main; main()"  # the console script, fresh


def load_average() -> float:
    return os.getloadavg()[0]


def child_env(pythonpath: str | None, workdir: Path) -> dict:
    """The environment of every command: the phase timers importable, `pythonpath`'s src/ first if given."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # W&B as the user has it (steerexp's default: offline)
    env.pop("PYTHONWARNINGS", None)
    paths = [str(workdir / "modules")] + ([str(Path(pythonpath) / "src")] if pythonpath else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def children_cpu() -> float:
    """CPU seconds (user + system) of the finished children of this process: one command's is the difference
    of two readings."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed_run(args: list[str], workdir: Path, env: dict) -> dict:
    """One `steerexp <args>`: wall seconds and the phases."""
    phases_file = workdir / f"phases-{time.monotonic_ns()}.json"
    run_dir = workdir / f"run-{time.monotonic_ns()}"
    cmd = [sys.executable, "-c", COLD, *args, f"hydra.run.dir={run_dir}"]
    load, cpu = load_average(), children_cpu()
    spawned = time.time()
    out = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True,
                         env=dict(env, BENCH_PHASES_FILE=str(phases_file)))
    exited = time.time()
    cpu = children_cpu() - cpu
    if out.returncode != 0:
        raise SystemExit(f"steerexp {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    recorded = json.loads(phases_file.read_text())
    wall = split(recorded["wall"], start=spawned, end=exited)
    # the child's CPU clock starts at 0 with its process
    cpu_phases = split(recorded["cpu"], start=0.0, end=cpu)
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


def timed_help(workdir: Path, env: dict) -> dict:
    load, cpu = load_average(), children_cpu()
    start = time.time()
    code = "from steerexp.cli import main; main()"
    out = subprocess.run([sys.executable, "-c", code, "--help"], cwd=workdir, capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "Configuration groups" in out.stdout, out.stderr[-2000:]
    return {"wall": time.time() - start, "cpu": children_cpu() - cpu, "load": load}


def median_run(runs: list[dict]) -> dict:
    return {
        "wall": statistics.median(r["wall"] for r in runs),
        "cpu": statistics.median(r["cpu"] for r in runs),
        "phases": {k: statistics.median(r["phases"][k] for r in runs) for k in PHASES} if "phases" in runs[0] else {},
        "cpu_phases": ({k: statistics.median(r["cpu_phases"][k] for r in runs) for k in PHASES}
                       if "cpu_phases" in runs[0] else {}),
        "load": statistics.mean(r["load"] for r in runs),
    }


def report(label: str, short_m: dict, long_m: dict, help_m: dict, steps: int) -> dict:
    print(f"\n{label}")
    print(f"{'phase (seconds)':<18} {'10 steps':>9} {f'{steps} steps':>10}   {'cpu: 10':>8} {steps:>6}")
    for k in PHASES:
        print(f"{k:<18} {short_m['phases'][k]:9.2f} {long_m['phases'][k]:10.2f}   "
              f"{short_m['cpu_phases'][k]:8.2f} {long_m['cpu_phases'][k]:6.2f}")
    print(f"{'wall':<18} {short_m['wall']:9.2f} {long_m['wall']:10.2f}")
    print(f"{'cpu (user+sys)':<18} {short_m['cpu']:9.2f} {long_m['cpu']:10.2f}   (wall columns left, CPU right)")
    print(f"{'load average':<18} {short_m['load']:9.2f} {long_m['load']:10.2f}")
    fixed = short_m["wall"] - short_m["phases"]["training"] - short_m["phases"]["evaluation"]
    fixed_cpu = short_m["cpu"] - short_m["cpu_phases"]["training"] - short_m["cpu_phases"]["evaluation"]
    per_step = (long_m["phases"]["training"] - short_m["phases"]["training"]) / (steps - 10)
    targets = [
        ("fixed overhead per run", fixed, 4.0),
        ("steerexp --help", help_m["wall"], 1.0),
        (f"{steps}-step TI run, no evaluators", long_m["wall"], 15.0),
    ]
    print(f"\n{'target':<36} {'seconds':>8} {'goal':>6}")
    for name, value, goal in targets:
        print(f"{name:<36} {value:8.2f} {goal:6.1f}  {'ok' if value <= goal else 'MISSED':6s}")
    print(f"cpu seconds of the same: fixed {fixed_cpu:.2f}, --help {help_m['cpu']:.2f}, {steps}-step run "
          f"{long_m['cpu']:.2f} (on an idle machine a one-thread run's wall is close to its CPU time)")
    print(f"training per step: {1000 * per_step:.1f} ms wall; load average during --help: {help_m['load']:.2f}")
    return {"short": short_m, "long": long_m, "help": help_m, "fixed": fixed, "fixed_cpu": fixed_cpu,
            "per_step_s": per_step}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--steps", type=int, default=400, help="technique.steps of the long TI run")
    ap.add_argument("--pythonpath", default=None, help="measure the checkout in this folder (its src/ first)")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    ap.add_argument("--main-job", action="store_true", help="also time the README's main job: `steerexp` with its "
                    "default evaluators and W&B logger, technique.steps=10")
    opts = ap.parse_args()

    base = ["evaluator=[]", "logger=none"]
    results: dict = {"repeat": opts.repeat, "pythonpath": opts.pythonpath}
    with tempfile.TemporaryDirectory(prefix="steerexp-startup-") as tmp:
        work = Path(tmp)
        (work / "modules").mkdir()
        (work / "modules" / "bench_phase_timers.py").write_text(TIMERS)
        env = child_env(opts.pythonpath, work)
        timed_help(work, env)  # warm the file cache
        runs: dict = {"short": [], "long": [], "help": [], "main": []}
        for _ in range(opts.repeat):  # interleaved, so that a change in the machine's load hits every figure
            runs["help"].append(timed_help(work, env))
            runs["short"].append(timed_run(base + ["technique.steps=10"], work, env))
            runs["long"].append(timed_run(base + [f"technique.steps={opts.steps}"], work, env))
            if opts.main_job:
                runs["main"].append(timed_run(["technique.steps=10"], work, env))

    print(f"steerexp start-up ({'code in ' + opts.pythonpath if opts.pythonpath else 'this checkout'}; "
          f"median of {opts.repeat}; {os.cpu_count()} CPUs; torch threads: default)")
    results["cold"] = report("every command a fresh process",
                             *(median_run(runs[k]) for k in ("short", "long", "help")), opts.steps)
    results["cold"]["runs"] = runs  # every command's figures, not only the medians
    if opts.main_job:
        main_run = median_run(runs["main"])
        print("\nthe main job (`steerexp technique.steps=10`: its four evaluators, W&B offline), wall seconds")
        for k in PHASES:
            print(f"{k:<18}{main_run['phases'][k]:9.2f}")
        print(f"{'wall':<18}{main_run['wall']:9.2f}")
        results["cold"]["main"] = main_run
    if opts.json:
        Path(opts.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
