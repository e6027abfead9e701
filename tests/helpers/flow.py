"""What the flow editors' reference tests share (tests/test_flow_edit.py, tests/test_rf_solver.py): their world
targets and the guided velocity written out by hand; the tiny SD3 / FLUX pipelines are conftest's `flows` fixture."""
from __future__ import annotations

TARGETS = {"k": 2, "seed": 0, "fixed": {"colour": "red"}}


def hand_velocity(gen, z, t, cond, empty, w):
    """The guided velocity written out: one transformer pass per branch (FLUX: the scale is a model input, its
    distilled guidance)."""
    if gen.distilled_guidance:
        return gen.denoise(z, t, cond, w)
    vc = gen.denoise(z, t, cond)
    return vc if w == 1 else (lambda vu: vu + w * (vc - vu))(gen.denoise(z, t, empty.expand(len(z), -1, -1)))
