"""Benchmark: a textual-inversion run's fixed cost (all it spends outside its training steps) at real scale,
against a bare diffusers `StableDiffusionPipeline.from_pretrained` of the same folder, in one benchmark run.

    python benchmarks/make_random_pipeline.py --arch sd15 --size real --out /tmp/sd15-real
    python benchmarks/fixed_cost.py --generator /tmp/sd15-real --resolution 256 --steps 2 --repeat 1

Every figure is a fresh process, spawned by this script (bare diffusers and `steerexp` alternate, so both see
the same load). The `steerexp` run is the console script's own code path: `generator=sd generator.path=<folder>
generator.dtype=fp32 generator.device=cpu technique.steps=N technique.batch_size=1 evaluator=[] logger=none`,
TI's default targets. A timers module the child imports first wraps steerexp's functions (no change to the
code measured) and splits the run's wall clock into:

    imports              spawn -> the timers module imported steerexp's CLI, run, the sd family, textual
                         inversion, Lightning and the trainer (all a TI run imports; they would otherwise be
                         imported lazily later, so this moves their cost here, it adds none)
    config + pre-flight  -> run() entered: Hydra's compose, validation, pre-flight, the run directory
    model load           steerexp.generators.load_generator, less the proofs taken in it
    proof at load        FrozenGenerator.proof_record calls inside the load (generator.proof: fast by default)
    build rest           the technique and evaluators (steerexp.run.build less the model load)
    technique prepare    TextualInversion.prepare: the targets loaded and encoded through the VAE
    training steps       every Trainable.optimizer_step (forward, backward, optimiser step, budget projection)
    trainer, not steps   steerexp.run.train less its steps: Lightning's set-up, checkpoints, last.ckpt
    proof at end         proof_record calls after the load (the end-of-run proof)
    writing              the rest of run(): deltas, metrics, learned_embeds, logger
    exit                 run() returned -> the process exited

`outside steps` is the process's wall clock less `training steps`. The bare diffusers process reports its
imports (torch, diffusers' StableDiffusionPipeline) and its from_pretrained apart. In the steerexp child, after
the run, both proofs are timed once more on the loaded generator (`proof_fast_s`, `proof_full_s`: what one proof
costs with generator.proof=fast and =full; a run takes two). `--init-check` loads the folder once more, through
steerexp's loader, under a TorchDispatchMode that counts random-init ops (normal_, uniform_, ...) on tensors
that are not on the meta device: 0 means no random-initialised model is built before the weights load.

--resolution: the image side; the run reads a view of the folder (symlinks to every file) whose unet/config.json
has sample_size = resolution / 8, so steerexp and diffusers load the same files at that size. Peak RSS is each
process's own (os.wait4). The machine may be shared: the load average is printed with every figure. Before each
process the folder's files are read once (`warm_page_cache`; `--cold` skips it), so both sides start from a warm
page cache. Prints JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# the phase timers: a module the child imports before steerexp.cli (see the docstring)
TIMERS = r"""
import atexit, json, os, time
t = {"proof_load": 0.0, "proof_end": 0.0, "steps": 0.0, "n_steps": 0}
inside_load = [False]
import steerexp.cli, steerexp.run as R, steerexp.trainer, lightning.pytorch
import steerexp.generators as GS
import steerexp.generators.sd
from steerexp.generators.frozen import FrozenGenerator as G
from steerexp.techniques.textual_inversion import TextualInversion as TI
from steerexp.techniques.trainable import Trainable
t["imported"] = time.time()
gens = []
def wrap(owner, name, after):
    inner = getattr(owner, name)
    def wrapper(*args, **kwargs):
        start = time.time()
        try:
            return after(inner(*args, **kwargs), args)
        finally:
            after_time(name, time.time() - start)
    setattr(owner, name, wrapper)
def after_time(name, seconds):
    key = {"load_generator": "load", "proof_record": "proof_load" if inside_load[0] else "proof_end",
           "optimizer_step": "steps"}.get(name, name)
    t[key] = t.get(key, 0.0) + seconds
    if name == "optimizer_step":
        t["n_steps"] += 1
def loading(inner):
    def wrapper(*args, **kwargs):
        inside_load[0] = True
        try:
            g = inner(*args, **kwargs)
            gens.append(g)
            return g
        finally:
            inside_load[0] = False
    return wrapper
GS.load_generator = loading(GS.load_generator)  # what conf/generator's _target_ resolves to
same = lambda out, args: out
raw_proof = G.proof_record  # timed after the run, unwrapped: not the run's "proof at end"
for owner, name in ((R, "build"), (R, "train"), (R, "evaluate"), (G, "proof_record"), (GS, "load_generator"),
                    (TI, "prepare"), (Trainable, "optimizer_step")):
    wrap(owner, name, same)
run = R.run
def entered(*args, **kwargs):
    t["entered"] = time.time()
    try:
        return run(*args, **kwargs)
    finally:
        t["returned"] = time.time()
        if gens:  # both proofs once more on the loaded generator, outside the run's phases
            g = gens[-1]
            for proof in ("fast", "full"):
                start = time.time()
                raw_proof(g, proof)
                t[f"proof_{proof}_s"] = time.time() - start
        t["after_proofs"] = time.time()
R.run = entered
def write():
    if os.environ.get("BENCH_PHASES_FILE") and "returned" in t:
        open(os.environ["BENCH_PHASES_FILE"], "w").write(json.dumps(t))
atexit.register(write)
"""
COLD = "import bench_phase_timers; from steerexp.cli import main; main()"

BARE = r"""
import json, sys, time
import torch
from diffusers import StableDiffusionPipeline
imported = time.time()
pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1], torch_dtype=torch.float32, safety_checker=None,
                                               feature_extractor=None, requires_safety_checker=False)
loaded = time.time()
parameters = sum(p.numel() for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters())
print(json.dumps({"imported": imported, "loaded": loaded, "parameters": parameters}))
"""

INIT_CHECK = r"""
import json, sys, torch
from torch.utils._python_dispatch import TorchDispatchMode
from steerexp.generators.sd import SDGenerator
RANDOM = {"normal_", "uniform_", "random_", "bernoulli_", "exponential_", "randn", "rand", "randint", "normal",
          "uniform", "kaiming_uniform_", "trunc_normal_"}
seen, meta = [], [0]
class Watch(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in RANDOM and isinstance(out, torch.Tensor):
            if out.device.type == "meta":
                meta[0] += 1
            else:
                seen.append(func.overloadpacket.__name__)
        return out
with Watch():
    SDGenerator.load(sys.argv[1], "fp32")
print(json.dumps({"random_init_ops_on_real_tensors": len(seen), "random_init_ops_on_meta": meta[0]}))
"""


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def resolution_view(folder: Path, resolution: int | None, out: Path) -> Path:
    """`folder` itself, or (resolution given) a view of it: symlinks to every file, unet/config.json's sample_size
    set to resolution / the VAE factor."""
    if not resolution:
        return folder
    vae = json.loads((folder / "vae" / "config.json").read_text())
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    if resolution % factor:
        raise SystemExit(f"--resolution must be a multiple of {factor}")
    for src in folder.rglob("*"):
        dst = out / src.relative_to(folder)
        if src.is_dir():
            dst.mkdir(parents=True, exist_ok=True)
        elif src.relative_to(folder) == Path("unet/config.json"):
            dst.parent.mkdir(parents=True, exist_ok=True)
            conf = json.loads(src.read_text())
            conf["sample_size"] = resolution // factor
            dst.write_text(json.dumps(conf, indent=2))
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(src.resolve())
    return out


def measured(cmd, env, cwd) -> dict:
    """One process: wall clock and its own peak RSS (os.wait4 on the child, before anything else reaps it)."""
    load = load_average()
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out_chunks, err_chunks = [], []

    def drain(stream, sink):
        sink.append(stream.read())

    readers = [threading.Thread(target=drain, args=(proc.stdout, out_chunks)),
               threading.Thread(target=drain, args=(proc.stderr, err_chunks))]
    for r in readers:
        r.start()
    _, status, usage = os.wait4(proc.pid, 0)
    end = time.time()
    for r in readers:
        r.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd[:4]))} ... failed (exit {proc.returncode}):\n"
                         f"{''.join(err_chunks)[-3000:]}")
    return {"start": start, "end": end, "wall": end - start, "stdout": "".join(out_chunks), "load": load,
            "peak_rss_mb": usage.ru_maxrss / 1024}


def bare(folder: Path, env: dict, cwd: Path) -> dict:
    r = measured([sys.executable, "-c", BARE, str(folder)], env, cwd)
    inner = json.loads(r["stdout"].strip().splitlines()[-1])
    return {"wall": r["wall"], "imports": inner["imported"] - r["start"],
            "from_pretrained": inner["loaded"] - inner["imported"], "exit": r["end"] - inner["loaded"],
            "peak_rss_mb": r["peak_rss_mb"], "load_average": r["load"], "parameters": inner["parameters"]}


def steerexp_run(folder: Path, steps: int, proof: str, threads: str, env: dict, cwd: Path) -> dict:
    phases_file = cwd / f"phases-{time.monotonic_ns()}.json"
    run_dir = cwd / f"run-{time.monotonic_ns()}"
    args = ["generator=sd", f"generator.path={folder}", "generator.dtype=fp32", "generator.device=cpu",
            f"generator.proof={proof}", f"technique.steps={steps}", "technique.batch_size=1", "evaluator=[]",
            "logger=none", f"threads={threads}", f"hydra.run.dir={run_dir}"]
    r = measured([sys.executable, "-c", COLD, *args], dict(env, BENCH_PHASES_FILE=str(phases_file)), cwd)
    t = json.loads(phases_file.read_text())
    load = t.get("load", 0.0)
    inside = t["returned"] - t["entered"]
    phases = {
        "imports": t["imported"] - r["start"],
        "config + pre-flight": t["entered"] - t["imported"],
        "model load": load - t["proof_load"],
        "proof at load": t["proof_load"],
        "build rest": t.get("build", 0.0) - load,
        "technique prepare": t.get("prepare", 0.0),
        "training steps": t["steps"],
        "trainer, not steps": t.get("train", 0.0) - t["steps"],
        "evaluation": t.get("evaluate", 0.0),
        "proof at end": t["proof_end"],
    }
    phases["writing"] = inside - sum(v for k, v in phases.items() if k not in ("imports", "config + pre-flight"))
    # after the run the timers time both proofs once more (not part of the run): take them off the exit
    extra = t.get("after_proofs", t["returned"]) - t["returned"]
    phases["exit"] = r["end"] - t["returned"] - extra
    wall = r["wall"] - extra
    return {"proof": proof, "wall": wall, "outside_steps": wall - t["steps"], "steps": t["n_steps"],
            "phases": phases, "proof_fast_s": t.get("proof_fast_s"), "proof_full_s": t.get("proof_full_s"),
            "peak_rss_mb": r["peak_rss_mb"], "load_average": r["load"]}


def warm_page_cache(folder: Path) -> None:
    """Read every file of the pipeline folder once, so that neither side pays for reading the weights from disk:
    a bare from_pretrained memory-maps them and reads nothing, while steerexp's proof at load is their first
    reader, so with a cold cache the disk read would land on steerexp alone (the bare script pays it at its first
    step instead). Both sides then start from the same warm cache."""
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                while f.read(1 << 24):
                    pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--generator", required=True, help="a StableDiffusionPipeline folder (make_random_pipeline.py)")
    ap.add_argument("--resolution", type=int, default=None)
    ap.add_argument("--steps", type=int, default=2, help="TI steps per run (the fixed cost excludes them)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--threads", default="auto", help="steerexp's threads setting (auto: torch's default here)")
    ap.add_argument("--proofs", default="fast", help="comma list: a steerexp run per generator.proof value")
    ap.add_argument("--init-check", action="store_true")
    ap.add_argument("--cold", action="store_true", help="do not read the folder's files into the page cache before "
                                                         "each process (the default warms it for both sides)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    repo = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory(prefix="fixed_cost_") as tmp:
        work = Path(tmp)
        (work / "modules").mkdir()
        (work / "modules" / "bench_phase_timers.py").write_text(TIMERS)
        folder = resolution_view(Path(a.generator).expanduser().resolve(), a.resolution, work / "view")
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=os.pathsep.join(
            [str(work / "modules"), str(repo / "src")] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
        env.pop("PYTHONWARNINGS", None)
        # conf/generator's _target_ resolves to the timers' wrapper of load_generator: the user's opt-in (safety.py)
        env["STEEREXP_ALLOW_TARGETS"] = "steerexp.generators.load_generator"
        rows: dict[str, list] = {"bare": []} | {f"steerexp_{p}": [] for p in a.proofs.split(",")}
        for i in range(a.repeat):
            order = list(rows) if i % 2 == 0 else list(reversed(rows))  # alternate who goes first
            for key in order:
                if not a.cold:
                    warm_page_cache(folder)
                if key == "bare":
                    rows[key].append(bare(folder, env, work))
                else:
                    rows[key].append(steerexp_run(folder, a.steps, key.split("_", 1)[1], a.threads, env, work))
                print(json.dumps({key: rows[key][-1]}), file=sys.stderr, flush=True)
        init = None
        if a.init_check:
            r = measured([sys.executable, "-c", INIT_CHECK, str(folder)], env, work)
            init = json.loads(r["stdout"].strip().splitlines()[-1])

    med = lambda xs: statistics.median(xs) if xs else None
    summary = {"generator": a.generator, "resolution": a.resolution, "steps": a.steps, "repeat": a.repeat,
               "cpus": os.cpu_count(), "bare_from_pretrained_s": med([r["from_pretrained"] for r in rows["bare"]]),
               "bare_process_s": med([r["wall"] for r in rows["bare"]])}
    for key in rows:
        if key != "bare":
            summary[f"{key}_outside_steps_s"] = med([r["outside_steps"] for r in rows[key]])
            summary[f"{key}_phases_median"] = {k: med([r["phases"][k] for r in rows[key]])
                                               for k in rows[key][0]["phases"]}
            summary[f"{key}_proof_fast_s"] = med([r["proof_fast_s"] for r in rows[key] if r["proof_fast_s"]])
            summary[f"{key}_proof_full_s"] = med([r["proof_full_s"] for r in rows[key] if r["proof_full_s"]])
    if init is not None:
        summary["init_check"] = init
    out = {"summary": summary, "runs": rows}
    text = json.dumps(out, indent=1)
    if a.json:
        Path(a.json).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
