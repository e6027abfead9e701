"""Benchmark: launcher=gpus on simulated devices (devices=[0,1]); jobs wait instead of computing.

    python benchmarks/sweep_concurrency.py [--jobs 8] [--wait 2.0]

Runs the same sweep of N jobs (tests/sweep_app/app.py, each job sleeps `wait` seconds: a job busy
on its device, not on the CPU) three ways and prints JSON plus a markdown table:

- gpus [0,1]: launcher=gpus over two devices (the concurrent sweep),
- gpus [0]:   launcher=gpus over one device (sequential, same fresh process per job),
- basic:      Hydra's basic launcher with steerexp's sweep callback (sequential, in one process, with the
              sweep markers: no per-job process).

Concurrency = N / wall(gpus [0,1]) over N / wall(gpus [0]) (target >= 1.8x). Scheduling overhead
per job = the launcher-measured time of a job (spawn, imports, unpickling the spec, run_job, markers)
minus the wait, averaged; also (wall(gpus [0]) - wall(basic)) / N, the cost of fresh processes.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

APP = Path(__file__).resolve().parents[1] / "tests" / "sweep_app" / "app.py"


def sweep(args: list[str], jobs: int, wait: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        xs = ",".join(str(i) for i in range(jobs))
        env = dict(os.environ)
        env.pop("CUDA_VISIBLE_DEVICES", None)
        start = time.perf_counter()
        out = subprocess.run([sys.executable, str(APP), "-m", *args, f"x={xs}", f"sleep_s={wait}"], cwd=tmp,
                             capture_output=True, text=True, env=env)
        wall = time.perf_counter() - start
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-3000:])
        sweep_dir = next(Path(tmp, "outputs", "multirun").glob("*/*"))
        done = [json.loads(p.read_text()) for p in sweep_dir.glob("*/COMPLETED")]
        seen = [json.loads(p.read_text()) for p in sweep_dir.glob("*/job.json")]
        assert len(seen) == jobs
        span = max(s["end"] for s in seen) - min(s["start"] for s in seen)
        result = {"wall_s": round(wall, 3), "jobs_span_s": round(span, 3), "jobs_per_s": round(jobs / wall, 4)}
        if done:
            result["per_job_overhead_s"] = round(statistics.mean(d["seconds"] for d in done) - wait, 3)
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--wait", type=float, default=2.0)
    a = parser.parse_args()
    runs = {
        "gpus [0,1]": sweep(["launcher=gpus", "hydra.launcher.devices=[0,1]"], a.jobs, a.wait),
        "gpus [0]": sweep(["launcher=gpus", "hydra.launcher.devices=[0]"], a.jobs, a.wait),
        "basic": sweep(["launcher=basic"], a.jobs, a.wait),
    }
    speedup = runs["gpus [0]"]["wall_s"] / runs["gpus [0,1]"]["wall_s"]
    report = {
        "jobs": a.jobs, "wait_s": a.wait, "runs": runs,
        "concurrency_vs_sequential": round(speedup, 3),
        "concurrency_vs_basic": round(runs["basic"]["wall_s"] / runs["gpus [0,1]"]["wall_s"], 3),
        "fresh_process_cost_per_job_s": round((runs["gpus [0]"]["wall_s"] - runs["basic"]["wall_s"]) / a.jobs, 3),
    }
    print(json.dumps(report, indent=1))
    print("\n| launcher | wall (s) | jobs/s | overhead per job (s) |\n|---|---|---|---|")
    for name, r in runs.items():
        print(f"| {name} | {r['wall_s']:.2f} | {r['jobs_per_s']:.3f} | {r.get('per_job_overhead_s', '-')} |")
    print(f"\nconcurrency: {speedup:.2f}x sequential (target >= 1.8x)")


if __name__ == "__main__":
    main()
