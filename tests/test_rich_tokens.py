"""Richer tokens for textual inversion (issue 34, section 2): P+ / XTI (a token per cross-attention layer) and NeTI
(a mapper from (timestep, layer) to the token), techniques/xti.py and techniques/neti.py."""
from __future__ import annotations


import pytest
import torch
from safetensors.torch import load_file

from steerexp.errors import ConfigError
from tests.helpers import compose_config, tiny_run

SAMPLING = {"steps": 3, "guidance_scale": 5.0}


def _technique(gen, name, placeholder, **kw):
    from steerexp.techniques.neti import NeTI
    from steerexp.techniques.textual_inversion import TextualInversion
    from steerexp.techniques.xti import XTI

    cls = {"ti": TextualInversion, "xti": XTI, "neti": NeTI}[name]
    t = cls(gen, placeholder=placeholder, steps=2, batch_size=2, sampling=SAMPLING, **kw)
    t.prepare()
    return t


def _processors(unet):
    return {k: v for k, v in unet.attn_processors.items()}


# ---------------------------------------------------------------------------- the layers get their own tokens
def test_layer_groups_cover_every_cross_attention_layer_in_unet_order(gen):
    from steerexp.techniques.xti import cross_attention_layers, layer_groups

    layers = cross_attention_layers(gen.unet)
    assert len(layers) == 7 and all(n.endswith("attn2") for n in layers)
    assert [n.split(".")[0] for n in layers] == ["down_blocks"] * 2 + ["mid_block"] + ["up_blocks"] * 4
    assert layer_groups(layers, "per_layer") == [[n] for n in layers]
    assert [len(g) for g in layer_groups(layers, "per_block")] == [1, 1, 1, 2, 2]
    assert [len(g) for g in layer_groups(layers, 3)] == [2, 3, 2]
    for k in (1, 3, 7):
        assert sum(layer_groups(layers, k), []) == layers
    with pytest.raises(ValueError, match="technique.layers=8 groups, but this UNet has 7"):
        layer_groups(layers, 8)


def test_each_layer_reads_the_conditioning_of_its_own_token(gen):
    """The states every cross-attention processor receives are the prompt encoded with its group's token; changing
    group k's token leaves every layer before k (in execution order) bit-identical and changes layer k."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    t = _technique(gen, "xti", "<x-layers>")
    with torch.no_grad():
        noise = torch.randn(t.embeddings.shape, generator=torch.Generator().manual_seed(0))
        t.embeddings.copy_(t.initial + 0.3 * noise)
    seen, outputs = {}, {}

    class Recorder(AttnProcessor2_0):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
            if encoder_hidden_states is not None:
                seen[self.name] = encoder_hidden_states.clone()
            out = super().__call__(attn, hidden_states, encoder_hidden_states, *args, **kwargs)
            outputs[self.name] = out.clone()
            return out

    before = _processors(gen.unet)
    prompt = ["a red <x-layers>"]
    x = gen.initial_latents([0])
    tstep = torch.tensor(500)
    try:
        gen.unet.set_attn_processor({k: Recorder(k[: -len(".processor")]) if "attn2" in k else v
                                     for k, v in before.items()})
        with torch.no_grad(), t.layer_control():
            gen.denoise(x, tstep, t.stacked(prompt, t.tables(t.embeddings)))
            first = dict(outputs)
            for g, names in enumerate(t.groups):
                own = gen.encode_prompt(prompt, t.tables(t.embeddings[g]))
                for name in names:
                    assert torch.equal(seen[name], own), name
            assert not torch.equal(seen[t.groups[0][0]], seen[t.groups[1][0]])  # the tokens differ per layer
            k = 3
            moved = t.embeddings.clone()
            moved[k] += 0.5 * torch.randn(moved.shape[1:], generator=torch.Generator().manual_seed(1))
            gen.denoise(x, tstep, t.stacked(prompt, t.tables(moved)))
    finally:
        gen.unet.set_attn_processor(dict(before))
    order = t.layer_names  # execution order of the UNet: down, mid, up
    for name in order[:k]:
        assert torch.equal(outputs[name], first[name]), f"{name} runs before layer {k} and must not change"
    assert (outputs[order[k]] - first[order[k]]).abs().max() > 1e-4


def test_one_group_is_textual_inversion_bit_for_bit(gen):
    """technique.layers=1: the same tokens give the same images as textual inversion, through the processors."""
    ti = _technique(gen, "ti", "<x-ti>")
    xti = _technique(gen, "xti", "<x-one>", layers=1)
    with torch.no_grad():
        v = ti.initial + 0.2 * torch.randn(ti.initial.shape, generator=torch.Generator().manual_seed(2))
        ti.embeddings.copy_(v)
        xti.embeddings.copy_(v[None])
    a = ti.generate(["a red {}"], [3], edited=True)
    b = xti.generate(["a red {}"], [3], edited=True)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["xti", "neti"])
def test_processors_are_removed_and_the_generator_unchanged(gen, name):
    t = _technique(gen, name, f"<x-clean-{name}>")
    before, fingerprint = _processors(gen.unet), gen.fingerprint()
    edited = t.generate(["a {}"], [0], edited=True)
    assert edited.shape[0] == 1 and _processors(gen.unet) == before
    t.training_loss((torch.tensor([0, 1]),)).backward()
    assert _processors(gen.unet) == before
    with pytest.raises(RuntimeError, match="boom"), t.layer_control():
        assert _processors(gen.unet) != before
        raise RuntimeError("boom")
    assert _processors(gen.unet) == before  # put back on error too
    assert gen.fingerprint() == fingerprint and gen.unchanged()
    trainable = [n for n, p in t.named_parameters() if p.requires_grad]
    assert trainable == (["embeddings"] if name == "xti" else [n for n, _ in t.named_parameters()])
    assert name == "xti" or all(n.startswith("mapper.") for n in trainable)


# ---------------------------------------------------------------------------- NeTI's mapper
def test_neti_tokens_depend_on_timestep_and_layer(gen):
    t = _technique(gen, "neti", "<x-neti>")
    with torch.no_grad():
        v = t.vectors_at(torch.tensor([0.0, 999.0]))  # [2 timesteps, G, 1, D]
    assert v.shape == (2, 7, 1, gen.token_dim)
    assert (v[0] - v[1]).abs().max() > 1e-3 and (v[0, 0] - v[0, 1]).abs().max() > 1e-3
    norms = v.norm(dim=-1)
    assert torch.allclose(norms, t.initial.norm(dim=-1).expand_as(norms), atol=1e-5)  # the initializer's norm
    cond = t.edited_cond(["a <x-neti>"])
    a, b = cond(torch.tensor(10.0), 0), cond(torch.tensor(900.0), 1)
    assert a.shape == (1, 7 * 32, gen.embed_dim) and (a - b).abs().max() > 1e-4


def test_exports_round_trip(gen, tmp_path):
    from steerexp.techniques.neti import load_neti
    from steerexp.techniques.xti import load_xti

    xti = _technique(gen, "xti", "<x-exp>", layers="per_block")
    with torch.no_grad():
        xti.embeddings.add_(torch.randn(xti.embeddings.shape, generator=torch.Generator().manual_seed(3)))
    assert xti.export(tmp_path) == ["xti_embeds.safetensors"]
    vectors, meta = load_xti(tmp_path / "xti_embeds.safetensors")
    assert set(vectors) == set(xti.layer_names) and meta["groups"] == xti.groups and meta["placeholder"] == "<x-exp>"
    for g, names in enumerate(xti.groups):
        for n in names:
            assert torch.equal(vectors[n], xti.embeddings[g].detach())
    assert meta["encoders"] == [["clip_l", gen.token_dim]]

    neti = _technique(gen, "neti", "<x-nexp>")
    with torch.no_grad():
        for p in neti.mapper.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(4)))
    neti.export(tmp_path)
    mapper, meta = load_neti(tmp_path / "neti_mapper.safetensors")
    assert meta["groups"] == neti.groups and meta["config"]["layers"] == 7
    t = torch.tensor([0.0, 17.0, 500.0, 999.0]).repeat_interleave(7)
    l = torch.arange(7).repeat(4)
    with torch.no_grad():
        assert torch.equal(mapper(t, l), neti.mapper(t, l))
        assert torch.equal(mapper(t, l).view(4, 7, 1, -1), neti.vectors_at(torch.tensor([0.0, 17.0, 500.0, 999.0])))
    with pytest.raises(ValueError, match="is not a NeTI export"):
        load_neti(tmp_path / "xti_embeds.safetensors")


# ---------------------------------------------------------------------------- configs, families, runs
def test_settings_are_checked_in_one_line():
    from steerexp.validate import validate

    for overrides, key in ((["technique=xti", "technique.layers=every"], "technique.layers"),
                           (["technique=neti", "technique.layers=0"], "technique.layers"),
                           (["technique=neti", "technique.budget.max_norm=1.0"], "technique.budget.max_norm"),
                           (["technique=neti", "technique.nested_dropout=2"], "technique.nested_dropout")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
            validate(compose_config(overrides))
        assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from steerexp.generators.random_pipelines import make_random_pipeline

    root = tmp_path_factory.mktemp("rich_families")
    return {name: make_random_pipeline(name, root / name, size="tiny") for name in ("sdxl", "sd3", "flux")}


def _family_base(folder):
    return ["generator=sd", f"generator.path={folder}", "generator.device=cpu", "generator.dtype=fp32",
            "sampling.steps=2", "eval.seeds=[0]", "eval.prompts=['a red {}']", "logger=none", "evaluator=[concept]"]


@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize("technique", ["xti", "neti"])
def test_joint_attention_families_are_refused_before_loading(folders, tmp_path, monkeypatch, family, technique):
    import steerexp.generators as generators

    def no_loading(*_a, **_k):
        raise AssertionError("the generator loaded before the refusal")

    monkeypatch.setattr(generators, "from_pretrained", no_loading)
    with pytest.raises(ValueError, match=f"does not apply to the {family} generator family: .*joint attention") as err:
        tiny_run(tmp_path, [f"technique={technique}", "technique.steps=1"], name=technique,
                 base=_family_base(folders[family]))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("technique", ["xti", "neti"])
def test_runs_on_tiny_sdxl_with_pooled_rows(folders, tmp_path, technique):
    """SDXL: two text encoders side by side and the pooled rows after the G hidden blocks."""
    metrics, run_dir = tiny_run(tmp_path, [f"technique={technique}", "technique.steps=2", "technique.batch_size=2",
                                           "technique.targets.k=2"], name=technique, base=_family_base(folders["sdxl"]))
    assert metrics["generator/unchanged"] is True
    export = {"xti": "xti_embeds.safetensors", "neti": "neti_mapper.safetensors"}[technique]
    assert (run_dir / export).is_file()


@pytest.mark.parametrize("technique", ["xti", "neti"])
def test_steerexp_technique_runs_end_to_end(shipped, tmp_path, technique):
    metrics, run_dir = tiny_run(tmp_path, [f"technique={technique}", "logger=none"], name=technique)
    assert metrics["generator/unchanged"] is True
    assert "concept/target_rate/edited" in metrics
    deltas = load_file(run_dir / "deltas.safetensors")
    if technique == "xti":
        assert deltas["embeddings"].shape == (7, 1, 64)
        assert not torch.equal(deltas["embeddings"][0], deltas["embeddings"][6])  # trained apart
    else:
        assert "embeddings" not in deltas and "mapper.out.weight" in deltas


def test_xti_groups_are_checked_against_the_unet_config_before_loading(tmp_path):
    """technique.layers=k needs k <= the UNet's cross-attention layers, counted from unet/config.json as diffusers
    builds them (the shipped UNet: 7; the tiny SDXL: as many as its loaded attn2 processors)."""
    from steerexp import ASSETS
    from steerexp.errors import ConfigError
    from steerexp.generators import load_generator
    from steerexp.generators.random_pipelines import make_random_pipeline
    from steerexp.spec import Facts
    from steerexp.techniques.xti_spec import cross_attention_count
    from steerexp.validate import validate
    from tests.helpers import compose_config

    assert cross_attention_count(Facts(family="sd", folder=ASSETS / "shapes")) == 7
    sdxl = make_random_pipeline("sdxl", tmp_path / "sdxl", size="tiny")
    loaded = load_generator(str(sdxl), device="cpu").unet.attn_processors
    assert cross_attention_count(Facts(family="sdxl", folder=sdxl)) == sum(k.endswith("attn2.processor")
                                                                         for k in loaded)
    with pytest.raises(ConfigError, match="technique.layers: asks for 8 groups, and this UNet has 7"):
        validate(compose_config(["technique=xti", "technique.layers=8"]))
    validate(compose_config(["technique=xti", "technique.layers=7"]))
