"""How a run ends: `exit_now` (without the interpreter's teardown) and the signals that stop a run cleanly
(SIGTERM, the pre-emption signal). Standard library only, so the sweep worker can import it before anything
else."""
from __future__ import annotations

import atexit
import logging
import os
import sys


def exit_now(code: int) -> None:
    """End the process without the interpreter's teardown, which spent ~1.7 s of CPU after every run (and every
    sweep job) freeing torch's, diffusers' and transformers' module state (measured: benchmarks/startup.py, phase
    `exit`). Everything a run leaves is written and closed by then; the exit handlers still run (W&B's among
    them), and the logs and both streams are flushed first."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()
    os._exit(code)


# ============================================================================ signals that stop a run
# SIGTERM (what SLURM, Kubernetes and `timeout` send) and the run's pre-emption signal (`preempt_signal`) stop a
# run as Ctrl-C does: the last good deltas are kept, the metrics so far written, the exact resume command
# printed, and the process exits with 128 + the signal's number. While training, the stop waits for the end of
# the current optimizer step, so the checkpoint written then holds a whole step (steerexp.trainer); a second
# signal stops at once.

received: int | None = None   # the signal that stopped this run (None: none, or Ctrl-C's own KeyboardInterrupt)
pending: int | None = None    # a signal waiting for the current training step to end
training = False              # the trainer sets this while it runs its steps
preempt: int | None = None    # the pre-emption signal, when the run has one
_previous: dict = {}          # the dispositions installed before ours (a scheduler's own requeue handler)


class Stopped(KeyboardInterrupt):
    """The run was stopped by a signal (`received`); args[0] is the optimizer step reached, if any."""


def signal_number(name) -> int:
    """`USR1`, `SIGUSR1` or a number -> the signal's number (ValueError if there is no such signal)."""
    import signal

    if isinstance(name, int) and not isinstance(name, bool):
        return int(signal.Signals(name))
    text = str(name).strip().upper()
    return int(signal.Signals[text if text.startswith("SIG") else "SIG" + text])


def _handle(signum, frame) -> None:
    global received, pending
    if received is None:
        received = signum
    if training and pending is None:
        pending = signum   # steerexp.trainer stops after the current step
        return
    raise Stopped(None)


def install(preempt_signal=None) -> None:
    """SIGTERM and the pre-emption signal stop the run cleanly (see above). An ignored SIGTERM stays ignored
    (nohup & co. chose that for the whole job)."""
    import signal

    global preempt
    numbers = [signal.SIGTERM]
    if preempt_signal is not None:
        preempt = signal_number(preempt_signal)
        numbers.append(preempt)
    for number in numbers:
        previous = signal.getsignal(number)
        if previous is signal.SIG_IGN and number == signal.SIGTERM:
            continue
        if previous is not _handle:  # a later job of an in-process sweep finds ours: keep the one from before it
            _previous[number] = previous
        signal.signal(number, _handle)


def exit_code() -> int:
    """128 + the stopping signal (130 for Ctrl-C)."""
    return 128 + (received if received is not None else 2)


def requeue() -> str | None:
    """After a pre-emption: hand over to the scheduler's own handler (submitit's requeues the job), or under
    plain SLURM requeue this job with scontrol. Returns what was done, for the message."""
    import signal
    import subprocess

    previous = _previous.get(preempt)
    if callable(previous) and previous not in (signal.default_int_handler,):
        previous(preempt, None)   # e.g. submitit: checkpoint the job function and requeue it
        return "handed to the scheduler's handler"
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        return f"requeued SLURM job {job}" if done.returncode == 0 else f"scontrol requeue {job} failed: " \
            f"{(done.stderr or done.stdout).strip()[:200]}"
    return None
