"""launcher=gpus's fork server (_zygote.py): every job forked from one server that imported torch & co. once.

Each job is still a process of its own (a child of the server, its own pid, its own CUDA_VISIBLE_DEVICES);
a job that raises, exits or is killed is FAILED and the others go on; a server that cannot start, or dies,
leaves the jobs to fresh processes after one warning; a real steerexp job gives the same metrics either way.
The launcher dying kills forked jobs too: tests/test_sweeps.py (the gpus tests run both ways there).
"""
import json
import subprocess
import sys

import pytest

from tests.test_sweeps import APP_PRELOAD, app, job_dirs, runs, sweep_cli, the_sweep

FAKE_DEVICES = "hydra.launcher.devices=[gpu-a,gpu-b]"  # CUDA_VISIBLE_DEVICES values are only strings here


def completed_device(job) -> str:
    return json.loads((job / "COMPLETED").read_text())["device"]


def is_fork_server(cmd: list[str]) -> bool:
    return "hydra_plugins.steerexp_launchers._zygote" in cmd


def test_every_job_is_forked_from_one_server_with_the_device_of_its_slot(tmp_path):
    out = app(["launcher=gpus", FAKE_DEVICES, "x=1,2,3,4"], tmp_path)  # the default preload: torch to steerexp.run
    assert out.returncode == 0, out.stderr[-3000:]
    jobs = job_dirs(the_sweep(tmp_path))
    seen = [runs(j)[0] for j in jobs]
    assert len({s["pid"] for s in seen}) == 4  # a process per job
    assert len({s["ppid"] for s in seen}) == 1 and all(is_fork_server(s["parent_cmd"]) for s in seen)
    assert all(s["torch_preloaded"] and not s["cuda_initialized"] for s in seen)  # imported once, CUDA never started
    assert len({s["numpy_draw"] for s in seen}) == 4  # numpy's global generator is not the server's copy in every job
    for job, s in zip(jobs, seen):
        assert s["cuda_visible_devices"] == completed_device(job)  # the slot the launcher gave it
    assert {s["cuda_visible_devices"] for s in seen} == {"gpu-a", "gpu-b"}
    assert [json.loads((j / "job.json").read_text())["value"] for j in jobs] == [1.0, 2.0, 3.0, 4.0]
    assert "fork server" not in out.stdout + out.stderr


def test_a_job_that_raises_exits_or_is_killed_fails_alone(tmp_path):
    flag = tmp_path / "fail_flag"
    flag.touch()
    out = app(["launcher=gpus", FAKE_DEVICES, APP_PRELOAD, "x=1,2,3,4,5,6", "fail_x=2", f"fail_flag={flag}",
               "exit_x=3", "kill_x=4"], tmp_path)
    assert out.returncode != 0
    assert "6 jobs, 3 completed, 3 failed" in out.stderr
    jobs = job_dirs(the_sweep(tmp_path))
    assert [(j / "COMPLETED").is_file() for j in jobs] == [True, False, False, False, True, True]  # the server went on
    assert len({runs(j)[0]["ppid"] for j in jobs}) == 1  # every job, after the crashes too, forked by the one server
    raised, exited, killed = (j / "FAILED" for j in jobs[1:4])
    assert raised.read_text().startswith("RuntimeError: deliberate failure of x=2")
    assert "deliberate failure of x=2" in (jobs[1] / "traceback.txt").read_text()
    assert "exited with code 3" in exited.read_text() and "exit code: 3" in exited.read_text()
    assert "exit code: -9" in killed.read_text()  # SIGKILL, as subprocess reports it
    assert "exited with code -9" in (jobs[3] / "traceback.txt").read_text()
    status = sweep_cli(["status", str(the_sweep(tmp_path))], tmp_path)
    assert status.returncode == 1 and status.stdout.count("failed") >= 3


@pytest.mark.parametrize("how", ["exits", "starts CUDA"])
def test_a_server_that_cannot_serve_leaves_the_jobs_to_fresh_processes(tmp_path, how):
    """A preloaded module ends the server (os._exit), or CUDA starts in it (faked: the check before each fork
    refuses); the jobs run as fresh processes, after one warning line."""
    (tmp_path / "bad_preload.py").write_text(
        "import os; os._exit(7)" if how == "exits" else
        "import sys, types\n"
        "sys.modules['torch'] = types.SimpleNamespace(cuda=types.SimpleNamespace(is_initialized=lambda: True))\n")
    out = app(["launcher=gpus", FAKE_DEVICES, "hydra.launcher.preload=[bad_preload]", "x=1,2,3"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    warnings = [line for line in (out.stdout + out.stderr).splitlines() if "fork server" in line]
    assert len(warnings) == 1 and "starting each job in a fresh process" in warnings[0], out.stdout + out.stderr
    assert ("exit code 7" if how == "exits" else "exit code 1") in warnings[0]
    jobs = job_dirs(the_sweep(tmp_path))
    assert all((j / "COMPLETED").is_file() for j in jobs)
    assert all(runs(j)[0]["parent_cmd"][1].endswith("app.py") for j in jobs)  # started by the launcher itself
    if how == "starts CUDA":
        log = (the_sweep(tmp_path) / ".sweep" / "fork_server.log").read_text()
        assert "CUDA started in the fork server" in log


def test_a_job_whose_server_dies_runs_to_its_end_and_the_rest_start_fresh(tmp_path):
    out = app(["launcher=gpus", "hydra.launcher.devices=[gpu-a]", APP_PRELOAD, "x=1,2,3", "kill_parent_x=1",
               "sleep_s=0.5"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    warnings = [line for line in (out.stdout + out.stderr).splitlines() if "fork server" in line]
    assert len(warnings) == 1 and "fork server stopped (exit code -9" in warnings[0], out.stdout + out.stderr
    first, *rest = (runs(j)[0] for j in job_dirs(the_sweep(tmp_path)))
    assert is_fork_server(first["parent_cmd"])  # it killed its server, went on orphaned, and completed
    assert all(r["parent_cmd"][1].endswith("app.py") for r in rest)  # then fresh processes of the launcher
    assert all((j / "COMPLETED").is_file() for j in job_dirs(the_sweep(tmp_path)))


def test_real_steerexp_jobs_give_the_same_metrics_forked_or_fresh(shipped, tmp_path):
    """Two tiny steerexp jobs forked from one server (the default preload), and the second again as a fresh process."""
    metrics = {}
    for fork_server, seeds in (("true", "0,1"), ("false", "1")):
        cwd = tmp_path / fork_server
        cwd.mkdir()
        out = subprocess.run(
            [sys.executable, "-m", "steerexp.cli", "-m", "launcher=gpus", FAKE_DEVICES,
             f"hydra.launcher.fork_server={fork_server}", f"seed={seeds}", "technique.steps=2", "evaluator=[concept]",
             "logger=none", "eval.seeds=[0]", "eval.prompts=['a {}']"],
            cwd=cwd, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        metrics[fork_server] = [json.loads((j / "metrics.json").read_text()) for j in job_dirs(the_sweep(cwd))]
        for m in metrics[fork_server]:
            m.pop("run/seconds")
    forked_seed0, forked_seed1 = metrics["true"]
    assert forked_seed1 == metrics["false"][0]
    assert forked_seed0 != forked_seed1  # two seeds, two results: the jobs did not share a state
