"""What a config may do to the machine, checked before Hydra acts on it.

`steerexp <args>` hands its config to Hydra, and Hydra acts on parts of it before any steerexp code runs:
it configures logging from `hydra.hydra_logging` and `hydra.job_logging` (Python's `dictConfig`, which
builds any `class:`/`()` object and opens any `filename:`), creates the run directory, writes `.hydra/`
into it, sets `hydra.job.env_set` in the process environment and hands launcher settings to SLURM or
Ray. A shared preset (`--config-dir`) must not be able to use any of that to reach the machine, so
`check_argv` composes the config exactly as Hydra will (same search path, same overrides, every job of
a sweep whose config groups differ) and checks it first. Nothing is written before it passes.

The rules, one per class (README: "Safe configs, nothing lost"):

- `_target_`s, after interpolations are resolved (`${oc.decode:...}` can make one): steerexp.safety.
- Logging (`hydra.job_logging`, `hydra.hydra_logging`): handlers only of the classes Hydra's own defaults
  use (StreamHandler on stdout/stderr, FileHandler, NullHandler), formatters without factories, no
  filters with factories, no `ext://` other than sys.stdout/sys.stderr; files only inside the run
  directory, and none at all in `hydra_logging` (it is configured before the run directory exists).
  The same check runs again wherever Hydra configures logging (`install_logging_guard`).
- Environment: `hydra.job.env_set` may set only the variables in ENV_SET_ALLOWED (thread counts and
  CUDA device selection); the allowlist opt-in is read from the environment the user's shell started
  steerexp with (safety.freeze_environment), never from anything a config sets.
- Launcher settings that run commands or set a job's environment (`setup`, `srun_args`,
  `additional_parameters`, `python`, Ray's `runtime_env`/`env_setup`/`env_vars`...) are taken only from
  the command line, never from a config file.
- Run and sweep directories resolve under the output root (`outputs/` in the working directory), unless
  the user passes `hydra.run.dir=` / `hydra.sweep.dir=` on the command line; `hydra.output_subdir`
  stays inside the run directory; `name` is a plain name (no `/`, no `..`).
- A directory that already holds a run or a sweep is refused unless the run resumes from a checkpoint
  inside it (`ckpt_path=`), resumes after a pre-emption (`PREEMPTED`), or the user passes
  `overwrite=true` (the old run's files are then removed first).
"""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steerexp import conf_dir, safety
from steerexp.errors import ConfigError

OUTPUT_ROOT = "outputs"

# hydra.job.env_set: variables a config may set (process-local tuning, nothing that loads code or widens
# permissions). Anything else is set in the shell that starts steerexp.
ENV_SET_ALLOWED = frozenset({
    "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS", "TOKENIZERS_PARALLELISM", "PYTORCH_CUDA_ALLOC_CONF", "NCCL_DEBUG",
})

# logging dictConfig: classes a config may name (Hydra's own defaults use the first three)
LOG_HANDLERS = frozenset({"logging.StreamHandler", "logging.FileHandler", "logging.NullHandler"})
LOG_FORMATTERS = frozenset({"logging.Formatter", "colorlog.ColoredFormatter"})   # hydra/job_logging=colorlog
LOG_STREAMS = frozenset({"ext://sys.stdout", "ext://sys.stderr"})
HANDLER_KEYS = frozenset({"class", "level", "formatter", "filters", "stream", "filename", "mode", "encoding",
                          "delay", "errors"})
FORMATTER_KEYS = frozenset({"format", "datefmt", "style", "validate", "class", "log_colors", "reset", "defaults"})

# launcher settings that run commands or shape a job's process: only from the command line
LAUNCHER_COMMAND_KEYS = frozenset({"setup", "srun_args", "additional_parameters", "python", "runtime_env",
                                   "env_setup", "env_vars", "env", "setup_commands", "commands", "pip_packages",
                                   "worker_init", "initialization_commands"})

HOLDS_A_RUN = (".hydra", "metrics.json", "deltas.safetensors", "checkpoints", "multirun.yaml", ".sweep")
PREEMPTED = "PREEMPTED"   # written by a run stopped by its pre-emption signal: the next start resumes it
SENTINEL = "/steerexp-run-dir"   # stands for the run directory while the logging config is checked

NAME_RE = re.compile(r"^[A-Za-z0-9._=,+@%:-]{1,120}$")


@dataclass
class Plan:
    """What the pre-flight decided for a single run (None fields: nothing to do)."""
    run_dir: Path | None = None          # an explicit hydra.run.dir (the default is claimed by Hydra)
    overwrite: bool = False              # remove the old run's files first
    cfg: Any = field(default=None, repr=False)   # the composed config of a single run


# ============================================================================ composing as Hydra will
def _parse(argv: list[str]):
    from hydra._internal.utils import get_args_parser

    return get_args_parser().parse_args(argv)


def _hydra(args):
    from hydra_plugins.steerexp_launchers.resolvers import register_resolvers

    register_resolvers()
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.core.global_hydra import GlobalHydra

    search_path = create_config_search_path(str(conf_dir()))
    if args.config_dir is not None:
        extra = os.path.abspath(os.path.expanduser(args.config_dir))
        if not os.path.isdir(extra):
            raise ConfigError("--config-dir", f"{extra} is not a folder", "give a folder of config groups")
        search_path.prepend(provider="command-line", path=f"file://{extra}", anchor=SearchPathQuery(provider="schema"))
    hydra = Hydra.create_main_hydra2(task_name="cli", config_search_path=search_path)
    GlobalHydra.instance().clear()  # create_main_hydra2 initialises it; hydra.main does so again itself
    return hydra


def _compose(hydra, config_name, overrides, multirun: bool):
    from hydra.types import RunMode

    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        return hydra.compose_config(config_name=config_name, overrides=list(overrides),
                                    run_mode=RunMode.MULTIRUN if multirun else RunMode.RUN,
                                    with_log_configuration=False)
    except (HydraException, OmegaConfBaseException) as err:
        one_line = compose_error(err)
        if one_line is not None:
            raise one_line from None
        raise ComposeFailed(err) from None


def compose_error(err: BaseException) -> ConfigError | None:
    """A value Hydra refused while composing (a type a spec declares, a key it does not have) as one line naming
    the key; None for other composition errors, which Hydra reports in its own words."""
    import re as _re

    from omegaconf.errors import OmegaConfBaseException

    from steerexp.spec import Spec, closest

    cause, seen = err, 0
    while cause is not None and seen < 8 and not (isinstance(cause, OmegaConfBaseException)
                                                   and getattr(cause, "full_key", None)):
        cause, seen = cause.__cause__ or cause.__context__, seen + 1
    if cause is None:
        return None
    key, msg = cause.full_key, (getattr(cause, "msg", None) or str(cause)).splitlines()[0]
    owner = getattr(cause, "object_type", None)
    label = f"{owner.group} {owner.label}" if isinstance(owner, type) and issubclass(owner, Spec) else \
        getattr(owner, "__name__", "this node")
    converted = _re.match(r"Value '(.*)' of type '(\w+)' could not be converted to (\w+)", msg)
    if converted:
        kind = {"float": "a number", "integer": "an integer", "boolean": "true or false"}.get(
            converted.group(3).lower(), converted.group(3).lower())
        return ConfigError(key, f"must be {kind}, got {converted.group(1)!r}", f"set {key}=<{kind}>")
    if "is not a valid bool" in msg:
        return ConfigError(key, f"must be true or false, got {msg.split(chr(39))[1]!r}", f"set {key}=true or false")
    missing = _re.match(r"Key '(.+)' not in '(\w+)'", msg)
    if missing:
        from dataclasses import fields, is_dataclass

        names = [f.name for f in fields(owner) if not f.name.startswith("_")] if is_dataclass(owner) else []
        near = closest(missing.group(1), names)
        fix = f"did you mean {key.rsplit('.', 1)[0]}.{near}?" if near else (
            f"its settings are: {', '.join(names)}" if names else "check the key's spelling")
        return ConfigError(key, f"is not a setting of {label}", fix)
    return ConfigError(key, msg, "fix the value")


class ComposeFailed(Exception):
    """Hydra cannot compose this command line: Hydra reports it in its own words when it composes (nothing runs)."""


def _sweep_jobs(overrides: list[str], limit: int = 64) -> list[list[str]]:
    """The override lists of a basic sweep's jobs whose config-group choices differ (capped): what can change
    logging, targets or the environment from one job to the next."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    batches = BasicSweeper.split_arguments(parsed, None)
    jobs = [job for batch in batches for job in batch]
    seen, out = set(), []
    for job in jobs:
        key = tuple(o for o in job if "." not in o.split("=")[0] or o.lstrip("+~").startswith("hydra."))
        if key not in seen:
            seen.add(key)
            out.append(job)
        if len(out) >= limit:
            break
    return out


# ============================================================================ the checks
def _plain(node, resolve: bool = True):
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=resolve)
    return node


def check_logging(log_cfg: Any, key: str, run_dir: str | None) -> None:
    """A logging dictConfig builds only allowlisted objects, reads no `ext://` but the standard streams and
    opens files only inside `run_dir` (None: no files at all)."""
    if log_cfg is None:
        return
    conf = log_cfg if isinstance(log_cfg, dict) else _plain(log_cfg)
    if not isinstance(conf, dict):
        raise ConfigError(key, "must be a logging dictConfig mapping", "drop it to use Hydra's default logging")
    fix = "use Hydra's default logging (drop the override) or only StreamHandler/FileHandler with files in the run dir"

    def allowed(name, names) -> bool:
        return name in names or safety.user_allows(str(name))

    def scan_ext(node, sub):
        if isinstance(node, dict):
            for k, v in node.items():
                scan_ext(v, f"{sub}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                scan_ext(v, f"{sub}[{i}]")
        elif isinstance(node, str) and re.match(r"^\s*(ext|cfg)://", node) and node.strip() not in LOG_STREAMS:
            raise ConfigError(sub, f"{node!r} would import or look up an object", fix)

    scan_ext(conf, key)
    for sub, spec in _entries(conf, "handlers", key, HANDLER_KEYS, "handler", fix):
        cls = spec.get("class")
        if not allowed(cls, LOG_HANDLERS):
            raise ConfigError(f"{sub}.class", f"handler class {cls!r} is not allowed in a config", fix)
        if "filename" in spec:
            if cls != "logging.FileHandler" and not safety.user_allows(str(cls)):
                raise ConfigError(f"{sub}.filename", f"{cls} takes no file", fix)
            _check_log_file(str(spec["filename"]), f"{sub}.filename", run_dir)
        if "stream" in spec and str(spec["stream"]).strip() not in LOG_STREAMS:
            raise ConfigError(f"{sub}.stream", f"only ext://sys.stdout or ext://sys.stderr, got {spec['stream']!r}",
                              fix)
        if "mode" in spec and spec["mode"] not in ("a", "w"):
            raise ConfigError(f"{sub}.mode", f"must be 'a' or 'w', got {spec['mode']!r}", fix)
    for sub, spec in _entries(conf, "formatters", key, FORMATTER_KEYS, "formatter", fix):
        if "class" in spec and not allowed(spec["class"], LOG_FORMATTERS):
            raise ConfigError(f"{sub}.class", f"formatter class {spec['class']!r} is not allowed in a config", fix)
    for name, spec in (conf.get("filters") or {}).items():
        sub = f"{key}.filters.{name}"
        if not isinstance(spec, dict) or set(map(str, spec)) - {"name"}:
            raise ConfigError(sub, "only name filters ({name: logger.name}) are allowed; a factory runs code", fix)


def _entries(conf: dict, section: str, key: str, keys: frozenset, what: str, fix: str):
    """(key, mapping) of each entry of a dictConfig section, refusing any setting a standard `what` does not have
    (a `()` factory or an attribute setter runs code)."""
    for name, entry in (conf.get(section) or {}).items():
        sub = f"{key}.{section}.{name}"
        if not isinstance(entry, dict):
            raise ConfigError(sub, "must be a mapping", fix)
        extra = sorted(set(map(str, entry)) - keys)
        if extra:
            raise ConfigError(f"{sub}.{extra[0]}", f"is not a setting of a standard {what} (a factory or an "
                              "attribute setter runs code)", fix)
        yield sub, entry


def _check_log_file(filename: str, key: str, run_dir: str | None) -> None:
    fix = "log files go in the run directory: filename: ${hydra.runtime.output_dir}/${hydra.job.name}.log"
    if run_dir is None:
        raise ConfigError(key, f"opens {filename!r} before the run directory exists", fix)
    path = os.path.normpath(filename if os.path.isabs(filename) else os.path.join(os.getcwd(), filename))
    root = os.path.normpath(run_dir)
    if not path.startswith(root + os.sep):
        raise ConfigError(key, f"opens {filename!r}, outside the run directory", fix)


def check_env(cfg) -> None:
    """hydra.job.env_set sets only ENV_SET_ALLOWED (no config widens its own permissions or loads code)."""
    env_set = _plain(cfg.hydra.job.get("env_set"), resolve=False) or {}
    for name in env_set:
        if str(name) not in ENV_SET_ALLOWED:
            raise ConfigError(f"hydra.job.env_set.{name}", "a config may not set this environment variable "
                              f"(allowed: {', '.join(sorted(ENV_SET_ALLOWED))})",
                              f"set it in your shell before steerexp if you mean it: {name}=... steerexp ...")


def _override_keys(overrides: list[str]) -> list[str]:
    return [o.split("=", 1)[0].lstrip("+~") for o in overrides]


def _from_command_line(key: str, overrides: list[str]) -> bool:
    return any(k == key or k.startswith(key + ".") or k.startswith(key + "[") for k in _override_keys(overrides))


def check_launcher(cfg, overrides: list[str]) -> None:
    """Launcher settings that run commands or set a job's environment come from the command line only."""
    launcher = cfg.hydra.get("launcher")
    if launcher is None:
        return

    def scan(node, key):
        from omegaconf import DictConfig

        if not isinstance(node, DictConfig):
            return
        for k in node.keys():
            sub = f"{key}.{k}"
            raw = node._get_node(k)
            value = _plain(raw._value() if not isinstance(raw, DictConfig) else raw, resolve=False)
            if str(k) in LAUNCHER_COMMAND_KEYS and value not in (None, [], {}, "") \
                    and not _from_command_line(sub, overrides):
                raise ConfigError(sub, "runs commands or sets a job's environment and came from a config file, "
                                  "not your command line", f"pass it on the command line ({sub}=...) if you trust it")
            if isinstance(raw, DictConfig):
                scan(raw, sub)

    scan(launcher, "hydra.launcher")


def _dir_value(cfg, key: str) -> str:
    """hydra.run.dir / hydra.sweep.dir resolved without claiming it (hydra.mode unset: the resolver creates
    nothing, hydra_plugins/steerexp_launchers/resolvers.py)."""
    from omegaconf import OmegaConf, open_dict, read_write

    copy = cfg.copy()
    with read_write(copy), open_dict(copy):
        copy.hydra.mode = None
        try:
            return str(OmegaConf.select(copy, key, throw_on_resolution_failure=True))
        except Exception as err:
            msg = getattr(err, "msg", None) or str(err)
            raise ConfigError(key, f"cannot be resolved: {msg.splitlines()[0]}", "give a plain folder path") from None


def _under(path: str, root: str) -> bool:
    a, b = os.path.normpath(os.path.abspath(path)), os.path.normpath(os.path.abspath(root))
    return a == b or a.startswith(b + os.sep)


def check_name(cfg) -> None:
    name = cfg.get("name")
    if name is None:
        return
    text = str(name)
    if not NAME_RE.match(text) or ".." in text:
        raise ConfigError("name", f"must be a plain name (letters, digits, ._=,+@%:- ; no '/' or '..'), got "
                          f"{text[:60]!r}", "e.g. name=ti_lr0.005")


def holds_a_run(path: Path) -> bool:
    """The folder already holds a run's or a sweep's files."""
    if not path.is_dir():
        return False
    if any((path / n).exists() for n in HOLDS_A_RUN):
        return True
    try:
        return any((child / ".hydra").is_dir() for child in path.iterdir() if child.is_dir())
    except OSError:
        return False


def check_dirs(cfg, overrides: list[str], multirun: bool, plan: Plan) -> None:
    """Run and sweep directories stay under outputs/ unless given on the command line; an existing run is never
    replaced without resume or overwrite=true."""
    check_name(cfg)
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    value = _dir_value(cfg, key)
    explicit = _from_command_line(key, overrides)
    fix = f"keep runs under {OUTPUT_ROOT}/, or pass {key}=<folder> on the command line"
    if not explicit and not _under(value, OUTPUT_ROOT):
        raise ConfigError(key, f"resolves to {value!r}, outside {OUTPUT_ROOT}/ (set by a config, not by you)", fix)
    if multirun:
        node = cfg.hydra.sweep._get_node("subdir")
        raw = "" if node is None or node._is_none() else str(node._value())
        if ".." in raw.split("/") or raw.startswith("/"):
            raise ConfigError("hydra.sweep.subdir", f"{raw!r} leaves the sweep directory", "keep ${hydra.job.num}")
    out_sub = cfg.hydra.get("output_subdir")
    if out_sub is not None and (os.path.isabs(str(out_sub)) or ".." in Path(str(out_sub)).parts):
        raise ConfigError("hydra.output_subdir", f"{out_sub!r} leaves the run directory", "keep .hydra")
    overwrite = cfg.get("overwrite", False)
    if overwrite not in (True, False):
        raise ConfigError("overwrite", f"must be true or false, got {overwrite!r}", "overwrite=true")
    if not explicit:
        return  # the default dirs are claimed atomically and never collide (steerexp_unique_dir)
    from steerexp.ranks import worker_rank

    if worker_rank():
        return  # a data-parallel rank Lightning relaunched into rank 0's run directory: it writes nothing there
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(key, f"{value} exists and is not a folder", "choose a new folder")
    if not holds_a_run(path):
        if not multirun:
            plan.run_dir = path
        return
    if multirun:
        if overwrite:
            plan.overwrite, plan.run_dir = True, path
            return
        raise ConfigError(key, f"{value} already holds a sweep; a second sweep there would mix with its jobs",
                          "choose a new hydra.sweep.dir, `steerexp-sweep rerun` it, or pass overwrite=true to "
                          "replace it")
    plan.run_dir = path
    ckpt = cfg.get("ckpt_path")
    if ckpt and _under(str(Path(str(ckpt)).expanduser()), str(path)):
        return  # resuming (or evaluating) the run that lives there
    if (path / PREEMPTED).is_file() and not ckpt:
        return  # a pre-empted run: the run resumes it in place (cli._resume_preempted)
    if overwrite:
        plan.overwrite = True
        return
    raise ConfigError(key, f"{value} already holds a run; it would be overwritten",
                      f"choose a new folder, resume it with ckpt_path={path / 'checkpoints' / 'last.ckpt'}, "
                      "or pass overwrite=true to replace it")


def check_preempt(cfg) -> None:
    from steerexp.shutdown import signal_number

    value = cfg.get("preempt_signal")
    if value is None:
        return
    try:
        number = signal_number(value)
    except (KeyError, ValueError):
        number = None
    if number is None or value in ("KILL", "SIGKILL", "STOP", "SIGSTOP", 9, 19):
        raise ConfigError("preempt_signal", f"{value!r} is not a signal a run can catch",
                          "e.g. preempt_signal=USR1 (with sbatch --signal=USR1@120), or null")


def check_config(cfg, overrides: list[str], multirun: bool, plan: Plan | None = None) -> Plan:
    """Every rule of this module on one composed config (Hydra's node included)."""
    plan = plan or Plan()
    check_env(cfg)
    safety.check_targets(cfg)   # after interpolation: a config cannot assemble one
    check_launcher(cfg, overrides)
    check_dirs(cfg, overrides, multirun, plan)
    check_preempt(cfg)
    check_logging(_logging_with_sentinel(cfg, "hydra_logging"), "hydra.hydra_logging", None)
    check_logging(_logging_with_sentinel(cfg), "hydra.job_logging", SENTINEL)
    return plan


def _logging_with_sentinel(cfg, which: str = "job_logging"):
    """hydra.job_logging (or hydra_logging) resolved with the run directory standing as SENTINEL."""
    from omegaconf import OmegaConf, open_dict, read_write

    if cfg.hydra.get(which) is None:
        return None
    copy = cfg.copy()
    with read_write(copy), open_dict(copy):
        copy.hydra.runtime.output_dir = SENTINEL
        copy.hydra.mode = None
        if OmegaConf.is_missing(copy.hydra.job, "num"):
            copy.hydra.job.num = 0
        try:
            return OmegaConf.to_container(copy.hydra[which], resolve=True)
        except Exception as err:
            msg = getattr(err, "msg", None) or str(err)
            raise ConfigError(f"hydra.{which}", f"cannot be resolved: {msg.splitlines()[0]}",
                              "use Hydra's default logging") from None


# ============================================================================ the entry point
def check_argv(argv: list[str]) -> Plan | None:
    """Compose what `steerexp <argv>` will run and check it; None for Hydra's informational commands
    (--cfg, --info, shell completion), which configure no logging and write nothing."""
    try:
        args = _parse(argv)
    except SystemExit:  # Hydra's own parser reports the usage error itself
        return None
    if args.cfg or args.info or args.shell_completion or args.help or args.hydra_help:
        return None
    try:
        return _check_args(args)
    except ComposeFailed:
        return None


def _check_args(args) -> Plan:
    hydra = _hydra(args)
    config_name = args.config_name or "config"
    overrides = list(args.overrides)
    if args.multirun:
        plan = Plan()
        base = _compose(hydra, config_name, overrides, multirun=True)
        check_config(base, overrides, True, plan)
        if "hydra/sweeper" not in " ".join(overrides) and base.hydra.sweeper.get("_target_", "").endswith(
                "BasicSweeper"):
            fixed = [o for o in overrides if not _is_sweep(o)]
            for job in _sweep_jobs([o for o in overrides if _is_sweep(o)] or []):
                cfg = _compose(hydra, config_name, fixed + job, multirun=True)
                safety.check_targets(cfg)   # after interpolation: a config cannot assemble one
                check_env(cfg)
                check_name(cfg)
                check_logging(_logging_with_sentinel(cfg), "hydra.job_logging", SENTINEL)
        return plan
    cfg = _compose(hydra, config_name, overrides, multirun=False)
    plan = check_config(cfg, overrides, False)
    plan.cfg = cfg
    return plan


def _is_sweep(override: str) -> bool:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_override(override).is_sweep_override()
    except Exception:
        return False


def apply(plan: Plan) -> None:
    """What the checks decided, just before Hydra creates the run: clear a run the user overwrites."""
    if plan.overwrite and plan.run_dir is not None and plan.run_dir.is_dir():
        for child in plan.run_dir.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()


# ============================================================================ the backstop inside Hydra
def install_logging_guard() -> None:
    """Check every logging config where Hydra applies it (a sweep's later jobs, a sweeper's trials), before
    dictConfig sees it (idempotent)."""
    import hydra.core.utils as core_utils
    from hydra.core.hydra_config import HydraConfig

    original = core_utils.configure_log
    if getattr(original, "steerexp_guard", False):
        return

    def guarded(log_config, verbose_config=False):
        run_dir = None
        try:
            if HydraConfig.initialized():
                run_dir = HydraConfig.get().runtime.output_dir or None
        except Exception:
            run_dir = None
        if log_config is not None:
            conf = _plain(log_config)
            check_logging(conf, "hydra.job_logging" if run_dir else "hydra.hydra_logging", run_dir)
        return original(log_config, verbose_config)

    guarded.steerexp_guard = True
    core_utils.configure_log = guarded
    import hydra._internal.hydra as internal_hydra

    if getattr(internal_hydra, "configure_log", None) is original:
        internal_hydra.configure_log = guarded
