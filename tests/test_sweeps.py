"""Sweeps: launcher=gpus (devices, concurrency, failure isolation, rerun), SLURM through submitit's
local executor, Ray on a local instance, hparams_search=optuna, unique sweep dirs, W&B run ids.

The jobs are tests/sweep_app/app.py: a tiny Hydra app whose jobs wait instead of computing; it uses
steerexp's own conf/launcher/*.yaml and conf/hparams_search/optuna.yaml.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

APP = Path(__file__).parent / "sweep_app" / "app.py"


def app(args, cwd, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HYDRA_FULL_ERROR="0")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return subprocess.run([sys.executable, str(APP), "-m", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def sweep_cli(args, cwd):
    return subprocess.run([sys.executable, "-m", "steerexp.sweep", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=240)


def the_sweep(cwd: Path) -> Path:
    sweeps = list((cwd / "outputs" / "multirun").glob("*/*"))
    assert len(sweeps) == 1, sweeps
    return sweeps[0]


def job_dirs(sweep: Path) -> list[Path]:
    return sorted((p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def runs(job: Path) -> list[dict]:
    return [json.loads(line) for line in (job / "runs.txt").read_text().splitlines()]


def max_overlap(intervals) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda t: (t[0], t[1]))
    running = best = 0
    for _, step in events:
        running += step
        best = max(best, running)
    return best


def test_gpus_launcher_gives_each_job_its_device_and_runs_two_at_once(tmp_path):
    out = app(["launcher=gpus", "hydra.launcher.devices=[0,1]", "x=1,2,3,4", "sleep_s=1.5"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    jobs = job_dirs(the_sweep(tmp_path))
    assert [j.name for j in jobs] == ["0", "1", "2", "3"]
    seen = [json.loads((j / "job.json").read_text()) for j in jobs]
    for job, s in zip(jobs, seen):
        assigned = json.loads((job / "COMPLETED").read_text())["device"]
        assert s["cuda_visible_devices"] == assigned and assigned in {"0", "1"}  # the device the launcher gave it
    assert len({s["pid"] for s in seen}) == 4  # a fresh process per job
    assert {s["cuda_visible_devices"] for s in seen} == {"0", "1"}
    intervals = [(s["start"], s["end"]) for s in seen]
    assert max_overlap(intervals) == 2  # two at once, never more than the pool
    for device in ("0", "1"):  # one job at a time per device
        assert max_overlap([(s["start"], s["end"]) for s in seen if s["cuda_visible_devices"] == device]) == 1


def test_failing_job_is_isolated_and_rerun_redoes_only_it(tmp_path):
    flag = tmp_path / "fail_flag"
    flag.touch()
    out = app(["launcher=gpus", "hydra.launcher.devices=[0,1]", "x=1,2,3", "fail_x=2", f"fail_flag={flag}"], tmp_path)
    assert out.returncode != 0
    assert "3 jobs, 2 completed, 1 failed" in out.stderr and "steerexp-sweep rerun" in out.stderr
    sweep = the_sweep(tmp_path)
    jobs = job_dirs(sweep)
    assert [(j / "COMPLETED").is_file() for j in jobs] == [True, False, True]
    assert (jobs[1] / "FAILED").read_text().startswith("RuntimeError: deliberate failure of x=2")
    assert "deliberate failure of x=2" in (jobs[1] / "traceback.txt").read_text()

    flag.unlink()  # the cause is fixed: the rerun redoes job 1 and nothing else
    status = sweep_cli(["status", str(sweep)], tmp_path)
    assert status.returncode == 1 and "failed" in status.stdout
    rerun = sweep_cli(["rerun", str(sweep)], tmp_path)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert [len(runs(j)) for j in jobs] == [1, 2, 1]
    assert all((j / "COMPLETED").is_file() and not (j / "FAILED").exists() for j in jobs)
    first, second = runs(jobs[1])
    # same sweep dir and job number: the same deterministic W&B run id, so W&B resumes instead of duplicating
    assert (first["sweep_dir"], first["job_num"]) == (second["sweep_dir"], second["job_num"]) == (first["sweep_dir"], 1)

    (jobs[0] / "COMPLETED").unlink()  # a job the sweep never finished (killed) counts as missing
    assert "1 missing" in sweep_cli(["status", str(sweep)], tmp_path).stdout
    assert sweep_cli(["rerun", str(sweep)], tmp_path).returncode == 0
    assert [len(runs(j)) for j in jobs] == [2, 2, 1]
    assert "nothing to rerun" in sweep_cli(["rerun", str(sweep)], tmp_path).stdout


def test_sweeps_started_in_the_same_second_never_share_a_dir(tmp_path):
    from hydra_plugins.steerexp_launchers.resolvers import unique_dir

    assert unique_dir(str(tmp_path / "a")) == str(tmp_path / "a")
    assert unique_dir(str(tmp_path / "a")) == str(tmp_path / "a") + "_1"
    # two sweeps racing for the very same name (as two launched in the same second do)
    base = tmp_path / "same"
    args = [f"hydra.sweep.dir=${{steerexp_unique_dir:{base}}}", "x=1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(APP), "-m", *args], cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(2)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    dirs = sorted(p.name for p in tmp_path.glob("same*"))
    assert dirs == ["same", "same_1"]
    assert all((tmp_path / d / "0" / "job.json").is_file() for d in dirs)


def test_device_pool_rejects_bad_devices_with_the_fix():
    from hydra_plugins.steerexp_launchers.jobs import slots

    assert slots([0, 1], 2) == ["0", "1", "0", "1"]  # the first jobs spread over the devices
    with pytest.raises(ValueError, match="jobs_per_device"):
        slots(["0", "0"], 1)
    with pytest.raises(ValueError, match="devices=\\[0\\]"):
        slots([], 1)
    with pytest.raises(ValueError, match=">= 1"):
        slots([0], 0)


def test_optuna_three_trials_return_the_best_value(tmp_path):
    out = app(["hparams_search=optuna", "hydra.sweeper.n_trials=3", "hydra.sweeper.n_jobs=2",
               "launcher=gpus", "hydra.launcher.devices=[0,1]"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    sweep = the_sweep(tmp_path)
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    trials = [json.loads((j / "job.json").read_text()) for j in job_dirs(sweep)]
    assert len(trials) == 3 and results["n_trials"] == 3
    alphas = [t["alpha"] for t in trials]
    assert len(set(alphas)) == 3 and all(0.25 <= a <= 4.0 for a in alphas)  # Optuna's picks in the interval
    best = max(trials, key=lambda t: t["value"])
    assert results["best_value"] == pytest.approx(best["value"])
    assert results["best_params"]["technique.alpha"] == pytest.approx(best["alpha"])
    # the value is the configured objective: target rate - 1.0 * flip rate
    a = best["alpha"]
    assert best["value"] == pytest.approx(max(0.0, 1 - (a - 1.5) ** 2 / 4) - 0.1 * a)


def test_submitit_local_sweep_of_two_jobs_completes(tmp_path):
    out = app(["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5", "x=1,2"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    jobs = job_dirs(the_sweep(tmp_path))
    assert [json.loads((j / "job.json").read_text())["x"] for j in jobs] == [1, 2]
    # launcher=slurm composes against submitit's SLURM schema: one GPU per task, requeues, an array
    cfg = subprocess.run([sys.executable, str(APP), "--cfg", "hydra", "--package", "hydra.launcher", "launcher=slurm"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert cfg.returncode == 0, cfg.stderr[-2000:]
    launcher = yaml.safe_load(cfg.stdout.split("# @package hydra.launcher")[-1])
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert launcher["gpus_per_task"] == 1 and launcher["max_num_timeout"] >= 1 and launcher["array_parallelism"] > 1


def test_ray_local_sweep_of_two_jobs_completes(tmp_path):
    out = app(["launcher=ray", "hydra.launcher.ray.remote.num_gpus=0", "+hydra.launcher.ray.init.num_cpus=2",
               "+hydra.launcher.ray.init.include_dashboard=false", "x=1,2"], tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    jobs = job_dirs(the_sweep(tmp_path))
    assert [json.loads((j / "job.json").read_text())["x"] for j in jobs] == [1, 2]
    hydra_cfg = yaml.safe_load((jobs[0] / ".hydra" / "hydra.yaml").read_text())["hydra"]["launcher"]
    assert hydra_cfg["ray"]["remote"]["max_calls"] == 1  # a fresh Ray worker per job (num_gpus=1 by default)


def test_wandb_run_id_is_deterministic_per_sweep_job(tmp_path):
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from steerexp.logging.wandb import default_run_id, sweep_run_id

    a = sweep_run_id(tmp_path / "sweep", 3)
    assert a == sweep_run_id(tmp_path / "sweep", 3)
    assert a != sweep_run_id(tmp_path / "sweep", 4) and a != sweep_run_id(tmp_path / "sweep_1", 3)
    previous = HydraConfig.instance().cfg
    try:
        HydraConfig.instance().cfg = OmegaConf.create(
            {"hydra": {"mode": "MULTIRUN", "sweep": {"dir": str(tmp_path / "sweep")}, "job": {"num": 3}}})
        assert default_run_id() == a
        HydraConfig.instance().cfg = OmegaConf.create({"hydra": {"mode": "RUN", "sweep": {"dir": "x"}, "job": {"num": 0}}})
        assert default_run_id() is None  # single runs: W&B picks a fresh id
    finally:
        HydraConfig.instance().cfg = previous


def test_real_steerexp_optuna_trial_on_the_gpus_launcher(shipped, tmp_path):
    """One real (tiny) steerexp job through launcher=gpus + hparams_search=optuna: the objective comes back."""
    out = subprocess.run([sys.executable, "-m", "steerexp.cli", "-m", "technique=embedding_arithmetic", "launcher=gpus",
                          "hydra.launcher.devices=[0]", "hparams_search=optuna", "hydra.sweeper.n_trials=1",
                          "evaluator=[concept,leakage]", "evaluator.concept.head=size", "evaluator.concept.target=large",
                          "evaluator.leakage.head=size", "evaluator.leakage.target=large", "logger=none",
                          "sampling.steps=2", "eval.seeds=[0]", "eval.prompts=['a small red circle']"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    sweep = the_sweep(tmp_path)
    metrics = json.loads((sweep / "0" / "metrics.json").read_text())
    assert metrics["generator/unchanged"] is True
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(metrics["concept/target_rate/edited"] - metrics["leakage/flip_rate"])
