"""Data parallel on the CPU (issue 31 section 3): `trainer.devices=2 trainer.strategy=ddp` (gloo) splits every
optimizer step's batch (technique.batch_size) across 2 processes; the final deltas equal a single-process run at
the same global batch, within float tolerance, and only rank 0 writes. Slow: two processes load the generator."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HELPER = Path(__file__).parent / "helpers" / "ddp_ti.py"


def _train(tmp_path, name, devices, strategy):
    out = tmp_path / f"{name}.safetensors"
    done = subprocess.run([sys.executable, str(HELPER), str(out), str(devices), strategy], cwd=tmp_path,
                          capture_output=True, text=True, timeout=900,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "CUDA_VISIBLE_DEVICES": "",
                               "MASTER_ADDR": "127.0.0.1"})
    assert done.returncode == 0, done.stderr[-4000:]
    return load_file(out), done


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_equals_one_process_at_the_same_global_batch(shipped, tmp_path):
    single, _ = _train(tmp_path, "single", 1, "auto")
    parallel, done = _train(tmp_path, "ddp", 2, "ddp")
    ranks = sorted(line for line in done.stdout.splitlines() if line.startswith("rank "))
    assert ranks == ["rank 0 world 2 global_zero True", "rank 1 world 2 global_zero False"], done.stdout
    assert not torch.equal(single["embeddings"], single["initial"])
    torch.testing.assert_close(parallel["embeddings"], single["embeddings"], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_ddp_through_the_command_line_shares_rank_0s_run_directory(shipped, tmp_path):
    """Lightning relaunches `steerexp` for rank 1 into the same hydra.run.dir (steerexp/ranks.py): rank 1 trains
    its share and writes nothing but its Hydra job log; rank 0 evaluates, logs one W&B run and reports."""
    steerexp = str(Path(sys.executable).parent / "steerexp")
    done = subprocess.run([steerexp, "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp",
                           "technique.steps=2", "technique.batch_size=2", "evaluator=[concept]", "eval.seeds=[0]",
                           "sampling.steps=2", "logger=wandb", "hydra.run.dir=run"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=900, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
                                                       "CUDA_VISIBLE_DEVICES": "", "MASTER_ADDR": "127.0.0.1"})
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("run directory:") == 1, done.stdout
    run = tmp_path / "run"
    assert {"metrics.json", "deltas.safetensors", "checkpoints", ".hydra", "wandb"} <= {p.name for p in run.iterdir()}
    assert len(list((run / "wandb").glob("offline-run-*"))) == 1  # one W&B run, rank 0's
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
