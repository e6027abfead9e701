"""`steerexp`: the Hydra main. `steerexp --help` lists the config groups and their options.

    steerexp                                            # textual inversion of the held-out shape + evaluation
    steerexp technique.steps=50 eval.seeds=[0,1]        # override anything
    steerexp -m technique.num_vectors=1,2 seed=0,1      # a sweep: one run dir and one W&B run per job
"""
from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra_plugins.steerexp_launchers.resolvers import register_resolvers
from omegaconf import DictConfig, OmegaConf

from steerexp import conf_dir
from steerexp.errors import ConfigError
from steerexp.shutdown import exit_now
from steerexp.validate import check_group_overrides, validate

register_resolvers()  # steerexp_unique_dir, steerexp_suffix (conf/config.yaml: hydra.run.dir)


def run_identity(cfg: DictConfig) -> tuple[Path, str, str]:
    """Run directory, W&B name and W&B group, from Hydra."""
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    overrides = hc.job.override_dirname
    name = cfg.get("name") or overrides or cfg.get("experiment_name") or "default"
    if hc.mode == RunMode.MULTIRUN:
        group = Path(hc.sweep.dir).as_posix().replace("/", "_")
    else:
        group = cfg.get("experiment_name") or "single"
    return run_dir, name, group


def sweep_objective_value(objective, metrics: dict) -> float:
    """What a sweeper (hparams_search=optuna) optimises: `sweep_objective` is a metric key
    ("concept/target_rate/edited") or a mapping metric -> weight whose weighted sum is returned,
    e.g. {concept/target_rate/edited: 1.0, leakage/flip_rate: -0.5} = target rate - 0.5 * flip rate."""
    terms = {objective: 1.0} if isinstance(objective, str) else dict(objective)
    missing = [k for k in terms if k not in metrics]
    if missing:
        raise KeyError(f"sweep_objective names metrics this run did not produce: {missing}; "
                       f"add the evaluator that writes them or choose among: {sorted(metrics)}")
    return float(sum(float(w) * float(metrics[k]) for k, w in terms.items()))


def _library_logs(verbose: bool) -> None:
    """verbose=true: the libraries' own logs at INFO (diffusers, transformers, W&B's console). By default the
    console holds progress, metrics and the run directory only: what used to print before the metrics is fixed
    where it came from (weights load in their dtype, accelerate installed, no loading bars, no obsolete W&B
    setting, Hydra's version_base given); W&B stays silent unless verbose."""
    if not verbose:
        return
    import logging

    for handler in logging.getLogger().handlers:  # Hydra's console handler (conf/config.yaml: hydra.job_logging)
        if type(handler) is logging.StreamHandler:
            handler.setLevel(logging.INFO)
    os.environ["WANDB_SILENT"] = "false"
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_info()
    transformers_logging.set_verbosity_info()


def _verbose(cfg: DictConfig | None = None) -> bool:
    """Full tracebacks for config errors and the libraries' logs: HYDRA_FULL_ERROR=1 or verbose=true."""
    if os.environ.get("HYDRA_FULL_ERROR", "") not in ("", "0"):
        return True
    try:
        return bool(cfg is not None and cfg.get("verbose", False) is True)
    except Exception:
        return False


def _is_multirun() -> bool:
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:  # no Hydra context (called from Python)
        return False


def _config_error(err: ConfigError, cfg: DictConfig | None) -> None:
    """A single run: `steerexp: error: <message>` and exit code 2 (the traceback only when verbose)."""
    if _verbose(cfg):
        traceback.print_exception(err)
    print(f"steerexp: error: {err}", file=sys.stderr, flush=True)
    sys.exit(2)


def _drop_unused_run_dir() -> None:
    """A single run refused by validation leaves no run dir behind (Hydra made it: .hydra/ and a log only)."""
    import shutil

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {".hydra", f"{HydraConfig.get().job.name}.log"}:
        shutil.rmtree(run_dir, ignore_errors=True)


_CHECKED: list[str] | None = None   # a single run's warnings: the pre-flight validated its config already


def _resume_preempted(cfg: DictConfig) -> None:
    """A run directory left by a pre-empted run (PREEMPTED, steerexp.shutdown) resumes from its last.ckpt."""
    from omegaconf import open_dict

    from steerexp.preflight import PREEMPTED

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    marker, last = run_dir / PREEMPTED, run_dir / "checkpoints" / "last.ckpt"
    if marker.is_file() and not cfg.get("ckpt_path"):
        if last.is_file():
            with open_dict(cfg):
                cfg.ckpt_path = str(last)
            print(f"steerexp: resuming the pre-empted run from {last}", file=sys.stderr, flush=True)
        marker.unlink()


def _main(cfg: DictConfig) -> float | None:
    from steerexp import shutdown

    try:
        # the whole config, before torch or any model loads (seconds, not minutes)
        try:
            warnings = _CHECKED if _CHECKED is not None and not _is_multirun() else validate(cfg)
        except ConfigError:
            if not _is_multirun():
                _drop_unused_run_dir()
            raise
        shutdown.install(cfg.get("preempt_signal"))
        _resume_preempted(cfg)
        for warning in warnings:
            print(f"steerexp: warning: {warning}", file=sys.stderr, flush=True)
        from steerexp import progress

        progress.configure(cfg.get("progress", "auto"))
        _library_logs(_verbose(cfg))
        from steerexp.run import run

        run_dir, name, group = run_identity(cfg)
        metrics = run(cfg, run_dir, name, group, checked=True)  # (validated above)
    except ConfigError as err:
        if _is_multirun():  # the launcher records this job as failed; the others go on
            print(f"steerexp: error: job {HydraConfig.get().job.num}: {err}", file=sys.stderr, flush=True)
            raise
        _config_error(err, cfg)
    from steerexp.ranks import worker_rank

    if worker_rank():  # a data-parallel rank other than 0: rank 0 reports the run
        return None
    keys = [k for k in cfg.get("print_metrics", []) if k in metrics]
    print(json.dumps({k: metrics[k] for k in keys}, indent=1))
    print(f"run directory: {run_dir}")
    objective = cfg.get("sweep_objective")
    return sweep_objective_value(objective, metrics) if objective else None


def config_groups(root: Path) -> list[tuple[str, list[str]]]:
    """(group, options) of every config group under `root`: its folders (nested ones as a/b), their yaml files."""
    return [(d.relative_to(root).as_posix(), sorted(f.stem for f in d.glob("*.yaml")))
            for d in sorted(p for p in root.rglob("*") if p.is_dir() and not p.name.startswith((".", "__")))]


def compose_config(overrides: list[str] = (), return_hydra_config: bool = False) -> DictConfig:
    """The config `steerexp <overrides>` composes, outside a run (--help)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3", job_name="steerexp"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=return_hydra_config)


def print_help(overrides: list[str]) -> None:
    """`steerexp [overrides] --help`: the text of Hydra's help (conf/config.yaml: hydra.help), from one compose
    and a listing of conf/. Hydra's own help composes the config again for each of its ~100 config groups
    (1.1 s here); this takes a fraction of that."""
    from omegaconf import open_dict

    cfg = compose_config(overrides, return_hydra_config=True)
    template = cfg.hydra.help.template
    groups = "".join(f"{group}: {', '.join(options)}\n" for group, options in config_groups(conf_dir()) if options)
    with open_dict(cfg):
        del cfg["hydra"]
    print(template.replace("$APP_CONFIG_GROUPS", groups).replace("$CONFIG", OmegaConf.to_yaml(cfg)))


def main() -> None:
    from steerexp import preflight, safety

    safety.freeze_environment()  # the allowlist opt-in as the shell gave it, before Hydra applies any env_set
    args = sys.argv[1:]
    try:  # group=option overrides name existing files: one line listing the options, before Hydra composes
        check_group_overrides(args)
    except ConfigError as err:
        _config_error(err, None)
    rest = [a for a in args if a not in ("--help", "-h")]
    if len(rest) < len(args) and not any(a.startswith("-") for a in rest):  # other flags: Hydra's own help
        try:
            check_group_overrides(rest)
            print_help(rest)
        except BrokenPipeError:  # `steerexp --help | head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
            sys.exit(0)
        except ConfigError as err:
            _config_error(err, None)
        except Exception as err:  # an override Hydra cannot apply: its message, one line
            print(f"steerexp: error: {str(err).splitlines()[0]}", file=sys.stderr, flush=True)
            sys.exit(2)
        return
    global _CHECKED
    plan = None
    try:  # what Hydra itself does with the config (logging, env, run dir, launcher), checked before it does it
        plan = preflight.check_argv(args)
        if plan is not None and plan.cfg is not None:  # a single run: the whole config, before anything is written
            _CHECKED = validate(plan.cfg)
    except ConfigError as err:
        _config_error(err, plan.cfg if plan is not None else None)
    if plan is not None:
        preflight.apply(plan)
    safety.install_guard()  # Hydra's own instantiations (callbacks, launcher, sweeper) are allowlisted too
    preflight.install_logging_guard()  # and every logging config it applies (a sweep's later jobs)
    hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")(_main)()
    exit_now(0)


if __name__ == "__main__":
    sys.exit(main())
