"""What every evaluator shares: the paired sample sets, computed once per run and reused by
all evaluators, the run's scorers (steerexp.scorers), by name, and who judges.

Judges. Every evaluator that reads attributes names its judge with one key, `judge:` (a scorer
of the run by name: analytic, classifier, clip, user or any entry of `scorers:`; null: `analytic`
when the generator is the shapes world, else `user` when scorers.user.path is set, else
`classifier`). `EvalContext.judging(evaluator, judge)` resolves it and knows which scorers the
edit was optimised, ranked or guided against (the technique's `optimised_against()`). A judge
among them is not independent: the run says so once on stderr, records
`<evaluator>/judge_is_objective`, and the evaluator reports an independent judge next to it
(`<evaluator>/independent/...`): the analytic judge on the world, else the user's classifier, else
the shipped classifier on the world only; none left is a warning too. Who judged is recorded in
metrics (`<evaluator>/judged_by/<name>: true`) and in the run directory's judges.json.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from steerexp import progress
from steerexp.images import GridLabels, ImagePolicy
from steerexp.scorers import HeadClassifier, Scorers
from steerexp.techniques.protocols import OptimisesAgainst
from steerexp.worlds.shapes import world

if TYPE_CHECKING:  # open_clip costs seconds to import: only runs that use a CLIP load it
    from steerexp.scorers.clip import CLIPScorer


@dataclass
class Paired:
    """Baseline and edited images for prompts[i] with seeds[i]."""
    prompts: list[str]
    seeds: list[int]
    baseline: torch.Tensor
    edited: torch.Tensor


@dataclass
class EvalResult:
    metrics: dict[str, float | bool] = field(default_factory=dict)
    grids: dict[str, torch.Tensor] = field(default_factory=dict)          # name -> [3, H, W]
    grid_labels: dict[str, GridLabels] = field(default_factory=dict)      # name -> its rows' and columns' titles
    histograms: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    tables: dict[str, tuple[list[str], list[list]]] = field(default_factory=dict)
    plots: dict[str, str] = field(default_factory=dict)                    # name -> PNG file written by the evaluator
    lines: dict[str, tuple] = field(default_factory=dict)                  # name -> (xs, {series: ys}, x name)


class ClipReader(HeadClassifier):
    """A CLIP scorer as a judge of the world's heads: zero-shot, 100 x cosine to one caption per class."""

    CAPTIONS = {"shape": "a photo of a {}", "colour": "a {} object", "size": "a {} object", "position": "a object {}"}

    def __init__(self, clip: CLIPScorer):
        super().__init__()
        self.clip, self.heads = clip, {h: list(c) for h, c in world.HEADS.items()}
        self._texts: dict[str, torch.Tensor] = {}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        emb = self.clip.encode_images(images)
        for head, classes in self.heads.items():
            if head not in self._texts:
                words = [world.POSITION_PHRASES[c] if head == "position" else c for c in classes]
                self._texts[head] = self.clip.encode_texts([self.CAPTIONS[head].format(w) for w in words])
        return {head: 100.0 * emb @ text.T for head, text in self._texts.items()}


def reads(scorer, head: str, target: str | None = None) -> bool:
    """Whether a judge can read `head` (and its class `target`) off images."""
    from steerexp.scorers.noisy import NoisyClassifier

    if isinstance(scorer, NoisyClassifier):  # it reads noisy latents z_t, not images: it cannot judge a sample
        return False
    try:
        scorer.class_index(head, target) if target is not None else scorer.head_name(head)
        return True
    except ValueError:
        return False


@dataclass
class Judging:
    """Who judges one evaluator's figures (EvalContext.judging)."""
    evaluator: str
    name: str                          # the judge, a scorer of the run by name
    scorer: HeadClassifier
    objective: tuple[str, ...]         # the run's scorers the edit was optimised, ranked or guided against
    independent: str | None            # a judge the edit was not optimised against (the judge itself when it is one)
    independent_scorer: HeadClassifier | None

    @property
    def is_objective(self) -> bool:
        return self.name in self.objective

    def metrics(self) -> dict[str, bool]:
        ev = self.evaluator
        return {f"{ev}/judged_by/{self.name}": True, f"{ev}/judge_is_objective": self.is_objective,
                f"{ev}/independent_judge_found": self.independent is not None}

    def record(self) -> dict:
        return {"judge": self.name, "independent": self.independent, "objective": list(self.objective)}


class EvalContext:
    """Shared by the evaluators of one run: sampling with and without the edit, cached; the judges."""

    def __init__(self, technique, prompts: list[str], seeds: list[int], scorers: Scorers | None = None,
                 run_dir=None, optimised_against=None, world: bool | None = None,
                 image_policy: ImagePolicy | None = None):
        if not prompts:
            raise ValueError("eval.prompts is empty; give at least one prompt template")
        if not seeds:
            raise ValueError("eval.seeds is empty; give at least one seed")
        self.technique, self.prompts, self.seeds = technique, list(prompts), list(seeds)
        self.run_dir = run_dir
        # the run's scorers (conf/config.yaml: scorers), by name, and its image policy (images:): given, else the
        # technique's (run.build binds them to it), else the shipped defaults
        self.scorers = scorers or getattr(technique, "scorers", None) or Scorers()
        self.image_policy = image_policy or getattr(technique, "image_policy", None) or ImagePolicy()
        self._cache: dict[tuple, Paired] = {}
        if optimised_against is None:  # the scorers the edit was optimised against (the run passes them)
            optimised_against = technique.optimised_against() if isinstance(technique, OptimisesAgainst) else ()
        self.optimised_against = tuple(sorted(set(optimised_against)))
        # the generator draws the shapes world: the analytic judge reads it (the run passes it; else the generator says)
        self.world = (getattr(getattr(technique, "generator", None), "world", None) == "shapes"
                      if world is None else bool(world))
        self.judges: dict[str, dict] = {}  # evaluator -> {judge, independent, objective}: the run's judges.json
        self._warned: set[str] = set()
        self._readers: dict[str, HeadClassifier] = {}

    # ------------------------------------------------------------------ judges
    def warn(self, message: str) -> None:
        """One warning line on stderr, once per run however many evaluators hit it."""
        if message not in self._warned:
            self._warned.add(message)
            print(f"steerexp: warning: {message}", file=sys.stderr, flush=True)

    def default_judge(self) -> str:
        """`analytic` on the shapes world, else the user's classifier when set, else the classifier."""
        if self.world:
            return "analytic"
        return "user" if self.scorers.configured("user") else "classifier"

    def reader(self, name: str) -> HeadClassifier:
        """The run's scorer `name` as a judge of attributes (a CLIP reads them zero-shot)."""
        if self.scorers.kind(name) == "noisy":
            raise ValueError(f"the scorer {name!r} reads noisy latents, not images; judge with analytic, classifier, "
                             "clip or user")
        scorer = self.scorer(name)
        if isinstance(scorer, HeadClassifier):
            return scorer
        if not hasattr(scorer, "encode_images"):
            raise ValueError(f"the scorer {name!r} reads no attributes (it is of kind {self.scorers.kind(name)!r}); "
                             "judge with analytic, classifier, clip or user")
        if name not in self._readers or self._readers[name].clip is not scorer:
            self._readers[name] = ClipReader(scorer)  # built once per CLIP (its class captions are encoded once)
        return self._readers[name]

    def reads(self, name: str, head: str, target: str | None = None) -> bool:
        """Whether the run's scorer `name` can judge `head` (and its class `target`) on images."""
        try:
            return reads(self.reader(name), head, target)
        except ValueError:
            return False

    def independent_judge(self, head: str | None = None, target: str | None = None,
                          exclude: tuple[str, ...] = ()) -> str | None:
        """A judge the edit was not optimised against that reads `head`/`target`: the analytic judge on the
        world, else the user's classifier, else the classifier (on the world, or a folder of the user's)."""
        candidates = (["analytic"] if self.world else []) + (["user"] if self.scorers.configured("user") else [])
        if self.world or self.scorers.spec.get("classifier"):  # the shipped classifier reads the world only
            candidates.append("classifier")
        for name in candidates:
            if name not in self.optimised_against and name not in exclude and (
                    head is None or self.reads(name, head, target)):
                return name
        return None

    def judging(self, evaluator: str, judge: str | None, head: str | None = None,
                target: str | None = None) -> Judging:
        """The judge of `evaluator` (its `judge:` key; None: `default_judge()`) and an independent one when the
        edit was optimised against it; records both and says once on stderr when the judge is not independent."""
        name = judge or self.default_judge()
        if name not in self.scorers.spec:
            raise ValueError(f"evaluator.{evaluator}.judge: the run has no scorer {name!r}; choose one of "
                             f"{sorted(self.scorers.spec)} (conf/config.yaml: scorers)")
        if name == "user" and not self.scorers.configured("user"):
            raise ValueError(f"evaluator.{evaluator}.judge=user, but scorers.user.path is not set; set it (and "
                             "scorers.user.classes) or choose another judge")
        scorer = self.reader(name)
        independent = name if name not in self.optimised_against else self.independent_judge(head, target)
        result = Judging(evaluator, name, scorer, self.optimised_against, independent,
                         self.reader(independent) if independent else None)
        if result.is_objective:
            also = (f"independent figures from {independent!r} are reported next to it (<evaluator>/independent/...)"
                    if independent else "no independent judge is configured: set scorers.user.path to an evaluation "
                    "classifier of your own (on the shapes world the analytic judge is one)")
            self.warn(f"the judge {name!r} is a scorer this run optimised against, so its figures are not "
                      f"independent; {also}")
        self.judges[evaluator] = result.record()
        return result

    def paired(self, prompts: list[str] | None = None, seeds: list[int] | None = None) -> Paired:
        """Every prompt x every seed, baseline and edited (cached by prompts and seeds)."""
        prompts, seeds = list(prompts or self.prompts), list(seeds or self.seeds)
        key = (tuple(prompts), tuple(seeds))
        if key not in self._cache:
            ps = [p for p in prompts for _ in seeds]
            ss = [s for _ in prompts for s in seeds]
            what = f"samples: {len(prompts)} prompts x {len(seeds)} seeds, baseline + edited"
            with torch.no_grad(), progress.phase(what, total=2 * len(ps)):
                self._cache[key] = Paired(ps, ss, self.technique.generate(ps, ss, edited=False),
                                          self.technique.generate(ps, ss, edited=True))
        return self._cache[key]

    def scorer(self, name: str):
        """The run's scorer `name` (e.g. 'classifier', 'clip', 'user'), on the CPU where the samples are."""
        return self.scorers.get(name)

    @property
    def classifier(self) -> HeadClassifier:
        """The run's concept classifier (scorers.classifier)."""
        return self.scorer("classifier")

    @property
    def clip(self) -> CLIPScorer:
        """The run's CLIP (scorers.clip; the clip evaluator may bring its own model)."""
        return self.scorer("clip")
