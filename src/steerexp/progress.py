"""Progress bars for long work: training steps and every evaluation phase (images done / total).

One switch for the whole run, the config's `progress` (auto | true | false), set once by the CLI:

    auto   bars on stderr when stderr is a terminal and the run is not a sweep job (-m): a log
           file, a pipe, CI and parallel sweep workers get no bar
    true   always (e.g. to watch a run whose stderr goes to a file with `tail -f`)
    false  never

Who draws what: the trainer draws the training bar (loss and delta norm); whoever starts a
phase of sampling opens it with `phase(desc, total)` (EvalContext.paired, the evaluators that
sample their own sets), and the generator's sampling loop advances the innermost open phase
with `advance(n)` as images denoise, so a phase's bar moves during its batches, not only after
them. Outside any phase `advance` does nothing, so sampling code calls it unconditionally.
"""
from __future__ import annotations

import contextlib
import os
import sys

MODES = ("auto", "true", "false")
_mode = "auto"
_stack: list = []  # open phases, innermost last (None for a phase drawn without a bar)


def configure(mode: str | bool | None = "auto") -> None:
    """The run's `progress` setting (auto | true | false, or a bool)."""
    global _mode
    text = "auto" if mode is None else str(mode).lower()
    if text not in MODES:
        raise ValueError(f"progress must be one of {MODES}, got {mode!r}")
    _mode = text


def in_sweep() -> bool:
    """This process runs a job of a Hydra multirun (in the launcher's process or in a worker process of
    launcher=gpus, ray or slurm: each runs the job with the sweep's Hydra config)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:
        return False


def enabled() -> bool:
    """Whether bars are drawn now (see the module docstring)."""
    if _mode != "auto":
        return _mode == "true"
    stream = sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)()) and not in_sweep()


def bar(total: float | None, desc: str, unit: str = "it"):
    """A tqdm bar on stderr, or None when bars are off. Counts may be fractional (images advance per
    denoising step); they show rounded."""
    if not enabled():
        return None
    from tqdm import tqdm

    try:  # the terminal's size, followed as it changes; a terminal that reports none (0 x 0) gets 100 x 24
        size = os.get_terminal_size(sys.stderr.fileno())
        sized = size.columns > 0 and size.lines > 0
    except (AttributeError, OSError, ValueError):
        sized = False
    counts = "{n:.0f}/{total:.0f} " + unit if total else "{n:.0f} " + unit
    return tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=sized, ncols=None if sized else 100,
                nrows=None if sized else 24,  # tqdm hides a bar below a height of 0
                leave=True, mininterval=0.2,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| " + counts + " [{elapsed}<{remaining}{postfix}]")


@contextlib.contextmanager
def phase(desc: str, total: float | None, unit: str = "images"):
    """A phase of work of `total` units: its bar (when bars are on) advances with `advance`."""
    b = bar(total, desc, unit)
    _stack.append(b)
    try:
        yield b
    finally:
        _stack.pop()
        if b is not None:
            if total:
                b.n = total  # fractional steps may sum to a hair below the total
                b.refresh()
            b.close()


def advance(n: float) -> None:
    """Advance the innermost open phase by `n` units (nothing when no phase is open or bars are off)."""
    if _stack and _stack[-1] is not None:
        b = _stack[-1]
        b.update(min(n, b.total - b.n) if b.total else n)  # fractional steps never run past the total
