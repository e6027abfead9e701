import numpy as np
import pytest

from steerexp.worlds.shapes import world


def test_dataset_is_deterministic_by_seed():
    a, sa = world.dataset(3, 16)
    b, sb = world.dataset(3, 16)
    c, _ = world.dataset(4, 16)
    assert np.array_equal(a, b) and sa == sb
    assert not np.array_equal(a, c)
    # an index does not depend on how many images were drawn before it
    img, scene = world.sample(3, 10)
    assert np.array_equal(img, a[10]) and scene == sa[10]


def test_world_size_meets_the_spec():
    assert len(world.SHAPES) >= 7 and len(world.SEEN_SHAPES) >= 6
    assert len(world.COLOURS) >= 6 and len(world.SIZES) == 2 and len(world.POSITIONS) == 5
    assert len(world.BACKGROUNDS) >= 3
    assert world.HELDOUT in world.SHAPES and world.HELDOUT not in world.SEEN_SHAPES


def test_shapes_render_differently():
    imgs = [world.render(world.Scene(s, "red", "large", "center", "black")) for s in world.SHAPES]
    for i in range(len(imgs)):
        for j in range(i + 1, len(imgs)):
            assert np.abs(imgs[i].astype(int) - imgs[j].astype(int)).mean() > 3, (world.SHAPES[i], world.SHAPES[j])


def test_heldout_name_never_in_generator_captions():
    rng = np.random.default_rng(0)
    _, scenes = world.dataset(0, 600)
    caps = [world.generator_caption(s, rng, generic_rate=0.15) for s in scenes]
    assert not any(world.HELDOUT in c.split() for c in caps)
    heldout = [c for c, s in zip(caps, scenes) if s.shape == world.HELDOUT]
    assert heldout and all(any(g in c.split() for g in world.GENERIC_WORDS) for c in heldout)
    # seen shapes are captioned generically too, so a generic word does not name the held-out class
    seen_generic = [
        c for c, s in zip(caps, scenes) if s.shape != world.HELDOUT and any(g in c.split() for g in world.GENERIC_WORDS)
    ]
    assert len(seen_generic) > 20


def test_absent_world_has_no_heldout_images():
    _, scenes = world.dataset(0, 300, shapes=world.SEEN_SHAPES)
    assert all(s.shape != world.HELDOUT for s in scenes)


def test_protected_set_is_unique_and_distinctive():
    images, captions = world.protected_set()
    assert len(images) >= 8 and len(set(captions)) == len(captions)
    flat = images.reshape(len(images), -1).astype(float) / 255
    d = np.sqrt(((flat[:, None] - flat[None]) ** 2).mean(-1))
    assert d[~np.eye(len(d), dtype=bool)].min() > 0.1
    vocab = set(world.SHAPES) | set(world.COLOURS) | set(world.POSITIONS)
    assert not any(set(c.split()) & vocab for c in captions)


def test_unrelated_prompts_do_not_name_the_heldout_class():
    assert len(world.UNRELATED_PROMPTS) >= 6
    assert not any(world.HELDOUT in p for p in world.UNRELATED_PROMPTS)


def test_unknown_shape_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown shape"):
        world.shape_mask("hexagon", np.zeros(1), np.zeros(1), 0.1)
