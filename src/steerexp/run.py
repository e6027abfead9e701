"""One run: compose generator x technique x objective x evaluators, learn (or compute) the
deltas, evaluate paired samples, and write the run directory:

    .hydra/config.yaml  metrics.json  deltas.safetensors  samples/*.png  wandb/  checkpoints/
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from safetensors.torch import save_file

from steerexp.evaluators.base import EvalContext
from steerexp.logging.wandb import RunLogger
from steerexp.techniques.base import NaNLossError


def save_png(path: Path, grid: torch.Tensor, upscale: int = 2) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray((grid.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
    img.resize((img.width * upscale, img.height * upscale), Image.NEAREST).save(path)


def write_metrics(run_dir: Path, metrics: dict) -> None:
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))


def _instantiate(node, **kwargs):
    """hydra's instantiate, re-raising our own clear errors (bad values, missing files) unwrapped."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, (ValueError, FileNotFoundError)):
            raise err.__cause__ from None
        raise


def build(cfg: DictConfig):
    """Instantiate generator, technique (with its objective) and evaluators; validates config first."""
    evaluators = [_instantiate(cfg.evaluator[k]) for k in cfg.evaluator] if cfg.get("evaluator") else []
    generator = _instantiate(cfg.generator)
    objective = _instantiate(cfg.objective) if cfg.get("objective") else None
    technique = _instantiate(cfg.technique, generator=generator, objective=objective, _recursive_=False)
    return generator, technique, evaluators


def train(cfg: DictConfig, technique, logger: RunLogger, run_dir: Path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt = ModelCheckpoint(dirpath=run_dir / "checkpoints", save_last=True, save_top_k=0,
                           every_n_train_steps=cfg.trainer.checkpoint_every)
    trainer = L.Trainer(
        max_steps=technique.steps, max_epochs=-1, accelerator=technique.generator.device.type, devices=1,
        logger=logger.lightning if logger.lightning is not None else False, callbacks=[ckpt],
        enable_progress_bar=cfg.trainer.progress_bar, enable_model_summary=False, num_sanity_val_steps=0,
        log_every_n_steps=cfg.trainer.log_every_n_steps, deterministic=False,
    )
    trainer.fit(technique, ckpt_path=cfg.ckpt_path)


def run(cfg: DictConfig, run_dir: Path, name: str, group: str) -> dict:
    start = time.time()
    run_dir = Path(run_dir)
    config_file = run_dir / ".hydra" / "config.yaml"
    if not config_file.is_file():  # Hydra's CLI writes it; runs started from Python get the same file
        config_file.parent.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, config_file)
    L.seed_everything(cfg.seed, verbose=False)
    generator, technique, evaluators = build(cfg)
    technique.prepare()  # loads and validates targets before any heavy work
    tags = [t for t in (cfg.technique._target_.split(".")[-2], cfg.get("experiment_name")) if t]
    logger = RunLogger(cfg.logger.mode, run_dir, name, group, tags, OmegaConf.to_container(cfg, resolve=True),
                       project=cfg.logger.project, entity=cfg.logger.get("entity"), job_type=technique.job_type)
    metrics: dict = {f"params/{k}": v for k, v in technique.parameter_counts().items()}
    try:
        if technique.job_type == "train":
            train(cfg, technique, logger, run_dir)
        else:
            technique.compute()
        if technique.nan_step is not None:
            technique.load_deltas(technique.last_good)
        save_file(technique.deltas(), str(run_dir / "deltas.safetensors"))
        technique.export(run_dir)
        if technique.nan_step is not None:
            raise NaNLossError(
                f"the loss became NaN/inf at step {technique.nan_step}; training stopped and the last good deltas "
                f"were saved to {run_dir / 'deltas.safetensors'}. Lower technique.lr or tighten technique.budget "
                f"(max_norm, or eps_text / eps_z for input deltas)")
        metrics.update({f"delta_norm/{k}": v for k, v in technique.delta_norms().items()})

        ctx = EvalContext(technique, list(cfg.eval.prompts), list(cfg.eval.seeds), cfg.eval.get("classifier"),
                          run_dir=run_dir)
        scores = {}
        for evaluator in evaluators:
            result = evaluator.evaluate(ctx)
            metrics.update(result.metrics)
            for key, grid in result.grids.items():
                save_png(run_dir / f"{key}.png", grid)
                logger.log_grid(key, grid)
            for key, series in result.histograms.items():
                logger.log_histograms(key, series)
                scores[key] = series
            for key, (columns, rows) in result.tables.items():
                logger.log_table(key, columns, rows)
            for key, path in result.plots.items():
                logger.log_plot(key, path)
            for key, (xs, series, xname) in result.lines.items():
                logger.log_lines(key, xs, series, xname)
        (run_dir / "scores.json").write_text(json.dumps(scores))
    except BaseException:
        # a failed run keeps its last good deltas, its metrics so far, and closes its W&B run
        deltas_file = run_dir / "deltas.safetensors"
        if not deltas_file.is_file() and technique.last_good is not None:
            save_file(technique.last_good, str(deltas_file))
        metrics.update({"run/failed": True, "generator/unchanged": generator.unchanged(),
                        "run/seconds": time.time() - start})
        write_metrics(run_dir, metrics)
        logger.finish(metrics)
        raise
    metrics["generator/unchanged"] = generator.unchanged()
    metrics["run/seconds"] = time.time() - start
    write_metrics(run_dir, metrics)
    logger.finish(metrics)
    generator.assert_unchanged()
    return metrics
