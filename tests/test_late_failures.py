"""Issue 29 §3 (and §2's "loaded deltas are checked"): inputs that used to fail only after the model had
loaded, mostly with a traceback, are now one line `steerexp: error: <key>: <problem>; <fix>` (exit code 2)
before any model loads, or a bounded, clear behaviour where only the loaded run can tell.

CLI cases run `python -m steerexp.cli` and check: exit code 2, one line on stderr that starts with the exact
key, no traceback, nothing on stdout, an answer in the time a config error takes (no model was loaded: that
alone takes longer), and no run directory left behind."""
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image

from steerexp.errors import MAX_CHARS, ConfigError
from steerexp.validate import MAX_LIST, validate
from tests.helpers import compose_config

TI = "steerexp.techniques.textual_inversion.TextualInversion"
CONFIG_ERROR_SECONDS = 6.0  # as tests/test_cli.py: generous for a loaded machine, below any model load


def config_env():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", WANDB_MODE="disabled")
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def refused(tmp_path: Path, args: list[str], key: str, seconds: float = CONFIG_ERROR_SECONDS) -> str:
    """Run `steerexp <args>` in tmp_path; assert the one-line error of `key`, fast, no run dir. Returns the line."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "steerexp.cli", *args, "logger=none"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120, env=config_env())
    elapsed = time.perf_counter() - start
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.startswith(f"steerexp: error: {key}: "), out.stderr[-2000:]
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stdout == ""
    assert elapsed < seconds, f"{elapsed:.1f} s: the model was loaded?"
    assert not list(tmp_path.glob("outputs/*/*")), "a refused run leaves no run directory behind"
    return out.stderr


def error(overrides, key: str) -> ConfigError:
    """The validator's error (in-process) for these overrides, its key checked."""
    with pytest.raises(ConfigError) as info:
        validate(compose_config(list(overrides)))
    assert info.value.key == key, str(info.value)
    assert "\n" not in str(info.value) and len(str(info.value)) <= MAX_CHARS
    return info.value


@contextmanager
def deadline(seconds: int = 20):
    """Fail instead of hanging (a FIFO opened for reading blocks until a writer comes)."""
    def boom(*_):
        raise TimeoutError("blocked: the file was opened")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def png(path: Path, size=(16, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 30, 30)).save(path)
    return path


def folder_with(tmp_path: Path, name: str, bad) -> Path:
    """A folder of one good image and `bad` (a callable making x.png in it)."""
    folder = tmp_path / name
    png(folder / "a.png")
    bad(folder / "x.png")
    return folder


def deltas_file(path: Path, embeddings, technique: str | None = TI) -> Path:
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    meta = {"technique": technique, "structure": json.dumps({"num_vectors": 1})} if technique else None
    save_file({"embeddings": embeddings, "initial": torch.zeros(embeddings.shape[0], embeddings.shape[-1])},
              str(path), metadata=meta)
    return path


# ---------------------------------------------------------------------------- seeds
@pytest.mark.parametrize("args,key", [
    (["seed=18446744073709551616"], "seed"),                          # 2**64
    (["seed=1.5"], "seed"),
    (["eval.seeds=[0,9223372036854775808]"], "eval.seeds[1]"),        # 2**63
    (["eval.seeds=[0,1,-3]"], "eval.seeds[2]"),
    (["technique.seed=4294967296"], "technique.seed"),                # 2**32
    (["technique=prompt_delta", "objective=[concept_score]", "technique.train_seeds=[100,4294967296]"],
     "technique.train_seeds[1]"),
])
def test_seeds_out_of_range_are_refused(tmp_path, args, key):
    line = refused(tmp_path, args, key)
    assert "0..4294967295" in line


def test_seed_bounds_in_process():
    assert validate(compose_config(["seed=4294967295", "eval.seeds=[0,4294967295]"])) == []
    error(["technique.targets.seed=-1"], "technique.targets.seed")
    error(["seed=abc"], "seed")


# ---------------------------------------------------------------------------- control characters in prompts
@pytest.mark.parametrize("args,key,shown", [
    (["eval.prompts=['a photo of a {}','a red\n{}']"], "eval.prompts[1]", "newline"),
    (["technique.templates=['a photo of a {}','a\t{}']"], "technique.templates[1]", "tab"),
    (["technique.slot_word='st\x1bar'"], "technique.slot_word", "control character"),
])
def test_control_characters_in_prompts_are_refused(tmp_path, args, key, shown):
    line = refused(tmp_path, args, key)
    assert shown in line and "one line" in line


def test_control_characters_in_other_prompt_lists(tmp_path):
    error(["technique=prompt_delta", "objective=[concept_score]", "technique.prompts=['a {}','a\r{}']"],
          "technique.prompts[1]")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a green square\na red\x07 circle\n")
    err = error([f"evaluator.leakage.prompts={prompts}"], f"evaluator.leakage.prompts ({prompts})[1]")
    assert "\\x07" in str(err)


# ---------------------------------------------------------------------------- thin images
def test_a_thin_image_names_the_file_and_the_minimum(tmp_path):
    folder = folder_with(tmp_path, "thin", lambda p: png(p, (1, 5000)))
    line = refused(tmp_path, [f"technique.targets.folder={folder}"], "technique.targets.folder")
    assert str(folder / "x.png") in line and "1x5000" in line and "images.min_side=8" in line


def test_an_image_thinner_than_max_aspect_is_refused(tmp_path):
    folder = folder_with(tmp_path, "thin", lambda p: png(p, (5000, 100)))
    line = refused(tmp_path, [f"technique.targets.folder={folder}"], "technique.targets.folder")
    assert str(folder / "x.png") in line and "images.max_aspect=4" in line
    assert validate(compose_config([f"technique.targets.folder={folder}", "images.max_aspect=60"])) == []
    png(folder / "x.png", (64, 16))  # 4:1 is within the limit
    assert validate(compose_config([f"technique.targets.folder={folder}"])) == []
    error([f"technique.targets.folder={folder}", "images.max_aspect=0.5"], "images.max_aspect")


def test_the_loader_applies_the_same_rules(tmp_path):
    from steerexp import images

    with pytest.raises(ConfigError, match=r"x\.png is 10x5000, its longer side 500 times the shorter") as info:
        images.read_image(png(tmp_path / "x.png", (10, 5000)), "technique.targets.folder", 32)
    assert info.value.key == "technique.targets.folder"
    error([f"objective.terms.reconstruction.image={tmp_path / 'x.png'}", "technique=prompt_delta",
           "objective=[reconstruction]"], "objective.terms.reconstruction.image")


# ---------------------------------------------------------------------------- FIFOs and devices
def test_a_fifo_named_png_is_refused_without_blocking(tmp_path):
    folder = folder_with(tmp_path, "fifo", lambda p: os.mkfifo(p))
    line = refused(tmp_path, [f"technique.targets.folder={folder}"], "technique.targets.folder")
    assert "x.png is a FIFO" in line


def test_a_link_to_dev_zero_named_png_is_refused(tmp_path):
    folder = folder_with(tmp_path, "dev", lambda p: p.symlink_to("/dev/zero"))
    line = refused(tmp_path, [f"technique.targets.folder={folder}"], "technique.targets.folder")
    assert "x.png is a character device (a link to /dev/zero)" in line


def test_fifos_and_devices_elsewhere(tmp_path):
    from steerexp import images

    os.mkfifo(tmp_path / "x.png")
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    with deadline():
        with pytest.raises(ConfigError, match="FIFO"):
            images.read_image(tmp_path / "x.png", "technique.targets.folder", 32)
        with pytest.raises(ConfigError, match="character device"):
            images.load_image(tmp_path / "zero.png", "objective reconstruction.image")
        error(["technique=ddim_inversion", f"technique.targets.files=['{tmp_path / 'x.png'}']",
               "technique.targets.prompts='a red circle'"], "technique.targets.files[0]")
        error([f"ckpt_path={tmp_path / 'zero.png'}"], "ckpt_path")
        os.mkfifo(tmp_path / "prompts.txt")
        error([f"evaluator.leakage.prompts={tmp_path / 'prompts.txt'}"], "evaluator.leakage.prompts")


def test_a_fifo_checkpoint_is_refused(tmp_path):
    os.mkfifo(tmp_path / "deltas.safetensors")
    line = refused(tmp_path, ["technique.steps=0", f"ckpt_path={tmp_path / 'deltas.safetensors'}"], "ckpt_path")
    assert "FIFO" in line


# ---------------------------------------------------------------------------- checkpoints
def test_a_checkpoint_of_another_generator_names_the_shapes(tmp_path):
    torch = pytest.importorskip("torch")
    path = deltas_file(tmp_path / "deltas.safetensors", torch.zeros(1, 32))  # embedding dim 32; shapes has 64
    line = refused(tmp_path, ["technique.steps=0", f"ckpt_path={path}"], "ckpt_path")
    assert str(path) in line and "[1, 32]" in line and "[1, 64]" in line and "another generator" in line
    # a .ckpt says its shapes in its steerexp record: the same line, also before loading
    ckpt = tmp_path / "last.ckpt"
    record = {"technique": TI, "deltas": {"embeddings": [1, 32]}, "structure": {"num_vectors": 1}}
    torch.save({"state_dict": {"embeddings": torch.zeros(1, 32)}, "steerexp": record}, ckpt)
    Path(f"{ckpt}.json").write_text(json.dumps({"steerexp": record}))  # its sidecar, as steerexp writes it
    assert "[1, 32]" in str(error(["technique.steps=0", f"ckpt_path={ckpt}"], "ckpt_path"))


@pytest.mark.parametrize("what,make,shown", [
    ("nan", lambda t: t.full((1, 64), float("nan")), "64 non-finite values (NaN/inf)"),
    ("huge", lambda t: t.full((1, 64), 1e30), "norm 8e+30, over the limit of 10000"),
    ("huge_bf16", lambda t: t.full((1, 64), 1e30, dtype=t.bfloat16), "over the limit of 10000"),
    ("int", lambda t: t.ones(1, 64, dtype=t.int64), "as I64 values; deltas are floating point"),
])
def test_bad_delta_values_are_refused_before_loading(tmp_path, what, make, shown):
    torch = pytest.importorskip("torch")
    path = deltas_file(tmp_path / f"{what}.safetensors", make(torch))
    line = refused(tmp_path, ["technique.steps=0", f"ckpt_path={path}"], "ckpt_path")
    assert shown in line


def test_plain_deltas_pass(tmp_path):
    torch = pytest.importorskip("torch")
    path = deltas_file(tmp_path / "deltas.safetensors", torch.randn(1, 64) * 0.3)
    assert validate(compose_config(["technique.steps=0", f"ckpt_path={path}"])) == []
    path = deltas_file(tmp_path / "plain.safetensors", torch.randn(1, 64), technique=None)  # no steerexp record
    assert validate(compose_config(["technique.steps=0", f"ckpt_path={path}"])) == []
    error(["technique.steps=0", f"ckpt_path={deltas_file(tmp_path / 'p32.safetensors', torch.zeros(1, 32), None)}"],
          "ckpt_path")


def deltas_technique(steps: int = 0):
    """A trainable technique that holds one delta `embeddings` [1, 64] (zeros), without a generator."""
    torch = pytest.importorskip("torch")
    from steerexp.techniques.base import Trainable

    class Deltas(Trainable):
        def __init__(self):
            super().__init__(generator=None, steps=steps)
            self.embeddings = torch.nn.Parameter(torch.zeros(1, 64))

    return Deltas()


def test_loaded_deltas_are_checked_before_sampling(tmp_path):
    """What only the run can read (a .ckpt's values, any technique's shapes) is checked when the deltas load:
    one ConfigError naming ckpt_path, before any sampling, and the technique keeps its own deltas."""
    torch = pytest.importorskip("torch")
    from omegaconf import OmegaConf

    from steerexp.run import load_checkpoint_deltas

    technique = deltas_technique()
    for name, value, shown in (("nan", torch.full((1, 64), float("inf")), "non-finite"),
                               ("huge", torch.full((1, 64), 1e30), "over the limit of 10000"),
                               ("int", torch.ones(1, 64, dtype=torch.int32), "int32 values"),
                               ("shape", torch.zeros(1, 32), r"'embeddings' of shape \[1, 32\], but Deltas on "
                                                             r"this generator expects \[1, 64\]")):
        ckpt = tmp_path / f"{name}.ckpt"
        torch.save({"state_dict": {"embeddings": value}}, ckpt)
        with pytest.raises(ConfigError, match=shown) as info:
            load_checkpoint_deltas(OmegaConf.create({"ckpt_path": str(ckpt)}), technique)
        assert info.value.key == "ckpt_path" and str(ckpt) in str(info.value)
        assert torch.equal(technique.embeddings, torch.zeros(1, 64))  # nothing was loaded
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"embeddings": torch.ones(1, 64)}}, good)
    assert load_checkpoint_deltas(OmegaConf.create({"ckpt_path": str(good)}), technique) is True
    assert torch.equal(technique.embeddings, torch.ones(1, 64))


def test_a_safetensors_of_the_wrong_shape_is_refused_from_its_header(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    import safetensors

    from steerexp.run import read_checkpoint

    path = deltas_file(tmp_path / "d.safetensors", torch.zeros(1, 32), technique=None)

    def no_tensors(*a, **k):
        raise AssertionError("a tensor was read before the shapes were checked")

    monkeypatch.setattr(safetensors, "safe_open", no_tensors)
    with pytest.raises(ConfigError, match=r"holds 'embeddings' of shape \[1, 32\], but Deltas on this generator "
                                          r"expects \[1, 64\]") as info:
        read_checkpoint(path, deltas_technique())
    assert info.value.key == "ckpt_path"


# ---------------------------------------------------------------------------- caps
def test_more_than_the_cap_of_seeds_on_the_command_line_is_refused_before_hydra_parses_it(tmp_path):
    seeds = ",".join(map(str, range(MAX_LIST + 1)))  # Hydra's parser alone took 15 s for these
    line = refused(tmp_path, [f"eval.seeds=[{seeds}]"], "eval.seeds", seconds=CONFIG_ERROR_SECONDS / 2)
    assert f"holds {MAX_LIST + 1} seeds, over the limit of {MAX_LIST}" in line


# slow: Hydra alone builds a 10,001-seed config for ~20 s; the command-line cap is tested unmarked
@pytest.mark.slow
def test_more_than_the_cap_of_seeds_in_a_config_file_is_refused(tmp_path):
    (tmp_path / "conf" / "experiment").mkdir(parents=True)
    (tmp_path / "conf" / "experiment" / "many.yaml").write_text(
        "# @package _global_\neval:\n  seeds: [" + ", ".join(map(str, range(MAX_LIST + 1))) + "]\n")
    refused(tmp_path, ["--config-dir", str(tmp_path / "conf"), "experiment=many"], "eval.seeds",
            seconds=3 * CONFIG_ERROR_SECONDS)  # Hydra composes the 10,001 entries first (about 3 s)
    error([f"eval.prompts=[{','.join(['a'] * (MAX_LIST + 1))}]"], "eval.prompts")
    error(["technique=prompt_delta", "objective=[concept_score]",
           f"technique.train_seeds=[{','.join(map(str, range(MAX_LIST + 1)))}]"], "technique.train_seeds")


def test_more_than_the_cap_of_target_images_is_refused(tmp_path):
    from steerexp.images import MAX_IMAGES

    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(MAX_IMAGES + 1):  # counted before any file is read
        (folder / f"{i:05d}.png").touch()
    line = refused(tmp_path, [f"technique.targets.folder={folder}"], "technique.targets.folder")
    assert f"holds {MAX_IMAGES + 1} PNG/JPG images, over the cap of {MAX_IMAGES}" in line


def test_the_loader_caps_images_and_warns_once_per_kind_of_change(tmp_path, caplog):
    import logging

    from steerexp import images

    with pytest.raises(ConfigError, match=r"lists 1001 images, over the cap of 1000") as info:
        images.read_images([tmp_path / f"{i}.png" for i in range(1001)], "technique.protected", 16)
    assert info.value.key == "technique.protected"
    folder = tmp_path / "targets"
    for i in range(6):
        png(folder / f"big{i}.png", (64, 64))
    png(folder / "wide.png", (64, 32))
    with caplog.at_level(logging.WARNING, "steerexp.images"):
        batch, names = images.load_folder(folder, 16, "technique.targets.folder")
    lines = [r.getMessage() for r in caplog.records if r.name == "steerexp.images"]
    assert tuple(batch.shape) == (7, 3, 16, 16) and len(names) == 7
    assert len(lines) == 2, lines  # six downscaled the same way: one line; the cropped one: its own
    assert lines[0].startswith("6 of 7 images (technique.targets.folder) were changed the same way, e.g. ")
    assert "big0.png: downscaled 64->16 px" in lines[0]
    assert "wide.png" in lines[1] and "centre-cropped 64x32" in lines[1]


def test_huge_num_vectors_is_a_short_line(tmp_path):
    line = refused(tmp_path, ["technique.num_vectors=10000"], "technique.num_vectors")
    assert len(line) < 300  # was a 99 KB "one-line" error


def test_every_error_message_is_one_short_line():
    err = ConfigError("eval.prompts[0]", "holds " + "<v*> " * 20000 + "\nand more", "fix\nit " * 1000)
    text = str(err)
    assert len(text) <= MAX_CHARS and "\n" not in text and "…" in text
    assert text.startswith("eval.prompts[0]: holds <v*>") and "; fix\\nit" in text
    assert err.problem.startswith("holds") and err.key == "eval.prompts[0]"  # the parts stay whole
    assert str(ConfigError("k", "a\tb")) == "k: a\\tb"


# ---------------------------------------------------------------------------- steerexp-report
def report(tmp_path: Path, directory) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "steerexp.report", str(directory), "--wandb", "disabled"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120, env=config_env())


@pytest.mark.parametrize("case", ["empty", "missing", "corrupt", "not_an_object", "corrupt_config"])
def test_report_on_a_folder_it_cannot_read_is_one_line(tmp_path, case):
    root = tmp_path / "sweep"
    root.mkdir()
    key, run = "directory", root / "0"
    if case == "missing":
        root = tmp_path / "nowhere"
    elif case == "corrupt":
        run.mkdir()
        (run / "metrics.json").write_text('{"concept/target_rate/edited": 0.5,')  # cut off mid-write
        key = str(run / "metrics.json")
    elif case == "not_an_object":
        run.mkdir()
        (run / "metrics.json").write_text("[1, 2]")
        key = str(run / "metrics.json")
    elif case == "corrupt_config":
        (run / ".hydra").mkdir(parents=True)
        (run / "metrics.json").write_text("{}")
        (run / ".hydra" / "config.yaml").write_text("seed: [unclosed\n")
        key = str(run / ".hydra" / "config.yaml")
    out = report(tmp_path, root)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.startswith(f"steerexp-report: error: {key}: "), out.stderr[-2000:]
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
