import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from steerexp import ASSETS, conf_dir

os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_MODE", "offline")


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


@pytest.fixture(scope="module")
def gen(shipped):
    """The shipped generator on the CPU, one per test module (tests may inject tokens into it)."""
    from steerexp.generators import load_generator

    return load_generator(device="cpu")


@pytest.fixture(scope="module")
def flows(tmp_path_factory):
    """Tiny random SD3 and FLUX pipeline folders (the flow editors' tests)."""
    from steerexp.generators.random_pipelines import make_random_pipeline

    root = tmp_path_factory.mktemp("flows")
    return {arch: make_random_pipeline(arch, root / arch, size="tiny") for arch in ("sd3", "flux")}


@pytest.fixture(scope="module")
def flow_gens(flows):
    from steerexp.generators import load_generator

    return {arch: load_generator(str(folder), device="cpu") for arch, folder in flows.items()}
