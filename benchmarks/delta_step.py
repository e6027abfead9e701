"""Benchmark: one optimisation step of an input delta (prompt_delta + latent_offset, objective
concept_score) through k DDIM sampling steps, with and without gradient checkpointing, on
the embedded generator.

    python benchmarks/delta_step.py [--ks 5 10 25] [--batch 8] [--repeats 3]

Each (k, checkpoint) runs in a fresh process (so its peak RSS is its own) and reports:
  s_per_step      wall time of one step (forward through k DDIM steps + decode + classifier,
                  backward, Adam, projection), the median of `repeats` steps after one warm-up
  peak_rss_mb     peak resident memory of the first step above the resident memory just before
                  it: getrusage's ru_maxrss after the step minus /proc/self/statm before it. It is
                  the real cost (activations, recomputation buffers, allocator behaviour) but it
                  has a noise floor of a few MB
  saved_mb        tensors saved for backward at the end of the forward pass (unique storages
                  seen by torch.autograd.graph.saved_tensors_hooks): the autograd graph the step
                  holds between forward and backward. With checkpointing the DDIM steps save
                  only their inputs; each step's activations exist only while it is recomputed
Prints JSON (one row per setting) and a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(k: int, checkpoint: bool, batch: int, repeats: int) -> dict:
    import torch

    from steerexp.generators import load_generator
    from steerexp.objectives.composite import Composite
    from steerexp.objectives.concept_score import ConceptScore
    from steerexp.techniques.input_delta import InputDelta

    gen = load_generator(device="cpu")
    tech = InputDelta(gen, Composite({"concept_score": ConceptScore("colour", "red")}), text=True, latent=True,
                      train_seeds=list(range(100, 100 + batch)), train_sampling_steps=k, checkpoint=checkpoint,
                      budget={"eps_text": 8.0, "eps_z": 4.0}, batch_size=batch)
    tech.prepare()
    opt = tech.configure_optimizers()
    idx = (torch.arange(batch),)

    def step():
        loss = tech.training_loss(idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
        tech.apply_budget()

    tech.objective.terms["concept_score"].log_prob(torch.zeros(1, 3, 32, 32))  # load the classifier first
    before = rss_mb()
    step()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before

    seen: dict[int, int] = {}

    def pack(t):
        try:
            st = t.untyped_storage()
            seen.setdefault(st.data_ptr(), st.nbytes())
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = tech.training_loss(idx)
    saved = sum(seen.values()) / 2**20
    loss.backward()
    opt.zero_grad()

    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"k": k, "checkpoint": checkpoint, "batch": batch, "s_per_step": statistics.median(times),
            "peak_rss_mb": round(peak_rss, 1), "saved_mb": round(saved, 2), "threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ks", type=int, nargs="+", default=[5, 10, 25])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--one", nargs=2, default=None, help=argparse.SUPPRESS)  # k checkpoint (child process)
    a = p.parse_args()
    if a.one:
        print(json.dumps(measure(int(a.one[0]), a.one[1] == "1", a.batch, a.repeats)))
        return
    rows = []
    for k in a.ks:
        for ckpt in (False, True):
            out = subprocess.run([sys.executable, __file__, "--one", str(k), str(int(ckpt)), "--batch", str(a.batch),
                                  "--repeats", str(a.repeats)], capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    print("\n| k | checkpoint | s / step | peak RSS above start (MB) | saved for backward (MB) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['k']} | {'yes' if r['checkpoint'] else 'no'} | {r['s_per_step']:.2f} | {r['peak_rss_mb']:.1f} | "
              f"{r['saved_mb']:.1f} |")


if __name__ == "__main__":
    main()
