"""The robust concept classifier: the same network and file format as the shipped one
(`ConceptClassifier`), trained so that its gradients mean something.

Recipe (conf/pretrain.yaml: classifier_robust): every step draws fresh-pool images, degrades
them (blur, brightness, light noise, as the plain classifier's recipe) and adds Gaussian noise
of a random strength up to `noise`; half of the batch is then replaced by its PGD adversary
(L-inf ball of radius `eps` on [0, 1] images, `pgd_steps` steps of `eps * pgd_step_frac`,
random start) against the sum of the heads' cross-entropies, and the model trains on the mix
(Madry et al. 2018, with clean examples kept so that clean accuracy stays at the plain one's).

`pgd` and `accuracy` are also the checks of the shipped asset (tests, benchmarks): robust
accuracy is measured with more PGD steps than training used, per head (each head attacked on
its own), at `eps` and `2 * eps`.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from steerexp.pretrain.common import optimizer_step, training_setup
from steerexp.pretrain.scorers import degrade
from steerexp.scorers.classifier import ConceptClassifier
from steerexp.worlds.shapes import world

NORMS = ("linf", "l2")


def heads_loss(logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor], heads=None) -> torch.Tensor:
    """Sum of the cross-entropies of `heads` (default: all)."""
    return sum(F.cross_entropy(logits[h], labels[h]) for h in (heads or logits))


def _unit(g: torch.Tensor) -> torch.Tensor:
    return g / g.flatten(1).norm(dim=1).clamp(min=1e-12).view(-1, 1, 1, 1)


def _project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    if norm == "linf":
        return delta.clamp(-eps, eps)
    return delta * (eps / delta.flatten(1).norm(dim=1).clamp(min=1e-12)).clamp(max=1).view(-1, 1, 1, 1)


def pgd(model, x: torch.Tensor, labels: dict[str, torch.Tensor], eps: float, steps: int, step_size: float,
        heads=None, gen: torch.Generator | None = None, random_start: bool = True, norm: str = "linf") -> torch.Tensor:
    """PGD on [0, 1] images: maximise the cross-entropy of `heads` within ||delta|| <= eps, the L-inf
    (`norm="linf"`, sign steps) or the L2 ball (`norm="l2"`, normalised steps). The model's
    parameters get no gradient; returns the adversarial images (detached)."""
    if norm not in NORMS:
        raise ValueError(f"PGD norm must be one of {NORMS}, got {norm!r}")
    if eps <= 0 or steps <= 0:
        return x.detach()
    delta = torch.zeros_like(x)
    if random_start:
        noise = torch.rand(x.shape, generator=gen) * 2 - 1
        delta = noise * eps if norm == "linf" else _unit(noise) * eps * torch.rand(len(x), 1, 1, 1, generator=gen)
    delta = ((x + delta).clamp(0, 1) - x).detach()
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = heads_loss(model(x + delta), labels, heads)
        (grad,) = torch.autograd.grad(loss, delta)
        step = grad.sign() if norm == "linf" else _unit(grad)
        delta = _project(delta.detach() + step_size * step, eps, norm)
        delta = ((x + delta).clamp(0, 1) - x).detach()
    return (x + delta).detach()


@torch.no_grad()
def _correct(model, x: torch.Tensor, labels: dict[str, torch.Tensor], head: str) -> torch.Tensor:
    return model(x)[head].argmax(-1) == labels[head]


def accuracy(model, x: torch.Tensor, labels: dict[str, torch.Tensor], eps: float = 0.0, steps: int = 0,
             batch_size: int = 256, seed: int = 0, norm: str = "linf") -> dict[str, float]:
    """Per-head accuracy on `x`; with eps > 0, under a PGD attack (`norm`) on that head alone
    (`steps` steps of 2.5 * eps / steps, random start): robust accuracy."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for head in labels:
        hits = []
        for i in range(0, len(x), batch_size):
            xb, lb = x[i : i + batch_size], {h: v[i : i + batch_size] for h, v in labels.items()}
            if eps > 0:
                with torch.enable_grad():
                    xb = pgd(model, xb, lb, eps, steps, 2.5 * eps / steps, heads=[head], gen=gen, norm=norm)
            hits.append(_correct(model, xb, lb, head))
        out[head] = float(torch.cat(hits).float().mean())
    return out


def augment(x: torch.Tensor, gen: torch.Generator, noise: float) -> torch.Tensor:
    """The plain recipe's degradation (blur, brightness, light noise) plus Gaussian noise of a
    random standard deviation in [0, noise] per image."""
    x = degrade(x, gen)
    sigma = torch.rand(len(x), 1, 1, 1, generator=gen) * noise
    return (x + sigma * torch.randn(x.shape, generator=gen)).clamp(0, 1)


def pretrain_robust_classifier(cfg, out: Path, seed: int, pool) -> Path:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x, _, labels = pool
    model = ConceptClassifier({h: list(c) for h, c in world.HEADS.items()}, width=cfg.width, resolution=x.shape[-1])
    opt, sched, progress = training_setup(model.parameters(), "classifier_robust", cfg.lr, cfg.steps, 1e-4)
    n_adv = int(round(cfg.batch_size * cfg.adv_fraction))
    for step in range(cfg.steps):
        idx = torch.randint(len(x), (cfg.batch_size,), generator=gen)
        xb, lb = augment(x[idx], gen, cfg.noise), {h: v[idx] for h, v in labels.items()}
        eps = cfg.eps * min(1.0, (step + 1) / max(1, cfg.eps_warmup))  # eps ramps up over the first steps
        if n_adv:
            model.eval()  # the attack reads the running statistics and does not update them
            adv = pgd(model, xb[:n_adv], {h: v[:n_adv] for h, v in lb.items()}, eps, cfg.pgd_steps,
                      eps * cfg.pgd_step_frac, gen=gen, norm=cfg.norm)
            xb = torch.cat([adv, xb[n_adv:]])
        model.train()
        progress(step, optimizer_step(opt, sched, heads_loss(model(xb), lb)))
    model.eval()
    model.save_pretrained(out)
    return out


def gradient_ascent(model, x: torch.Tensor, head: str, target: str, steps: int, step_size: float,
                    until: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to `steps` steps of L2-normalised gradient ascent on log p(head = target) from images `x`
    (each step moves an image by `step_size` in L2, pixels in [0, 1], then clamps): what a
    classifier's gradient asks of an image. With `until`, an image stops once p(target) >= until.
    Returns the final images (detached) and the number of steps each image took."""
    from steerexp.scorers import log_prob

    taken = torch.zeros(len(x), dtype=torch.long)
    for _ in range(steps):
        x = x.detach().requires_grad_(True)
        lp = log_prob(model, x, head, target)
        moving = torch.ones(len(x), dtype=torch.bool) if until is None else lp.detach().exp() < until
        if not moving.any():
            break
        (grad,) = torch.autograd.grad(lp.sum(), x)
        grad = grad / grad.flatten(1).norm(dim=1).clamp(min=1e-12).view(-1, 1, 1, 1)
        x = torch.where(moving.view(-1, 1, 1, 1), (x + step_size * grad).clamp(0, 1), x)
        taken += moving.long()
    return x.detach(), taken
