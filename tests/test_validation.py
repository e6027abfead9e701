"""The config validator (steerexp.validate): every config error is found on the composed config,
before torch or any model loads, as one ConfigError naming the key and the fix."""
import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from steerexp import ASSETS
from steerexp.errors import ConfigError
from steerexp.generators.checks import gpu_count
from steerexp.validate import SlotTokenizer, check_group_overrides, read_checkpoint_info, slot_tokenizer, validate
from tests.helpers import compose_config
from tests.helpers.pipelines import pipeline_copy

SHAPES = ASSETS / "shapes"
TI = "steerexp.techniques.textual_inversion.TextualInversion"


def composed(overrides):
    """compose_config, with a value Hydra refuses while composing (a type a spec declares) as the one-line
    ConfigError the CLI gives (preflight.compose_error)."""
    from hydra.errors import HydraException

    from steerexp.preflight import compose_error

    try:
        return compose_config(overrides)
    except HydraException as err:
        one_line = compose_error(err)
        if one_line is None:
            raise
        raise one_line from None


def error(overrides, key=None) -> ConfigError:
    """The ConfigError that validating these overrides raises (its key checked when given)."""
    with pytest.raises(ConfigError) as info:
        validate(composed(overrides))
    if key is not None:
        assert info.value.key == key, str(info.value)
    assert "\n" not in str(info.value)
    return info.value


def ok(overrides=()) -> list[str]:
    return validate(compose_config(list(overrides)))


def replace(path: Path, data: bytes | str) -> None:
    path.unlink()
    path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)


# ---------------------------------------------------------------------------- the shipped configs pass
def test_every_shipped_config_validates_without_heavy_imports():
    from steerexp import conf_dir

    sets = [[]] + [[f"experiment={p.stem}"] for p in (conf_dir() / "experiment").glob("*.yaml")]
    sets += [[f"technique={p.stem}"] for p in (conf_dir() / "technique").glob("*.yaml")]
    from steerexp.techniques.input_delta_spec import PromptDeltaSpec

    sets += [["technique=prompt_delta", f"objective=[{p.stem}]"] for p in (conf_dir() / "objective").glob("*.yaml")
             if p.stem not in PromptDeltaSpec.refuses_objective]   # (denoising: refused, test_input_delta_specs)
    # the evaluators that apply to the default technique (each technique x evaluator pair: tests/test_contract.py)
    sets += [["evaluator=[clip,concept,leakage,memorisation,quality]"]]
    for overrides in sets:
        assert ok(overrides) == [], overrides


def test_validate_imports_nothing_heavy():
    code = ("import sys; from tests.helpers import compose_config; from steerexp.validate import validate; "
            "validate(compose_config([])); validate(compose_config(['generator=sd', "
            f"'generator.path={SHAPES}', 'generator.dtype=fp32', 'generator.device=cpu']));"
            "print([m for m in ('torch', 'lightning', 'diffusers', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------------- seeds and prompt lists
# key -> override sets that must each be refused with an error naming that key
BAD_VALUES = {
    'eval.seeds': [['eval.seeds=[]'], ['eval.seeds=3']],
    'eval.prompts': [['eval.prompts=[]'], ["eval.prompts='a {}'"]],
    'seed': [['seed=abc'], ['seed=-1']],
    'eval.seeds[1]': [['eval.seeds=[0,x]'], ['eval.seeds=[0,1.5]']],
    'technique.lr': [
        ['technique.lr=${nope}'],
        ['technique.lr=nan'],
        ['technique.lr=0'],
        ['technique.lr=-1e-3'],
        ['technique.lr=abc'],
    ],
    'sampling.steps': [['sampling.steps=0'], ['sampling.steps=5000'], ['sampling.steps=abc']],
    'sampling.guidance_scale': [
        ['sampling.guidance_scale=-1'],
        ['sampling.guidance_scale=nan'],
        ['sampling.guidance_scale=inf'],
    ],
    'technique.train_sampling_steps': [['technique=prompt_delta', 'technique.train_sampling_steps=0']],
    'technique.batch_size': [['technique.batch_size=0']],
    'technique.steps': [['technique.steps=-1']],
    'technique.num_vectors': [['technique.num_vectors=0']],
    'trainer.checkpoint_every': [['trainer.checkpoint_every=-1'], ['trainer.checkpoint_every=0']],
    'technique.placeholder': [["technique.placeholder=''"], ["technique.placeholder='<v *>'"]],
    'technique.opt_lr': [['technique=nudging', 'technique.opt_lr=nan']],
}


@pytest.mark.parametrize("overrides,key", [(o, k) for k, sets in BAD_VALUES.items() for o in sets])
def test_bad_values_name_their_key(overrides, key):
    error(overrides, key)


# ---------------------------------------------------------------------------- sampling


def test_sampling_steps_limit_comes_from_the_folders_scheduler(tmp_path):
    folder = pipeline_copy(tmp_path / "pipe")
    sched = json.loads((SHAPES / "scheduler" / "scheduler_config.json").read_text()) | {"num_train_timesteps": 50}
    replace(folder / "scheduler" / "scheduler_config.json", json.dumps(sched))
    ok([f"generator.path={folder}", "sampling.steps=50"])
    err = error([f"generator.path={folder}", "sampling.steps=60"], "sampling.steps")
    assert "50" in str(err)
    ok(["sampling.steps=1000"])  # the shipped scheduler: 1000


# ---------------------------------------------------------------------------- prompt templates
@pytest.mark.parametrize("prompt,problem", [
    ("a {} next to a {}", "2 '{}' slots"),   # str.format: IndexError in textual inversion
    ("a {name}", "{name}"),                   # KeyError
    ("a {0}", "{0}"),
    ("a red circle", "no '{}' slot"),         # baseline == edited
    ("a { broken", "unmatched"),
])
def test_textual_inversion_prompts_need_exactly_one_slot(prompt, problem):
    err = error([f"eval.prompts=['a photo of a {{}}','{prompt}']"], "eval.prompts[1]")
    assert problem in str(err)


def test_slots_of_other_prompt_lists():
    error(["technique.templates=['a {}','a {} and a {}']"], "technique.templates[1]")
    error(["evaluator.leakage.prompts=['a red circle','a {name}']"], "evaluator.leakage.prompts[1]")
    ok(["evaluator.leakage.prompts=['a red circle','a blue square']"])  # unrelated prompts need no slot
    ok(["technique=guidance", "eval.prompts=['a red circle']"])  # the edit is not in the slot here
    error(["technique=guidance", "eval.prompts=['a {name}']"], "eval.prompts[0]")
    ok(["experiment=nti_edit"])  # '{}' is each target's source prompt


def test_leakage_prompt_file(tmp_path):
    error([f"evaluator.leakage.prompts={tmp_path / 'none.txt'}"], "evaluator.leakage.prompts")
    (tmp_path / "p.txt").write_text("a red circle\na {} and a {}\n")
    err = error([f"evaluator.leakage.prompts={tmp_path / 'p.txt'}"])
    assert err.key.startswith("evaluator.leakage.prompts")
    (tmp_path / "p.txt").write_text("a red circle\na blue square\n")
    ok([f"evaluator.leakage.prompts={tmp_path / 'p.txt'}"])


def long_prompt(words: int, tail: str = "") -> str:
    return "a photo of " + "a very " * words + "{}" + tail


def test_a_slot_past_the_tokenizer_limit_is_an_error_a_truncated_tail_a_warning():
    # shipped tokenizer: 32 tokens (start + 30 + end); "a photo of" = 3 tokens, "a very" = 2
    assert slot_tokenizer(SHAPES / "tokenizer").max_length == 32
    ok([f"eval.prompts=['{long_prompt(13)}']"])  # star at token 30: kept
    err = error([f"eval.prompts=['{long_prompt(14)}']"], "eval.prompts[0]")  # token 32: cut
    assert "limit" in str(err) and "32" in str(err)
    warnings = ok([f"eval.prompts=['{long_prompt(10, ' ' + 'on the left ' * 5)}']"])
    assert len(warnings) == 1 and "eval.prompts[0]" in warnings[0] and "dropped" in warnings[0]
    # three learned vectors need three tokens where the baseline word needs one
    ok([f"eval.prompts=['{long_prompt(13)}']", "technique.num_vectors=1"])
    error([f"eval.prompts=['{long_prompt(13)}']", "technique.num_vectors=3"], "eval.prompts[0]")


def test_the_slot_check_agrees_with_the_generators_tokenizer(tmp_path):
    """Exactness against transformers' CLIPTokenizer (tokenizer.json, and vocab.json + merges.txt only):
    the slot survives truncation exactly when the validator says so."""
    from transformers import CLIPTokenizer

    bare = tmp_path / "tok"
    bare.mkdir()
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"):
        (bare / name).write_bytes((SHAPES / "tokenizer" / name).read_bytes())
    added = ["<v*>", "<v*>_1"]
    templates = [long_prompt(n, tail) for n in (10, 13, 14, 15) for tail in ("", " at the top, café 3x!")]
    templates += ["A  Photo\tof a {}'s   thing", "x{}y", "a {}s"]
    for folder in (SHAPES / "tokenizer", bare):
        hf = CLIPTokenizer.from_pretrained(str(folder))
        hf.add_tokens(added)
        ours = SlotTokenizer(folder)
        ours.add_tokens(added)
        assert ours.max_length == hf.model_max_length
        for t in templates:
            for fill in ("star", "<v*> <v*>_1"):
                text = t.replace("{}", fill)
                assert ours.tok.encode(text).ids == hf(text).input_ids, text
                if t in ("x{}y", "a {}s"):
                    continue  # the fill merges with its neighbours: no token sequence of its own
                last, total = ours.slot_end(t, fill)
                assert total == len(hf(text).input_ids)
                kept = hf(text, truncation=True, max_length=hf.model_max_length).input_ids
                slot_ids = hf(fill, add_special_tokens=False).input_ids
                assert (last <= ours.max_length - 2) == (kept[last - len(slot_ids) + 1:last + 1] == slot_ids), text


def test_placeholder_and_initializer_against_the_vocabulary():
    error(["technique.placeholder=star"], "technique.placeholder")  # a word the tokenizer has
    error(["technique.initializer=abcxyzqq"], "technique.initializer")  # several tokens


# ---------------------------------------------------------------------------- technique and trainer numbers


def test_zero_steps_is_allowed():
    ok(["technique.steps=0"])


# ---------------------------------------------------------------------------- generator
def test_gpu_count_reads_cuda_visible_devices(monkeypatch):
    for value in ("", "-1", " "):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
        assert gpu_count() == 0


def test_cuda_without_a_gpu(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    err = error(["generator.device=cuda"], "generator.device")
    assert "cpu" in str(err)
    error(["generator.device=cuda:0"], "generator.device")
    monkeypatch.setattr("steerexp.generators.checks.gpu_count", lambda: 1)
    ok(["generator.device=cuda:0"])
    error(["generator.device=cuda:1"], "generator.device")
    error(["generator.device='cuda 0'"], "generator.device")


def test_generator_path_before_dtype(monkeypatch, tmp_path):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    err = error(["generator=sd", "generator.path=/nonexistent"], "generator.path")  # not the fp16 error
    assert "/nonexistent" in str(err)
    error(["generator=sd"], "generator.path")  # ??? : required
    error(["generator=sd", f"generator.path={SHAPES}"], "generator.dtype")  # fp16 + auto on a CPU machine
    error(["generator=sd", f"generator.path={SHAPES}", "generator.device=cpu"], "generator.dtype")
    error(["generator.dtype=fp8"], "generator.dtype")
    ok(["generator=sd", f"generator.path={SHAPES}", "generator.dtype=fp32"])
    ok(["generator=sd", f"generator.path={SHAPES}", "generator.dtype=bf16", "generator.device=cpu"])
    ok(["generator=sd", "generator.path=org/some-model", "generator.dtype=fp32"])  # a hub id: the loader's job


def test_broken_pipeline_files_are_named(tmp_path):
    folder = pipeline_copy(tmp_path / "index")
    replace(folder / "model_index.json", '{"_class_name": "StableDiffusionPipeline", "unet": [')
    err = error([f"generator.path={folder}"], "generator.path")
    assert "model_index.json" in str(err) and "not valid JSON" in str(err) and "hub" not in str(err)

    folder = pipeline_copy(tmp_path / "truncated")
    data = (SHAPES / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    replace(folder / "unet" / "diffusion_pytorch_model.safetensors", data[: 8 + n + 100])
    err = error([f"generator.path={folder}"], "generator.path")
    assert "unet/diffusion_pytorch_model.safetensors" in str(err) and "truncated" in str(err)

    replace(folder / "unet" / "diffusion_pytorch_model.safetensors", struct.pack("<Q", 10 ** 6) + b"{}")
    assert "header claims" in str(error([f"generator.path={folder}"], "generator.path"))

    folder = pipeline_copy(tmp_path / "no_vae")
    for p in sorted((folder / "vae").iterdir()):
        p.unlink()
    (folder / "vae").rmdir()
    assert "vae" in str(error([f"generator.path={folder}"], "generator.path"))

    folder = pipeline_copy(tmp_path / "bad_config")
    replace(folder / "text_encoder" / "config.json", "{not json")
    assert "text_encoder/config.json" in str(error([f"generator.path={folder}"], "generator.path"))
    error([f"generator.path={tmp_path}"], "generator.path")  # no model_index.json


def test_a_presets_term_settings_without_the_term_are_one_error():
    """A preset that sets a term's values (latent_offset_layout: attribute_keep) with objective=[...] that drops
    the term: one line that names the key and both fixes, not a failure at instantiation."""
    err = error(["experiment=latent_offset_layout", "objective=[concept_score]"], "objective.terms.attribute_keep")
    assert "objective=[...,attribute_keep]" in str(err) and "'~objective.terms.attribute_keep'" in str(err)
    ok(["experiment=latent_offset_layout", "objective=[concept_score]", "~objective.terms.attribute_keep"])
    ok(["experiment=latent_offset_layout"])
    key = "objective.terms.attribute_keep.heads"
    err = error(["experiment=latent_offset_layout", f"{key}=[position,shape]"], key)  # the head the edit moves
    assert "concept_score moves" in str(err) and f"{key}=[shape]" in str(err)
    assert "['hue']" in str(error(["experiment=latent_offset_layout", f"{key}=[hue]"], key))
    error(["experiment=latent_offset_layout", f"{key}=[]"], key)
    scorer = "objective.terms.attribute_keep.scorer"
    assert "one-head model" in str(error(["experiment=latent_offset_layout", f"{scorer}=user"], scorer))
    err = error(["experiment=latent_offset_layout", "evaluator=[]"], "evaluator.leakage")  # the same for evaluators
    assert "evaluator=[...,leakage]" in str(err) and "'~evaluator.leakage'" in str(err)
    ok(["experiment=latent_offset_layout", "evaluator=[]", "~evaluator.leakage"])


def test_proximity_border_is_checked_before_loading():
    base = ["technique=prompt_delta", "objective=[concept_score,proximity]"]
    ok(base + ["objective.terms.proximity.border=2"])
    for bad in ("0", "true", "2.5", "-1"):
        error(base + [f"objective.terms.proximity.border={bad}"], "objective.terms.proximity.border")


def test_nudging_keep_is_checked_before_loading():
    """technique.keep (nudging's attribute_keep on the initial output): the same checks, under its own key. On
    technique=nudging keep is null, so an override sets it whole (on the preset a dict override merges into it)."""
    ok(["experiment=nudging_memorisation"])
    ok(["experiment=nudging_memorisation", "technique.keep=null"])
    base = ["technique=nudging"]
    ok(base + ["technique.keep={heads:[colour,shape],weight:1.0,scorer:robust}"])
    error(base + ["technique.keep={heads:[],scorer:robust}"], "technique.keep.heads")
    assert "['hue']" in str(error(base + ["technique.keep={heads:[hue]}"], "technique.keep.heads"))
    error(base + ["technique.keep={heads:[colour],weight:-1}"], "technique.keep.weight")
    error(base + ["technique.keep={heads:[colour],weight:inf}"], "technique.keep.weight")
    error(base + ["technique.keep=[colour]"], "technique.keep")
    error(base + ["technique.keep={}"], "technique.keep.heads")
    error(base + ["technique.keep={heads:[colour],scorer:nope}"], "technique.keep.scorer")
    assert "no image classifier" in str(error(base + ["technique.keep={heads:[colour],scorer:clip}"],
                                              "technique.keep.scorer"))
    error(base + ["technique.keep={heads:[colour],ref:start}"], "technique.keep")
    assert "mode=noise" in str(error(base + ["technique.mode=noise", "technique.keep={heads:[colour]}"],
                                      "technique.keep"))


# ---------------------------------------------------------------------------- files and folders
def test_missing_files_and_folders(tmp_path):
    missing = tmp_path / "missing"
    cases = [
        ([f"scorers.classifier={missing}"], "scorers.classifier"),
        ([f"scorers.classifier={tmp_path}"], "scorers.classifier"),  # a folder without config.json
        ([f"scorers.user.path={missing}.pt", "scorers.user.classes=[a]"], "scorers.user.path"),
        (["scorers.user.path=no_such_module_xyz:make", "scorers.user.classes=[a]"], "scorers.user.path"),
        ([f"scorers.user.path={missing}", "scorers.user.classes=[a]"], "scorers.user.path"),
        ([f"scorers.user.path={tmp_path / 'a.png'}"], "scorers.user.classes"),  # a user model needs its class names
        ([f"scorers.clip.pretrained={missing}.safetensors"], "scorers.clip.pretrained"),
        ([f"technique.targets.folder={missing}"], "technique.targets.folder"),
        ([f"technique.targets.folder={tmp_path}"], "technique.targets.folder"),  # no images in it
        (["technique=prompt_delta", "objective=[clip_similarity]", "objective.terms.clip_similarity.text=null",
          f"objective.terms.clip_similarity.image={missing}.png"], "objective.terms.clip_similarity.image"),
        (["technique=prompt_delta", "objective=[reconstruction]",
          f"objective.terms.reconstruction.image={missing}.png"], "objective.terms.reconstruction.image"),
        ([f"evaluator.clip.pretrained={missing}.safetensors"], "evaluator.clip.pretrained"),
        (["technique=ddim_inversion", f"technique.targets.files={missing}", "technique.targets.prompts='a red circle'"],
         "technique.targets.files"),
        (["technique=ddim_inversion", f"technique.targets.files=['{missing}.png']",
          "technique.targets.prompts='a red circle'"], "technique.targets.files[0]"),
        (["technique=ddim_inversion", f"technique.targets.files={missing}"], "technique.targets.prompts"),
        (["technique=nudging", f"technique.protected={missing}"], "technique.protected"),
        (["technique=nudging", f"technique.exemplars={missing}"], "technique.exemplars"),
    ]
    for overrides, key in cases:
        error(overrides, key)
    from PIL import Image

    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")  # a real one: the validator reads every image's header
    ok([f"technique.targets.folder={tmp_path}"])
    ok([f"scorers.classifier={ASSETS / 'classifier'}"])
    ok(["scorers.classifier="])  # empty: the shipped one, as the run reads it


# ---------------------------------------------------------------------------- checkpoints
def fake_ckpt(path: Path, technique: str = TI, num_vectors: int = 1, steerexp: bool = True) -> Path:
    """A checkpoint as steerexp writes one: last.ckpt plus its JSON sidecar (trainer.Sidecar), which holds the
    identity validation reads; steerexp=False: a checkpoint without one (of other origin, or older)."""
    torch = pytest.importorskip("torch")
    entry = {"steerexp": {"technique": technique, "deltas": {"embeddings": [num_vectors, 64]},
                          "structure": {"num_vectors": num_vectors}}} if steerexp else {}
    torch.save({"epoch": 0, "global_step": 4, "pytorch-lightning_version": "2.6.6",
                "state_dict": {"embeddings": torch.nn.Parameter(torch.zeros(num_vectors, 64)),
                               "initial": torch.zeros(num_vectors, 64, dtype=torch.bfloat16)},
                "optimizer_states": [{"state": {0: {"step": torch.tensor(4.0), "exp_avg": torch.zeros(3)}},
                                      "param_groups": [{"lr": 0.005, "betas": (0.9, 0.999), "params": [0]}]}],
                "loops": {"fit_loop": {"state_dict": {}}}, "callbacks": {}, "lr_schedulers": [], **entry}, path)
    if steerexp:
        Path(f"{path}.json").write_text(json.dumps({"global_step": 4, **entry}))
    return path


def test_checkpoint_checks(tmp_path):
    error([f"ckpt_path={tmp_path / 'missing.ckpt'}"], "ckpt_path")
    error([f"ckpt_path={tmp_path}"], "ckpt_path")
    good = fake_ckpt(tmp_path / "good.ckpt")
    assert read_checkpoint_info(good)["structure"] == {"num_vectors": 1}
    ok([f"ckpt_path={good}"])
    err = error([f"ckpt_path={fake_ckpt(tmp_path / 'other.ckpt', 'steerexp.techniques.input_delta.InputDelta')}"],
                "ckpt_path")
    assert "InputDelta" in str(err) and "TextualInversion" in str(err)
    err = error([f"ckpt_path={fake_ckpt(tmp_path / 'nv2.ckpt', num_vectors=2)}"], "technique.num_vectors")
    assert "technique.num_vectors=2" in str(err) and "this run has 1" in str(err)
    ok([f"ckpt_path={tmp_path / 'nv2.ckpt'}", "technique.num_vectors=2"])
    ok([f"ckpt_path={fake_ckpt(tmp_path / 'old.ckpt', steerexp=False)}"])  # no record: the load checks it


def test_deltas_safetensors_metadata(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    torch = pytest.importorskip("torch")
    path = tmp_path / "deltas.safetensors"
    st.save_file({"embeddings": torch.zeros(2, 64)}, str(path),
                 metadata={"technique": TI, "structure": json.dumps({"num_vectors": 2})})
    error([f"ckpt_path={path}"], "technique.num_vectors")
    ok([f"ckpt_path={path}", "technique.num_vectors=2"])


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_checkpoint_checks_never_unpickle_the_file(tmp_path, monkeypatch):
    """Identity comes from the JSON sidecar only: a checkpoint whose pickle would run code is never unpickled
    before loading (and the load itself is torch.load(weights_only=True))."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.ckpt"
    payload = pickle.dumps({"steerexp": {"technique": "x", "structure": {}}, "boom": _Evil()}, protocol=2)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", payload)
    assert read_checkpoint_info(path) is None  # no sidecar: nothing is read from the file before loading
    from steerexp.run import read_checkpoint

    with pytest.raises(ConfigError, match="not a readable weights-only checkpoint"):  # and the load refuses it
        read_checkpoint(path)
    ok([f"ckpt_path={path}"])
    assert not (tmp_path / "PWNED").exists()
    Path(f"{path}.json").write_text("not json")
    assert read_checkpoint_info(path) is None


# ---------------------------------------------------------------------------- group overrides before Hydra
def test_group_overrides_name_existing_options(tmp_path):
    for argv in (["evaluator=[concpt]"], ["+evaluator=[concept,leakge]"], ["-m", "technique=textual_inversion,nope"],
                 ["generator=sdxl"]):
        with pytest.raises(ConfigError) as info:
            check_group_overrides(argv)
        assert info.value.key == argv[-1].lstrip("+").split("=")[0]
        assert "choose from" in str(info.value)
    assert "concept, edit" in str(pytest.raises(ConfigError, check_group_overrides, ["evaluator=[concpt]"]).value)
    for argv in (["evaluator=[concept,leakage]"], ["-m", "technique=guidance,textual_inversion", "seed=0,1"],
                 ["~evaluator"], ["experiment=null"], ["hydra/launcher=basic"], ["--help"], []):
        check_group_overrides(argv)
    extra = tmp_path / "conf" / "technique"
    extra.mkdir(parents=True)
    (extra / "mine.yaml").write_text("_target_: steerexp.techniques.guidance.GuidanceTuning\n")
    check_group_overrides(["--config-dir", str(tmp_path / "conf"), "technique=mine"])


def test_targets_pass_the_allowlist():
    pytest.importorskip("steerexp.safety")
    error(["technique._target_=os.system"], "technique._target_")
