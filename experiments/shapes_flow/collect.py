"""Every run of run_presets.sh in one JSON: `python experiments/shapes_flow/collect.py [outputs/<generator>] [out]`.

Out: experiments/shapes_flow/results_<generator>.json by default. Keys: the run name
(outputs/<generator>/<name>), then for a sweep's jobs ' | ' and the job's overrides. Values: the run's
metrics.json (numbers, lists and flags as written), so the README columns can be read off one file.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml


def collect(root: Path) -> dict:
    out = {}
    for metrics in sorted(root.rglob("metrics.json")):
        run = metrics.parent
        name = str(run.relative_to(root))
        overrides = run / ".hydra" / "overrides.yaml"
        if overrides.is_file() and run.parent != root:  # a sweep job: name it by what it swept
            swept = [o for o in yaml.safe_load(overrides.read_text()) or [] if not o.startswith(
                ("generator=", "logger=", "threads=", "experiment=")) or o.startswith("experiment=noise")]
            swept = [o.replace("$\\{", "${").replace("\\}", "}") for o in swept]  # as typed, not as Hydra escapes
            name = f"{run.parent.relative_to(root)} | {' '.join(swept)}"
        out[name] = json.loads(metrics.read_text())
    return out


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/shapes_flow")
    dest = Path(sys.argv[2] if len(sys.argv) > 2 else f"experiments/shapes_flow/results_{root.name}.json")
    data = collect(root)
    dest.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(f"{len(data)} runs -> {dest}")
