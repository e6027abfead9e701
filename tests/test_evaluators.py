import re
import shutil
import subprocess
from dataclasses import replace

import pytest
import torch

from steerexp.evaluators.base import EvalContext
from steerexp.evaluators.leakage import Leakage
from steerexp.evaluators.memorisation import Memorisation
from steerexp.evaluators.concept import Concept
from steerexp.evaluators.quality import saturation
from steerexp.images import nn_rms
from steerexp.techniques.base import TrainingFree
from steerexp.worlds.shapes import world
from tests.helpers import tiny_run


class PromptEdit(TrainingFree):
    """A test technique: the edit rewrites the prompt (identity for the null edit)."""

    def __init__(self, generator, rewrite):
        super().__init__(generator, sampling={"steps": 8})
        self.rewrite = rewrite

    def generate(self, prompts, seeds, edited):
        texts = [(self.rewrite(p) if edited else p).replace("{}", "circle") for p in prompts]
        return self.generator.generate(texts, seeds, steps=self.sampling_steps, guidance=self.guidance)


def all_red(prompt):
    return " ".join("red" if w in world.COLOURS else w for w in prompt.split())



def test_leakage_catches_a_planted_leak_and_passes_a_null_edit(gen):
    prompts = [p for p in world.UNRELATED_PROMPTS if "red" not in p]
    leak = Leakage(prompts=prompts, tolerance=0.1)
    planted = leak.evaluate(EvalContext(PromptEdit(gen, all_red), ["a {}"], [0, 1, 2, 3]))
    null = leak.evaluate(EvalContext(PromptEdit(gen, lambda p: p), ["a {}"], [0, 1, 2, 3]))
    assert planted.metrics["leakage/flip_rate"] > 0.5 and planted.metrics["leakage/passed"] is False
    assert planted.metrics["leakage/pixel_rms"] > 0.05
    assert null.metrics["leakage/flip_rate"] == 0.0 and null.metrics["leakage/passed"] is True
    assert null.metrics["leakage/pixel_rms"] == 0.0


def test_leakage_prompts_from_a_file(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("a red circle\n\na blue square\n")
    assert Leakage(prompts=str(f)).prompts == ["a red circle", "a blue square"]
    with pytest.raises(FileNotFoundError, match="prompt file"):
        Leakage(prompts=str(tmp_path / "missing.txt"))


def test_concept_measures_a_colour_edit(gen):
    ctx = EvalContext(PromptEdit(gen, all_red), ["a blue {}", "a green {} on the left"], [0, 1, 2, 3])
    m = Concept(head="colour", target="red").evaluate(ctx).metrics
    assert m["concept/target_rate/baseline"] <= 0.25 and m["concept/target_rate/edited"] >= 0.75
    assert m["concept/paired_diff/ci_low"] > 0 and m["concept/wilcoxon_p"] < 0.01


def test_concept_reports_what_the_edit_kept_pair_by_pair(gen):
    """attribute_kept: per head, the pairs whose edit the judge reads as it reads their baseline, whether the prompt
    names the head or not. Planted on world renders: the edit turns the background white on seeds 0 and 1 and the
    object small on seed 3; the prompt names neither."""
    plain = {s: world.Scene("circle", "red", "large", pos, "black") for s, pos in enumerate(
        ("left", "right", "top", "center"))}
    changed = {0: replace(plain[0], background="white"), 1: replace(plain[1], background="white"),
               2: plain[2], 3: replace(plain[3], size="small")}

    class Renders(TrainingFree):
        def generate(self, prompts, seeds, edited):
            scenes = [(changed if edited else plain)[s] for s in seeds]
            return torch.stack([torch.from_numpy(world.render(sc)).permute(2, 0, 1).float() / 255 for sc in scenes])

    ctx = EvalContext(Renders(gen, sampling={"steps": 8}), ["a red {}"], [0, 1, 2, 3])
    m = Concept(head="shape", target="circle").evaluate(ctx).metrics
    assert m["concept/attribute_kept/background"] == 0.5 and m["concept/attribute_kept/size"] == 0.75
    assert m["concept/attribute_kept/colour"] == 1.0 and m["concept/attribute_kept/position"] == 1.0
    assert "concept/attribute_kept/shape" not in m  # the concept's own head is the edit's, not kept or lost
    assert m["concept/attribute_agreement/colour/edited"] == 1.0  # what the prompt names cannot show the change


def test_memorisation_flags_the_protected_captions(gen):
    ctx = EvalContext(PromptEdit(gen, lambda p: p), ["a {}"], [0, 1, 2])
    m = Memorisation(reference="protected").evaluate(ctx).metrics
    assert m["memorisation/frac_below_threshold"] >= 0.5
    # ordinary prompts are far from the protected images
    plain = Memorisation(reference="protected", prompts=list(world.UNRELATED_PROMPTS)).evaluate(ctx).metrics
    assert plain["memorisation/frac_below_threshold"] == 0.0


def test_nn_rms_by_hand():
    refs = torch.zeros(2, 3, 4, 4)
    refs[1] += 1.0
    imgs = torch.full((1, 3, 4, 4), 0.25)
    assert float(nn_rms(imgs, refs)[0]) == pytest.approx(0.25)


def test_saturation_by_hand():
    img = torch.zeros(1, 3, 2, 2)
    img[0, 0] = 1.0  # pure red: saturation 1, every value clipped
    s = saturation(img)
    assert s["saturation"] == pytest.approx(1.0) and s["clipped_fraction"] == pytest.approx(1.0)
    assert s["overexposed_fraction"] == 0.0


def test_report_renders_in_the_browser(shipped, tmp_path):
    from steerexp.report import write_report

    for seed in (0, 1):
        tiny_run(tmp_path / "sweep", [f"seed={seed}", "evaluator=[concept]"], name=str(seed))
    html_path, csv_path = write_report(tmp_path / "sweep")
    rows = csv_path.read_text().strip().splitlines()
    assert len(rows) == 3 and "seed" in rows[0]
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's chromium)")
    out = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                          "--disable-component-update", "--disable-sync", "--no-first-run",
                          f"--user-data-dir={tmp_path / 'chrome'}", "--virtual-time-budget=5000", "--dump-dom",
                          html_path.as_uri()], capture_output=True, text=True, timeout=120)
    dom = out.stdout
    grids = re.search(r'data-grids-rendered="(\d+)"', dom)
    metric_rows = re.search(r'data-metric-rows="(\d+)"', dom)
    assert grids and int(grids.group(1)) == 2, out.stderr[-2000:]  # one grid per run, both decoded
    assert metric_rows and int(metric_rows.group(1)) == 2
    assert "concept/target_rate/edited" in dom


class Brightness(torch.nn.Module):
    """A user's classifier: logits over ["dark", "bright"] from mean brightness."""

    def forward(self, x):
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([0.5 - m, m - 0.5], dim=-1) * 20


def test_concept_accepts_a_torchscript_user_classifier(gen, tmp_path):
    path = tmp_path / "bright.pt"
    torch.jit.script(Brightness()).save(str(path))
    from steerexp import scorers

    user = scorers.build({"user": {"path": str(path), "classes": ["dark", "bright"]}})
    ctx = EvalContext(PromptEdit(gen, lambda p: p.replace("black", "white")),
                      ["a large red {} on a black background"], [0, 1, 2, 3], scorers=user)
    with pytest.raises(ValueError, match="analytic judge knows no shape 'bright'.*judge=user"):
        Concept(target="bright").evaluate(ctx)  # on the shapes world the default judge is the analytic one
    m = Concept(target="bright", judge="user").evaluate(ctx).metrics  # the user's classifier, named
    assert m["concept/judged_by/user"] is True
    paired = ctx.paired()
    bright = lambda imgs: float((Brightness()(imgs).softmax(-1)[:, 1] >= 0.5).float().mean())
    assert m["concept/target_rate/baseline"] == pytest.approx(bright(paired.baseline))
    assert m["concept/target_rate/edited"] == pytest.approx(bright(paired.edited))
    assert m["concept/score_mean/edited"] > m["concept/score_mean/baseline"]  # white backgrounds are brighter
    assert "concept/attribute_agreement/colour/edited" not in m  # a one-head judge reads nothing else
    ctx.scorers = scorers.build({"user": {"path": str(path), "classes": ["dark"]}})
    with pytest.raises(ValueError, match="classes must list the target"):
        Concept(target="bright", judge="user").evaluate(ctx)
    shipped = Concept(target="bright", judge="classifier")  # the judge by name, whatever else is set
    with pytest.raises(ValueError, match="unknown shape 'bright'"):
        shipped.evaluate(ctx)


def test_clip_evaluator_uses_the_model_it_is_given(gen, shipped, tmp_path):
    from safetensors.torch import load_file, save_file

    from steerexp.evaluators.clip import Clip
    from steerexp.scorers.clip import DEFAULT_MODEL, DEFAULT_PRETRAINED

    ctx = EvalContext(PromptEdit(gen, lambda p: p), ["a red {}"], [0, 1])
    default = Clip().evaluate(ctx).metrics
    same = Clip(model=DEFAULT_MODEL, pretrained=str(DEFAULT_PRETRAINED)).evaluate(ctx).metrics
    assert same == pytest.approx(default)
    weights = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v
               for k, v in load_file(DEFAULT_PRETRAINED).items()}
    save_file(weights, str(tmp_path / "other.safetensors"))
    other = Clip(model=DEFAULT_MODEL, pretrained=str(tmp_path / "other.safetensors")).evaluate(ctx).metrics
    assert other["clip/text_similarity/edited"] != pytest.approx(default["clip/text_similarity/edited"])
    with pytest.raises(FileNotFoundError, match="CLIP weights not found"):
        Clip(model=DEFAULT_MODEL, pretrained=str(tmp_path / "missing.safetensors")).evaluate(ctx)
