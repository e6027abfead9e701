import json
import subprocess
import sys


from tests.conftest import TINY


def steerexp(args, cwd):
    return subprocess.run([sys.executable, "-m", "steerexp.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=900)


def test_help_lists_the_groups_and_options(tmp_path):
    out = steerexp(["--help"], tmp_path)
    assert out.returncode == 0, out.stderr
    for text in ("generator: sd, shapes", "technique:", "textual_inversion", "evaluator:", "concept", "leakage",
                 "logger: none, wandb", "trainer:", "launcher:", "experiment:"):
        assert text in out.stdout, text


def test_unknown_option_fails_with_the_choices(tmp_path):
    out = steerexp(["technique=nope"], tmp_path)
    assert out.returncode != 0
    assert "textual_inversion" in out.stderr and "nope" in out.stderr


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
