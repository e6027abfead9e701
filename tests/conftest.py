import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from steerexp import ASSETS, conf_dir

os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_MODE", "offline")

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


@pytest.fixture(scope="session")
def shipped():
    """The shipped assets folder (pretrained by `steerexp-pretrain`, committed)."""
    if not (ASSETS / "shapes" / "model_index.json").is_file():
        pytest.fail("the shipped assets are missing: run `steerexp-pretrain`")
    return ASSETS


@pytest.fixture(scope="session")
def smoke_assets(tmp_path_factory) -> Path:
    """Assets made by the smoke version of the pretraining recipe (a few steps per stage)."""
    from steerexp.pretrain.cli import run as pretrain_run

    out = tmp_path_factory.mktemp("smoke_assets")
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="pretrain", overrides=["smoke=true", f"out={out}"])
    pretrain_run(cfg)
    return out


def pickle_payload(marker: Path):
    """An object whose unpickling runs a shell command that creates `marker` (if a load ever ran it)."""
    import shlex

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {shlex.quote(str(marker))}",))

    return Payload()
