"""`hydra/sweeper=steerexp_optuna` (steerexp: `hparams_search=optuna`): Optuna through its own API.

This sweeper is ours, not the released hydra-optuna-sweeper, because every release of that plugin
(1.2.0, 1.3.0) pins optuna < 3 (2.10, 2021), whose SQLite/RDB storage needs SQLAlchemy < 2; pinning both
would downgrade them for everything installed beside steerexp. This sweeper does the same job in one short file with the
current Optuna (ask/tell), keeps the released plugin's config keys (sampler, direction, storage,
study_name, n_trials, n_jobs, params), and runs each batch of trials through the configured
launcher, so `launcher=gpus` evaluates n_jobs trials at once, one per GPU.

Search space (`hydra.sweeper.params`, or `-m key=...` on the command line), Hydra's sweep syntax:
    interval(0.25, 4.0)           float in [low, high] (ints on both ends: an int)
    tag(log, interval(0.1, 10))   the same, sampled on a log scale
    0.5,1,2  /  choice(a,b)       categorical
    range(1, 8)                   categorical over the range
    a plain value                 fixed for every trial
The task function returns the value to optimise (steerexp: `sweep_objective`, e.g. target rate -
lambda * flip rate). A failed trial is told to Optuna as FAIL and the search goes on; the sweep fails
only if every trial failed. The best trial is written to <sweep dir>/optimization_results.yaml and
returned by `sweep()`.
"""
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.steerexp_launchers.optuna_sweeper.OptunaSweeper"
    sampler: Dict[str, Any] = field(default_factory=lambda: {"_target_": "optuna.samplers.TPESampler", "seed": None})
    direction: str = "maximize"       # maximize | minimize
    storage: Optional[str] = None     # e.g. sqlite:///optuna.db to keep / resume the study; null: in memory
    study_name: Optional[str] = None
    n_trials: int = 20
    n_jobs: int = 1                   # trials per batch, launched together (launcher=gpus: one per device)
    params: Optional[Dict[str, str]] = None


ConfigStore.instance().store(group="hydra/sweeper", name="steerexp_optuna", node=OptunaSweeperConf, provider="steerexp")


def _format(value: Any) -> str:
    """A Python value as a Hydra override value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and any(c in value for c in " ,()[]{}=:'\"\\"):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(value)


def distribution(override: Override):
    """The Optuna distribution of one sweep override (interval, choice, range or a comma list)."""
    import optuna.distributions as D

    value = override.value()
    if isinstance(value, IntervalSweep):
        log_scale = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return D.IntDistribution(int(value.start), int(value.end), log=log_scale)
        return D.FloatDistribution(float(value.start), float(value.end), log=log_scale)
    if isinstance(value, RangeSweep):
        return D.CategoricalDistribution(list(override.sweep_iterator()))
    if isinstance(value, ChoiceSweep):
        return D.CategoricalDistribution(list(override.sweep_iterator()))
    raise ValueError(f"{override.input_line!r}: use interval(low, high), choice(...), range(...) or a,b,c for Optuna")


def search_space(arguments: List[str], params: Optional[DictConfig]) -> tuple:
    """(distributions by key, fixed overrides) from hydra.sweeper.params and the command line."""
    parser = OverridesParser.create()
    overrides = {}  # by key: the command line wins over hydra.sweeper.params (e.g. an experiment's)
    for override in parser.parse_overrides([f"{k}={v}" for k, v in (params or {}).items()]) + \
            parser.parse_overrides(list(arguments)):
        overrides[override.get_key_element()] = override
    space, fixed = {}, []
    for key, override in overrides.items():
        if override.is_sweep_override():
            space[key] = distribution(override)
        else:
            fixed.append(override.input_line)
    if not space:
        raise ValueError("hparams_search=optuna has nothing to search: set hydra.sweeper.params "
                         "(e.g. technique.alpha: interval(0.25, 4.0)) or pass key=interval(a,b) with -m")
    return space, fixed


class OptunaSweeper(Sweeper):
    def __init__(self, sampler: Any = None, direction: str = "maximize", storage: Optional[str] = None,
                 study_name: Optional[str] = None, n_trials: int = 20, n_jobs: int = 1,
                 params: Optional[DictConfig] = None) -> None:
        if direction not in ("maximize", "minimize"):
            raise ValueError(f"hydra.sweeper.direction must be maximize or minimize, got {direction!r}")
        if int(n_trials) < 1 or int(n_jobs) < 1:
            raise ValueError(f"hydra.sweeper.n_trials and n_jobs must be >= 1, got {n_trials} and {n_jobs}")
        self.sampler_cfg, self.direction, self.storage = sampler, direction, storage
        self.study_name, self.n_trials, self.n_jobs, self.params = study_name, int(n_trials), int(n_jobs), params
        self.config: Optional[DictConfig] = None
        self.hydra_context: Optional[HydraContext] = None
        self.launcher = None
        self.job_idx = 0

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def _study(self):
        import optuna
        from hydra.utils import instantiate

        sampler = self.sampler_cfg  # Hydra instantiates the sweeper recursively: usually a sampler already
        if isinstance(sampler, (dict, DictConfig)):
            sampler = instantiate(sampler)
        return optuna.create_study(study_name=self.study_name, storage=self.storage, sampler=sampler,
                                   direction=self.direction, load_if_exists=True)

    def sweep(self, arguments: List[str]) -> Any:
        from optuna.trial import TrialState

        assert self.config is not None and self.launcher is not None
        space, fixed = search_space(arguments, self.params)
        study = self._study()
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        log.info(f"Optuna: study {study.study_name}, {self.direction} over {', '.join(space)}; "
                 f"{self.n_trials} trials, {self.n_jobs} at a time")

        failures, done = [], 0
        while done < self.n_trials:
            trials = [study.ask(space) for _ in range(min(self.n_jobs, self.n_trials - done))]
            batch = [fixed + [f"{k}={_format(v)}" for k, v in t.params.items()] for t in trials]
            self.validate_batch_is_legal(batch)
            returns = self.launcher.launch(batch, initial_job_idx=self.job_idx)
            self.job_idx += len(returns)
            done += len(returns)
            for trial, ret, overrides in zip(trials, returns, batch):
                if ret.status != JobStatus.COMPLETED:
                    failures.append(f"trial {trial.number} ({' '.join(overrides)})")
                    study.tell(trial, state=TrialState.FAIL)
                    continue
                value = ret.return_value
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    raise ValueError(f"trial {trial.number} returned {value!r}: the task function must return the "
                                     "number to optimise (steerexp: set sweep_objective to a metric or a weighted sum)")
                study.tell(trial, float(value))

        completed = [t for t in study.trials if t.state == TrialState.COMPLETE]
        if not completed:
            raise RuntimeError(f"all {len(failures)} Optuna trials failed: {'; '.join(failures)}; "
                               "see the tracebacks in their run dirs")
        best = study.best_trial
        results = {"name": "optuna", "direction": self.direction, "best_params": dict(best.params),
                   "best_value": float(best.value), "best_trial": best.number, "n_trials": len(study.trials),
                   "n_failed": len(failures)}
        OmegaConf.save(OmegaConf.create(results), sweep_dir / "optimization_results.yaml")
        log.info(f"Optuna best value {best.value:.4g} with {best.params} (trial {best.number}); "
                 f"{len(failures)} failed; results in {sweep_dir / 'optimization_results.yaml'}")
        if failures:
            log.warning("failed trials: " + "; ".join(failures))
        return results
