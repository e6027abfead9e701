"""The analytic judge as a scorer (kind `analytic`): the shapes world's judge with no learned
weights and no gradients (steerexp.worlds.shapes.judge.AnalyticJudge). It reads the heads
shape, colour, size and position like a classifier (`scorers.prob(judge, images, head,
target)`), and also gives `clean_score(images)` and `read(images)`.

    scorers:
      analytic: null      # no settings: the world's palette, masks and positions are its whole model

It is the default evaluation judge when the generator is the shapes world. It cannot be an
objective: asking it for a gradient is an error.
"""
from __future__ import annotations

from functools import lru_cache

from steerexp.worlds.shapes.judge import AnalyticJudge


@lru_cache(maxsize=1)
def load_analytic() -> AnalyticJudge:
    """The analytic judge, on the CPU (its template bank is built once per process)."""
    return AnalyticJudge().eval()


def build(spec, device: str, key: str) -> AnalyticJudge:
    if spec not in (None, {}):
        raise ValueError(f"{key} takes no settings (the world's palette, masks and positions are its model); "
                         f"set {key}: null")
    return load_analytic()  # it runs on the CPU (cheap; the evaluators' samples are there) whatever `device`
