"""Sweeps: launcher=gpus (devices, concurrency, failure isolation, a job process that dies, rerun, workers
dying with the launcher or stopped by its SIGTERM), launcher=basic (Hydra's own launcher with the sweep
callback: markers, failure isolation, rerun, one paragraph instead of a traceback), `steerexp-sweep
status|rerun|best` on a live sweep, on a sweep of submitit's local executor and of a local Ray instance, and on
directories that are no sweep or hold damaged state, hparams_search=optuna, unique run and sweep dirs (one per
sweep, whatever process its jobs run in), W&B run ids, a real steerexp sweep with one bad job.

The jobs are tests/sweep_app/app.py: a tiny Hydra app whose jobs wait instead of computing; it uses
steerexp's own conf/launcher/*.yaml and conf/hparams_search/optuna.yaml.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

APP = Path(__file__).parent / "sweep_app" / "app.py"


def app_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HYDRA_FULL_ERROR="0")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def app(args, cwd, timeout=240):
    return subprocess.run([sys.executable, str(APP), "-m", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=app_env())


def sweep_cli(args, cwd):
    return subprocess.run([sys.executable, "-m", "steerexp.sweep", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=240)


def default_signals() -> None:
    """In a child about to receive signals from a test: their default dispositions, whatever the test runner's
    are (under nohup SIGHUP is ignored, and an ignored disposition is inherited)."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def the_sweep(cwd: Path) -> Path:
    sweeps = list((cwd / "outputs" / "multirun").glob("*/*"))
    assert len(sweeps) == 1, sweeps
    return sweeps[0]


def job_dirs(sweep: Path) -> list[Path]:
    return sorted((p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def runs(job: Path) -> list[dict]:
    return [json.loads(line) for line in (job / "runs.txt").read_text().splitlines()]


def assert_one_sweep(cwd: Path) -> Path:
    """The sweep's only dir: every job ran in it (whatever process it ran in), and nothing else was
    claimed: no `<time>_1` sweep dir, no single-run dir outputs/<date>/<time> (app.yaml's hydra.run.dir
    uses the claiming resolver, as steerexp's does)."""
    assert sorted(p.name for p in (cwd / "outputs").iterdir()) == ["multirun"]
    sweep = the_sweep(cwd)
    jobs = job_dirs(sweep)
    assert jobs
    for job in jobs:
        for r in runs(job):
            assert (cwd / r["sweep_dir"]).resolve() == sweep.resolve()
            assert Path(r["output_dir"]).resolve() == job.resolve()
    return sweep


def jobs_started(cwd: Path, n: int) -> bool:
    """Jobs 0..n-1 of the only sweep under cwd have started, and their RUNNING markers name their processes."""
    for num in range(n):
        found = list((cwd / "outputs").glob(f"multirun/*/*/{num}"))
        if not found or not (found[0] / "runs.txt").is_file() or not (found[0] / "RUNNING").is_file():
            return False
        try:  # either file may be caught between its creation and its first write
            marker = json.loads((found[0] / "RUNNING").read_text())
            ran = runs(found[0])
        except ValueError:
            return False
        if not ran or marker["pid"] != ran[0]["pid"]:
            return False
    return True


def gone(pids, within: float) -> bool:
    """All these processes have exited (zombies count as exited) within `within` seconds."""
    from hydra_plugins.steerexp_launchers.jobs import pid_alive

    deadline = time.time() + within
    while any(pid_alive(p) for p in pids):
        if time.time() > deadline:
            return False
        time.sleep(0.1)
    return True


def max_overlap(intervals) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda t: (t[0], t[1]))
    running = best = 0
    for _, step in events:
        running += step
        best = max(best, running)
    return best


def test_gpus_launcher_gives_each_job_its_device_and_runs_two_at_once(tmp_path):
    out = app(["launcher=gpus", "hydra.launcher.devices=[0,1]", "x=1,2,3,4", "sleep_s=3"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    jobs = job_dirs(assert_one_sweep(tmp_path))
    assert [j.name for j in jobs] == ["0", "1", "2", "3"]
    seen = [json.loads((j / "job.json").read_text()) for j in jobs]
    for job, s in zip(jobs, seen):
        assigned = json.loads((job / "COMPLETED").read_text())["device"]
        assert s["cuda_visible_devices"] == assigned and assigned in {"0", "1"}  # the device the launcher gave it
    assert len({s["pid"] for s in seen}) == 4  # a fresh process per job
    assert len({runs(j)[0]["ppid"] for j in jobs}) == 1  # each worker started by the launcher itself
    assert {s["cuda_visible_devices"] for s in seen} == {"0", "1"}
    intervals = [(s["start"], s["end"]) for s in seen]
    assert max_overlap(intervals) == 2  # two at once, never more than the pool
    for device in ("0", "1"):  # one job at a time per device
        assert max_overlap([(s["start"], s["end"]) for s in seen if s["cuda_visible_devices"] == device]) == 1


def test_failing_job_is_isolated_and_rerun_redoes_only_it(tmp_path):
    flag = tmp_path / "fail_flag"
    flag.touch()
    out = app(["launcher=gpus", "hydra.launcher.devices=[0,1]", "x=1,2,3", "fail_x=2", f"fail_flag={flag}"], tmp_path)
    assert out.returncode == 1
    assert "3 jobs, 2 completed, 1 failed" in out.stderr and "steerexp-sweep rerun" in out.stderr
    assert "Traceback" not in out.stderr  # the summary, not the job's traceback (that is in traceback.txt)
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


def test_gpus_job_process_that_dies_is_failed_with_its_exit_code(tmp_path):
    """A job whose process ends without a verdict (os._exit, SIGKILL) is FAILED with its exit code and its log's
    tail as the traceback; the other job completes."""
    out = app(["launcher=gpus", "hydra.launcher.devices=[0,1]", "x=1,2,3", "exit_x=1", "kill_x=2"], tmp_path)
    assert out.returncode == 1 and "3 jobs, 1 completed, 2 failed" in out.stderr
    jobs = job_dirs(the_sweep(tmp_path))
    assert (jobs[0] / "FAILED").read_text().startswith("the job process exited with code 3")
    assert (jobs[1] / "FAILED").read_text().startswith("the job process exited with code -9")
    assert "last lines of stdout.log" in (jobs[0] / "traceback.txt").read_text()
    assert (jobs[2] / "COMPLETED").is_file()


def test_basic_launcher_isolates_a_failing_job_and_rerun_redoes_only_it(tmp_path):
    flag = tmp_path / "fail_flag"
    flag.touch()
    out = app(["x=1,2,3", "fail_x=2", f"fail_flag={flag}"], tmp_path)  # launcher=basic: the default
    assert out.returncode == 1
    # one paragraph, the sweep's summary; the job's traceback is in its traceback.txt, not on the console
    assert "3 jobs, 2 completed, 1 failed" in out.stderr and "steerexp-sweep rerun" in out.stderr
    assert "Traceback" not in out.stderr and "deliberate failure of x=2" in out.stderr
    sweep = assert_one_sweep(tmp_path)
    jobs = job_dirs(sweep)
    assert [(j / "COMPLETED").is_file() for j in jobs] == [True, False, True]  # the job after the failure ran
    assert (jobs[1] / "FAILED").read_text().startswith("RuntimeError: deliberate failure of x=2")
    assert "deliberate failure of x=2" in (jobs[1] / "traceback.txt").read_text()
    assert not any((j / "RUNNING").exists() for j in jobs)
    launcher_pid = runs(jobs[0])[0]["pid"]
    assert {runs(j)[0]["pid"] for j in jobs} == {launcher_pid}  # one after another, in the launching process
    hydra_launcher = yaml.safe_load((jobs[0] / ".hydra" / "hydra.yaml").read_text())["hydra"]["launcher"]
    assert hydra_launcher["_target_"] == "hydra._internal.core_plugins.basic_launcher.BasicLauncher"  # Hydra's own

    status = sweep_cli(["status", str(sweep)], tmp_path)
    assert status.returncode == 1 and "#1    failed" in status.stdout and "#2    completed" in status.stdout
    assert "RuntimeError: deliberate failure of x=2" in status.stdout.splitlines()[1]
    flag.unlink()
    rerun = sweep_cli(["rerun", str(sweep)], tmp_path)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "rerunning 1 of 3 jobs: #1" in rerun.stdout
    assert [len(runs(j)) for j in jobs] == [1, 2, 1]
    assert all((j / "COMPLETED").is_file() and not (j / "FAILED").exists() for j in jobs)
    first, second = runs(jobs[1])
    assert second["pid"] != launcher_pid  # a fresh process, through the gpus launcher's worker
    assert (first["sweep_dir"], first["job_num"]) == (second["sweep_dir"], second["job_num"])
    assert second["cuda_visible_devices"] is None  # this process's devices, as the basic launcher had

    (jobs[0] / "COMPLETED").write_text("")  # a damaged marker is not "completed": the job is missing, rerun redoes it
    status = sweep_cli(["status", str(sweep)], tmp_path)
    assert status.returncode == 1 and status.stdout.startswith("#0    missing") and "damaged" in status.stdout
    assert sweep_cli(["rerun", str(sweep)], tmp_path).returncode == 0
    assert [len(runs(j)) for j in jobs] == [2, 2, 1]


def test_a_live_basic_sweep_shows_its_running_job_and_a_killed_one_is_rerun(tmp_path):
    """launcher=basic: the job running in the launching process is "running" (rerun refuses it); once the launcher
    is killed it is "missing" (was stopped) and rerun redoes it. The jobs it never reached are not listed."""
    hold = tmp_path / "hold"
    hold.touch()
    launcher = subprocess.Popen([sys.executable, str(APP), "-m", "x=1,2", f"hold_flag={hold}"], cwd=tmp_path,
                                env=app_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                preexec_fn=default_signals)
    try:
        deadline = time.time() + 90
        while not jobs_started(tmp_path, 1):
            assert launcher.poll() is None and time.time() < deadline
            time.sleep(0.1)
        sweep = the_sweep(tmp_path)
        status = sweep_cli(["status", str(sweep)], tmp_path)
        assert status.returncode == 1 and status.stdout.startswith("#0    running")
        assert f"pid {launcher.pid} on " in status.stdout and "1 jobs, 0 completed" in status.stdout
        rerun = sweep_cli(["rerun", str(sweep)], tmp_path)
        assert rerun.returncode == 1 and "job #0 is still running" in rerun.stderr
        launcher.send_signal(signal.SIGKILL)
        launcher.wait(timeout=10)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    status = sweep_cli(["status", str(sweep)], tmp_path)
    assert status.stdout.startswith("#0    missing") and "was stopped" in status.stdout
    hold.unlink()
    rerun = sweep_cli(["rerun", str(sweep)], tmp_path)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert len(runs(sweep / "0")) == 2 and (sweep / "0" / "COMPLETED").is_file() and not (sweep / "1").exists()


def test_sweep_cli_says_in_one_line_what_is_wrong_with_a_directory(tmp_path, capsys):
    """Not a sweep (empty, a run dir, a job dir of a sweep, a file) or damaged state: one line and exit code 2,
    never a traceback; an empty FAILED marker still gives the job a reason; a damaged metrics.json is named."""
    from hydra_plugins.steerexp_launchers import jobs as J

    from steerexp.sweep import main

    def one_line(argv, code=2):
        assert main(argv) == code
        out = capsys.readouterr()
        assert "Traceback" not in out.err + out.out
        if code == 2:
            assert len(out.err.strip().splitlines()) == 1 and out.err.startswith("steerexp-sweep: "), out.err
        return out

    (tmp_path / "empty").mkdir()
    for command in ("status", "rerun", "best"):
        assert "not a steerexp sweep directory" in one_line([command, str(tmp_path / "empty")]).err
    (tmp_path / "a_file").write_text("x")
    assert "not a directory" in one_line(["status", str(tmp_path / "a_file")]).err
    assert "not a directory" in one_line(["status", str(tmp_path / "nope")]).err

    sweep = tmp_path / "sweep"  # a sweep's state as the launchers write it: job 0 completed, job 1 failed
    J.write_manifest(sweep, "basic", str(tmp_path))
    jobs = [J.Job(n, [f"x={n}"], sweep / str(n), sweep / ".sweep" / "jobs" / f"{n}.pkl") for n in (0, 1)]
    for job in jobs:
        job.job_dir.mkdir(parents=True)
        J.write_record(job)
    J.mark_completed(jobs[0])
    J.mark_failed(jobs[1], "RuntimeError: boom")
    assert "inside the sweep" in one_line(["status", str(sweep / "0")]).err  # a job dir: points at its sweep
    assert one_line(["status", str(sweep)], code=1).out.startswith("#0    completed")

    (jobs[1].job_dir / "FAILED").write_text("")
    out = one_line(["status", str(sweep)], code=1).out
    assert "#1    failed" in out and "no error recorded" in out
    (jobs[0].job_dir / "metrics.json").write_text("{not json")
    assert main(["best", str(sweep)]) == 2  # nothing left to rank; the damaged file is named first
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "0/metrics.json is damaged" in err[0] and "no completed job" in err[1]
    J.record_path(jobs[1]).write_text("{")
    assert "is damaged" in one_line(["status", str(sweep)]).err
    (sweep / ".sweep" / "manifest.json").write_text("[1, 2")
    for command in ("status", "rerun", "best"):
        assert "manifest.json is damaged" in one_line([command, str(sweep)]).err


def test_sweep_best_ranks_restarts_by_the_training_objective(tmp_path):
    """`steerexp-sweep best`: completed jobs ranked by technique/train_objective (lowest first); a failed job and a job
    without the metric are left out and counted; ranking by an evaluation metric says it picks on its seeds."""
    flag = tmp_path / "fail_flag"
    flag.touch()
    out = app(["x=1,2,3,4", "fail_x=4", f"fail_flag={flag}"], tmp_path)  # job 3 fails
    assert out.returncode != 0
    sweep = assert_one_sweep(tmp_path)
    jobs = job_dirs(sweep)
    for job, objective, rate in zip(jobs[:2], (9.98, 8.56), (0.96, 0.10)):  # what steerexp runs write
        (job / "metrics.json").write_text(json.dumps({"technique/train_objective": objective,
                                                      "concept/target_rate/edited": rate}))
    (jobs[2] / "metrics.json").write_text(json.dumps({"concept/target_rate/edited": 0.5}))  # no train objective
    ranked = sweep_cli(["best", str(sweep)], tmp_path)
    assert ranked.returncode == 0, ranked.stderr
    lines = ranked.stdout.splitlines()
    assert lines[0].startswith("best #1 ") and "technique/train_objective=8.56" in lines[0] and "x=2" in lines[0]
    assert lines[1].lstrip().startswith("#0 ") and "(2 of 4 jobs not ranked" in lines[2]
    # the training objective looks at no evaluation seed, but these jobs differ in x, not only in seed
    assert "measured on the evaluation seeds" not in ranked.stderr and "differ in x, not only in seed" in ranked.stderr
    by_rate = sweep_cli(["best", str(sweep), "--by", "concept/target_rate/edited", "--max"], tmp_path)
    assert by_rate.stdout.startswith("best #0 ") and "measured on the evaluation seeds" in by_rate.stderr
    missing = sweep_cli(["best", str(sweep), "--by", "nope"], tmp_path)
    assert missing.returncode == 2 and "no completed job" in missing.stderr
    (jobs[1] / "metrics.json").write_text("{not json")  # a damaged file: that job is left out, the others ranked
    assert sweep_cli(["best", str(sweep)], tmp_path).stdout.startswith("best #0 ")


def test_gpus_workers_die_with_the_launcher_and_a_live_sweep_is_not_rerun(tmp_path):
    hold = tmp_path / "hold"  # the jobs wait while it exists
    hold.touch()
    with open(tmp_path / "launcher.log", "wb") as log:
        launcher = subprocess.Popen([sys.executable, str(APP), "-m", "launcher=gpus", "hydra.launcher.devices=[0,1]",
                                     "x=1,2,3", f"hold_flag={hold}", "child=true"],
                                    cwd=tmp_path, env=app_env(), stdout=log, stderr=subprocess.STDOUT,
                                    preexec_fn=default_signals)
    try:
        deadline = time.time() + 90
        while not jobs_started(tmp_path, 2):  # jobs 0 and 1 run (in their workers), job 2 waits for a device
            assert launcher.poll() is None and time.time() < deadline, (tmp_path / "launcher.log").read_text()[-3000:]
            time.sleep(0.1)
        sweep = the_sweep(tmp_path)
        jobs = [sweep / "0", sweep / "1"]
        started = [runs(j)[0] for j in jobs]

        # two jobs running (one per device), the third queued: status says so, rerun refuses all three
        status = sweep_cli(["status", str(sweep)], tmp_path)
        lines = status.stdout.splitlines()
        assert status.returncode == 1
        for num, r in enumerate(started):
            assert lines[num].startswith(f"#{num}    running") and f"pid {r['pid']} on " in lines[num]
        assert lines[2].startswith("#2    pending")
        assert "2 running, 1 pending" in status.stdout and "did not run" not in status.stdout
        rerun = sweep_cli(["rerun", str(sweep)], tmp_path)
        assert rerun.returncode == 1
        refusals = rerun.stderr.strip().splitlines()
        assert len(refusals) == 3 and all("not rerunning it" in line for line in refusals)
        assert "job #0 is still running" in refusals[0] and "job #2 is queued" in refusals[2]
        assert [len(runs(j)) for j in jobs] == [1, 1] and not (sweep / "2").exists()  # nothing started twice

        # the launcher dies: its workers (its own children, fresh processes), and what they started, die with it
        assert {r["ppid"] for r in started} == {launcher.pid}
        launcher.send_signal(signal.SIGKILL)
        launcher.wait(timeout=10)
        assert gone([r["pid"] for r in started] + [r["child_pid"] for r in started], within=10)
    finally:
        if launcher.poll() is None:
            launcher.kill()

    status = sweep_cli(["status", str(sweep)], tmp_path)
    assert "3 missing" in status.stdout and status.stdout.count("was stopped") == 2
    hold.unlink()
    rerun = sweep_cli(["rerun", str(sweep)], tmp_path)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert [len(runs(j)) for j in job_dirs(sweep)] == [2, 2, 1]


def test_sigterm_to_the_launcher_stops_its_jobs_and_leaves_them_missing(tmp_path):
    hold = tmp_path / "hold"
    hold.touch()
    launcher = subprocess.Popen([sys.executable, str(APP), "-m", "launcher=gpus", "hydra.launcher.devices=[0,1]",
                                 "x=1,2,3", f"hold_flag={hold}", "child=true"],
                                cwd=tmp_path, env=app_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                preexec_fn=default_signals)
    try:
        deadline = time.time() + 90
        while not jobs_started(tmp_path, 2):
            assert launcher.poll() is None and time.time() < deadline
            time.sleep(0.1)
        started = [runs(the_sweep(tmp_path) / str(num))[0] for num in (0, 1)]
        launcher.send_signal(signal.SIGTERM)  # scancel, kill: the jobs (and what they started) stop, the launcher ends
        assert launcher.wait(timeout=30) != 0
        assert gone([r["pid"] for r in started] + [r["child_pid"] for r in started], within=10)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    status = sweep_cli(["status", str(the_sweep(tmp_path))], tmp_path)
    assert "3 missing" in status.stdout  # stopped, not failed: `rerun` redoes them
    assert not list(the_sweep(tmp_path).glob("*/FAILED"))


def test_sweeps_and_runs_started_in_the_same_second_never_share_a_dir(tmp_path):
    from hydra_plugins.steerexp_launchers.resolvers import unique_dir

    from steerexp import conf_dir

    assert unique_dir(str(tmp_path / "a")) == str(tmp_path / "a")
    assert unique_dir(str(tmp_path / "a")) == str(tmp_path / "a") + "_1"
    (tmp_path / "a").rmdir()
    (tmp_path / "a_1").rmdir()
    # steerexp's own run and sweep dirs are claimed by the resolver
    hydra_cfg = yaml.safe_load((conf_dir() / "config.yaml").read_text())["hydra"]
    assert hydra_cfg["run"]["dir"].startswith("${steerexp_unique_dir:outputs/")
    assert hydra_cfg["sweep"]["dir"].startswith("${steerexp_unique_dir:outputs/multirun/")
    # two sweeps and two single runs racing for the very same names (as two launched in the same second do)
    sweep_args = ["-m", f"hydra.sweep.dir=${{steerexp_unique_dir:{tmp_path / 'same'}}}", "x=1"]
    run_args = [f"hydra.run.dir=${{steerexp_unique_dir:{tmp_path / 'run'}}}", "x=1", "sleep_s=0.5"]
    procs = [subprocess.Popen([sys.executable, str(APP), *args], cwd=tmp_path, env=app_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for args in (sweep_args, sweep_args, run_args, run_args)]
    assert all(p.wait(timeout=120) == 0 for p in procs), [p.stderr.read()[-2000:] for p in procs]
    # nothing else: the sweeps' jobs claimed no run dir (outputs/<date>/<time>)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "run_1", "same", "same_1"]
    for d in ("same", "same_1"):
        assert (tmp_path / d / "0" / "job.json").is_file()
    for d in ("run", "run_1"):
        assert Path(runs(tmp_path / d)[0]["output_dir"]) == tmp_path / d and (tmp_path / d / "job.json").is_file()


def test_a_sweep_dir_is_claimed_once_and_pinned_for_every_job(tmp_path, monkeypatch):
    """Job configs carry the claimed sweep dir as a literal (a pinned Hydra override), so a job never
    resolves the claiming expression again, even with its resolver cache gone (hydra-core 1.4
    prereleases lost it on the way to submitit's job processes: `<time>/` and `<time>_1/`)."""
    import pickle

    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    import hydra_plugins.steerexp_launchers  # noqa: F401  (registers the resolver)
    from steerexp import conf_dir

    monkeypatch.chdir(tmp_path)
    with initialize_config_dir(config_dir=str(APP.parent / "conf"), version_base="1.3"):
        hydra_app = GlobalHydra.instance().hydra
        master = hydra_app.compose_config("app", [f"hydra.searchpath=[file://{conf_dir()}]", "hydra.mode=MULTIRUN",
                                                  "x=1,2"], run_mode=RunMode.MULTIRUN)
        sweep_dir = master.hydra.sweep.dir  # where the sweep starts: claimed here, once
        assert master.hydra.sweep.dir == sweep_dir
        assert master.hydra.overrides.hydra[-1] == f"hydra.sweep.dir='{sweep_dir}'"
        job = hydra_app.config_loader.load_sweep_config(master, ["x=1"])
        assert OmegaConf.to_container(job.hydra.sweep)["dir"] == sweep_dir  # a literal, no resolver left
        OmegaConf.clear_cache(job)
        assert job.hydra.sweep.dir == sweep_dir
        assert pickle.loads(pickle.dumps(job)).hydra.sweep.dir == sweep_dir
        assert job.hydra.run.dir.startswith("outputs/")  # a sweep job resolves its run dir without claiming it
    leaves = [p for p in (tmp_path / "outputs").rglob("*") if p.is_dir() and not any(p.iterdir())]
    assert leaves == [tmp_path / sweep_dir]


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


def assert_status_and_rerun_work(tmp_path: Path, flag: Path, launcher: str) -> None:
    """A sweep of x=1,2 whose job 1 failed while `flag` existed, run by another launcher than gpus: the sweep
    callback kept its state in the jobs' processes, so status shows the failure and rerun redoes only it."""
    sweep = assert_one_sweep(tmp_path)
    jobs = job_dirs(sweep)
    assert json.loads((jobs[0] / "job.json").read_text())["x"] == 1 and (jobs[0] / "COMPLETED").is_file()
    assert (jobs[1] / "FAILED").read_text().startswith("RuntimeError: deliberate failure of x=2")
    assert json.loads((sweep / ".sweep" / "manifest.json").read_text())["launcher"] == launcher
    launching = runs(jobs[0])[0]["pid"]
    status = sweep_cli(["status", str(sweep)], tmp_path)
    assert status.returncode == 1, status.stdout + status.stderr
    first, second = status.stdout.splitlines()[:2]
    assert first.startswith("#0    completed ") and first.endswith(f" x=1 fail_x=2 fail_flag={flag}")
    assert second.startswith("#1    failed ") and second.endswith(
        f" x=2 fail_x=2 fail_flag={flag}   RuntimeError: deliberate failure of x=2")
    flag.unlink()
    rerun = sweep_cli(["rerun", str(sweep)], tmp_path)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "rerunning 1 of 2 jobs: #1" in rerun.stdout and "2 jobs, 2 completed" in rerun.stdout
    assert [len(runs(j)) for j in jobs] == [1, 2] and runs(jobs[1])[1]["pid"] != launching
    assert json.loads((jobs[1] / "job.json").read_text())["x"] == 2
    assert sweep_cli(["status", str(sweep)], tmp_path).returncode == 0


def test_submitit_local_sweep_keeps_its_state_for_status_and_rerun(tmp_path):
    flag = tmp_path / "fail_flag"
    flag.touch()
    out = app(["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5", "x=1,2", "fail_x=2",
               f"fail_flag={flag}"], tmp_path)
    assert out.returncode == 1 and "2 jobs, 1 completed, 1 failed" in out.stderr, out.stderr[-3000:]
    # the jobs ran in submitit's processes, all in one sweep dir
    assert_status_and_rerun_work(tmp_path, flag, "submitit_local")
    # launcher=slurm composes against submitit's SLURM schema: one GPU per task, requeues, an array
    cfg = subprocess.run([sys.executable, str(APP), "--cfg", "hydra", "--package", "hydra.launcher", "launcher=slurm"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert cfg.returncode == 0, cfg.stderr[-2000:]
    launcher = yaml.safe_load(cfg.stdout.split("# @package hydra.launcher")[-1])
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert launcher["gpus_per_task"] == 1 and launcher["max_num_timeout"] >= 1 and launcher["array_parallelism"] > 1


def test_ray_local_sweep_keeps_its_state_for_status_and_rerun(tmp_path):
    flag = tmp_path / "fail_flag"
    flag.touch()
    out = app(["launcher=ray", "hydra.launcher.ray.remote.num_gpus=0", "+hydra.launcher.ray.init.num_cpus=2",
               "+hydra.launcher.ray.init.include_dashboard=false", "x=1,2", "fail_x=2", f"fail_flag={flag}"],
              tmp_path, timeout=300)
    assert out.returncode == 1 and "2 jobs, 1 completed, 1 failed" in out.stderr, out.stderr[-3000:]
    jobs = job_dirs(assert_one_sweep(tmp_path))  # the jobs ran in Ray workers, all in one sweep dir
    assert runs(jobs[0])[0]["pid"] != runs(jobs[1])[0]["pid"]
    assert_status_and_rerun_work(tmp_path, flag, "ray")
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
        HydraConfig.instance().cfg = OmegaConf.create(
            {"hydra": {"mode": "RUN", "sweep": {"dir": "x"}, "job": {"num": 0}}})
        assert default_run_id() is None  # single runs: W&B picks a fresh id
    finally:
        HydraConfig.instance().cfg = previous


def test_real_steerexp_optuna_trial_on_the_gpus_launcher(shipped, tmp_path):
    """One real (tiny) steerexp job through launcher=gpus + hparams_search=optuna: the objective comes back."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "steerexp.cli",
            "-m",
            "technique=embedding_arithmetic",
            "launcher=gpus",
            "hydra.launcher.devices=[0]",
            "hparams_search=optuna",
            "hydra.sweeper.n_trials=1",
            "evaluator=[concept,leakage]",
            "evaluator.concept.head=size",
            "evaluator.concept.target=large",
            "evaluator.leakage.head=size",
            "evaluator.leakage.target=large",
            "logger=none",
            "sampling.steps=2",
            "eval.seeds=[0]",
            "eval.prompts=['a small red circle']",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    sweep = the_sweep(tmp_path)
    metrics = json.loads((sweep / "0" / "metrics.json").read_text())
    assert metrics["generator/unchanged"] is True
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(metrics["concept/target_rate/edited"] - metrics["leakage/flip_rate"])


def test_real_steerexp_sweep_with_a_bad_job_says_so_in_one_line(shipped, tmp_path):
    """`steerexp -m technique.lr=0.005,nan ...` (launcher=basic): the bad job is one `steerexp: error: job 1: ...`
    line, no traceback; the good job completes; status shows the bad one failed with that reason."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", WANDB_MODE="disabled")
    env.pop("HYDRA_FULL_ERROR", None)
    out = subprocess.run([sys.executable, "-m", "steerexp.cli", "-m", "technique.lr=0.005,nan", "technique.steps=2",
                          "logger=none", "eval.seeds=[0]", "eval.prompts=['a {}']", "evaluator=[concept]",
                          "sampling.steps=2"], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 1, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if "error" in line.lower()]
    assert errors[0].startswith("steerexp: error: job 1: technique.lr: ") and "nan" in errors[0]
    assert sum(line.startswith("steerexp: error:") for line in out.stderr.splitlines()) == 1
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) < 12, out.stderr
    assert "2 jobs, 1 completed, 1 failed" in out.stderr
    sweep = the_sweep(tmp_path)
    assert json.loads((sweep / "0" / "metrics.json").read_text())["generator/unchanged"] is True
    status = sweep_cli(["status", str(sweep)], tmp_path)
    assert status.returncode == 1
    line = status.stdout.splitlines()[1]
    assert line.startswith("#1    failed ") and line.endswith(errors[0].replace("steerexp: error: job 1: ", ""))
    assert "ConfigError: technique.lr: " in line and "Traceback" in (sweep / "1" / "traceback.txt").read_text()
