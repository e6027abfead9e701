"""A fast start (issue 18 section 3): `steerexp --help` composes once and imports no torch; a run imports
only what it uses (Lightning only when a technique trains, no W&B with logger=none, no open_clip without a CLIP);
`threads: auto`;
the new settings fail as one clear error. Timings live in benchmarks/startup.py, not here: the machine
is shared, so tests assert what is imported and done, not how long it took."""
import json
import subprocess
import sys

import pytest
import torch

from steerexp.errors import ConfigError
from steerexp.validate import validate
from tests.helpers import compose_config

HEAVY = ("torch", "lightning", "torchmetrics", "wandb", "open_clip", "timm", "diffusers", "transformers")
# runs the console script's main() and reports, at exit, which heavy packages this process imported
PROBE = ("import atexit, json, sys\n"
         f"atexit.register(lambda: print('IMPORTED ' + json.dumps([m for m in {HEAVY!r} if m in sys.modules]), "
         "file=sys.stderr))\n"
         "from steerexp.cli import main\n"
         "main()\n")


def steerexp(args, cwd):
    out = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=cwd, capture_output=True, text=True, timeout=900,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(cwd), "CUDA_VISIBLE_DEVICES": ""})
    imported = [json.loads(line.split(" ", 1)[1]) for line in out.stderr.splitlines() if line.startswith("IMPORTED ")]
    return out, (imported[-1] if imported else None)


def test_help_composes_once_imports_no_torch_and_says_what_hydra_says(tmp_path):
    fast, imported = steerexp(["--help"], tmp_path)
    assert fast.returncode == 0, fast.stderr[-2000:]
    assert imported == [], imported
    hydra_own, _ = steerexp(["--help", "--config-name", "config"], tmp_path)  # another flag: Hydra's own help
    assert hydra_own.returncode == 0, hydra_own.stderr[-2000:]
    # Hydra's own help also lists the parts' specs (ConfigStore's schema/<group>/<name>, steerexp/spec.py), which
    # are what the yaml files extend, not options to choose
    assert fast.stdout == "".join(line for line in hydra_own.stdout.splitlines(keepends=True)
                                  if not line.startswith("schema/"))
    with_override, _ = steerexp(["technique=prompt_delta", "--help"], tmp_path)
    assert "_target_: steerexp.techniques.input_delta.InputDelta" in with_override.stdout


def test_a_training_run_imports_lightning_but_neither_wandb_nor_open_clip(shipped, tmp_path):
    out, imported = steerexp(["technique.steps=2", "technique.batch_size=2", "evaluator=[]", "logger=none",
                              "hydra.run.dir=ti"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert {"torch", "diffusers", "transformers", "lightning"} <= set(imported)  # the generator's, the trainer's
    assert not {"wandb", "open_clip", "timm"} & set(imported), imported
    ckpt = torch.load(tmp_path / "ti" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2 and ckpt["steerexp"]["technique"].endswith("TextualInversion")
    assert set(ckpt["state_dict"]) == {"embeddings", "initial"}  # the deltas only: never the generator
    assert not [line for line in out.stderr.splitlines() if "warn" in line.lower()], out.stderr[-3000:]


def test_a_training_free_run_never_imports_lightning(shipped, tmp_path):
    out, imported = steerexp(["technique=guidance", "evaluator=[]", "logger=none", "hydra.run.dir=guided"],
                             tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "torch" in imported and "lightning" not in imported, imported


def test_threads_auto_is_one_thread_for_the_small_cpu_generator(gen):
    from steerexp.run import set_threads

    before = torch.get_num_threads()
    try:
        set_threads("auto", gen)
        assert torch.get_num_threads() == 1
        set_threads(2, gen)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("override, key", [
    ("threads=0", "threads"),
    ("threads=many", "threads"),
    ("progress=sometimes", "progress"),
    ("+trainer.enable_progress_bar=true", "trainer.enable_progress_bar"),  # Lightning's, gone with Lightning
    ("+trainer.max_epochs=3", "trainer.max_epochs"),
    ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val"),
])
def test_bad_settings_are_one_clear_error(override, key):
    with pytest.raises(ConfigError) as err:
        validate(compose_config([override]))
    assert err.value.key == key
    if "progress_bar" in key:
        assert "progress=" in str(err.value)  # the fix names the setting that replaced it
