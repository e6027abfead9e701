"""One run: compose generator x technique x objective x evaluators, learn (or compute) the
deltas, evaluate paired samples, and write the run directory:

    .hydra/config.yaml  metrics.json  deltas.safetensors  samples/*.png  wandb/  checkpoints/
"""
from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

import torch
from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file

from steerexp import combine, safety, scorers, shutdown
from steerexp.errors import ConfigError
from steerexp.evaluators.base import EvalContext
from steerexp.images import ImagePolicy, save_png
from steerexp.logging.wandb import RunLogger
from steerexp.preflight import PREEMPTED
from steerexp.techniques.base import NaNLossError

safety.install_guard()  # every instantiation (ours and Hydra's) checks its _target_ against the allowlist


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run; the run directory keeps the last good deltas."""


def write_metrics(run_dir: Path, metrics: dict) -> None:
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))


def _instantiate(node, **kwargs):
    """hydra's instantiate (the guard checks every _target_), re-raising our own clear errors (bad values,
    missing files) unwrapped."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, (ValueError, FileNotFoundError)):
            raise err.__cause__ from None
        raise


def build(cfg: DictConfig):
    """Instantiate generator, technique (a trainable one with its objective, every one with the run's
    sampling settings) and evaluators, from a config `validate` has checked (run() checks it, once).
    The run's scorers (cfg.scorers) and image policy (cfg.images) are made once, here, and bound to the technique
    (which binds its objective); the evaluators get them through the technique (EvalContext). No module holds them."""
    combine.expand(cfg)  # objective=auto and the rest the technique decides (run() did it already: a no-op then)
    run_scorers = scorers.build(cfg.get("scorers"))  # every model built once per run, whoever asks for it
    image_policy = ImagePolicy.from_config(cfg.get("images"))  # how user image files are read (images:)
    evaluators = (
        [_instantiate(cfg.evaluator[k]) for k in cfg.evaluator] if cfg.get("evaluator") else []
    )
    technique_cls = get_object(cfg.technique._target_)  # (its _target_ passed the allowlist in validate)
    generator = _instantiate(cfg.generator)
    learns = getattr(technique_cls, "trainable", False)
    objective = {"objective": _instantiate(cfg.objective)} if learns and cfg.get("objective") else {}
    sampling = OmegaConf.to_container(cfg.sampling, resolve=True)
    if cfg.get("guider") is not None:  # diffusers' guider for every technique's sampling (steerexp/guiders.py)
        import steerexp.guiders  # noqa: F401  (its log filter, before the guider is built)

        node = OmegaConf.create(OmegaConf.to_container(cfg.guider, resolve=True))
        if node.get("weak_model") == "embedded":  # autoguidance: the run's embedded generator's own weak model
            node.weak_model = str(steerexp.guiders.weak_folder("embedded", cfg.generator.get("embedded") or "shapes"))
        sampling["guider"] = _instantiate(node, guidance_scale=float(sampling["guidance_scale"]),
                                          _convert_="all")  # plain dicts and lists: diffusers checks their types
    technique = _instantiate(cfg.technique, generator=generator, **objective, _recursive_=False,
                             sampling=sampling)
    technique.bind(run_scorers, image_policy)  # and its objective: before prepare reads any file or scorer
    return generator, technique, evaluators


def read_checkpoint(path: str | Path, technique=None) -> tuple[dict, dict]:
    """(deltas, identity) of a training checkpoint (.ckpt, loaded with weights_only=True: no pickle
    code runs) or of a run's deltas.safetensors. Only a regular file is opened (a FIFO or a link to /dev/zero
    is refused from os.stat). Given the `technique`, a deltas.safetensors is checked against it from its header
    alone (the technique, then every tensor's shape: expected vs found) before any value is read."""
    from steerexp.generators.checks import read_safetensors_header
    from steerexp.images import not_regular

    path = Path(path).expanduser()
    fix = "give <run dir>/checkpoints/last.ckpt or <run dir>/deltas.safetensors of an earlier run"
    try:
        kind = not_regular(path)
    except OSError:
        raise ConfigError("ckpt_path", f"checkpoint not found: {path}", fix) from None
    if kind is not None:
        raise ConfigError("ckpt_path", f"{path} is {kind}, not a checkpoint file", fix)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            header = read_safetensors_header(path)
        except ValueError as err:
            raise ConfigError("ckpt_path", str(err), "use another checkpoint") from None
        meta = header.get("__metadata__") or {}
        try:
            ident = {"technique": meta.get("technique"), "structure": json.loads(meta.get("structure") or "{}")}
        except ValueError:
            ident = {"technique": meta.get("technique"), "structure": {}}
        if technique is not None:
            _check_identity(path, ident, technique)
            from steerexp.techniques.base import check_compatible

            shapes = {k: list(v.get("shape") or []) for k, v in header.items() if k != "__metadata__"}
            check_compatible(technique, shapes, str(path), ident.get("structure"))
        with safe_open(str(path), "pt") as f:
            deltas = {k: f.get_tensor(k) for k in f.keys()}
        return deltas, ident
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # not a checkpoint, truncated, or holding objects a weights-only load refuses
        raise ConfigError(
            "ckpt_path",
            f"{path} is not a readable weights-only checkpoint ({str(err).splitlines()[0]})",
            "give a .ckpt written by steerexp or a deltas.safetensors",
        ) from None
    if "state_dict" not in ckpt:
        raise ConfigError(
            "ckpt_path", f"{path} has no state_dict: not a training checkpoint", "give <run dir>/checkpoints/last.ckpt"
        )
    return ckpt["state_dict"], ckpt.get("steerexp", {})


def load_checkpoint_deltas(cfg: DictConfig, technique) -> bool:
    """Check `ckpt_path` against the technique; load its deltas when the run does not train on from it
    (technique.steps=0, or a deltas.safetensors). Returns True when the deltas were loaded."""
    if not cfg.get("ckpt_path"):
        return False
    if not technique.trainable:
        raise ConfigError(
            "ckpt_path",
            f"{type(technique).__name__} computes its deltas, it does not train them",
            "drop ckpt_path, or use it with a trainable technique (textual_inversion, prompt_delta, ...)",
        )
    deltas, ident = read_checkpoint(cfg.ckpt_path, technique)
    _check_identity(cfg.ckpt_path, ident, technique)
    technique.check_loaded(deltas, str(cfg.ckpt_path))  # floating point, finite, sane norms (before sampling)
    technique.load_deltas(deltas, str(cfg.ckpt_path), ident.get("structure"))  # shapes: expected vs found
    return technique.steps == 0 or str(cfg.ckpt_path).endswith(".safetensors")


def _check_identity(path, ident: dict, technique) -> None:
    mine = technique.identity()["technique"]
    if ident.get("technique") and ident["technique"] != mine:
        raise ConfigError(
            "ckpt_path",
            f"{path} was written by {ident['technique']}, this run's technique is {mine}",
            "choose the technique= it was trained with, or another checkpoint",
        )


def seed_everything(seed: int) -> None:
    """Python's, NumPy's and torch's global generators (the run's own randomness is seeded where it is used)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


SMALL_GENERATOR = 100_000_000  # parameters: below this, `threads: auto` runs a CPU generator on one thread


def set_threads(threads, generator) -> None:
    """The config's `threads`: a number, or auto = one thread for a small generator on the CPU (the shapes
    generator: its ops are too small to gain from splitting, and threads that wait on each other stall
    whenever another process has the cores: 40 TI steps took 55-120 s on 2 threads against 2.6-3.5 s on
    one on the shared 2-core machine), torch's default otherwise."""
    if threads == "auto":
        if generator.device.type == "cpu" and generator.num_parameters() < SMALL_GENERATOR:
            torch.set_num_threads(1)
    else:
        torch.set_num_threads(int(threads))


def callbacks(cfg: DictConfig, run_dir: Path, logged: bool) -> list:
    """conf/callbacks/ by _target_ (Lightning's callbacks, or a steerexp one). `model_checkpoint` writes into
    <run_dir>/checkpoints: the layout that resume (ckpt_path=.../last.ckpt), the Ctrl-C hint and the final
    save rely on. Lightning's LearningRateMonitor needs a logger: without one (logger=none) it is left out."""
    nodes = cfg.get("callbacks") or {}
    made = []
    for name, node in nodes.items():
        if node is None:
            continue
        if not logged and str(node.get("_target_", "")).endswith(".LearningRateMonitor"):
            continue
        made.append(_instantiate(node, **({"dirpath": str(run_dir / "checkpoints")}
                                          if name == "model_checkpoint" else {})))
    return made


def train(cfg: DictConfig, technique, logger: RunLogger, run_dir: Path) -> None:
    """conf/trainer/ by _target_ (lightning.pytorch.Trainer: steerexp.trainer.fit), with what the rest of the
    run decides: the steps, the logger (the run's W&B run, through Lightning's WandbLogger) and the callbacks."""
    from steerexp.trainer import TrainingInterrupted, fit, ranks_of_this_run

    lightning_logger = logger.lightning() if logger.active else None
    # data-parallel ranks run this job's own command (a sweep's job too), resuming from the same checkpoint
    # (ckpt_path: also when the run chose it, resuming a pre-empted run)
    try:
        with ranks_of_this_run({"ckpt_path": cfg.get("ckpt_path")}):
            trainer = fit(OmegaConf.to_container(cfg.trainer, resolve=True), technique,
                          callbacks(cfg, run_dir, lightning_logger is not None), lightning_logger,
                          cfg.get("ckpt_path"), run_dir / "checkpoints")
            if technique.nan_step is None:  # (every rank calls it: a collective; rank 0 writes)
                # last.ckpt holds the final deltas, whatever the checkpoint interval
                trainer.save_checkpoint(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    except TrainingInterrupted as stop:
        raise Interrupted(stop.args[0]) from None


def resume_hint(cfg: DictConfig, run_dir: Path, technique, step: int | None) -> str:
    """What to tell the user after Ctrl-C: where the last good deltas are, and the exact resume command."""
    from hydra.core.hydra_config import HydraConfig

    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    overrides = [o for o in overrides if not o.split("=")[0].lstrip("+~") == "ckpt_path"]
    last = run_dir / "checkpoints" / "last.ckpt"
    at = f" at step {step} of {technique.steps}" if step is not None else ""
    how = "interrupted" if shutdown.received is None else f"stopped by {_signal_name(shutdown.received)}"
    lines = [f"steerexp: {how}{at}.", f"  last good deltas: {run_dir / 'deltas.safetensors'}"]
    if last.is_file():
        saved = torch.load(last, map_location="cpu", weights_only=True).get("global_step")
        command = " ".join(["steerexp", *map(shlex.quote, overrides), shlex.quote(f"ckpt_path={last}")])
        lines.append(f"  resume exactly (from the checkpoint of step {saved}): {command}")
    else:
        command = " ".join(["steerexp", *map(shlex.quote, overrides)])
        lines.append(
            f"  no checkpoint was written yet (every {cfg.trainer.checkpoint_every} steps); start again: {command}"
        )
    return "\n".join(lines)


def _signal_name(number: int) -> str:
    import signal

    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def learn(cfg: DictConfig, technique, logger: RunLogger, run_dir: Path) -> None:
    """The deltas: loaded from ckpt_path, trained, or computed; saved to deltas.safetensors (+ the technique's
    exports)."""
    if load_checkpoint_deltas(cfg, technique):
        technique.last_good = technique.deltas()  # evaluate the checkpoint's deltas; nothing to train
    elif technique.job_type == "train":
        train(cfg, technique, logger, run_dir)
    else:
        technique.compute()
    if technique.nan_step is not None:
        technique.load_deltas(technique.last_good)
    save_file(technique.deltas(), str(run_dir / "deltas.safetensors"), metadata=technique.safetensors_metadata())
    technique.export(run_dir)
    if technique.nan_step is not None:
        raise NaNLossError(
            f"the loss became NaN/inf at step {technique.nan_step}; training stopped and the last good deltas "
            f"were saved to {run_dir / 'deltas.safetensors'}. Lower technique.lr or tighten technique.budget "
            f"(max_norm, or eps_text / eps_z for input deltas)"
        )


def evaluate(cfg: DictConfig, technique, evaluators: list, logger: RunLogger, run_dir: Path, metrics: dict) -> None:
    """Every evaluator on the same paired samples; its metrics into `metrics` (as they come: a failed run keeps
    them), its grids to <run_dir>/<key>.png (labelled; their labels in grids.json), its score histograms to
    scores.json, its tables to tables.json ({key: {columns, rows}}), all of it to the logger; who judged each
    evaluator (and what the edit was optimised against) to judges.json."""
    # the scorers the edit was optimised against: a judge among them gets an independent one beside it
    # (the run's scorers and image policy: the technique's, bound by run.build)
    ctx = EvalContext(technique, list(cfg.eval.prompts), list(cfg.eval.seeds), run_dir=run_dir,
                      optimised_against=technique.optimised_against())
    scores, tables, grids = {}, {}, {}
    for evaluator in evaluators:
        result = evaluator.evaluate(ctx)
        metrics.update(result.metrics)
        for key, grid in result.grids.items():
            labels = result.grid_labels.get(key)
            save_png(run_dir / f"{key}.png", grid, labels=labels)
            grids[f"{key}.png"] = labels.as_dict() if labels else {}
        scores.update(result.histograms)
        tables.update({key: {"columns": columns, "rows": rows} for key, (columns, rows) in result.tables.items()})
        logger.log_result(result)
    (run_dir / "scores.json").write_text(json.dumps(scores))
    (run_dir / "tables.json").write_text(json.dumps(tables, default=float))
    (run_dir / "grids.json").write_text(json.dumps(grids, indent=1))
    (run_dir / "judges.json").write_text(json.dumps(ctx.judges, indent=1))  # who judged each evaluator


def run(cfg: DictConfig, run_dir: Path, name: str, group: str, checked: bool = False) -> dict:
    """One run, top to bottom: check (every rule, once: `validate`, unless the caller did, as the CLI does) ->
    build -> learn or compute the deltas -> evaluate -> write. Returns the metrics."""
    start = time.time()
    run_dir = Path(run_dir)
    for note in combine.expand(cfg):  # objective=auto, the evaluators the technique decides (validate checks a copy)
        print(f"steerexp: warning: {note}", file=sys.stderr, flush=True)
    if not checked:
        from steerexp.validate import validate

        for warning in validate(cfg):
            print(f"steerexp: warning: {warning}", file=sys.stderr, flush=True)
    config_file = run_dir / ".hydra" / "config.yaml"
    from steerexp.ranks import worker_rank as _worker  # rank 0 alone writes the run directory

    # Hydra's CLI writes it as composed; the run records what it runs (the expanded objective), as do runs from Python
    if not _worker() and (not config_file.is_file() or config_file.read_text() != OmegaConf.to_yaml(cfg)):
        config_file.parent.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, config_file)
    seed_everything(cfg.seed)
    generator, technique, evaluators = build(cfg)
    set_threads(cfg.get("threads", "auto"), generator)
    technique.prepare()  # loads and validates targets before any heavy work
    from steerexp.ranks import worker_rank

    if worker_rank():  # a data-parallel rank other than 0 (steerexp/ranks.py): its share of training, nothing else
        train(cfg, technique, RunLogger("disabled", run_dir, name, group, [], {}), run_dir)
        return {}
    tags = [t for t in (cfg.technique._target_.split(".")[-2], cfg.get("experiment_name")) if t]
    logger = RunLogger(cfg.logger.mode, run_dir, name, group, tags, safety.loggable_config(cfg),
                       project=cfg.logger.project, entity=cfg.logger.get("entity"), job_type=technique.job_type)
    metrics: dict = {f"params/{k}": v for k, v in technique.parameter_counts().items()}
    try:
        learn(cfg, technique, logger, run_dir)
        metrics.update({f"delta_norm/{k}": v for k, v in technique.delta_norms().items()})
        evaluate(cfg, technique, evaluators, logger, run_dir, metrics)
        # what the technique measured about itself (Diagnosable), read after the evaluators: per-output
        # techniques (reno, noise_search) optimise while the evaluators ask for samples
        metrics.update({f"technique/{k}": v for k, v in technique.diagnostics().items() if isinstance(v, (int, float))})
    except BaseException as err:
        # a failed run keeps its last good deltas, its metrics so far, and closes its W&B run
        deltas_file = run_dir / "deltas.safetensors"
        if not deltas_file.is_file() and technique.last_good is not None:
            save_file(technique.last_good, str(deltas_file), metadata=technique.safetensors_metadata())
        metrics.update(
            {"run/failed": True, "generator/unchanged": generator.unchanged(), "run/seconds": time.time() - start}
        )
        write_metrics(run_dir, metrics)
        logger.finish(metrics)
        if isinstance(err, KeyboardInterrupt):
            step = err.args[0] if isinstance(err, Interrupted) else None
            print(resume_hint(cfg, run_dir, technique, step), file=sys.stderr, flush=True)
            if shutdown.received is not None and shutdown.received == shutdown.preempt:
                (run_dir / PREEMPTED).write_text(f"stopped by signal {shutdown.received} at step {step}\n")
                done = shutdown.requeue()
                print(f"  pre-empted: {done or 'not requeued (no scheduler found)'}; the next start of this "
                      f"run directory resumes it", file=sys.stderr, flush=True)
            raise SystemExit(shutdown.exit_code()) from None
        raise
    changes = generator.changes()  # the unchanged-proof (generator.proof), taken once at the end
    metrics["generator/unchanged"] = not changes
    metrics["run/seconds"] = time.time() - start
    write_metrics(run_dir, metrics)
    logger.finish(metrics)
    generator.assert_unchanged(changes)
    return metrics
