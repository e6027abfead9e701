"""Small helpers shared by the pretraining stages."""
from __future__ import annotations

import math
import time

import torch

from steerexp.images import to_tensor  # noqa: F401  (the stages import it from here)


def cosine_lr(optimizer: torch.optim.Optimizer, base_lr: float, steps: int, warmup: int = 100):
    """LambdaLR with linear warm-up then cosine decay to 5% of `base_lr`."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    for group in optimizer.param_groups:
        group["lr"] = base_lr
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def training_setup(params, name: str, lr: float, steps: int, weight_decay: float, warmup: int = 100):
    """(AdamW, its cosine schedule, the stage's progress printer): every stage trains this way."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return opt, cosine_lr(opt, lr, steps, warmup=warmup), Progress(name, steps)


def optimizer_step(optimizer: torch.optim.Optimizer, scheduler, loss: torch.Tensor, clip_params=None) -> float:
    """zero_grad, backward, optional grad-norm clip to 1, step the optimizer and the schedule."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip_params is not None:
        torch.nn.utils.clip_grad_norm_(clip_params, 1.0)
    optimizer.step()
    scheduler.step()
    return loss.item()


class Progress:
    """Prints a line every `every` steps with the running loss and elapsed time."""

    def __init__(self, name: str, steps: int, every: int = 200):
        self.name, self.steps, self.every, self.start, self.acc, self.n = name, steps, every, time.time(), 0.0, 0

    def __call__(self, step: int, loss: float) -> None:
        self.acc, self.n = self.acc + loss, self.n + 1
        if (step + 1) % self.every == 0 or step + 1 == self.steps:
            print(f"[{self.name}] step {step + 1}/{self.steps} loss {self.acc / self.n:.5f} "
                  f"({time.time() - self.start:.0f}s)", flush=True)
            self.acc, self.n = 0.0, 0
