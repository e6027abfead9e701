"""Trains textual inversion on the shipped generator with Lightning's Trainer and writes the final deltas (rank 0
only) to argv[1]: `python ddp_ti.py OUT DEVICES STRATEGY`. Lightning's ddp strategy relaunches this script for
every other rank (tests/test_ddp.py)."""
import os
import sys

import torch
from safetensors.torch import save_file

from steerexp.generators import load_generator
from steerexp.techniques.textual_inversion import TextualInversion
from steerexp.trainer import fit


def main(out: str, devices: int, strategy: str) -> None:
    torch.set_num_threads(1)
    gen = load_generator(device="cpu")  # once per rank
    tech = TextualInversion(gen, steps=3, batch_size=4, lr=0.05, targets={"k": 4}, placeholder="<ddp>")
    tech.prepare()
    trainer = fit({"_target_": "lightning.pytorch.Trainer", "accelerator": "cpu", "devices": devices,
                   "strategy": strategy, "log_every_n_steps": 1}, tech, [], None, None, None)
    rank = int(os.environ.get("LOCAL_RANK", 0))
    print(f"rank {rank} world {trainer.world_size} global_zero {trainer.is_global_zero}", flush=True)
    if trainer.is_global_zero:
        save_file(tech.deltas(), out)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
