import json
import os
import subprocess
import sys
import time

import pytest

from tests.helpers import TINY


def steerexp(args, cwd, env=None):
    return subprocess.run([sys.executable, "-m", "steerexp.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=900, env=env)


def config_env(**extra):
    """No GPU, no full tracebacks: what the config-error tests expect."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", WANDB_MODE="disabled", **extra)
    if "HYDRA_FULL_ERROR" not in extra:
        env.pop("HYDRA_FULL_ERROR", None)
    return env


# Before the validator these took 8-11 s (imports, model loading) or a whole training run (eval.seeds=[]).
# The goal is <= 2 s; the bound here is generous for a loaded machine, far below the old cost.
CONFIG_ERROR_SECONDS = 6.0


def test_help_lists_the_groups_and_options(tmp_path):
    out = steerexp(["--help"], tmp_path)
    assert out.returncode == 0, out.stderr
    for text in ("generator: sd, shapes", "technique:", "textual_inversion", "evaluator:", "concept", "leakage",
                 "logger: none, wandb", "trainer:", "launcher:", "experiment:"):
        assert text in out.stdout, text


def test_unknown_option_fails_with_the_choices(tmp_path):
    out = steerexp(["technique=nope"], tmp_path, env=config_env())
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("steerexp: error: technique: ")
    assert "textual_inversion" in out.stderr and "nope" in out.stderr


@pytest.mark.parametrize("args,key", [
    (["eval.seeds=[]"], "eval.seeds"),                                   # was: an error after training
    (["technique.lr=nan"], "technique.lr"),                               # was: torch's message after loading
    (["eval.prompts=['a {} next to a {}']"], "eval.prompts[0]"),          # was: IndexError after training
    (["generator=sd", "generator.path=/nonexistent"], "generator.path"),  # was: the fp16-on-CPU error
    (["evaluator=[concpt]"], "evaluator"),                                # was: Hydra's error without the options
])
def test_config_errors_are_one_line_exit_2_in_seconds(tmp_path, args, key):
    start = time.perf_counter()
    out = steerexp([*args, "logger=none"], tmp_path, env=config_env())
    elapsed = time.perf_counter() - start
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.startswith(f"steerexp: error: {key}: ") and out.stderr.count("\n") == 1, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and out.stdout == ""
    assert elapsed < CONFIG_ERROR_SECONDS, elapsed
    assert not list(tmp_path.glob("outputs/*/*")), "a refused run leaves no run directory behind"


@pytest.mark.parametrize("how", [["verbose=true"], []])
def test_verbose_or_hydra_full_error_shows_the_traceback(tmp_path, how):
    env = config_env() if how else config_env(HYDRA_FULL_ERROR="1")
    out = steerexp(["technique.batch_size=0", "logger=none", *how], tmp_path, env=env)
    assert out.returncode == 2
    assert "Traceback" in out.stderr and "ConfigError" in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("steerexp: error: technique.batch_size: ")


def test_a_sweep_records_each_bad_job_and_goes_on(tmp_path):
    start = time.perf_counter()
    out = steerexp(["-m", "technique.lr=nan,-1", "logger=none"], tmp_path, env=config_env())
    assert out.returncode != 0
    assert "steerexp: error: job 0: technique.lr: " in out.stderr
    assert "steerexp: error: job 1: technique.lr: " in out.stderr  # the second job ran after the first failed
    assert time.perf_counter() - start < 3 * CONFIG_ERROR_SECONDS


@pytest.mark.slow   # 19 s; test_sweeps keeps real sweeps in the default suite
def test_sweep_makes_one_run_dir_and_one_wandb_run_per_job(shipped, tmp_path):
    args = ["-m", "technique.num_vectors=1,2", "seed=0,1", "evaluator=[concept]", *TINY]
    out = steerexp(args, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    sweeps = list((tmp_path / "outputs" / "multirun").glob("*/*"))
    assert len(sweeps) == 1
    jobs = sorted(p for p in sweeps[0].iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    ids = set()
    for job in jobs:
        assert json.loads((job / "metrics.json").read_text())["generator/unchanged"] is True
        assert (job / "deltas.safetensors").is_file() and (job / "samples" / "grid.png").is_file()
        runs = list((job / "wandb").glob("offline-run-*"))
        assert len(runs) == 1
        ids.add(runs[0].name.split("-")[-1])
        record = next(runs[0].glob("*.wandb")).read_bytes()
        group = "outputs_multirun_" + "_".join(sweeps[0].parts[-2:])
        assert group.encode() in record  # every job in the sweep's W&B group
        cfg = (job / ".hydra" / "config.yaml").read_text()
        assert "num_vectors" in cfg
    assert len(ids) == 4  # no W&B run reused across jobs
