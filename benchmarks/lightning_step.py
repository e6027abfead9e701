"""Benchmark: Lightning's cost per training step (issue 31 section 4). Textual inversion trained by Lightning's
Trainer (steerexp.trainer.fit, as a run trains) against the plain PyTorch loop steerexp used before (zero_grad,
the loss of the step, backward, AdamW step, the budget's projection), interleaved in one process: round r runs
--steps steps of each, Lightning first in even rounds and last in odd ones, so both see the same machine.

A step's time is the wall time from one step's start to the next's (Lightning: on_train_batch_start to
on_train_batch_start, its hooks, logging and progress included; the first step of each fit is left out: it
holds Lightning's set-up). Reports the median per step of each and the ratio.

    python benchmarks/lightning_step.py [--generator DIR] [--resolution 256] [--batch 1] [--steps 10] [--rounds 3]

--generator: a Stable Diffusion pipeline folder (default: the embedded shapes generator), e.g. the real-architecture
SD 1.5 with random weights of benchmarks/make_random_pipeline.py. Prints JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def technique(gen, steps: int, batch: int):
    from steerexp.techniques.textual_inversion import TextualInversion

    tech = TextualInversion(gen, steps=steps, batch_size=batch, lr=5e-3, targets={"k": 4},
                            placeholder=f"<bench-{time.monotonic_ns()}>")
    tech.prepare()
    return tech


def lightning_steps(gen, steps: int, batch: int) -> list[float]:
    import lightning.pytorch as L

    from steerexp.trainer import fit

    starts: list[float] = []

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, b, batch_idx):
            starts.append(time.perf_counter())

        def on_train_end(self, trainer, pl_module):
            starts.append(time.perf_counter())

    tech = technique(gen, steps + 1, batch)
    fit({"_target_": "lightning.pytorch.Trainer", "accelerator": "cpu", "devices": 1, "log_every_n_steps": 10},
        tech, [Clock()], None, None, None)
    return [b - a for a, b in zip(starts[1:], starts[2:])]  # without the first step


def plain_steps(gen, steps: int, batch: int) -> list[float]:
    import torch

    tech = technique(gen, steps + 1, batch)
    optimizer = tech.configure_optimizers()
    tech.train()
    times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = tech.training_loss(tech.batch_at(step))
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            tech.apply_budget()
        float(loss.detach())  # the old loop read the loss every step (progress bar, logging)
        if step:
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--generator", default=None)
    ap.add_argument("--resolution", type=int, default=None)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import torch

    from ti_step import load

    torch.set_num_threads(args.threads)
    gen = load(args.generator, args.resolution)
    light, plain = [], []
    for r in range(args.rounds):
        order = [(lightning_steps, light), (plain_steps, plain)]
        for run, into in order if r % 2 == 0 else order[::-1]:
            into.extend(run(gen, args.steps, args.batch))
    result = {
        "generator": args.generator or "shapes (embedded)",
        "resolution": args.resolution or gen.resolution,
        "batch": args.batch, "steps_per_round": args.steps, "rounds": args.rounds, "threads": args.threads,
        "lightning_step_s_median": statistics.median(light),
        "plain_step_s_median": statistics.median(plain),
        "overhead_ratio": statistics.median(light) / statistics.median(plain),
        "lightning_step_s_all": [round(t, 5) for t in light],
        "plain_step_s_all": [round(t, 5) for t in plain],
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
