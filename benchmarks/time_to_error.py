"""Time to a config error: each case is a real `steerexp ...` command whose config is wrong; we
measure the wall time until it exits, its exit code and its stderr (one line expected).

    python benchmarks/time_to_error.py            # the table (case, seconds, rc, the one line)
    python benchmarks/time_to_error.py --repeat 3 # the median of 3 runs per case

Goal (issue 13 section 4): every case answers in <= 2 s with exit code 2 and one line naming the
key and the fix, before torch, Lightning or any model is loaded. `steerexp --help` is timed too.
Fixtures (a broken pipeline folder, truncated weights, checkpoints of another technique or
num_vectors) are built in a temporary folder first; building them is not timed.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import string
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from steerexp import ASSETS

sys.path.insert(0, str(Path(__file__).parents[1]))  # the tests' helpers: the same fixtures as the tests
from tests.helpers.pipelines import pipeline_copy  # noqa: E402

SHAPES = ASSETS / "shapes"
TI = "steerexp.techniques.textual_inversion.TextualInversion"


def steerexp_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("steerexp")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "steerexp.cli"]


def fixtures(tmp: Path) -> dict[str, str]:
    out = {}
    broken = pipeline_copy(tmp / "broken_index")
    (broken / "model_index.json").unlink()
    (broken / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline", "unet": [')
    out["broken_index"] = str(broken)

    trunc = pipeline_copy(tmp / "truncated")
    weights = trunc / "unet" / "diffusion_pytorch_model.safetensors"
    data = (SHAPES / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    weights.unlink()
    (n,) = struct.unpack("<Q", data[:8])
    weights.write_bytes(data[: 8 + n + 4096])  # the header survives, the tensors do not
    out["truncated"] = str(trunc)

    import torch  # only to build the fake checkpoints (the steerexp side never imports it)

    def ckpt(name: str, technique: str, num_vectors: int) -> str:
        path = tmp / name
        record = {"technique": technique, "deltas": {"embeddings": [num_vectors, 64]},
                  "structure": {"num_vectors": num_vectors}}
        torch.save({"epoch": 0, "global_step": 10, "pytorch-lightning_version": "2.6.6",
                    "state_dict": {"embeddings": torch.zeros(num_vectors, 64), "initial": torch.zeros(num_vectors, 64)},
                    "steerexp": record}, path)
        # its JSON sidecar, as steerexp writes beside every checkpoint (trainer.Sidecar): what validation reads
        Path(f"{path}.json").write_text(json.dumps({"global_step": 10, "steerexp": record}))
        return str(path)

    out["ckpt_other_technique"] = ckpt("other.ckpt", "steerexp.techniques.input_delta.InputDelta", 1)
    out["ckpt_num_vectors"] = ckpt("nv2.ckpt", TI, 2)
    return out


# case | the overrides of its `steerexp` command (shell words; $NAME: a fixture path or a long prompt)
CASES = """
eval.seeds empty              | eval.seeds=[]
eval.prompts empty            | eval.prompts=[]
seed=abc                      | seed=abc
eval.seeds not ints           | eval.seeds=[0,x]
sampling.steps=0              | sampling.steps=0
sampling.steps=5000           | sampling.steps=5000
guidance_scale<0              | sampling.guidance_scale=-1
guidance_scale=nan            | sampling.guidance_scale=nan
prompt two slots              | "eval.prompts=['a {} next to a {}']"
prompt {name}                 | "eval.prompts=['a {name}']"
prompt without slot           | "eval.prompts=['a red circle']"
prompt slot past 32 tokens    | "eval.prompts=['$long_prompt']"
classifier folder missing     | scorers.classifier=/nonexistent/classifier
user classifier missing       | scorers.user.path=/nonexistent/clf.pt scorers.user.classes=[a,b]
targets.folder missing        | technique.targets.folder=/nonexistent/images
objective image missing       | technique=prompt_delta objective=[clip_similarity]
                                objective.terms.clip_similarity.text=null
                                objective.terms.clip_similarity.image=/nonexistent/a.png
technique.lr=nan              | technique.lr=nan
technique.batch_size=0        | technique.batch_size=0
trainer.checkpoint_every=-1   | trainer.checkpoint_every=-1
technique.steps=-1            | technique.steps=-1
technique.placeholder=''      | "technique.placeholder=''"
generator.device=cuda, no GPU | generator.device=cuda
sd path /nonexistent          | generator=sd generator.path=/nonexistent
sd fp16 on CPU                | generator=sd generator.path=$shapes
broken model_index.json       | generator.path=$broken_index
truncated safetensors         | generator.path=$truncated
ckpt_path missing             | ckpt_path=/nonexistent/last.ckpt
ckpt of another technique     | ckpt_path=$ckpt_other_technique
ckpt of num_vectors=2         | ckpt_path=$ckpt_num_vectors
evaluator=[concpt]            | evaluator=[concpt]
"""


def cases(fx: dict[str, str]) -> list[tuple[str, list[str]]]:
    """(case, overrides) from CASES; a line that starts with spaces continues the previous case."""
    values = dict(fx, shapes=str(SHAPES), long_prompt="a photo of " + "a very " * 16 + "{}")
    rows: list[tuple[str, list[str]]] = []
    for line in CASES.strip("\n").splitlines():
        name, _, words = line.partition("|") if not line.startswith(" ") else ("", "", line)
        args = [string.Template(w).safe_substitute(values) for w in shlex.split(words)]
        if name.strip():
            rows.append((name.strip(), args))
        else:
            rows[-1][1].extend(args)
    return rows


def run_case(args: list[str], cwd: Path, env: dict) -> tuple[float, int, str]:
    start = time.perf_counter()
    out = subprocess.run([*steerexp_cmd(), *args, "logger=none"], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=1800)
    return time.perf_counter() - start, out.returncode, out.stderr.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    opts = ap.parse_args()
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", WANDB_MODE="disabled")
    env.pop("HYDRA_FULL_ERROR", None)
    tmp = Path(tempfile.mkdtemp(prefix="steerexp_tte_"))
    try:
        fx = fixtures(tmp / "fx")
        work = tmp / "work"
        work.mkdir()
        rows = []
        help_times = []
        for _ in range(opts.repeat):
            start = time.perf_counter()
            subprocess.run([*steerexp_cmd(), "--help"], cwd=work, capture_output=True, timeout=300)
            help_times.append(time.perf_counter() - start)
        for name, args in cases(fx):
            results = [run_case(args, work, env) for _ in range(opts.repeat)]
            secs = statistics.median(r[0] for r in results)
            rc, err = results[-1][1], results[-1][2]
            lines = err.splitlines()
            rows.append({"case": name, "seconds": round(secs, 2), "rc": rc, "lines": len(lines),
                         "message": lines[-1] if lines else ""})
        print("| case | seconds | rc | stderr lines | message |\n|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['case']} | {r['seconds']:.2f} | {r['rc']} | {r['lines']} | {r['message']} |")
        print(f"| `steerexp --help` | {statistics.median(help_times):.2f} | | | |")
        worst = max(r["seconds"] for r in rows)
        bad = [r["case"] for r in rows if r["rc"] != 2 or r["lines"] != 1 or r["seconds"] > 2.0]
        print(f"\n{len(rows)} cases, slowest {worst:.2f} s; not (rc 2, one line, <= 2 s): {bad or 'none'}")
        if opts.json:
            opts.json.write_text(json.dumps({"cases": rows, "help_seconds": help_times}, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
