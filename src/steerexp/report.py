"""`steerexp-report <multirun or run directory>`: one static HTML page (no network, images
embedded), CSVs and, for a sweep, a W&B summary run, comparing the runs found under the directory:

- sweep plots: for each swept parameter (the overrides that differ between jobs, from each job's
  .hydra/overrides.yaml), the key metrics against it, with 95% bootstrap CI bars over the images
  of each run (per-image values from the run's tables.json, resampled within prompts);
- curves within runs: metric families a run measures at several points (magnitude: target and
  flip rate against strength, with the sweet spot; inversion: PSNR / SSIM against method; edit);
- metric tables grouped by evaluator (sortable: click a column), key metrics first, all in a fold;
- the labelled sample grids of each run and its score distributions (overlaid histograms).

    steerexp-report outputs/multirun/2026-11-21/10-00-00      # -> report.html, report.csv there
    steerexp-report <dir> --wandb disabled                     # no W&B summary run (default: offline)

Files written to the directory (or --out): report.html, report.csv (every metric of every run),
report_plots.csv (every plotted point with its CI) and, for two runs or more, a W&B summary run
under wandb/ (the sweep plots as W&B line / bar charts and images; see docs/wandb.md).

A directory it cannot report on (missing, empty: no metrics.json under it, or a run's metrics.json or
other record corrupt) is one line, `steerexp-report: error: <what>: <problem>; <fix>`, exit code 2.
"""
from __future__ import annotations

import argparse
import base64
import csv
import html
import json
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from steerexp.errors import ConfigError
from steerexp.report_plots import Panel, Point, histogram_png, panels_png

log = logging.getLogger("steerexp.report")

KEY_METRICS = ("concept/target_rate/baseline", "concept/target_rate/edited", "concept/paired_diff/mean",
               "concept/paired_diff/ci_low", "concept/paired_diff/ci_high", "concept/wilcoxon_p",
               "leakage/flip_rate", "leakage/pixel_rms", "leakage/passed", "clip/text_similarity/edited",
               "clip/image_similarity/edited", "memorisation/frac_below_threshold", "magnitude/sweet_spot",
               "magnitude/sweet_spot_target_rate", "generator/unchanged", "run/seconds")
NOT_PLOTTED = ("run/seconds", "generator/unchanged")
# metric families measured at several points within one run: (title, x name, [key prefixes])
FAMILIES = (
    ("magnitude: target rate and leakage against strength", "strength",
     ("magnitude/target_rate/", "magnitude/flip_rate/")),
    ("inversion: reconstruction against method", "method", ("inversion/psnr/", "inversion/ssim/")),
    ("edit: success and preservation against method", "method",
     ("edit/success/", "edit/success_and_kept/", "edit/bg_rms/")),
)
HISTOGRAM_AXES = {  # score histogram key -> (x label, values are probabilities in [0, 1])
    "concept/scores": ("judge's P(target) per image", True),
    "memorisation/nn_rms": ("per-pixel RMS to the nearest reference image", False),
    "nudging/nn_rms": ("per-pixel RMS to the nearest protected image", False),
}
CI_NOTE = ("bars: 95% bootstrap CI of each run's mean over its images (2000 resamples, within each prompt when "
           "there are several; paired differences: the evaluator's own CI); no bar: the run kept no per-image values")


# ---------------------------------------------------------------------------- reading runs
def find_runs(root: Path) -> list[Path]:
    runs = sorted({p.parent for p in Path(root).rglob("metrics.json")},
                  key=lambda p: [int(s) if s.isdigit() else s for s in p.relative_to(root).parts])
    if not runs:
        raise ConfigError("directory", f"no run directories (with metrics.json) under {root}",
                          "pass a run directory (outputs/<date>/<time>) or a multirun directory "
                          "(outputs/multirun/<date>/<time>) that steerexp wrote")
    return runs


def flatten(d, prefix: str = "") -> dict[str, object]:
    """A nested config as dotted keys; lists as JSON text (so they compare and print as one value)."""
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, list) else v
    return out


def parse_overrides(lines) -> dict[str, str]:
    """Hydra's overrides.yaml (['technique.alpha=2', '+x=1', ...]) as {key: value text}."""
    out = {}
    for line in lines or []:
        key, sep, value = str(line).partition("=")
        if sep:
            out[key.lstrip("+~")] = value
    return out


def _corrupt(path: Path, problem: str) -> ConfigError:
    return ConfigError(str(path), problem, f"re-run that job, or move its run directory ({path.parent.name}) out of "
                       "the folder and report on the rest")


def _read(path: Path, parse, kind: dict | type):
    """A run's record (JSON or YAML) of the expected kind, or one ConfigError naming the file."""
    try:
        value = parse(path.read_text())
    except (ValueError, UnicodeDecodeError, yaml.YAMLError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise _corrupt(path, f"is corrupt ({first})") from None
    except OSError as err:
        raise _corrupt(path, f"cannot be read ({err.strerror or err})") from None
    if not isinstance(value, kind):
        raise _corrupt(path, f"is corrupt: a {type(value).__name__}, not a {kind.__name__}")
    return value


def _json(path: Path, default, kind: type = dict):
    return _read(path, json.loads, kind) if path.is_file() else default


def _yaml(path: Path, default, kind: type = dict):
    return _read(path, lambda text: yaml.safe_load(text) or kind(), kind) if path.is_file() else default


def load_run(path: Path, root: Path) -> dict:
    cfg = _yaml(path / ".hydra" / "config.yaml", {})
    overrides = _yaml(path / ".hydra" / "overrides.yaml", None, list)
    samples = sorted((path / "samples").glob("*.png")) if (path / "samples").is_dir() else []
    grids = _json(path / "grids.json", None)  # {"samples/grid.png": labels} for runs that wrote it
    return {
        "name": str(path.relative_to(root)) if path != root else path.name,
        "path": path,
        "config": flatten(cfg),
        "overrides": parse_overrides(overrides) if overrides is not None else None,
        "metrics": _json(path / "metrics.json", {}),
        "grids": [(p, (grids or {}).get(p.relative_to(path).as_posix(), {})) for p in samples
                  if grids is None or p.relative_to(path).as_posix() in grids],
        "plots": [p for p in samples if grids is not None and p.relative_to(path).as_posix() not in grids],
        "scores": _json(path / "scores.json", {}),
        "tables": _json(path / "tables.json", {}),
    }


def config_diff(runs: list[dict]) -> list[str]:
    keys = sorted(set().union(*(r["config"] for r in runs)))
    return [k for k in keys if len({json.dumps(r["config"].get(k), default=str) for r in runs}) > 1]


def swept_parameters(runs: list[dict]) -> list[str]:
    """The keys whose override differs between runs (a Hydra multirun); without overrides files, the
    config keys that differ."""
    if len(runs) < 2:
        return []
    if all(r["overrides"] is not None for r in runs):
        keys = list(dict.fromkeys(k for r in runs for k in r["overrides"]))
        swept = [k for k in keys if len({r["overrides"].get(k) for r in runs}) > 1]
    else:
        swept = config_diff(runs)
    return [k for k in swept if not k.startswith("hydra.")]


def _as_number(v):
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)):
        return float(v)
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def param_value(run: dict, key: str) -> float | str:
    """The run's value of swept `key`: a number when it is one (from the resolved config), else its text."""
    v = run["config"].get(key)
    if v is None and run["overrides"] is not None:
        v = run["overrides"].get(key)
    n = _as_number(v)
    return n if n is not None else ("null" if v is None else str(v).strip('"'))


def short_names(keys: list[str]) -> dict[str, str]:
    """technique.alpha -> alpha, unless two keys would share a short name."""
    tails = [k.split(".")[-1] for k in keys]
    return {k: t if tails.count(t) == 1 else k for k, t in zip(keys, tails)}


def run_label(run: dict, swept: list[str], names: dict[str, str]) -> str:
    if not swept:
        return run["name"]
    return " ".join(f"{names[k]}={_fmt_x(param_value(run, k))}" for k in swept)


def _fmt_x(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def config_list(run: dict, key: str) -> list:
    v = run["config"].get(key)
    try:
        v = json.loads(v) if isinstance(v, str) else v
    except ValueError:
        return []
    return list(v) if isinstance(v, list) else []


# ---------------------------------------------------------------------------- per-image values and CIs
def _table(run: dict, name: str):
    t = run["tables"].get(name)
    return (t["columns"], t["rows"]) if t and t.get("rows") else None


def _codes(labels) -> np.ndarray:
    return np.unique(np.asarray([str(x) for x in labels]), return_inverse=True)[1]


def per_image(run: dict, key: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The per-image values whose mean is metric `key`, and their strata (the prompt of each image), from
    the run's tables; None when the run kept none for this metric."""
    parts = key.split("/")
    if parts[0] == "concept" and len(parts) == 3 and parts[1] in ("target_rate", "score_mean"):
        t = _table(run, "concept/scores")
        if t is None or parts[2] not in t[0]:
            return None
        cols, rows = t
        v = np.array([r[cols.index(parts[2])] for r in rows], float)
        if parts[1] == "target_rate":
            v = (v >= float(run["config"].get("evaluator.concept.threshold", 0.5))).astype(float)
        return v, _codes(r[cols.index("prompt")] for r in rows)
    if parts[0] == "leakage" and len(parts) == 2:
        t = _table(run, "leakage/per_image")
        column = "flipped" if parts[1] == "flip_rate" else parts[1]
        if t is None or column not in t[0]:
            return None
        cols, rows = t
        return (np.array([r[cols.index(column)] for r in rows], float),
                _codes(r[cols.index("prompt")] for r in rows))
    if key == "magnitude/sweet_spot_target_rate" and "magnitude/sweet_spot" in run["metrics"]:
        return per_image(run, f"magnitude/target_rate/{float(run['metrics']['magnitude/sweet_spot']):g}")
    if parts[0] == "magnitude" and len(parts) == 3 and parts[1] in ("target_rate", "flip_rate"):
        t = _table(run, "magnitude/per_image")
        if t is None:
            return None
        cols, rows = t
        which = "target" if parts[1] == "target_rate" else "leakage"
        sel = [r for r in rows if r[cols.index("set")] == which and f"{float(r[cols.index('strength')]):g}" == parts[2]]
        return (np.array([r[cols.index("hit")] for r in sel], float), _codes(r[cols.index("prompt")] for r in sel)) \
            if sel else None
    for evaluator, columns in (("inversion", ("psnr", "ssim")), ("edit", ("bg_rms", "kept_all"))):
        if parts[0] == evaluator and len(parts) == 3 and parts[1] in columns:
            t = _table(run, f"{evaluator}/per_image")
            if t is None or parts[1] not in t[0]:
                return None
            cols, rows = t
            sel = [r for r in rows if r[cols.index("method")] == parts[2]]
            return (np.array([r[cols.index(parts[1])] for r in sel], float), np.zeros(len(sel), int)) if sel else None
    return None


def estimate(run: dict, key: str) -> Point | None:
    """The run's value of metric `key` with its 95% CI: the evaluator's own CI for a paired difference
    (`.../mean` with `.../ci_low`, `.../ci_high`), else a bootstrap over the run's per-image values
    (resampled within prompts, steerexp.evaluators.stats.bootstrap_ci). No CI when the run kept no
    per-image values, or when they do not reproduce the logged metric."""
    m = run["metrics"]
    value = _as_number(m.get(key)) if not isinstance(m.get(key), bool) else None
    if value is None or not math.isfinite(value):
        return None
    if key.endswith("/mean") and f"{key[:-5]}/ci_low" in m and f"{key[:-5]}/ci_high" in m:
        return Point(None, value, float(m[f"{key[:-5]}/ci_low"]), float(m[f"{key[:-5]}/ci_high"]))
    got = per_image(run, key)
    if got is None or not len(got[0]) or abs(float(got[0].mean()) - value) > 1e-5 * max(1.0, abs(value)):
        return Point(None, value)
    from steerexp.evaluators.stats import bootstrap_ci

    lo, hi = bootstrap_ci(got[0], got[1])
    return Point(None, value, lo, hi)


# ---------------------------------------------------------------------------- figures
@dataclass
class Figure:
    key: str            # e.g. "sweep/technique.alpha" (also the W&B key prefix)
    title: str
    xname: str
    panels: list[Panel]
    png: bytes
    caption: str


def plot_metrics(runs: list[dict]) -> list[str]:
    """The key metrics to plot: the runs' print_metrics and KEY_METRICS that are numbers and differ
    between runs; a `.../baseline` metric is drawn in its `.../edited` panel."""
    wanted = [k for r in runs for k in config_list(r, "print_metrics")] + list(KEY_METRICS)
    out = []
    for k in dict.fromkeys(wanted):
        values = [r["metrics"].get(k) for r in runs]
        numbers = [float(v) for v in values if _as_number(v) is not None and not isinstance(v, bool)]
        if k in NOT_PLOTTED or k.endswith(("/ci_low", "/ci_high", "_p")) or not numbers:  # p-values: not a scale
            continue
        if k.endswith("/baseline") and any(k[: -len("baseline")] + "edited" in r["metrics"] for r in runs):
            continue
        if max(numbers) - min(numbers) > 1e-12:  # a metric the sweep does not move needs no plot against it
            out.append(k)
    return out


def _at(run: dict, key: str, x) -> Point | None:
    p = estimate(run, key)
    if p is not None:
        p.x = x
    return p


def one_baseline(reference: dict[str, list[Point]]) -> dict[str, list[Point]]:
    """The baseline of every series as one series when they agree at every x (the edit's settings do not
    change the baseline), else as they are."""
    at: dict = {}
    for pts in reference.values():
        for p in pts:
            at.setdefault(p.x, []).append(p)
    if len(reference) > 1 and all(max(p.value for p in ps) - min(p.value for p in ps) < 1e-12 for ps in at.values()):
        return {"baseline": [ps[0] for ps in at.values()]}
    return reference


def sweep_figures(runs: list[dict], swept: list[str]) -> list[Figure]:
    """For each swept parameter: every key metric against it, one series per setting of the other swept
    parameters, with CI bars."""
    names = short_names(swept)
    metrics = plot_metrics(runs)
    figures = []
    for param in swept:
        others = [k for k in swept if k != param]
        xs = [param_value(r, param) for r in runs]
        numeric = all(isinstance(x, float) for x in xs)
        panels = []
        for key in metrics:
            series: dict[str, list[Point]] = {}
            reference: dict[str, list[Point]] = {}
            base_key = key[: -len("edited")] + "baseline" if key.endswith("/edited") else None
            for r, x in zip(runs, xs):
                label = run_label(r, others, names) if others else "runs"
                if (p := _at(r, key, x)) is not None:
                    series.setdefault(label, []).append(p)
                if base_key and (b := _at(r, base_key, x)) is not None:
                    reference.setdefault(f"baseline ({label})" if len(others) else "baseline", []).append(b)
            if series:
                panels.append(Panel(key, series, one_baseline(reference)))
        if not panels:
            continue
        positive = numeric and min(xs) > 0
        png = panels_png(panels, param, title=f"key metrics against {param}",
                         logx=positive and max(xs) / min(xs) >= 8)
        figures.append(Figure(f"sweep/{param}", f"against {param}", param, panels, png, CI_NOTE))
    return figures


def family_figures(runs: list[dict], swept: list[str]) -> list[Figure]:
    """Metric families measured at several points in each run (FAMILIES), one series per run."""
    names = short_names(swept)
    figures = []
    for title, xname, prefixes in FAMILIES:
        panels = []
        for prefix in prefixes:
            series, marks = {}, []
            for r in runs:
                label = run_label(r, swept, names) if len(runs) > 1 else "this run"
                pts = []
                for key in r["metrics"]:
                    rest = key[len(prefix):]
                    if key.startswith(prefix) and "/" not in rest:
                        x = _as_number(rest)
                        if (p := _at(r, key, x if x is not None else rest)) is not None:
                            pts.append(p)
                if pts:
                    order = table_order(r, "method")
                    series[label] = sorted(pts, key=lambda p: order.index(p.x) if p.x in order else len(order))
                if prefix == "magnitude/target_rate/" and "magnitude/sweet_spot" in r["metrics"]:
                    marks.append((float(r["metrics"]["magnitude/sweet_spot"]),
                                  float(r["metrics"]["magnitude/sweet_spot_target_rate"]), "sweet spot"))
            if series:
                hline = None
                if prefix == "magnitude/flip_rate/":
                    tolerance = _as_number(runs[0]["config"].get("evaluator.magnitude.tolerance"))
                    hline = (tolerance, f"tolerance {tolerance:g}") if tolerance is not None else None
                panels.append(Panel(prefix.rstrip("/"), series, hline=hline, marks=marks))
        if not panels:
            continue
        xs = [p.x for panel in panels for pts in panel.series.values() for p in pts]
        numeric = all(isinstance(x, float) for x in xs)
        png = panels_png(panels, xname, title=title, logx=numeric and min(xs) > 0 and max(xs) / min(xs) >= 8)
        figures.append(Figure(f"curves/{prefixes[0].split('/')[0]}", title, xname, panels, png, CI_NOTE))
    return figures


def table_order(run: dict, column: str) -> list:
    """The values of `column` in the run's tables, in first-seen order (e.g. the evaluator's method order)."""
    seen = []
    for t in run["tables"].values():
        if column in t.get("columns", []):
            i = t["columns"].index(column)
            seen += [row[i] for row in t["rows"]]
    return list(dict.fromkeys(seen))


def histogram_figures(run: dict) -> list[tuple[str, bytes]]:
    out = []
    for key, series in run["scores"].items():
        xlabel, unit = HISTOGRAM_AXES.get(key, (key, False))
        threshold = _as_number(run["config"].get("evaluator.concept.threshold", 0.5)) if key == "concept/scores" \
            else None
        out.append((key, histogram_png(series, xlabel, title=key, unit_range=unit, threshold=threshold)))
    return out


# ---------------------------------------------------------------------------- HTML
def fmt(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def img_tag(path: Path, cls: str = "grid") -> str:
    return f'<img class="{cls}" alt="{html.escape(path.stem)}" src="data:image/png;base64,{_b64(path.read_bytes())}"/>'


def png_tag(data: bytes, alt: str) -> str:
    return f'<img class="plot" alt="{html.escape(alt)}" src="data:image/png;base64,{_b64(data)}"/>'


def metric_groups(keys: list[str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for k in keys:
        group = k.split("/")[0]
        groups.setdefault("run" if group == "generator" else group, []).append(k)
    return {g: ks for g, ks in sorted(groups.items(), key=lambda item: item[0] == "run")}  # run/ last


def _breakable(text: str) -> str:
    """`text` for a narrow header: may wrap after '/' and '_'."""
    return html.escape(text).replace("/", "/<wbr>").replace("_", "_<wbr>")


def metrics_tables(runs: list[dict], keys: list[str], swept: list[str], cis: bool) -> str:
    """One sortable table per evaluator (key prefix): a row per run, its swept values, then the metrics
    (short names; the full key on hover), with the CI under each value when `cis`."""
    names = short_names(swept)
    out = []
    for group, gkeys in metric_groups(keys).items():
        head = "".join(f'<th title="{html.escape(k)}">{html.escape(names[k])}</th>' for k in swept)
        short = {k: k[len(group) + 1:] if k.startswith(group + "/") else k for k in gkeys}
        head += "".join(f'<th title="{html.escape(k)}">{_breakable(short[k])}</th>' for k in gkeys)
        body = []
        for r in runs:
            cells = [f'<td data-v="{html.escape(r["name"])}">{html.escape(r["name"])}</td>']
            cells += [f'<td data-v="{html.escape(_fmt_x(param_value(r, k)))}">{html.escape(_fmt_x(param_value(r, k)))}'
                      "</td>" for k in swept]
            for k in gkeys:
                v = r["metrics"].get(k, "")
                p = estimate(r, k) if cis and _as_number(v) is not None and not isinstance(v, bool) else None
                ci = f'<span class="ci">[{p.lo:.3g}, {p.hi:.3g}]</span>' if p is not None and p.lo is not None else ""
                cells.append(f'<td data-v="{fmt(v)}">{fmt(v)}{ci}</td>')
            body.append("<tr>" + "".join(cells) + "</tr>")
        out.append(f'<h3>{html.escape(group)}</h3><div class="tablewrap"><table class="metrics sortable" '
                   f'data-group="{html.escape(group)}"><thead><tr><th>run</th>{head}</tr></thead>'
                   f'<tbody>{"".join(body)}</tbody></table></div>')
    return "".join(out)


def figure_html(fig: Figure) -> str:
    return (f'<figure class="wide">{png_tag(fig.png, fig.key)}<figcaption>{html.escape(fig.title)}. '
            f'{html.escape(fig.caption)}</figcaption></figure>')


STYLE = """body{font-family:system-ui,sans-serif;margin:1em auto;max-width:1400px;padding:0 1em;color:#222}
h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}h3{margin:.8em 0 .3em}
table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}
th{background:#f4f4f4;white-space:normal;overflow-wrap:break-word;max-width:9em;vertical-align:bottom;
cursor:pointer}td{white-space:nowrap}td:first-child,th:first-child{text-align:left}
th[data-dir=asc]::after{content:" \\25B2"}th[data-dir=desc]::after{content:" \\25BC"}
.ci{display:block;color:#777;font-size:10px}.tablewrap{max-width:100%;overflow-x:auto}
#config-diff th{max-width:none}#config-diff td{white-space:normal;max-width:28em;overflow-wrap:anywhere;text-align:left}
img.grid{image-rendering:pixelated;max-width:100%}img.plot{max-width:100%}
figure{margin:.5em 0;display:inline-block;vertical-align:top}figure.wide{display:block}
figcaption{font-size:12px;color:#555;max-width:900px}.run{border:1px solid #ddd;padding:.3em .8em;margin:.8em 0}
.run>summary{font-weight:bold;cursor:pointer;padding:.3em 0}.note{color:#555;font-size:13px}"""

SCRIPT = """document.querySelectorAll('table.sortable th').forEach((th, i) => th.addEventListener('click', () => {
  const table = th.closest('table'), body = table.tBodies[0], dir = th.dataset.dir === 'asc' ? -1 : 1;
  table.querySelectorAll('th').forEach(h => delete h.dataset.dir);
  th.dataset.dir = dir > 0 ? 'asc' : 'desc';
  const key = td => { const n = parseFloat(td.dataset.v); return isNaN(n) ? (td.dataset.v || '') : n; };
  [...body.rows].sort((a, b) => { const x = key(a.cells[i]), y = key(b.cells[i]);
    return dir * (typeof x === 'number' && typeof y === 'number' ? x - y
                  : String(x).localeCompare(String(y), undefined, {numeric: true})); })
    .forEach(r => body.appendChild(r));
}));
const sortBy = decodeURIComponent(location.hash).match(/^#sort=(-?)(.+)$/);  // report.html#sort=-<metric key>
if (sortBy) {
  const th = document.querySelector(`table.metrics th[title="${CSS.escape(sortBy[2])}"]`);
  if (th) { th.click(); if (sortBy[1]) th.click(); }
}
window.addEventListener('load', () => {
  const ok = sel => [...document.querySelectorAll(sel)].filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.gridsRendered = ok('img.grid');
  document.body.dataset.plotsRendered = ok('img.plot');
  document.body.dataset.plotsTotal = document.querySelectorAll('img.plot').length;
  const first = document.querySelector('table.metrics');
  document.body.dataset.metricRows = first ? first.tBodies[0].rows.length : 0;
});"""


def run_section(run: dict, label: str, open_: bool) -> str:
    grids = "".join(
        f'<figure>{img_tag(p)}<figcaption>{html.escape(p.stem)}'
        f'{": " + html.escape(labels["what"]) if labels.get("what") else ""}</figcaption></figure>'
        for p, labels in run["grids"]
    )
    plots = "".join(f"<figure>{img_tag(p, 'plot')}<figcaption>{html.escape(p.stem)} (the evaluator's own plot)"
                    "</figcaption></figure>" for p in run["plots"])
    hists = "".join(f"<figure>{png_tag(png, key)}</figure>" for key, png in histogram_figures(run))
    title = html.escape(run["name"] + (f" · {label}" if label != run["name"] else ""))
    return (f'<details class="run"{" open" if open_ else ""}><summary>{title}</summary>'
            f'<div>{grids}</div><div>{plots}{hists}</div></details>')


def write_report(root: str | Path, out: str | Path | None = None, wandb: str = "offline") -> tuple[Path, Path]:
    """report.html, report.csv and report_plots.csv for the runs under `root`; for two runs or more, a
    W&B summary run (`wandb`: offline, online or disabled) under <out>/wandb. Returns (html, csv)."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError("directory", f"{root} is not a directory" if root.exists() else f"no such directory: {root}",
                          "pass a run directory or a multirun directory that steerexp wrote")
    if wandb not in ("offline", "online", "disabled"):
        raise ValueError(f"--wandb must be offline, online or disabled, got {wandb!r}")
    runs = [load_run(p, root) for p in find_runs(root)]
    swept = swept_parameters(runs)
    names = short_names(swept)
    diff = config_diff(runs)
    all_metrics = sorted(set().union(*(r["metrics"] for r in runs)))
    key_metrics = [k for k in dict.fromkeys([k for r in runs for k in config_list(r, "print_metrics")]
                                            + list(KEY_METRICS)) if any(k in r["metrics"] for r in runs)
                   and not k.endswith(("/ci_low", "/ci_high"))]  # CIs show under their value
    figures = sweep_figures(runs, swept) + family_figures(runs, swept)
    out = Path(out) if out else root
    out.mkdir(parents=True, exist_ok=True)

    csv_path = out / "report.csv"
    with csv_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", *diff, *all_metrics])
        for r in runs:
            w.writerow(
                [r["name"], *[r["config"].get(k, "") for k in diff], *[r["metrics"].get(k, "") for k in all_metrics]]
            )
    with (out / "report_plots.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["figure", "metric", "series", "x_name", "x", "value", "ci_low", "ci_high"])
        for fig in figures:
            for panel in fig.panels:
                for label, pts in {**panel.series, **panel.reference}.items():
                    w.writerows([fig.key, panel.title, label, fig.xname, p.x, p.value, p.lo, p.hi] for p in pts)

    head = "".join(f"<th>{html.escape(k)}</th>" for k in ["run", *diff])
    diff_rows = "".join(
        "<tr>" + "".join(f"<td>{fmt(v)}</td>" for v in [r["name"], *[r["config"].get(k, "") for k in diff]]) + "</tr>"
        for r in runs
    )
    swept_text = "; ".join(
        f"<code>{html.escape(k)}</code> ∈ {{{', '.join(html.escape(_fmt_x(v)) for v in dict.fromkeys(param_value(r, k) for r in runs))}}}"  # noqa: E501
        for k in swept
    ) or "nothing (a single run, or runs with the same overrides)"
    sweep_html = "".join(figure_html(f) for f in figures if f.key.startswith("sweep/"))
    curves_html = "".join(figure_html(f) for f in figures if f.key.startswith("curves/"))
    sections = "".join(run_section(r, run_label(r, swept, names), len(runs) <= 4) for r in runs)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>steerexp report: {html.escape(root.name)}</title>
<style>{STYLE}</style></head><body><h1>steerexp report</h1>
<p>{len(runs)} run{"s" if len(runs) != 1 else ""} under <code>{html.escape(str(root))}</code>. Swept: {swept_text}.</p>
{f'<h2 id="sweep">Sweep plots</h2>{sweep_html}' if sweep_html else ""}
{f'<h2 id="curves">Curves within runs</h2>{curves_html}' if curves_html else ""}
<h2 id="key-metrics">Key metrics</h2><p class="note">Grouped by evaluator; click a column to sort (or open
report.html#sort=&lt;key&gt;, #sort=-&lt;key&gt; for descending). Under a value: its 95% CI where the run kept
per-image values. The full key shows on hover.</p>
{metrics_tables(runs, key_metrics, swept, cis=True)}
<details><summary>All metrics ({len(all_metrics)})</summary>{metrics_tables(runs, all_metrics, swept, cis=False)}
</details>
{f'<h2>Config: what differs between runs</h2><div class="tablewrap"><table id="config-diff"><tr>{head}</tr>'
  f'{diff_rows}</table></div>' if diff else ""}
<h2 id="samples">Samples and score distributions</h2>{sections}
<script>{SCRIPT}</script></body></html>"""
    html_path = out / "report.html"
    html_path.write_text(page)
    if wandb != "disabled" and len(runs) > 1:
        log_summary_run(root, out, runs, swept, figures, key_metrics, wandb)
    return html_path, csv_path


# ---------------------------------------------------------------------------- W&B summary run
def sweep_group(runs: list[dict], root: Path) -> str:
    """The W&B group the sweep's jobs logged under (steerexp.cli: the sweep dir, '/' -> '_')."""
    hydra_file = runs[0]["path"] / ".hydra" / "hydra.yaml"
    sweep_dir = None
    if hydra_file.is_file():
        sweep_dir = ((yaml.safe_load(hydra_file.read_text()) or {}).get("hydra", {}).get("sweep") or {}).get("dir")
    if not sweep_dir or "${" in str(sweep_dir):
        sweep_dir = str(root)
    return Path(sweep_dir).as_posix().replace("/", "_")


def wandb_rows(panel: Panel) -> list[list]:
    """[x, series, value, ci_low, ci_high] for every point of a panel (its reference series included)."""
    return [[p.x, label, p.value, p.lo, p.hi] for label, pts in {**panel.series, **panel.reference}.items()
            for p in pts]


def log_summary_run(root: Path, out: Path, runs: list[dict], swept: list[str], figures: list[Figure],
                    key_metrics: list[str], mode: str) -> Path | None:
    """One W&B run (job_type=summary, in the sweep's group) holding the sweep plots as W&B charts (a line
    chart for a numeric x, a bar chart for a categorical one, from a table with the CIs), the same figures
    as images, and a table of every run's swept values and key metrics. Offline under <out>/wandb unless
    mode=online (which falls back to offline, with one warning, when W&B cannot be reached)."""
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb
    from PIL import Image

    if mode == "online":
        from steerexp.logging.wandb import missing_login, server_url, unreachable

        reason = missing_login(server_url()) or unreachable(server_url())
        if reason is not None:
            log.warning("W&B online logging unavailable: %s; the summary run is logged offline instead", reason)
            mode = "offline"
    cfg = runs[0]["config"]
    if wandb.run is not None:
        wandb.finish()
    run = wandb.init(project=cfg.get("logger.project") or "steerexp", entity=cfg.get("logger.entity"),
                     group=sweep_group(runs, root), job_type="summary", name=f"summary {root.name}",
                     dir=str(out), mode=mode, tags=["summary"],
                     config={"sweep_dir": str(root), "runs": len(runs), "swept": swept},
                     settings=wandb.Settings(silent=True, console="off"))
    try:
        import io

        for fig in figures:
            run.log({f"{fig.key}/figure": wandb.Image(Image.open(io.BytesIO(fig.png)), caption=f"{fig.title}. "
                                                      f"{fig.caption}")})
            for panel in fig.panels:
                columns = [fig.xname, "series", "value", "ci_low", "ci_high"]
                table = wandb.Table(columns=columns, data=wandb_rows(panel))
                chart_key = f"{fig.key}/{panel.title}"
                title = f"{panel.title} against {fig.xname}"
                if all(isinstance(p.x, float) for pts in panel.series.values() for p in pts):
                    run.log({chart_key: wandb.plot.line(table, x=fig.xname, y="value", stroke="series", title=title)})
                else:  # a bar per (x, series); the table with the CIs beside it
                    several = len(panel.series) > 1
                    bars = [[f"{_fmt_x(x)} · {label}" if several else _fmt_x(x), v]
                            for x, label, v, _, _ in wandb_rows(panel) if label in panel.series]
                    chart = wandb.plot.bar(wandb.Table(columns=["label", "value"], data=bars), "label", "value",
                                           title=title)
                    run.log({chart_key: chart, f"{chart_key}/points": table})
        names = short_names(swept)
        table = wandb.Table(columns=["run", *[names[k] for k in swept], *key_metrics],
                            data=[[r["name"], *[param_value(r, k) for k in swept],
                                   *[_wandb_cell(r["metrics"].get(k)) for k in key_metrics]] for r in runs])
        run.log({"sweep/runs": table})
        run.summary.update({"runs": len(runs)})
        path = Path(run.dir).parent
    finally:
        run.finish()
    return path


def _wandb_cell(v):
    return v if isinstance(v, (int, float, str)) else (None if v is None else str(v))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("directory", help="a run directory or a multirun directory")
    p.add_argument("--out", default=None, help="where to write report.html and report.csv (default: the directory)")
    p.add_argument("--wandb", default="offline", choices=("offline", "online", "disabled"),
                   help="the W&B summary run of a sweep (default: offline, under <out>/wandb; `wandb sync` uploads it)")
    a = p.parse_args(argv)
    try:
        html_path, csv_path = write_report(a.directory, a.out, wandb=a.wandb)
    except ConfigError as err:  # a directory it cannot report on: one line, as argparse's own errors
        if os.environ.get("HYDRA_FULL_ERROR", "") not in ("", "0"):
            raise
        print(f"steerexp-report: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    print(f"wrote {html_path}, {csv_path} and {csv_path.with_name('report_plots.csv')}")


if __name__ == "__main__":
    main()
