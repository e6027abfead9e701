"""One sweep job in a fresh process: `python -m hydra_plugins.steerexp_launchers._worker <spec.pkl>`.

Started by launcher=gpus for each job, and by `steerexp-sweep rerun` for each job it redoes (jobs.run_jobs).
The launcher sets CUDA_VISIBLE_DEVICES before the process starts, so the job only ever sees its own device.
Loads the spec (the job's composed config, the task function, Hydra's singleton state; launcher=gpus also
saves its Hydra context, the sweep callback does not: the callbacks are built again from the config), runs
the job exactly as Hydra's own launchers do (`run_job`), and leaves next to the spec: `<num>.status.json`
(COMPLETED / FAILED + the error) and `<num>.return.pkl` (the JobReturn, whose return value the sweeper
reads, e.g. Optuna's objective). A failing job also writes its traceback to `<job dir>/traceback.txt`.
Exit code 0 if the job completed, 1 if it failed. The launcher writes the job's markers from these: the
sweep callback (sweep_callback.py) is left out of this process's Hydra callbacks.

The job dies with its launcher: the launcher passes the read end of a pipe (fd in STEEREXP_LAUNCHER_FD)
whose write end only it holds. A daemon thread blocks reading it; EOF means the launcher is gone (exited,
crashed or SIGKILLed: the kernel closes its fds), and the thread kills this process's group (the worker
leads its own session: the job and every process it started). Nothing is saved at that point: the job
stays without COMPLETED and `steerexp-sweep rerun` redoes it.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import traceback
from pathlib import Path

from steerexp.shutdown import exit_now  # standard library only

PARENT_FD_ENV = "STEEREXP_LAUNCHER_FD"  # = jobs.PARENT_FD_ENV (not imported: this runs before any import)
SWEEP_CALLBACK = "SweepStateCallback"  # sweep_callback.py's class


def watch_launcher() -> None:
    """Kill this job's process group when the launcher's end of the pipe closes (see the docstring)."""
    fd = os.environ.pop(PARENT_FD_ENV, None)
    if fd is None:
        return
    fd = int(fd)
    os.set_inheritable(fd, False)  # the job's own subprocesses need not hold it

    def watch() -> None:
        try:
            while os.read(fd, 1024):
                pass
        except OSError:
            pass
        print("steerexp worker: the launcher is gone; stopping this job and its processes", file=sys.stderr, flush=True)
        if os.getpgrp() == os.getpid():
            os.killpg(os.getpid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="steerexp-launcher-watch", daemon=True).start()


def _write_failure(job_dir: Path | None, err: BaseException) -> str:
    text = "".join(traceback.format_exception(err))
    print(text, file=sys.stderr, flush=True)
    if job_dir is not None:
        job_dir.mkdir(parents=True, exist_ok=True)
        (job_dir / "traceback.txt").write_text(text)
    return f"{type(err).__name__}: {err}".splitlines()[0]


def main(argv: list[str]) -> int:
    watch_launcher()
    spec_path = Path(argv[0])
    status_path = spec_path.with_suffix(".status.json")
    return_path = spec_path.with_suffix(".return.pkl")
    job_dir = None
    try:
        import cloudpickle
        from hydra.core.singleton import Singleton
        from hydra.core.utils import JobStatus, run_job, setup_globals

        spec = cloudpickle.loads(spec_path.read_bytes())
        job_dir = Path(spec["job_dir"])
        setup_globals()
        Singleton.set_state(spec["singleton_state"])
        hydra_context = spec.get("hydra_context")
        if hydra_context is None:  # a spec saved by the sweep callback, in the job's own process
            from hydra._internal.callbacks import Callbacks
            from hydra.types import HydraContext

            # run_job composes nothing (no config loader needed); the callbacks are built again from the config
            hydra_context = HydraContext(config_loader=None, callbacks=Callbacks(spec["config"]))
        # the launcher of this process writes the job's markers, not the sweep callback (matched by name: the spec
        # may hold the class by value, when Hydra's plugin scan had reloaded its module in the sweep's process)
        hydra_context.callbacks.callbacks = [c for c in hydra_context.callbacks.callbacks
                                             if type(c).__name__ != SWEEP_CALLBACK]
        ret = run_job(hydra_context=hydra_context, task_function=spec["task_function"],
                      config=spec["config"], job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
        if ret.status == JobStatus.FAILED:
            error = _write_failure(job_dir, ret._return_value)
            ret._return_value = None  # exceptions need not pickle; the launcher puts a clear one back
            verdict = {"status": "FAILED", "error": error}
        else:
            verdict = {"status": "COMPLETED", "error": None}
        try:
            payload = cloudpickle.dumps(ret)
        except Exception as err:  # an unpicklable return value: keep the job, drop the value
            ret._return_value = None
            payload = cloudpickle.dumps(ret)
            verdict["warning"] = f"the return value could not be pickled ({err}); the sweeper gets None"
        return_path.write_bytes(payload)
    except BaseException as err:  # outside the task: a bad spec, a config that does not resolve, ...
        verdict = {"status": "FAILED", "error": _write_failure(job_dir, err)}
    status_path.write_text(json.dumps(verdict))
    return 0 if verdict["status"] == "COMPLETED" else 1


if __name__ == "__main__":
    exit_now(main(sys.argv[1:]))
