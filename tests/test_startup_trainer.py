"""steerexp's training loop (steerexp/trainer.py), which replaced Lightning's Trainer to save its 3.6 s of
imports per run: what it logs and when, gradient clipping, checkpoints, NaN and Ctrl-C. Exact resume
after SIGKILL is tests/test_recovery.py."""
import pytest
import torch

from steerexp.techniques.textual_inversion import TextualInversion
from steerexp.trainer import Checkpoint, Trainer, TrainingInterrupted


class Recorder:
    def __init__(self):
        self.calls = []

    def log_metrics(self, metrics, step):
        self.calls.append((step, dict(metrics)))


def technique(gen, placeholder, steps=5, **kwargs):
    tech = TextualInversion(gen, steps=steps, batch_size=2, targets={"k": 2}, placeholder=placeholder, **kwargs)
    tech.prepare()
    return tech


def test_metrics_reach_the_logger_every_n_steps_and_at_the_end(gen):
    logger = Recorder()
    Trainer(max_steps=5, log_every_n_steps=2, logger=logger).fit(technique(gen, "<log-a>"))
    assert [step for step, _ in logger.calls] == [0, 2, 4, 5]  # params at 0, then every 2 steps and the last
    assert logger.calls[0][1] == {"params/trainable": 64, "params/frozen": gen.num_parameters()}
    for _, metrics in logger.calls[1:]:
        assert {"train/loss", "delta_norm/embeddings"} <= set(metrics)
        assert all(isinstance(v, float) for v in metrics.values())


def test_gradient_clipping_changes_the_step_and_the_checkpoint_holds_the_step(gen, tmp_path):
    free, clipped = technique(gen, "<clip-a>", steps=3), technique(gen, "<clip-b>", steps=3, lr=0.05)
    free.lr = 0.05
    Trainer(max_steps=3).fit(free)
    Trainer(max_steps=3, gradient_clip_val=1e-6, callbacks=[Checkpoint(every_n_steps=2, dirpath=tmp_path)]).fit(clipped)
    moved = lambda t: float((t.embeddings - t.initial).norm())
    assert moved(clipped) < moved(free)  # a tiny clip: AdamW's first steps still move by ~lr, but less
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2 and set(ckpt["state_dict"]) == {"embeddings", "initial"}
    assert ckpt["optimizer_states"][0]["state"][0]["step"] == 2  # AdamW's state at step 2
    assert not list(tmp_path.glob(".*.tmp")), "checkpoints are written to a temporary file, then renamed"


def test_a_nan_loss_stops_training_and_keeps_the_last_good_deltas(gen, monkeypatch):
    tech = technique(gen, "<nan-a>", steps=6)
    real = tech.training_loss
    monkeypatch.setattr(tech, "training_loss",
                        lambda batch: real(batch) * (float("nan") if tech.global_step == 3 else 1.0))
    Trainer(max_steps=6).fit(tech)
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
        Trainer(max_steps=10).fit(tech)
    assert stop.value.args[0] == 4 and tech._trainer is None and not tech.training


def test_bad_trainer_settings_are_clear_errors():
    with pytest.raises(ValueError, match="log_every_n_steps must be >= 1"):
        Trainer(log_every_n_steps=0)
    with pytest.raises(ValueError, match="gradient_clip_val must be positive"):
        Trainer(gradient_clip_val=0)
    with pytest.raises(ValueError, match="every_n_steps must be >= 1"):
        Checkpoint(every_n_steps=0)
