"""The unchanged-proof (FrozenGenerator.proof_record, generator.proof): what the fast proof (identity, version
counters, an on-device integer checksum) and the full proof (SHA-256 of every byte) catch and miss, each on a
fresh copy of the shipped generator; the setting refused in one line before loading; loading builds no
random-initialised model first."""
import pytest
import torch

from steerexp.errors import ConfigError
from steerexp.generators import GeneratorChangedError, load_generator
from steerexp.generators.frozen import CHUNK, _checksum
from steerexp.validate import validate
from tests.helpers import compose_config


@pytest.fixture
def fresh(shipped):
    """A fresh shipped generator (the tests tamper with its weights), fast proof."""
    return load_generator(device="cpu")


def weight(g) -> torch.nn.Parameter:
    return g.unet.conv_in.weight


def only_change(g) -> str:
    changes = g.changes()
    assert len(changes) == 1, changes
    return changes[0]


def test_untouched_and_used_generator_passes_both_proofs(fresh):
    full = load_generator(device="cpu", proof="full")
    for g in (fresh, full):
        g.generate(["a red circle"], [0], steps=2)
        assert g.unchanged() and g.changes() == []
        g.assert_unchanged()
    before = full.fingerprint()
    assert fresh.fingerprint().startswith("fast:") and before.startswith("full:")
    with torch.no_grad():
        next(full.vae.parameters()).view(-1)[0] += 1.0  # a tampered weight changes the full fingerprint
    assert full.fingerprint() != before and not full.unchanged()


def test_fast_proof_catches_an_in_place_edit_with_and_without_no_grad(fresh):
    w = weight(fresh)
    w.mul_(1.0)  # autograd-tracked (the weight requires no grad, so it is allowed): same values, version bumped
    assert "unet.conv_in.weight: version 0 -> 1" == only_change(fresh)
    g = load_generator(device="cpu")
    with torch.no_grad():
        weight(g)[0, 0, 0, 0] += 1e-3
    change = only_change(g)
    assert change.startswith("unet.conv_in.weight: version") and "checksum differs" in change
    with pytest.raises(GeneratorChangedError, match="unet.conv_in.weight"):
        g.assert_unchanged()


def test_a_write_through_data_bypasses_the_version_counter_and_the_checksum_catches_it(fresh):
    w = weight(fresh)
    w.data.view(-1)[5] += 1e-3
    assert w._version == 0  # `.data` has its own version counter: only the checksum sees this write
    assert only_change(fresh) == "unet.conv_in.weight: checksum differs"


def test_a_replaced_parameter_is_caught_by_identity_even_with_the_same_values(fresh):
    conv = fresh.unet.conv_in
    conv.weight = torch.nn.Parameter(conv.weight.detach().clone(), requires_grad=False)
    change = only_change(fresh)
    assert change.startswith("unet.conv_in.weight: data_ptr") and "checksum" not in change
    # the full proof compares content only: the same values in a new tensor pass it (documented)
    full = load_generator(device="cpu", proof="full")
    full.unet.conv_in.weight = torch.nn.Parameter(full.unet.conv_in.weight.detach().clone(), requires_grad=False)
    assert full.unchanged()
    # p.data = other: the Parameter object stays, its memory changes
    g = load_generator(device="cpu")
    weight(g).data = weight(g).data.clone()
    assert only_change(g).startswith("unet.conv_in.weight: data_ptr")


def test_a_requires_grad_flip_is_caught_by_both_proofs(fresh):
    weight(fresh).requires_grad_(True)
    changes = fresh.changes()
    assert [c for c in changes if "conv_in.weight" in c] == ["unet.conv_in.weight: requires_grad False -> True"]
    full = load_generator(device="cpu", proof="full")
    weight(full).requires_grad_(True)
    assert not full.unchanged()
    weight(full).requires_grad_(False)
    full.unet.train()
    assert full.changes() == ["unet is in training mode"]


def test_numpy_view_writes_bypass_the_version_counter(fresh):
    """One changed word through a numpy view: the fast proof's checksum catches it. Two words swapped within
    one checksum chunk: the fast proof misses it (documented), the full proof catches it."""
    w = weight(fresh)
    w.detach().numpy().reshape(-1)[7] += 0.5
    assert w._version == 0 and only_change(fresh) == "unet.conv_in.weight: checksum differs"

    for proof, caught in (("fast", False), ("full", True)):
        g = load_generator(device="cpu", proof=proof)
        a = weight(g).detach().numpy().reshape(-1)
        assert a.size <= CHUNK and a[0] != a[1]
        a[0], a[1] = a[1], a[0]
        assert weight(g)._version == 0
        assert g.unchanged() is not caught, (proof, g.changes())
        if caught:
            assert only_change(g) == "unet.conv_in.weight: sha256 differs"


def test_the_checksum_sees_which_chunk_changed_and_ignores_the_thread_count():
    x = torch.randn(3 * CHUNK + 5)
    base = _checksum(x).tolist()
    swapped = x.clone()
    swapped[0], swapped[CHUNK] = x[CHUNK].item(), x[0].item()  # same words, other chunks: the weighted sum sees it
    s = _checksum(swapped).tolist()
    assert (s[0] - base[0]) % 2**32 == 0 and s[1] != base[1]  # the plain sum is the same mod 2**32
    for dtype in (torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.bool):
        y = x.to(dtype)
        z = y.clone()
        z[-1] = 0 if dtype != torch.bool else not bool(y[-1])  # the last element: in the tail bytes for odd sizes
        if torch.equal(z, y):
            z[-1] = 1
        assert _checksum(z).tolist() != _checksum(y).tolist(), dtype
    big = torch.randn(1 << 20)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _checksum(big).tolist()
        torch.set_num_threads(2)
        assert _checksum(big).tolist() == one
    finally:
        torch.set_num_threads(threads)


def test_proof_setting_is_validated_before_loading_and_reaches_the_generator():
    with pytest.raises(ConfigError) as info:
        validate(compose_config(["generator.proof=sha256"]))
    assert info.value.key == "generator.proof" and "\n" not in str(info.value) and "full" in str(info.value)
    validate(compose_config(["generator.proof=full"]))
    with pytest.raises(ValueError, match="generator.proof"):
        load_generator(device="cpu", proof="sha")


def test_loading_builds_no_random_initialised_model(shipped):
    """The weights load into modules built on the meta device: no random init runs on a real tensor first."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from steerexp.generators.sd import SDGenerator

    random_ops = {"normal_", "uniform_", "random_", "bernoulli_", "exponential_", "randn", "rand", "randint",
                  "normal", "uniform", "kaiming_uniform_", "trunc_normal_"}
    seen: list[str] = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if name in random_ops and isinstance(out, torch.Tensor) and out.device.type != "meta":
                seen.append(f"{name} {tuple(out.shape)}")
            return out

    with Watch():
        SDGenerator.load(shipped / "shapes", "fp32")
    assert seen == []
    from diffusers import UNet2DConditionModel

    with Watch():  # the watch sees a random init where there is one: a model built from its config alone
        UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(shipped / "shapes" / "unet"))
    assert seen
