"""`steerexp-report <multirun or run directory>`: one static HTML page (no network, images
embedded) and a CSV comparing the runs found under the directory: what differs in their
configs, a key-metrics table, the sample grids side by side and the score distributions.

    steerexp-report outputs/multirun/2026-11-21/10-00-00      # -> report.html, report.csv there
"""
from __future__ import annotations

import argparse
import base64
import csv
import html
import json
from pathlib import Path

import numpy as np
import yaml

KEY_METRICS = ("concept/target_rate/baseline", "concept/target_rate/edited", "concept/paired_diff/mean",
               "concept/paired_diff/ci_low", "concept/paired_diff/ci_high", "concept/wilcoxon_p",
               "leakage/flip_rate", "leakage/pixel_rms", "leakage/passed", "clip/text_similarity/edited",
               "clip/image_similarity/edited", "memorisation/frac_below_threshold", "generator/unchanged",
               "run/seconds")


def find_runs(root: Path) -> list[Path]:
    runs = sorted({p.parent for p in Path(root).rglob("metrics.json")},
                  key=lambda p: [int(s) if s.isdigit() else s for s in p.relative_to(root).parts])
    if not runs:
        raise FileNotFoundError(f"no run directories (with metrics.json) under {root}")
    return runs


def flatten(d, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, list) else v
    return out


def load_run(path: Path, root: Path) -> dict:
    cfg_file = path / ".hydra" / "config.yaml"
    cfg = yaml.safe_load(cfg_file.read_text()) if cfg_file.is_file() else {}
    scores_file = path / "scores.json"
    return {
        "name": str(path.relative_to(root)) if path != root else path.name,
        "config": flatten(cfg),
        "metrics": json.loads((path / "metrics.json").read_text()),
        "grids": sorted((path / "samples").glob("*.png")) if (path / "samples").is_dir() else [],
        "scores": json.loads(scores_file.read_text()) if scores_file.is_file() else {},
    }


def config_diff(runs: list[dict]) -> list[str]:
    keys = sorted(set().union(*(r["config"] for r in runs)))
    return [k for k in keys if len({json.dumps(r["config"].get(k), default=str) for r in runs}) > 1]


def fmt(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def histogram_svg(series: dict[str, list[float]], width: int = 260, height: int = 90, bins: int = 20) -> str:
    colours = {"baseline": "#888888", "edited": "#d62728"}
    edges = np.linspace(0, 1, bins + 1)
    counts = {k: np.histogram(np.clip(v, 0, 1), edges)[0] for k, v in series.items()}
    top = max(1, max(int(c.max()) for c in counts.values()))
    bw = width / bins
    bars = []
    for side, c in counts.items():
        for i, n in enumerate(c):
            h = (height - 14) * n / top
            bars.append(f'<rect x="{i * bw:.1f}" y="{height - 14 - h:.1f}" width="{bw - 1:.1f}" height="{h:.1f}" '
                        f'fill="{colours.get(side, "#1f77b4")}" fill-opacity="0.55"/>')
    legend = " ".join(f'<tspan fill="{colours.get(s, "#1f77b4")}">{html.escape(s)}</tspan>' for s in counts)
    return (f'<svg class="hist" width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">{"".join(bars)}'
            f'<text x="0" y="{height - 2}" font-size="10">0 .. 1  {legend}</text></svg>')


def img_tag(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img class="grid" alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}"/>'


def write_report(root: str | Path, out: str | Path | None = None) -> tuple[Path, Path]:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"not a directory: {root}; pass a run or multirun directory")
    runs = [load_run(p, root) for p in find_runs(root)]
    diff = config_diff(runs)
    metric_keys = [k for k in KEY_METRICS if any(k in r["metrics"] for r in runs)]
    out = Path(out) if out else root
    out.mkdir(parents=True, exist_ok=True)

    csv_path = out / "report.csv"
    all_metrics = sorted(set().union(*(r["metrics"] for r in runs)))
    with csv_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", *diff, *all_metrics])
        for r in runs:
            w.writerow(
                [r["name"], *[r["config"].get(k, "") for k in diff], *[r["metrics"].get(k, "") for k in all_metrics]]
            )

    head = "".join(f"<th>{html.escape(k)}</th>" for k in ["run", *diff])
    diff_rows = "".join(
        "<tr>" + "".join(f"<td>{fmt(v)}</td>" for v in [r["name"], *[r["config"].get(k, "") for k in diff]]) + "</tr>"
        for r in runs
    )
    mhead = "".join(f"<th>{html.escape(k)}</th>" for k in ["run", *metric_keys])
    mrows = "".join(
        "<tr>"
        + "".join(f"<td>{fmt(v)}</td>" for v in [r["name"], *[r["metrics"].get(k, "") for k in metric_keys]])
        + "</tr>"
        for r in runs
    )
    cards = []
    for r in runs:
        grids = "".join(
            f"<figure>{img_tag(g)}<figcaption>{html.escape(g.stem)}</figcaption></figure>" for g in r["grids"]
        )
        hists = "".join(
            f"<figure>{histogram_svg(s)}<figcaption>{html.escape(k)}</figcaption></figure>"
            for k, s in r["scores"].items()
        )
        cards.append(f'<section class="run"><h3>{html.escape(r["name"])}</h3>{grids}{hists}</section>')
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>steerexp report: {html.escape(root.name)}</title>
<style>body{{font-family:sans-serif;margin:1em}}table{{border-collapse:collapse;font-size:12px}}
td,th{{border:1px solid #ccc;padding:3px 6px}}.runs{{display:flex;flex-wrap:wrap;gap:1em}}
.run{{border:1px solid #ddd;padding:.5em}}img.grid{{image-rendering:pixelated;max-width:520px}}
figure{{margin:.3em}}</style>
</head><body><h1>steerexp report</h1><p>{len(runs)} runs under <code>{html.escape(str(root))}</code></p>
<h2>What differs</h2><table id="config-diff"><tr>{head}</tr>{diff_rows}</table>
<h2>Key metrics</h2><table id="metrics"><tr>{mhead}</tr>{mrows}</table>
<h2>Samples and score distributions</h2><p>grids: rows are prompts, columns seeds; baseline | edited</p>
<div class="runs">{"".join(cards)}</div>
<script>window.addEventListener('load',()=>{{const imgs=[...document.querySelectorAll('img.grid')];
document.body.dataset.gridsRendered=imgs.filter(i=>i.complete&&i.naturalWidth>0).length;
document.body.dataset.metricRows=document.querySelectorAll('#metrics tr').length-1;}});</script>
</body></html>"""
    html_path = out / "report.html"
    html_path.write_text(page)
    return html_path, csv_path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("directory", help="a run directory or a multirun directory")
    p.add_argument("--out", default=None, help="where to write report.html and report.csv (default: the directory)")
    a = p.parse_args(argv)
    html_path, csv_path = write_report(a.directory, a.out)
    print(f"wrote {html_path} and {csv_path}")


if __name__ == "__main__":
    main()
