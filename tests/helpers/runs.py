"""Composing configs with Hydra's compose API, and tiny but complete runs."""
from __future__ import annotations

from hydra import compose, initialize_config_dir

from steerexp import conf_dir

# A tiny but complete run: few TI steps, 1 seed, 2 prompts, 4 sampling steps.
TINY = [
    "technique.steps=3",
    "technique.batch_size=2",
    "eval.seeds=[0,1]",
    "eval.prompts=['a photo of a {}','a red {}']",
    "sampling.steps=4",
    "trainer.checkpoint_every=2",
]


def compose_config(overrides=()):
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def tiny_run(tmp_path, extra=(), name="t", base=TINY):
    """One run of the `base` overrides (TINY by default) plus `extra` in `tmp_path / name`;
    returns (metrics, run directory)."""
    from steerexp.run import run

    cfg = compose_config(list(base) + list(extra))
    run_dir = tmp_path / name
    run_dir.mkdir(parents=True, exist_ok=True)
    return run(cfg, run_dir, name, "tests"), run_dir
