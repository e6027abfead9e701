"""logger.mode=online never stalls a run (issue 13): without a network or without a login it
falls back, within a bounded time, to an offline W&B run under the same run dir with one
warning that says why and how to upload it later. Offline mode needs neither."""
import logging
import socket
import threading
import time
from pathlib import Path

import pytest

# imported up front, so that the timings below are W&B's, not the imports'
import wandb

from steerexp.logging import wandb as wandb_logging
from steerexp.logging.wandb import RunLogger

FAKE_KEY = "0123456789" * 4
BOUND_S = 15.0


@pytest.fixture
def fresh_wandb(monkeypatch):
    """wandb re-reads the environment (WANDB_API_KEY, WANDB_BASE_URL, ...) only when it sets up:
    tear it down around each test so that the test's environment is the one in effect."""
    monkeypatch.delenv("WANDB_IDENTITY_TOKEN_FILE", raising=False)
    wandb.teardown()
    yield
    if wandb.run is not None:
        wandb.finish()
    wandb.teardown()


@pytest.fixture
def silent_server():
    """A server that accepts connections and never answers."""
    srv = socket.create_server(("127.0.0.1", 0))
    held = []

    def serve():
        while True:
            try:
                held.append(srv.accept()[0])
            except OSError:
                return

    threading.Thread(target=serve, daemon=True).start()
    yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    srv.close()
    for conn in held:
        conn.close()


@pytest.fixture
def hanging_connect():
    """A port whose connects time out: its listen backlog is full and nobody accepts, so the
    kernel drops further SYNs (what a firewalled or unroutable server looks like)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    filler = socket.create_connection(srv.getsockname(), timeout=2)
    yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    filler.close()
    srv.close()


def start_online(tmp_path, caplog):
    run_dir = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="steerexp.logging"):
        start = time.monotonic()
        logger = RunLogger("online", run_dir, "job", "group", ["t"], {"a": 1}, project="steerexp", entity=None,
                           job_type="eval")
        took = time.monotonic() - start
    return run_dir, logger, took


def assert_offline_fallback(run_dir: Path, logger, took, caplog, *hints):
    assert took < BOUND_S, f"fallback took {took:.1f} s"
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    assert logger.run.settings.mode in ("offline", "dryrun") and logger.fallback_reason
    warnings = [r for r in caplog.records if r.name == "steerexp.logging" and r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    message = warnings[0].getMessage()
    assert "\n" not in message
    assert f"wandb sync {runs[0].absolute()}" in message
    for hint in hints:
        assert hint in message
    logger.log_table("t", ["x"], [[1]])  # the offline run works
    logger.finish({"m": 1.0})
    assert list(runs[0].glob("*.wandb"))


@pytest.mark.parametrize("case", ["refused", "unroutable", "connect_timeout", "silent_server"])
def test_online_without_network_falls_back_to_offline_in_bounded_time(
        case, fresh_wandb, silent_server, hanging_connect, monkeypatch, tmp_path, caplog):
    base_url = {
        "refused": "http://127.0.0.1:9",
        # times out on a host without a network (a sandbox that intercepts it answers 404 instead)
        "unroutable": "http://10.255.255.1:9",
        "connect_timeout": hanging_connect,
        "silent_server": silent_server,  # the connect works, wandb.init times out
    }[case]
    monkeypatch.setenv("WANDB_BASE_URL", base_url)
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    run_dir, logger, took = start_online(tmp_path, caplog)
    print(f"{case}: fallback after {took:.2f} s: {logger.fallback_reason}")
    assert_offline_fallback(run_dir, logger, took, caplog)


def test_online_with_hanging_name_resolution_falls_back_in_bounded_time(fresh_wandb, monkeypatch, tmp_path, caplog):
    resolve = socket.getaddrinfo

    def hanging(host, *args, **kwargs):
        if host == "wandb-server.invalid":
            time.sleep(60)
        return resolve(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", hanging)
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb-server.invalid")
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    run_dir, logger, took = start_online(tmp_path, caplog)
    print(f"dns hang: fallback after {took:.2f} s: {logger.fallback_reason}")
    assert_offline_fallback(run_dir, logger, took, caplog, "wandb-server.invalid:443", "no answer within")


def test_online_without_login_falls_back_with_login_hint(fresh_wandb, monkeypatch, tmp_path, caplog):
    netrc = tmp_path / "netrc"
    netrc.write_text("")
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setattr("builtins.input", lambda *a: pytest.fail("prompted for a login"))
    monkeypatch.setattr(wandb_logging, "unreachable", lambda *a, **k: pytest.fail("probed without a login"))
    run_dir, logger, took = start_online(tmp_path, caplog)
    print(f"no login: fallback after {took:.2f} s: {logger.fallback_reason}")
    assert_offline_fallback(run_dir, logger, took, caplog, "no W&B login", "wandb login", "WANDB_API_KEY")


def test_offline_mode_needs_no_login_and_no_network(fresh_wandb, monkeypatch, tmp_path, caplog, capfd):
    def fail(*args, **kwargs):
        pytest.fail("offline mode probed the W&B server or looked for a login")

    for probe in ("server_url", "missing_login", "unreachable"):
        monkeypatch.setattr(wandb_logging, probe, fail)
    monkeypatch.setattr(socket, "create_connection", fail)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    run_dir = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="steerexp.logging"):
        logger = RunLogger("offline", run_dir, "job", "group", ["t"], {"a": 1})
    assert logger.fallback_reason is None and logger.run.settings.mode in ("offline", "dryrun")
    assert logger.active
    logger.finish({"m": 1.0})
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1
    assert not [r for r in caplog.records if r.name == "steerexp.logging"]
    assert "anonymous setting has no effect" not in capfd.readouterr().err


@pytest.mark.parametrize("mode", ["Online", "dryrun", "offline ", ""])
def test_logger_mode_is_validated(mode, tmp_path):
    with pytest.raises(ValueError, match="logger.mode must be one of"):
        RunLogger(mode, tmp_path, "job", "group", [], {})


def test_disabled_mode_starts_no_wandb_run(tmp_path, monkeypatch):
    monkeypatch.setattr(wandb_logging, "unreachable", lambda *a, **k: pytest.fail("probed"))
    logger = RunLogger("disabled", tmp_path, "job", "group", [], {})
    assert not logger.active
    logger.finish({"m": 1.0})
    assert not (tmp_path / "wandb").exists()
