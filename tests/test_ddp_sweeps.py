"""Data parallel inside a sweep (issue 31 section 3): a job of `steerexp -m ...` (Hydra's basic launcher, jobs in
one process) or of launcher=gpus (a worker process per job, a slot such as CUDA_VISIBLE_DEVICES=0,1) trains with
`trainer.devices=2 trainer.strategy=ddp`. Lightning would start rank 1 with a command built from sys.argv (the whole
sweep, or the worker); steerexp.trainer.ranks_of_this_run gives it the job's own single run instead
(steerexp.ranks.relaunch_command). The slow tests load the generator in 2 processes per job."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict, read_write

TINY = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp", "technique.steps=2",
        "technique.batch_size=2", "evaluator=[concept]", "eval.seeds=[0]", "sampling.steps=2", "logger=none"]


@pytest.fixture
def sweep_job(tmp_path):
    """Sets Hydra's state to that of job #1 of a sweep `steerexp -m launcher=gpus hydra.launcher.devices=['0,1']
    technique.lr=0.01,0.02 ...` (its own overrides only, the sweep's hydra overrides, its output dir), composed
    from `main` (default: steerexp's conf/) and `--config-dir extra`."""
    from hydra.conf import ConfigSourceInfo
    from omegaconf import OmegaConf

    from steerexp.cli import compose_config

    composed = compose_config(["launcher=gpus", "technique.lr=0.02", "hydra.mode=MULTIRUN",
                               "hydra.launcher.devices=['0,1']", "hydra.run.dir=elsewhere"], return_hydra_config=True)
    previous = HydraConfig.instance().cfg

    def set_job(main: str | None = None, extra: str | None = None):
        cfg = composed.copy()
        with read_write(cfg), open_dict(cfg):
            sources = OmegaConf.to_container(cfg.hydra.runtime.config_sources)
            sources[1]["path"] = main or sources[1]["path"]
            if extra:
                sources.insert(2, {"path": extra, "schema": "file", "provider": "command-line"})
            cfg.hydra.runtime.config_sources = [ConfigSourceInfo(**source) for source in sources]
            cfg.hydra.runtime.output_dir = str(tmp_path / "sweep, a=b" / "1")
            cfg.hydra.runtime.cwd = str(tmp_path)
        HydraConfig.instance().set_config(cfg)

    set_job()
    try:
        yield set_job
    finally:
        HydraConfig.instance().cfg = previous


def test_rank_command_is_the_jobs_own_single_run_in_its_directory(sweep_job, tmp_path):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from steerexp.ranks import ENTRY, relaunch_command

    ckpt = tmp_path / "run 1" / 'a "b"\\' / "last.ckpt"
    command, cwd = relaunch_command(1, {"ckpt_path": str(ckpt), "unset": None})
    assert command[:3] == [sys.executable, "-c", ENTRY] and cwd == str(tmp_path)
    assert command[3:8] == ["--config-name", "config", "launcher=gpus", "technique.lr=0.02",
                            "hydra.launcher.devices=['0,1']"]  # the job's overrides, no -m, no hydra.mode/run.dir
    assert command[10:] == ["hydra.job.name=train_ddp_process_1", "hydra.output_subdir=null"]
    parsed = {o.key_or_group: o.value() for o in OverridesParser.create().parse_overrides(command[8:10])}
    assert parsed == {"ckpt_path": str(ckpt), "hydra.run.dir": str(tmp_path / "sweep, a=b" / "1")}
    # a --config-dir the job was composed with comes along; another Hydra app's job is left to Lightning
    sweep_job(extra=str(tmp_path))
    assert relaunch_command(2)[0][3:7] == ["--config-name", "config", "--config-dir", str(tmp_path)]
    sweep_job(main=str(tmp_path))
    assert relaunch_command(1) is None


def test_ranks_of_this_run_hands_lightning_the_command_and_restores_its_launcher_and_env(sweep_job, monkeypatch):
    from lightning.fabric.strategies.launchers import subprocess_script as fabric_launcher
    from lightning.pytorch.strategies.launchers import subprocess_script as trainer_launcher

    from steerexp.ranks import relaunch_command
    from steerexp.trainer import ranks_of_this_run

    lightnings = trainer_launcher._hydra_subprocess_cmd
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with ranks_of_this_run({"ckpt_path": "/x/last.ckpt"}):
        assert trainer_launcher._hydra_subprocess_cmd(1) == relaunch_command(1, {"ckpt_path": "/x/last.ckpt"})
        assert fabric_launcher._hydra_subprocess_cmd(local_rank=1) == trainer_launcher._hydra_subprocess_cmd(1)
        os.environ.update(LOCAL_RANK="0", MASTER_ADDR="10.0.0.1")  # as Lightning's launcher leaves them
    assert "LOCAL_RANK" not in os.environ and os.environ["MASTER_ADDR"] == "127.0.0.1"
    assert trainer_launcher._hydra_subprocess_cmd is lightnings
    assert fabric_launcher._hydra_subprocess_cmd is lightnings
    sweep_job(main="/elsewhere")  # not composed from steerexp's configs: Lightning's own command
    with ranks_of_this_run():
        command, _ = trainer_launcher._hydra_subprocess_cmd(1)
    assert "-c" not in command[:2]
    assert command[-2:] == ["hydra.job.name=train_ddp_process_1", "hydra.output_subdir=null"]


def test_ranks_of_this_run_stops_lightnings_observer_of_the_ranks_and_kills_them_if_the_run_failed(sweep_job,
                                                                                                   monkeypatch):
    """Lightning's observer SIGKILLs this process when a rank exits non-zero: while the fit runs, as Lightning
    does; not after it (a basic sweep's next jobs run in this process), when a failed run's ranks are killed."""
    from lightning.pytorch.strategies.launchers import subprocess_script as trainer_launcher

    from steerexp import trainer

    terminated = []
    monkeypatch.setattr(trainer._RankObserver, "_terminate_all", lambda self: terminated.append(self))
    monkeypatch.setattr(trainer._RankObserver, "every_s", 0.02)

    def rank(code: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", code])

    with trainer.ranks_of_this_run():  # during the fit: a rank that fails stops the run
        trainer_launcher._launch_process_observer([failing := rank("import sys; sys.exit(3)")])
        failing.wait()
        time.sleep(0.5)
    assert len(terminated) == 1
    terminated.clear()
    with pytest.raises(RuntimeError), trainer.ranks_of_this_run():  # the run failed: its ranks are killed
        trainer_launcher._launch_process_observer([waiting := rank("import time; time.sleep(60)")])
        raise RuntimeError("the fit failed")
    assert waiting.returncode == -signal.SIGKILL
    with trainer.ranks_of_this_run():  # after the fit: a rank that fails late is not the next job's end
        trainer_launcher._launch_process_observer([failing := rank("import sys, time; time.sleep(0.3); sys.exit(3)")])
    failing.wait()
    time.sleep(0.5)
    assert terminated == []
    assert trainer_launcher._launch_process_observer.__module__.startswith("lightning.")


def _default_signals() -> None:
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def _steerexp(args, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    steerexp = str(Path(sys.executable).parent / "steerexp")
    return subprocess.run([steerexp, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=1200,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(cwd), "MASTER_ADDR": "127.0.0.1", **env},
                          preexec_fn=_default_signals)


def _the_sweep_and_its_jobs(cwd: Path, out: subprocess.CompletedProcess) -> tuple[Path, list[Path]]:
    """The one sweep under outputs/ (no other dir claimed: rank 1 runs in its job's dir) and its 2 job dirs,
    each trained by 2 ranks that wrote one run: rank 0's files, rank 1's log only."""
    assert out.returncode == 0, out.stderr[-4000:]
    assert [p.name for p in (cwd / "outputs").iterdir()] == ["multirun"]
    sweeps = list((cwd / "outputs" / "multirun").glob("*/*"))
    assert len(sweeps) == 1, sweeps
    sweep = sweeps[0]
    assert {p.name for p in sweep.iterdir()} == {".sweep", "multirun.yaml", "0", "1"}
    jobs = [sweep / "0", sweep / "1"]
    for job in jobs:
        names = {p.name for p in job.iterdir()}
        assert {"metrics.json", "deltas.safetensors", "checkpoints", ".hydra", "COMPLETED",
                "train_ddp_process_1.log"} <= names, names
        assert {p.name for p in job.iterdir() if p.is_dir()} <= {".hydra", "checkpoints", "samples"}
        assert len(list(job.glob("*.log"))) == 2 + ("stdout.log" in names)  # rank 0's, rank 1's (+ the worker's)
        rank0 = [p for p in job.glob("*.log") if p.name not in ("train_ddp_process_1.log", "stdout.log")]
        assert "GLOBAL_RANK: 0, MEMBER: 1/2" in rank0[0].read_text()
        assert "Starting with 2 processes" in rank0[0].read_text()
        assert "GLOBAL_RANK: 1, MEMBER: 2/2" in (job / "train_ddp_process_1.log").read_text()
        assert torch.load(job / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
        assert json.loads((job / "metrics.json").read_text())["generator/unchanged"] is True
    status = subprocess.run([sys.executable, "-m", "steerexp.sweep", "status", str(sweep)], cwd=cwd,
                            capture_output=True, text=True, timeout=240)
    assert status.returncode == 0 and "2 jobs, 2 completed, 0 failed, 0 missing" in status.stdout, status.stdout
    return sweep, jobs


@pytest.mark.slow
def test_a_basic_sweep_of_ddp_jobs_runs_each_job_once_on_two_ranks(shipped, tmp_path):
    """`steerexp -m technique.lr=0.01,0.02 trainer.devices=2 trainer.strategy=ddp`: the jobs run in this process
    one after another; each starts its own rank 1 (its own overrides, its dir), not the whole sweep again."""
    out = _steerexp(["technique.lr=0.01,0.02", *TINY], tmp_path, {"CUDA_VISIBLE_DEVICES": ""})
    sweep, jobs = _the_sweep_and_its_jobs(tmp_path, out)
    assert out.stdout.count("Launching 2 jobs locally") == 1, out.stdout  # no rank ran the sweep again
    reported = [line.split(": ", 1)[1] for line in out.stdout.splitlines() if line.startswith("run directory:")]
    assert [Path(r).resolve() for r in reported] == [job.resolve() for job in jobs]  # rank 0 of each job, once


@pytest.mark.slow
def test_gpus_launcher_gives_a_ddp_job_its_two_device_slot(shipped, tmp_path):
    """launcher=gpus with one slot of 2 devices (CUDA_VISIBLE_DEVICES=0,1; the CPU trains): each job's worker
    starts rank 1 as the job's own run, in the slot the launcher gave the job."""
    out = _steerexp(["launcher=gpus", "hydra.launcher.devices=['0,1']", "technique.lr=0.01,0.02", *TINY], tmp_path,
                    {})
    sweep, jobs = _the_sweep_and_its_jobs(tmp_path, out)
    assert out.stdout.count("completed on device 0,1") == 2, out.stdout
    for job in jobs:
        assert (job / "stdout.log").read_text().count("run directory:") == 1
