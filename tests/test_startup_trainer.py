"""Training on Lightning (steerexp/trainer.py, techniques/trainable.py): what reaches the logger, gradient clipping,
checkpoints, NaN, Ctrl-C, the learning-rate schedules, gradient accumulation and bf16 autocast. Exact resume after
SIGKILL and the stopping signals are tests/test_recovery.py; data parallel is tests/test_ddp.py."""
import pytest
import torch

from steerexp.techniques.textual_inversion import TextualInversion
from steerexp.trainer import TrainingInterrupted, fit

TRAINER = {"_target_": "lightning.pytorch.Trainer", "accelerator": "cpu", "devices": 1, "log_every_n_steps": 10}


def train(tech, callbacks=(), logger=None, checkpoint_dir=None, ckpt_path=None, **args):
    return fit(TRAINER | args, tech, list(callbacks), logger, ckpt_path, checkpoint_dir)


def technique(gen, placeholder, steps=5, batch_size=2, **kwargs):
    tech = TextualInversion(gen, steps=steps, batch_size=batch_size, targets={"k": 2}, placeholder=placeholder,
                            **kwargs)
    tech.prepare()
    return tech


def test_the_technique_is_a_lightning_module_that_holds_only_its_deltas(gen):
    import lightning.pytorch as L

    tech = technique(gen, "<shape-a>")
    assert isinstance(tech, L.LightningModule)
    assert set(tech.state_dict()) == {"embeddings", "initial"}
    optimizer = tech.configure_optimizers()
    assert [p.shape for g in optimizer.param_groups for p in g["params"]] == [tech.embeddings.shape]


def test_metrics_reach_the_logger_every_n_steps(gen, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(tmp_path)
    train(technique(gen, "<log-a>", steps=4), logger=logger, log_every_n_steps=2)
    logger.finalize("success")
    text = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    header = text.splitlines()[0].split(",")
    assert {"train/loss", "delta_norm/embeddings", "params/trainable", "params/frozen", "step"} <= set(header)
    steps = {int(line.split(",")[header.index("step")]) for line in text.splitlines()[1:]}
    assert steps == {0, 1, 3}  # params at 0, then every 2 steps (Lightning counts from 0)


def test_gradient_clipping_changes_the_step_and_the_checkpoint_holds_the_step(gen, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    free, clipped = technique(gen, "<clip-a>", steps=3, lr=0.05), technique(gen, "<clip-b>", steps=3, lr=0.05)
    train(free)
    every2 = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_last=True, save_top_k=0)
    train(clipped, callbacks=[every2], gradient_clip_val=1e-6)
    moved = lambda t: float((t.embeddings - t.initial).norm())
    assert moved(clipped) < moved(free)  # a tiny clip: AdamW's first steps still move by ~lr, but less
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2 and set(ckpt["state_dict"]) == {"embeddings", "initial"}
    assert ckpt["optimizer_states"][0]["state"][0]["step"] == 2  # AdamW's state at step 2
    assert ckpt["steerexp"]["technique"].endswith("TextualInversion")


def test_a_nan_loss_stops_training_and_keeps_the_last_good_deltas(gen, monkeypatch):
    tech = technique(gen, "<nan-a>", steps=6)
    real = tech.training_loss
    monkeypatch.setattr(tech, "training_loss",
                        lambda batch: real(batch) * (float("nan") if tech.global_step == 3 else 1.0))
    train(tech)
    assert tech.nan_step == 3
    assert torch.equal(tech.last_good["embeddings"], tech.embeddings.detach())  # no step was taken on the NaN


def test_ctrl_c_raises_training_interrupted_with_the_steps_done(gen, monkeypatch):
    tech = technique(gen, "<int-a>", steps=10)
    real = tech.training_loss

    def interrupt_at_4(batch):
        if tech.global_step == 4:
            raise KeyboardInterrupt
        return real(batch)

    monkeypatch.setattr(tech, "training_loss", interrupt_at_4)
    with pytest.raises(TrainingInterrupted) as stop:
        train(tech)
    assert stop.value.args[0] == 4 and tech._trainer is None and not tech.training


@pytest.mark.parametrize("schedule, expect", [
    ("constant", [0.1, 0.1, 0.1, 0.1]),
    ("warmup", [0.025, 0.05, 0.075, 0.1]),
    ("cosine", [0.05, 0.1, 0.1, 0.05]),  # 2 warm-up steps, then half-way down the cosine at step 4
])
def test_learning_rate_schedules(gen, schedule, expect):
    tech = technique(gen, f"<lr-{schedule}>", steps=6, lr=0.1)
    seen = []
    real = tech.training_loss

    def record(batch):
        seen.append(tech.trainer.optimizers[0].param_groups[0]["lr"])
        return real(batch)

    tech.training_loss = record
    train(tech, lr_scheduler=schedule, warmup_steps=4 if schedule != "cosine" else 2)
    got = seen[:4] if schedule != "cosine" else [seen[0], seen[1], seen[2], seen[4]]
    assert got == pytest.approx(expect)


def test_accumulating_4_micro_batches_of_1_equals_one_batch_of_4(gen):
    whole, split = technique(gen, "<acc-a>", steps=3, batch_size=4, lr=0.05), \
        technique(gen, "<acc-b>", steps=3, batch_size=4, lr=0.05)
    train(whole)
    train(split, accumulate_grad_batches=4)
    assert not torch.equal(whole.embeddings, whole.initial)
    torch.testing.assert_close(split.embeddings, whole.embeddings, rtol=1e-4, atol=1e-5)


def test_bf16_mixed_on_the_cpu_trains_with_autocast_and_fp32_deltas(gen):
    tech = technique(gen, "<bf16-a>", steps=2, lr=0.05)
    dtypes = []
    real = tech.training_loss

    def record(batch):
        loss = real(batch)
        dtypes.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return loss

    tech.training_loss = record
    train(tech, precision="bf16-mixed")
    assert dtypes == [torch.bfloat16, torch.bfloat16]
    assert tech.embeddings.dtype == torch.float32 and torch.isfinite(tech.embeddings).all()
    assert not torch.equal(tech.embeddings, tech.initial)


def test_16_mixed_on_the_cpu_is_one_line():
    from steerexp.errors import ConfigError
    from steerexp.validate import validate
    from tests.helpers import compose_config

    with pytest.raises(ConfigError) as err:
        validate(compose_config(["trainer.precision=16-mixed", "trainer.accelerator=cpu"]))
    assert err.value.key == "trainer.precision" and "bf16-mixed" in str(err.value)
    assert "\n" not in str(err.value)


def test_checkpoints_of_the_earlier_plain_loop_resume_exactly(gen, tmp_path):
    """The loop before Lightning wrote state_dict, optimizer_states, global_step, epoch and steerexp only."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    whole = technique(gen, "<old-a>", steps=4, lr=0.05)
    train(whole)
    first = technique(gen, "<old-b>", steps=2, lr=0.05)
    train(first, callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)])
    lightning_ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    old = {k: lightning_ckpt[k] for k in ("state_dict", "optimizer_states", "global_step", "epoch", "steerexp")}
    torch.save(old, tmp_path / "old.ckpt")
    resumed = technique(gen, "<old-c>", steps=4, lr=0.05)
    train(resumed, ckpt_path=tmp_path / "old.ckpt", checkpoint_dir=tmp_path / "run")
    assert torch.equal(resumed.embeddings, whole.embeddings)
    assert not list((tmp_path / "run").glob(".resume-from-legacy*"))


@pytest.mark.parametrize("overrides, key, says", [
    (["+trainer.acumulate_grad_batches=2"], "trainer.acumulate_grad_batches", "trainer.accumulate_grad_batches"),
    (["+trainer.max_epochs=3"], "trainer.max_epochs", "technique.steps"),
    (["trainer.lr_scheduler=cosin"], "trainer.lr_scheduler", "trainer.lr_scheduler=cosine"),
    (["trainer.precision=fp8"], "trainer.precision", "bf16-mixed"),
    (["technique.batch_size=3", "trainer.accumulate_grad_batches=2"], "trainer.accumulate_grad_batches",
     "multiple of 2"),
    (["trainer.devices=0"], "trainer.devices", "trainer.devices=2"),
])
def test_lightning_trainer_settings_are_checked_before_anything_loads(overrides, key, says):
    from steerexp.errors import ConfigError
    from steerexp.validate import validate
    from tests.helpers import compose_config

    with pytest.raises(ConfigError) as err:
        validate(compose_config(overrides))
    assert err.value.key == key and says in str(err.value), str(err.value)
