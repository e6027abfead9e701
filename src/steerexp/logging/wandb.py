"""W&B through `wandb.init` (training logs into the same run through Lightning's WandbLogger: `lightning()`):
offline by default under <run_dir>/wandb, online
only when `logger.mode=online`, nothing with `logger.mode=disabled`. Every run, including
each job of a multirun, starts and finishes its own W&B run.

Online mode never stalls a run: before `wandb.init` it checks, without prompting, that there
are credentials for the W&B server (WANDB_API_KEY, ~/.netrc from `wandb login`, ...) and that
the server (WANDB_BASE_URL or the `base_url` setting; through the proxy when one is set)
accepts a connection within PROBE_TIMEOUT_S, DNS included; `wandb.init` itself gets
INIT_TIMEOUT_S instead of wandb's 90 s. If any of that fails, the run is logged offline under
the same run dir instead, with one warning on the "steerexp.logging" logger that says why and
which `wandb sync <dir>` uploads it later.

In a sweep (`steerexp -m ...`): group = the sweep (its directory), name = the job's override
dirname, job_type = train (the technique learns) or eval (training-free), and the run id is a
hash of the sweep dir and the job number, so `steerexp-sweep rerun` of a failed job resumes its
W&B run instead of starting a duplicate (offline runs sync into the same id with `wandb sync`)."""
from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import torch

MODES = ("offline", "online", "disabled")
PROBE_TIMEOUT_S = 5.0   # the W&B server must accept a TCP connection (DNS included) within this
INIT_TIMEOUT_S = 8.0    # wandb.init's limit in online mode (wandb's default init_timeout is 90 s)
DEFAULT_BASE_URL = "https://api.wandb.ai"

log = logging.getLogger("steerexp.logging")


def flat_config(config: dict, prefix: str = "") -> dict:
    """A nested config as flat dotted keys ({"technique": {"alpha": 1}} -> {"technique.alpha": 1}); lists stay
    lists. W&B gets this, so a dashboard filters and groups runs by `technique.alpha` like any other column."""
    out = {}
    for key, value in (config or {}).items():
        if isinstance(value, dict) and value:
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def sweep_run_id(sweep_dir: str | Path, job_num: int) -> str:
    """Deterministic W&B run id of a sweep job: the same sweep dir and job number give the same id."""
    key = f"{Path(sweep_dir).absolute().as_posix()}#{int(job_num)}"
    return hashlib.sha1(key.encode()).hexdigest()[:16]


def default_run_id() -> str | None:
    """The sweep job's deterministic id when running inside a Hydra multirun, else None (W&B picks one)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    mode = hc.get("mode")
    if getattr(mode, "name", mode) != "MULTIRUN" or hc.job.get("num") is None:
        return None
    return sweep_run_id(hc.sweep.dir, hc.job.num)


def server_url() -> str:
    """The W&B server an online run talks to: WANDB_BASE_URL, else wandb's `base_url` setting
    (settings files written by `wandb login --host`), else wandb's default."""
    url = os.environ.get("WANDB_BASE_URL")
    if url:
        return url.rstrip("/")
    try:
        from wandb.sdk import wandb_setup

        return str(wandb_setup.singleton().settings.base_url).rstrip("/")
    except Exception:  # an older/newer wandb without this internal: its documented default
        return DEFAULT_BASE_URL


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def missing_login(base_url: str) -> str | None:
    """Why there are no W&B credentials for `base_url` (None when there are). Looks where
    `wandb.init` looks (environment, this session, ~/.netrc, wandb's settings) but never prompts."""
    how = "run `wandb login` (or set WANDB_API_KEY) to log online"
    hostname = urlsplit(base_url).hostname or ""
    if hostname not in ("api.wandb.ai", "api.forge.coreweave.com", "forge.coreweave.com"):
        how = f"run `wandb login --host {base_url}` (or set WANDB_API_KEY) to log online"
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return None
    try:
        from wandb.sdk.lib import wbauth
    except ImportError:  # an older wandb: its ~/.netrc entry is all `wandb login` leaves
        import netrc

        try:
            found = netrc.netrc(os.environ.get("NETRC")).authenticators(hostname)
        except (OSError, netrc.NetrcParseError):
            found = None
        return None if found else f"no W&B login for {base_url}; {how}"
    try:
        if wbauth.session_credentials(host=base_url) or wbauth.read_netrc_auth(host=base_url):
            return None
    except Exception as e:  # a malformed key in ~/.netrc, ...
        return f"the W&B credentials for {base_url} are invalid ({_one_line(e)}); {how}"
    try:
        from wandb.sdk import wandb_setup

        settings = wandb_setup.singleton().settings
        if settings.api_key and str(settings.base_url).rstrip("/") == base_url:
            return None
    except Exception:
        pass
    return f"no W&B login for {base_url}; {how}"


def _probe_target(base_url: str) -> tuple[str, int]:
    """host, port of the first hop to `base_url`: the proxy when the environment sets one for it."""
    url = urlsplit(base_url)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    proxy = urllib.request.getproxies_environment().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass_environment(host):
        p = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if p.hostname:
            return p.hostname, p.port or (443 if p.scheme == "https" else 80)
    return host, port


def unreachable(base_url: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the W&B server at `base_url` cannot be reached (None when it accepts a connection).
    Name resolution and connect run in a daemon thread joined for at most `timeout` seconds:
    getaddrinfo has no timeout of its own and can hang when there is no network."""
    host, port = _probe_target(base_url)
    if not host:
        return f"WANDB_BASE_URL / base_url {base_url!r} has no host"
    outcome: dict[str, object] = {}

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome["ok"] = True
        except OSError as e:
            outcome["error"] = e

    probe = threading.Thread(target=connect, name="steerexp-wandb-probe", daemon=True)
    probe.start()
    probe.join(timeout)
    if outcome.get("ok"):
        return None
    why = _one_line(outcome["error"]) if "error" in outcome else f"no answer within {timeout:g} s"
    return f"cannot reach the W&B server {host}:{port} ({why})"


class RunLogger:
    def __init__(self, mode: str, run_dir: Path, name: str, group: str, tags: list[str], config: dict,
                 project: str = "steerexp", entity: str | None = None, job_type: str = "train",
                 run_id: str | None = None):
        if mode not in MODES:
            raise ValueError(f"logger.mode must be one of {MODES}, got {mode!r}")
        self.mode, self.run_dir = mode, Path(run_dir)
        self.run = None  # the wandb run; None when W&B is off (logger.mode=disabled)
        self.fallback_reason: str | None = None  # why an online run was logged offline instead
        if mode == "disabled":
            return
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        # a fresh run per job: never resume the previous job's run within one process
        if wandb.run is not None:
            wandb.finish()
        run_id = run_id or default_run_id()  # started with resume="allow" (_init)
        init = dict(
            project=project,
            entity=entity,
            name=name,
            group=group,
            tags=tags,
            job_type=job_type,
            save_dir=str(self.run_dir),
            id=run_id,
            config=flat_config(config),  # technique.alpha, ...: dashboards filter and group by any override
        )
        if mode == "online":
            reason = self._start_online(wandb, init)
            if reason is None:
                return
            self.fallback_reason = reason
        settings = wandb.Settings(silent=True, console="off")
        self.run = self._init(wandb, offline=True, settings=settings, **init)
        if self.fallback_reason is not None:
            sync_dir = Path(self.run.settings.sync_dir).absolute()
            log.warning(
                "W&B online logging unavailable: %s. Logged offline to %s instead; "
                "upload it later with `wandb sync %s`",
                self.fallback_reason,
                sync_dir,
                sync_dir,
            )

    @staticmethod
    def _init(wandb, offline: bool, settings, save_dir: str, **init):
        """wandb.init under <save_dir>/wandb; resume="allow": a rerun sweep job continues its run. The mode is
        explicit in the settings: an earlier job of this process must not decide it through the environment."""
        settings.mode = "offline" if offline else "online"
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        return wandb.init(dir=save_dir, resume="allow", settings=settings, **init)

    def lightning(self):
        """Lightning's WandbLogger on this same W&B run (training metrics and the evaluation's results land in
        one run); None when W&B is off. Built only when a technique trains (it imports Lightning)."""
        if self.run is None:
            return None
        from lightning.pytorch.loggers import WandbLogger

        return WandbLogger(experiment=self.run, save_dir=str(self.run_dir), log_model=False)

    @property
    def active(self) -> bool:
        """Whether a W&B run is logging (offline or online)."""
        return self.run is not None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Scalars of training step `step` (the trainer's train/loss, delta_norm/*, ...)."""
        if self.active:
            self.run.log(dict(metrics), step=step)

    def _start_online(self, wandb, init: dict) -> str | None:
        """Start an online run; None when it started, else why not (nothing is left running)."""
        base_url = server_url()
        reason = missing_login(base_url) or unreachable(base_url)
        if reason is not None:
            return reason
        # wandb reports a failed init to its error tracker, which takes another ~10 s without a
        # network: not for this attempt, whose failure is expected and handled here
        reporting = os.environ.get("WANDB_ERROR_REPORTING")
        os.environ["WANDB_ERROR_REPORTING"] = "false"
        try:
            settings = wandb.Settings(silent=True, console="off", base_url=base_url, init_timeout=INIT_TIMEOUT_S)
            self.run = self._init(wandb, offline=False, settings=settings, **init)
        except Exception as e:  # wandb.Error (timeout, auth, server), pydantic validation, ...
            if wandb.run is not None:
                wandb.finish(exit_code=1)
            first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
            return f"wandb.init failed against {base_url} ({first})"
        finally:
            if reporting is None:
                os.environ.pop("WANDB_ERROR_REPORTING", None)
            else:
                os.environ["WANDB_ERROR_REPORTING"] = reporting
        return None

    def log_result(self, result) -> None:
        """Everything an evaluator returned (an EvalResult), each channel as W&B shows it: grids and plots as
        images, histograms, tables, line plots. Summary metrics go to the run's summary in `finish`."""
        for key, grid in result.grids.items():
            self.log_grid(key, grid, result.grid_labels.get(key))
        for key, series in result.histograms.items():
            self.log_histograms(key, series)
        for key, (columns, rows) in result.tables.items():
            self.log_table(key, columns, rows)
        for key, path in result.plots.items():
            self.log_plot(key, path)
        for key, (xs, series, xname) in result.lines.items():
            self.log_lines(key, xs, series, xname)

    def log_grid(self, key: str, grid: torch.Tensor, labels=None) -> None:
        """The grid as the PNG on disk shows it (labels drawn around it), captioned with what its rows and
        columns are (`labels`: an images.GridLabels)."""
        if self.active:
            import wandb

            from steerexp.images import labelled_image

            caption = labels.caption() if labels is not None else key
            self.run.log({key: wandb.Image(labelled_image(grid, labels), caption=caption)})

    def log_histograms(self, key: str, series: dict[str, list[float]]) -> None:
        if self.active:
            import wandb

            self.run.log({f"{key}/{side}": wandb.Histogram(np.asarray(v)) for side, v in series.items()})

    def log_table(self, key: str, columns: list[str], rows: list[list]) -> None:
        if self.active:
            import wandb

            self.run.log({key: wandb.Table(columns=columns, data=rows)})

    def log_plot(self, key: str, path: str) -> None:
        if self.active:
            import wandb

            self.run.log({key: wandb.Image(str(path))})

    def log_lines(self, key: str, xs: list[float], series: dict[str, list[float]], xname: str) -> None:
        if self.active:
            import wandb

            self.run.log(
                {
                    key: wandb.plot.line_series(
                        xs=xs, ys=list(series.values()), keys=list(series), title=key, xname=xname
                    )
                }
            )

    def finish(self, metrics: dict) -> None:
        if self.active:
            import wandb

            self.run.summary.update(metrics)
            wandb.finish()
