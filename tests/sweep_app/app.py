"""A tiny Hydra app for the sweep tests and benchmarks: its jobs wait instead of computing.

Each job appends a JSON line to <job dir>/runs.txt per execution (pid, parent pid, CUDA_VISIBLE_DEVICES,
sweep dir, job number, the pid of its child process if `child`; written before a deliberate failure or
crash), waits while `hold_flag` exists, sleeps `sleep_s`, records
what it saw in <job dir>/job.json (also start/end times), and returns x, or an objective computed like
steerexp's (`sweep_objective` over fake metrics that depend on technique.alpha). Run without -m, it is a
single run in hydra.run.dir.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from steerexp.cli import sweep_objective_value


def fake_metrics(alpha: float) -> dict:
    """A target rate that peaks at alpha = 1.5 and a flip rate that grows with alpha."""
    return {"concept/target_rate/edited": max(0.0, 1.0 - (alpha - 1.5) ** 2 / 4), "leakage/flip_rate": 0.1 * alpha}


@hydra.main(config_path="conf", config_name="app", version_base="1.3")
def main(cfg: DictConfig):
    hc = HydraConfig.get()
    job_dir = Path(hc.runtime.output_dir)
    start = time.time()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"]) if cfg.child else None
    with open(job_dir / "runs.txt", "a") as f:  # one line per execution: who ran it, where, as which job
        f.write(json.dumps({"pid": os.getpid(), "ppid": os.getppid(),
                            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                            "sweep_dir": hc.sweep.dir if hc.mode.name == "MULTIRUN" else None,
                            "job_num": hc.job.get("num"), "child_pid": child and child.pid,
                            "output_dir": hc.runtime.output_dir}) + "\n")
    if cfg.fail_x is not None and cfg.x == cfg.fail_x and cfg.fail_flag and Path(cfg.fail_flag).exists():
        raise RuntimeError(f"deliberate failure of x={cfg.x}")
    if cfg.x == cfg.exit_x:
        os._exit(3)  # no traceback, no verdict: the process just ends
    if cfg.x == cfg.kill_x:
        os.kill(os.getpid(), signal.SIGKILL)
    while cfg.hold_flag and Path(cfg.hold_flag).exists() and time.time() - start < 120:
        time.sleep(0.05)
    time.sleep(cfg.sleep_s)
    if child is not None:
        child.kill()
        child.wait()
    value = (
        sweep_objective_value(cfg.sweep_objective, fake_metrics(cfg.technique.alpha))
        if cfg.sweep_objective
        else float(cfg.x)
    )
    (job_dir / "job.json").write_text(
        json.dumps(
            {
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "pid": os.getpid(),
                "x": cfg.x,
                "alpha": cfg.technique.alpha,
                "value": value,
                "start": start,
                "end": time.time(),
                "job_num": hc.job.get("num"),
            }
        )
    )
    return value


if __name__ == "__main__":
    from steerexp import conf_dir

    # steerexp's conf/ on the search path: launcher=... and hparams_search=... are steerexp's own files
    sys.argv.append(f"hydra.searchpath=[file://{conf_dir()}]")
    main()
