"""The worked example of docs/architecture.md: a new technique in two files (one .py, one .yaml),
outside the package, runs end to end with the allowlist opt-in."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

DOC = Path(__file__).parents[1] / "docs" / "architecture.md"
STEERXP = str(Path(sys.executable).parent / "steerexp")


def example_files() -> dict[str, str]:
    """'`path`:' followed by a fenced block -> {path: code}."""
    text = DOC.read_text()
    return dict(re.findall(r"`([\w/]+\.(?:py|yaml))`:\s*\n\s*```\w+\n(.*?)```", text, flags=re.S))


def test_the_documented_technique_runs_from_its_two_files(shipped, tmp_path):
    files = example_files()
    assert set(files) == {"my_lab/prompt_append.py", "my_conf/technique/prompt_append.yaml"}
    for rel, code in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(code)
    args = ["--config-dir", "my_conf", "technique=prompt_append", "concept.head=size", "concept.target=large",
            "evaluator=[concept]", "logger=none", "eval.seeds=[0,1]", "eval.prompts=['a photo of a red {}']",
            "sampling.steps=4", "hydra.run.dir=run"]
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    refused = subprocess.run([STEERXP, *args], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert refused.returncode == 2 and "my_lab.prompt_append.PromptAppend" in refused.stderr  # not allowlisted
    env["STEEREXP_ALLOW_TARGETS"] = "my_lab."
    out = subprocess.run([STEERXP, *args], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["generator/unchanged"] is True
    assert 0.0 <= metrics["concept/target_rate/edited"] <= 1.0 and "concept/paired_diff/mean" in metrics
