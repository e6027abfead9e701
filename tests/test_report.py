"""steerexp-report on a small sweep: sweep plots with bootstrap CIs, curves within runs, labelled grids,
grouped sortable metric tables, and the page rendered in headless Chromium.

The sweep is made by the real evaluators (concept, leakage, magnitude, with the shipped classifier) and
the real `run.evaluate` / `write_metrics`, on a stand-in technique that renders world scenes instead of
sampling the generator (seconds instead of minutes): with the edit, the first `strength` seeds of every 4
come out large, so the target rate of each job is known."""
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from omegaconf import OmegaConf
from PIL import Image

from steerexp.techniques.base import TrainingFree
from steerexp.worlds.shapes import world

PROMPTS = ["a small red circle", "a small blue square on the left"]
SEEDS = [0, 1, 2, 3]
LEAK = ["a green square at the top", "a purple cross at the bottom"]
ALPHAS = [1, 2, 4]


class Painter(TrainingFree):
    """Stand-in technique without a generator: the world scene a prompt names (small); edited, large for
    seeds with seed % 4 < strength. StrengthScalable (the magnitude evaluator scales `strength`)."""

    def __init__(self, strength: float):
        super().__init__(generator=None)
        self.strength = strength

    def generate(self, prompts, seeds, edited):
        from steerexp.images import to_tensor

        images = []
        for prompt, seed in zip(prompts, seeds):
            words = prompt.replace("{}", "circle").split()
            fixed = {head: w for w in words for head, names in world.HEADS.items() if w in names}
            fixed["size"] = "large" if edited and seed % 4 < self.strength else "small"
            fixed.setdefault("background", "gray")
            images.append(world.sample(seed, 0, **fixed)[0])
        return to_tensor(np.stack(images))


def make_job(root: Path, num: int, alpha: float) -> Path:
    """One job of a multirun as steerexp writes it: .hydra/{config,overrides}.yaml, metrics.json, grids,
    scores.json, tables.json, grids.json."""
    from steerexp.evaluators.concept import Concept
    from steerexp.evaluators.leakage import Leakage
    from steerexp.evaluators.magnitude import Magnitude
    from steerexp.logging.wandb import RunLogger
    from steerexp.run import evaluate, write_metrics

    run_dir = root / str(num)
    (run_dir / ".hydra").mkdir(parents=True)
    cfg = OmegaConf.create({
        "technique": {"alpha": alpha}, "eval": {"prompts": PROMPTS, "seeds": SEEDS},
        "evaluator": {"concept": {"threshold": 0.5}, "magnitude": {"tolerance": 0.1}},
        "print_metrics": ["concept/target_rate/baseline", "concept/target_rate/edited", "leakage/flip_rate",
                          "magnitude/sweet_spot", "generator/unchanged"],
        "logger": {"project": "steerexp", "entity": None},
    })
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    (run_dir / ".hydra" / "overrides.yaml").write_text(
        yaml.safe_dump([f"technique.alpha={alpha}", "evaluator=[concept,leakage,magnitude]"]))
    evaluators = [Concept(head="size", target="large"),
                  Leakage(prompts=LEAK, head="size", target="large", heads=["shape", "colour"]),
                  Magnitude(strengths=[1, 2, 4], head="size", target="large", leakage_prompts=LEAK,
                            leakage_heads=["shape", "colour"])]
    metrics = {"generator/unchanged": True}
    evaluate(cfg, Painter(alpha), evaluators, RunLogger("disabled", run_dir, "t", "tests", [], {}), run_dir,
             metrics)
    write_metrics(run_dir, metrics)
    return run_dir


@pytest.fixture(scope="module")
def sweep(shipped, tmp_path_factory):
    root = tmp_path_factory.mktemp("report") / "sweep"
    for num, alpha in enumerate(ALPHAS):
        make_job(root, num, alpha)
    return root


def test_the_stand_in_sweep_has_the_rates_it_was_built_for(sweep):
    from steerexp.report import find_runs, load_run

    runs = [load_run(p, sweep) for p in find_runs(sweep)]
    for run, alpha in zip(runs, ALPHAS):  # the classifier reads the world's sizes right
        assert run["metrics"]["concept/target_rate/baseline"] == 0.0
        assert run["metrics"]["concept/target_rate/edited"] == pytest.approx(alpha / 4)


def test_sweep_parameters_come_from_the_overrides(sweep):
    from steerexp.report import find_runs, load_run, param_value, swept_parameters

    runs = [load_run(p, sweep) for p in find_runs(sweep)]
    assert swept_parameters(runs) == ["technique.alpha"]  # the evaluator override is the same in every job
    assert [param_value(r, "technique.alpha") for r in runs] == [1.0, 2.0, 4.0]


def test_plotted_points_carry_the_bootstrap_ci_of_the_per_image_values(sweep, tmp_path):
    import csv

    from steerexp.evaluators.stats import bootstrap_ci
    from steerexp.report import write_report

    write_report(sweep, tmp_path, wandb="disabled")
    rows = list(csv.DictReader((tmp_path / "report_plots.csv").open()))
    edited = [r for r in rows if r["figure"] == "sweep/technique.alpha" and r["metric"] == "concept/target_rate/edited"
              and r["series"] == "runs"]
    assert [float(r["x"]) for r in edited] == ALPHAS
    for row, alpha in zip(edited, ALPHAS):
        hits = np.array([float(s % 4 < alpha) for _ in PROMPTS for s in SEEDS])
        strata = np.repeat(np.arange(len(PROMPTS)), len(SEEDS))
        lo, hi = bootstrap_ci(hits, strata)
        assert float(row["value"]) == pytest.approx(hits.mean())
        assert (float(row["ci_low"]), float(row["ci_high"])) == pytest.approx((lo, hi))
    assert 0 < float(edited[1]["ci_low"]) < 0.5 < float(edited[1]["ci_high"]) < 1  # a real interval at rate 0.5
    # the baseline is the same in every job: one reference series
    assert {r["series"] for r in rows if r["metric"] == "concept/target_rate/edited"} == {"runs", "baseline"}
    # the magnitude curves: one series per job, x = strength
    curves = [r for r in rows if r["figure"] == "curves/magnitude" and r["metric"] == "magnitude/target_rate"]
    assert {r["series"] for r in curves} == {"alpha=1", "alpha=2", "alpha=4"}
    assert sorted({float(r["x"]) for r in curves}) == [1.0, 2.0, 4.0]
    at4 = [float(r["value"]) for r in curves if float(r["x"]) == 4.0]
    assert at4 == [1.0, 1.0, 1.0] and all(r["ci_low"] for r in curves)


def test_a_metric_the_tables_do_not_reproduce_gets_no_ci(sweep):
    from steerexp.report import estimate, find_runs, load_run

    run = load_run(find_runs(sweep)[1], sweep)
    assert estimate(run, "leakage/flip_rate").lo is not None
    run["metrics"]["leakage/flip_rate"] += 0.25  # the per-image table no longer averages to the metric
    p = estimate(run, "leakage/flip_rate")
    assert p.lo is None and p.hi is None
    assert estimate(run, "concept/paired_diff/mean").lo == run["metrics"]["concept/paired_diff/ci_low"]


def test_psnr_against_method_keeps_the_evaluators_method_order_and_has_cis():
    from steerexp.evaluators.stats import bootstrap_ci
    from steerexp.report import family_figures

    psnr = {"vae": [30.0, 28.0, 29.0], "ddim_w1": [25.0, 27.0, 24.0], "nti": [29.0, 27.5, 28.0]}
    rows = [[f"img{i}", m, v, 0.9] for m, vs in psnr.items() for i, v in enumerate(vs)]
    run = {"name": "nti", "config": {}, "overrides": None, "tables": {
        "inversion/per_image": {"columns": ["image", "method", "psnr", "ssim"], "rows": rows}},
        "metrics": {f"inversion/psnr/{m}": float(np.mean(v)) for m, v in sorted(psnr.items())}}
    (fig,) = family_figures([run], [])
    (panel,) = fig.panels  # no ssim metrics: one panel
    points = panel.series["this run"]
    assert [p.x for p in points] == ["vae", "ddim_w1", "nti"]  # not alphabetical: the evaluator's order
    for p in points:
        lo, hi = bootstrap_ci(np.array(psnr[p.x]), np.zeros(3, int))
        assert (p.value, p.lo, p.hi) == pytest.approx((np.mean(psnr[p.x]), lo, hi))
    assert fig.png[:8] == b"\x89PNG\r\n\x1a\n"


def test_grids_are_labelled_with_prompts_and_seeds(sweep):
    import json

    labels = json.loads((sweep / "0" / "grids.json").read_text())
    assert labels["samples/grid.png"]["rows"] == PROMPTS
    assert labels["samples/grid.png"]["columns"] == [f"seed {s}" for s in SEEDS] * 2
    assert labels["samples/grid.png"]["groups"] == ["baseline", "edited"]
    assert labels["samples/leakage.png"]["rows"] == LEAK
    grid = np.asarray(Image.open(sweep / "0" / "samples" / "grid.png").convert("L"))
    cells_w = 2 * (2 * len(SEEDS) * 32 + 4)  # the images and the gap between the blocks, upscaled 2x
    assert grid.shape[1] > cells_w + 100  # a column of prompt labels on the left
    label_column = grid[:, : grid.shape[1] - cells_w - 8]
    assert (label_column < 128).mean() > 0.005  # dark text on white


def chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def browse(browser, url: str, profile: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                           f"--user-data-dir={profile}", "--virtual-time-budget=5000", *args, url],
                          capture_output=True, text=True, timeout=120)


def test_report_renders_with_its_plots_in_chromium(sweep, tmp_path):
    from steerexp.report import write_report

    html_path, _ = write_report(sweep, tmp_path, wandb="disabled")
    browser = chromium()
    if browser is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's chromium)")
    out = browse(browser, html_path.as_uri() + "#sort=-concept/target_rate/edited", tmp_path / "chrome", "--dump-dom")
    dom = out.stdout
    found = {k: re.search(rf'data-{k}="(\d+)"', dom) for k in ("plots-rendered", "plots-total", "grids-rendered")}
    assert all(found.values()), out.stderr[-2000:]
    plots = int(found["plots-total"].group(1))
    # sweep plot + magnitude curves + per run: concept histogram and the magnitude evaluator's own plot
    assert plots == 2 + 2 * len(ALPHAS)
    assert int(found["plots-rendered"].group(1)) == plots  # every plot decoded, with a non-zero natural size
    assert int(found["grids-rendered"].group(1)) == 2 * len(ALPHAS)  # concept and leakage grids of every job
    for heading in ("Sweep plots", "Curves within runs", "Key metrics"):
        assert f">{heading}</h2>" in dom
    # the key-metrics tables are grouped by evaluator, and #sort=-<key> sorted the concept one descending
    assert re.findall(r'data-group="(\w+)"', dom)[:3] == ["concept", "leakage", "magnitude"]
    concept = re.search(r'data-group="concept".*?<tbody>(.*?)</tbody>', dom, re.S).group(1)
    assert re.findall(r"<tr><td[^>]*>(\d)</td>", concept) == ["2", "1", "0"]

    shot = tmp_path / "shot.png"
    browse(browser, html_path.as_uri(), tmp_path / "chrome", f"--screenshot={shot}", "--window-size=1280,1600")
    pixels = np.asarray(Image.open(shot).convert("L"), float)
    assert pixels.shape == (1600, 1280)
    assert pixels.std() > 20 and (pixels < 200).mean() > 0.02  # drawn, not a blank page


# ---------------------------------------------------------------------------- W&B (offline, read back)
def wandb_records(folder: Path, wait_s: float = 20.0):
    """(run record, config {key: value}, history {(key, field...): value}, run dir) of the one offline W&B
    run under folder/wandb, read back from its .wandb file. wandb's service may still be writing it when
    finish() returns: read it once it ends with the run's exit record (a record caught half-written fails its
    checksum: read again, until `wait_s`)."""
    import json
    import time

    from wandb.proto import wandb_internal_pb2 as pb
    from wandb.sdk.internal import datastore

    files = sorted(folder.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    deadline = time.time() + wait_s
    while True:
        store = datastore.DataStore()
        store.open_for_scan(str(files[0]))
        records, torn = [], False
        try:
            while (data := store.scan_data()) is not None:
                records.append(pb.Record())
                records[-1].ParseFromString(data)
        except AssertionError:   # the writer is mid-record (wandb's datastore asserts on the checksum)
            if time.time() > deadline:
                raise
            torn = True
        finally:
            store.close()
        if not torn and (any(r.WhichOneof("record_type") == "exit" for r in records) or time.time() > deadline):
            break
        time.sleep(0.2)
    run, config, history = None, {}, {}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            config.update({u.key: json.loads(u.value_json) for u in record.run.config.update})
        elif kind == "config":  # nested keys (_wandb.visualize.<chart>) as nested dicts
            for u in record.config.update:
                *path, last = list(u.nested_key) or [u.key]
                node = config
                for part in path:
                    node = node.setdefault(part, {})
                node[last] = json.loads(u.value_json)
        elif kind == "history":
            history.update({tuple(i.nested_key) or (i.key,): json.loads(i.value_json) for i in record.history.item})
    return run, config, history, files[0].parent


def test_a_run_logs_flat_config_keys_and_captioned_labelled_grids(shipped, tmp_path):
    import torch

    from steerexp.evaluators.base import EvalResult, Paired
    from steerexp.images import side_by_side_grid, side_by_side_labels
    from steerexp.logging.wandb import RunLogger

    paired = Paired([p for p in PROMPTS for _ in SEEDS], [s for _ in PROMPTS for s in SEEDS],
                    torch.rand(8, 3, 32, 32), torch.rand(8, 3, 32, 32))
    labels = side_by_side_labels(paired, len(SEEDS))
    logger = RunLogger("offline", tmp_path, "alpha=2", "sweep_x", ["embedding_arithmetic"],
                       {"technique": {"alpha": 2.0, "mode": "pooled"}, "eval": {"seeds": SEEDS}, "seed": 0})
    logger.log_result(EvalResult(grids={"samples/grid": side_by_side_grid(paired, len(SEEDS))},
                                 grid_labels={"samples/grid": labels}))
    logger.finish({"concept/target_rate/edited": 0.5})
    run, config, history, run_dir = wandb_records(tmp_path)
    assert run.run_group == "sweep_x"
    assert config["technique.alpha"] == 2.0 and config["technique.mode"] == "pooled"
    assert config["eval.seeds"] == SEEDS and "technique" not in config  # flat: filter / group by any override
    assert history[("samples/grid", "caption")] == labels.caption()
    assert PROMPTS[1] in labels.caption()
    image = Image.open(run_dir / "files" / history[("samples/grid", "path")])
    assert image.width > 2 * (2 * len(SEEDS) * 32 + 4)  # the labelled grid: prompt labels beside the images


def test_the_sweep_summary_run_holds_the_sweep_plots_as_wandb_charts(sweep, tmp_path):
    import csv
    import json

    from steerexp.report import write_report

    write_report(sweep, tmp_path, wandb="offline")
    run, config, history, run_dir = wandb_records(tmp_path)
    assert run.job_type == "summary" and run.run_group == sweep.as_posix().replace("/", "_")
    key = "sweep/technique.alpha/concept/target_rate/edited"
    chart = config["_wandb"]["visualize"][key]["panel_config"]
    assert chart["panelDefId"] == "wandb/line/v0"
    assert chart["fieldSettings"] == {"x": "technique.alpha", "y": "value", "stroke": "series"}
    table = json.loads((run_dir / "files" / history[(f"{key}_table", "path")]).read_text())
    assert table["columns"] == ["technique.alpha", "series", "value", "ci_low", "ci_high"]
    expected = [[float(r["x"]), r["series"], float(r["value"]), float(r["ci_low"]), float(r["ci_high"])]
                for r in csv.DictReader((tmp_path / "report_plots.csv").open())
                if r["figure"] == "sweep/technique.alpha" and r["metric"] == "concept/target_rate/edited"]
    assert table["data"] == expected
    assert "95% bootstrap CI" in history[("sweep/technique.alpha/figure", "caption")]
    assert ("curves/magnitude/magnitude/flip_rate_table", "path") in history
    runs = json.loads((run_dir / "files" / history[("sweep/runs", "path")]).read_text())
    assert runs["columns"][:2] == ["run", "alpha"] and [r[1] for r in runs["data"]] == ALPHAS
