"""Benchmark: a sweep job's start with and without launcher=gpus's fork server, both measured in one run.

    python benchmarks/fork_server.py [--jobs 6] [--repeat 1]

Runs the same sweep of N tiny real steerexp jobs (`steerexp -m launcher=gpus hydra.launcher.devices=[a,b]
seed=0..N-1 technique.steps=2 evaluator=[] logger=none`, one prompt, one seed; the devices are names only,
the jobs run on the CPU) with hydra.launcher.fork_server=false (each job a fresh interpreter) and =true
(each job forked from a server that imported torch & co. once), OMP_NUM_THREADS=1, and prints JSON plus a
markdown table. Per way:

    wall          spawn -> exit of the `steerexp -m` process
    CPU           user + system seconds of that process and every process under it (RUSAGE_CHILDREN: the
                  launcher reaps the workers, or the fork server, which reaps its children)
    per job       wall / N and CPU / N
    job start     per job, the launcher's time for the job (its process started -> exited) less the run's
                  own `run/seconds` (steerexp.run: build, training, writing): the start-up (interpreter,
                  imports, spec, Hydra's run_job) and exit; mean, and the first job's (which, forked, waits
                  for the server's imports)

On a shared machine compare the CPU figures first: wall depends on who else holds a core.
"""
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


def steerexp_command() -> list[str]:
    script = Path(sys.executable).with_name("steerexp")  # the console script, as a user runs it
    return [str(script)] if script.is_file() else [sys.executable, "-m", "steerexp.cli"]


def sweep(fork_server: bool, jobs: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        args = ["-m", "launcher=gpus", "hydra.launcher.devices=[a,b]", f"hydra.launcher.fork_server={fork_server}",
                "seed=" + ",".join(str(i) for i in range(jobs)), "technique.steps=2", "evaluator=[]", "logger=none",
                "eval.seeds=[0]", "eval.prompts=['a {}']"]
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        env.pop("CUDA_VISIBLE_DEVICES", None)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        out = subprocess.run([*steerexp_command(), *args], cwd=tmp, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-3000:])
        sweep_dir = next(Path(tmp, "outputs", "multirun").glob("*/*"))
        job_dirs = sorted((p for p in sweep_dir.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
        assert len(job_dirs) == jobs and all((j / "COMPLETED").is_file() for j in job_dirs)
        starts = [json.loads((j / "COMPLETED").read_text())["seconds"]
                  - json.loads((j / "metrics.json").read_text())["run/seconds"] for j in job_dirs]
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "wall_per_job_s": round(wall / jobs, 2),
                "cpu_per_job_s": round(cpu / jobs, 2), "job_start_mean_s": round(statistics.mean(starts), 2),
                "job_start_first_s": round(starts[0], 2), "job_start_last_s": round(starts[-1], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=6)
    parser.add_argument("--repeat", type=int, default=1, help="runs of each way, alternating (medians reported)")
    a = parser.parse_args()
    results: dict[str, list[dict]] = {"fresh processes": [], "fork server": []}
    for _ in range(a.repeat):
        results["fresh processes"].append(sweep(False, a.jobs))
        results["fork server"].append(sweep(True, a.jobs))
    runs = {way: {k: round(statistics.median(r[k] for r in rs), 2) for k in rs[0]} for way, rs in results.items()}
    fresh, forked = runs["fresh processes"], runs["fork server"]
    report = {"jobs": a.jobs, "repeat": a.repeat, "load_average": os.getloadavg(), "runs": runs, "all": results,
              "cpu_saved_per_job_s": round((fresh["cpu_s"] - forked["cpu_s"]) / a.jobs, 2),
              "wall_saved_per_job_s": round((fresh["wall_s"] - forked["wall_s"]) / a.jobs, 2)}
    print(json.dumps(report, indent=1))
    print(f"\n{a.jobs} jobs, OMP_NUM_THREADS=1, load average {os.getloadavg()[0]:.1f}\n")
    print("| jobs start as | wall (s) | CPU (s) | wall per job (s) | CPU per job (s) "
          "| job start, mean / first / last (s) |")
    print("|---|---|---|---|---|---|")
    for way, r in runs.items():
        print(f"| {way} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | {r['wall_per_job_s']:.2f} | {r['cpu_per_job_s']:.2f} "
              f"| {r['job_start_mean_s']:.2f} / {r['job_start_first_s']:.2f} / {r['job_start_last_s']:.2f} |")
    print(f"\nsaved per job: {report['cpu_saved_per_job_s']:.2f} s of CPU, {report['wall_saved_per_job_s']:.2f} s wall")


if __name__ == "__main__":
    main()
