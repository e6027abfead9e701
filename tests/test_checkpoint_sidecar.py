"""Checkpoint identity lives beside the checkpoint (issue 30 §1): every last.ckpt gets a JSON sidecar that
validation reads, so a steerexp checkpoint is checked before loading without being unpickled at all."""
import json

import pytest

from steerexp import validate
from steerexp.errors import ConfigError
from tests.helpers import compose_config, tiny_run


def test_every_checkpoint_has_a_sidecar_that_validation_reads_without_unpickling(shipped, tmp_path, monkeypatch):
    _, run_dir = tiny_run(tmp_path, ["logger=none", "evaluator=[concept]"])
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    record = json.loads((ckpt.parent / "last.ckpt.json").read_text())
    assert record["steerexp"]["technique"].endswith("TextualInversion") and record["global_step"] == 3

    with monkeypatch.context() as m:  # nothing may unpickle it
        m.setattr("pickle.Unpickler", None)
        m.setattr("pickle.load", None)
        m.setattr("pickle.loads", None)
        assert validate.read_checkpoint_info(ckpt)["technique"] == record["steerexp"]["technique"]
    # the identity drives the same one-line refusal as before: this checkpoint is not a prompt_delta one
    with pytest.raises(ConfigError) as err:
        validate.validate(compose_config(["technique=prompt_delta", f"ckpt_path={ckpt}", "technique.steps=0"]))
    assert err.value.key == "ckpt_path" and "TextualInversion" in str(err.value)


def test_a_checkpoint_without_a_sidecar_is_checked_where_it_loads(shipped, tmp_path):
    """Checkpoints written before the sidecar existed: nothing is read before loading; the load
    (weights_only) checks the deltas' shapes and refuses another technique's in one line."""
    _, run_dir = tiny_run(tmp_path, ["logger=none", "evaluator=[concept]"])
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    (ckpt.parent / "last.ckpt.json").unlink()
    assert validate.read_checkpoint_info(ckpt) is None
    with pytest.raises(ConfigError) as err:
        tiny_run(tmp_path / "other", ["logger=none", "evaluator=[concept]", "technique=prompt_delta",
                                      f"ckpt_path={ckpt}", "technique.steps=0"])
    assert err.value.key == "ckpt_path"
