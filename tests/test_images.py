"""steerexp.images: user image files are read correctly (issue 13), and say what was done."""
import logging
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from steerexp import images
from steerexp.images import ImagePolicy, read_image

KEY = "technique.targets.folder"
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "steerexp.images" and r.levelno == logging.WARNING]


def save(arr, path):
    Image.fromarray(np.asarray(arr)).save(path)
    return path


def test_plain_rgb_at_size_is_unchanged_and_silent(tmp_path, caplog):
    arr = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    p = save(arr, tmp_path / "ok.png")
    with caplog.at_level(logging.WARNING, "steerexp.images"):
        out = read_image(p, KEY, 32)
        assert np.array_equal(read_image(p, KEY), arr)
    assert np.array_equal(out, arr)
    assert warnings_of(caplog) == []


def test_16bit_grey_is_scaled_not_saturated(tmp_path, caplog):
    p = tmp_path / "grey16.png"
    Image.fromarray(np.full((16, 16), 32896, np.uint16)).save(p)  # mid-grey in 16 bits
    assert Image.open(p).mode.startswith("I")
    with caplog.at_level(logging.WARNING, "steerexp.images"):
        out = read_image(p, KEY, 16)
    assert out.shape == (16, 16, 3) and np.all(out == 128)  # the old convert("RGB") gave 255
    [line] = warnings_of(caplog)
    assert "grey16.png" in line and "16-bit" in line


def test_alpha_is_composited_onto_background(tmp_path, caplog):
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0] = 255  # red everywhere, but the left half fully transparent
    rgba[:, 8:, 3] = 255
    p = tmp_path / "rgba.png"
    Image.fromarray(rgba, "RGBA").save(p)
    with caplog.at_level(logging.WARNING, "steerexp.images"):
        out = read_image(p, KEY, 16)
    assert np.all(out[:, :8] == 255) and np.all(out[:, 8:] == RED)  # the old convert dropped alpha: all red
    [line] = warnings_of(caplog)
    assert "rgba.png" in line and "composited" in line and "white" in line
    blue = ImagePolicy(background=[0, 0, 255])  # a run's policy (images.background), passed to the reader
    assert np.all(read_image(p, KEY, 16, blue)[:, :8] == BLUE)
    # LA and a palette with a transparent index too
    la = np.zeros((16, 16, 2), np.uint8)
    la[..., 1] = 0
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    assert np.all(read_image(tmp_path / "la.png", KEY, pol=blue) == BLUE)
    pal = Image.new("P", (16, 16), 0)
    pal.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    pal.paste(1, (8, 0, 16, 16))
    pal.save(tmp_path / "p.png", transparency=0)
    out = read_image(tmp_path / "p.png", KEY, pol=blue)
    assert np.all(out[:, :8] == BLUE) and np.all(out[:, 8:] == GREEN)


def test_opaque_rgba_and_grey_are_silent(tmp_path, caplog):
    arr = np.full((16, 16, 3), 7, np.uint8)
    Image.fromarray(arr).convert("RGBA").save(tmp_path / "opaque.png")
    Image.fromarray(arr[..., 0]).save(tmp_path / "grey.png")
    with caplog.at_level(logging.WARNING, "steerexp.images"):
        assert np.array_equal(read_image(tmp_path / "opaque.png", KEY, 16), arr)
        assert np.array_equal(read_image(tmp_path / "grey.png", KEY, 16), arr)
    assert warnings_of(caplog) == []


def test_exif_orientation_is_applied(tmp_path, caplog):
    arr = np.zeros((20, 40, 3), np.uint8)  # 40 wide, 20 high: left half red, right half blue
    arr[:, :20] = RED
    arr[:, 20:] = BLUE
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    im.save(tmp_path / "rot.png", exif=exif)
    with caplog.at_level(logging.WARNING, "steerexp.images"):
        out = read_image(tmp_path / "rot.png", KEY)
    assert out.shape == (40, 20, 3)  # displayed upright: 20 wide, 40 high; ignoring EXIF kept 40x20
    assert np.all(out[:20] == RED) and np.all(out[20:] == BLUE)  # the left half became the top half
    [line] = warnings_of(caplog)
    assert "rot.png" in line and "EXIF orientation 6" in line


def stripes(tmp_path):
    arr = np.zeros((32, 64, 3), np.uint8)  # 64 wide, 32 high: red | green (centre 32 columns) | blue
    arr[:, :16], arr[:, 16:48], arr[:, 48:] = RED, GREEN, BLUE
    return save(arr, tmp_path / "wide.png")


def test_non_square_is_centre_cropped_not_squashed(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, "steerexp.images"):
        out = read_image(stripes(tmp_path), KEY, 32)
    assert out.shape == (32, 32, 3) and np.all(out == GREEN)  # a squash would keep red and blue edges
    [line] = warnings_of(caplog)
    assert "wide.png" in line and "centre-cropped 64x32 to 32x32" in line


def test_pad_and_stretch(tmp_path, caplog):
    p = stripes(tmp_path)
    with caplog.at_level(logging.WARNING, "steerexp.images"):
        out = read_image(p, KEY, 64, ImagePolicy(fit="pad"))
    assert np.all(out[:16] == 255) and np.all(out[48:] == 255)  # white bands above and below
    assert np.all(out[20:44, :12] == RED) and np.all(out[20:44, 52:] == BLUE)
    [line] = warnings_of(caplog)
    assert "padded 64x32 to 64x64" in line
    assert np.all(read_image(p, KEY, 64, ImagePolicy(fit="pad", background="black"))[:16] == 0)
    out = read_image(p, KEY, 32, ImagePolicy(fit="stretch"))
    assert np.all(out[:, 0] == RED) and np.all(out[:, -1] == BLUE)  # stretch only when asked for


def test_up_and_downscaling_are_reported(tmp_path, caplog):
    save(np.full((8, 8, 3), 9, np.uint8), tmp_path / "small.png")
    save(np.full((64, 64, 3), 9, np.uint8), tmp_path / "big.png")
    with caplog.at_level(logging.WARNING, "steerexp.images"):
        assert read_image(tmp_path / "small.png", KEY, 32).shape == (32, 32, 3)
        assert read_image(tmp_path / "big.png", KEY, 32).shape == (32, 32, 3)
    small, big = warnings_of(caplog)
    assert "small.png" in small and "upscaled 8->32" in small and "blurry" in small
    assert "big.png" in big and "downscaled 64->32" in big


def test_tiny_image_is_refused(tmp_path):
    save(np.zeros((1, 1, 3), np.uint8), tmp_path / "dot.png")
    with pytest.raises(ValueError, match=r"technique\.targets\.folder: .*dot\.png is 1x1.*images\.min_side=8") as e:
        read_image(tmp_path / "dot.png", KEY, 32)
    assert "\n" not in str(e.value)
    assert read_image(tmp_path / "dot.png", KEY, 4, ImagePolicy(min_side=1)).shape == (4, 4, 3)


def bomb_png(path, side=14000):
    """A valid 1-bit greyscale PNG of side x side pixels that compresses to a few kB."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = zlib.compress(bytes((1 + (side + 7) // 8) * side), 9)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", rows) + chunk(b"IEND", b""))
    return path


def test_decompression_bomb_is_a_clear_error(tmp_path):
    p = bomb_png(tmp_path / "huge.png")
    assert p.stat().st_size < 100_000
    with pytest.raises(ValueError, match=r"technique\.targets\.folder: .*huge\.png.*images\.max_pixels") as e:
        read_image(p, KEY, 32)
    assert not isinstance(e.value, Image.DecompressionBombError) and "\n" not in str(e.value)
    # between Pillow's warning and error thresholds: refused by our own check, same message
    save(np.zeros((16, 16, 3), np.uint8), tmp_path / "over.png")
    with pytest.raises(ValueError, match=r"over\.png is 16x16 = 256 pixels, over images\.max_pixels=100"):
        read_image(tmp_path / "over.png", KEY, pol=ImagePolicy(max_pixels=100))


def test_max_pixels_raises_pillows_limit_for_one_open_only(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a 64x64 file is a "bomb" to Pillow now
    p = save(np.full((64, 64, 3), 5, np.uint8), tmp_path / "img.png")
    with pytest.raises(Image.DecompressionBombError):
        Image.open(p)
    assert np.all(read_image(p, KEY, 32) == 5)  # images.max_pixels (default 89478485) is the limit
    assert Image.MAX_IMAGE_PIXELS == 1000  # Pillow's guard is back as it was
    with pytest.raises(ValueError, match=r"img\.png.*images\.max_pixels \(now 2000\)"):
        read_image(p, KEY, 32, ImagePolicy(max_pixels=2000))
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"technique\.targets\.folder: image not found: .*nope\.png"):
        read_image(tmp_path / "nope.png", KEY)
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"technique\.targets\.folder: cannot read image file .*junk\.png.*replace"):
        read_image(tmp_path / "junk.png", KEY)


@pytest.mark.parametrize("settings, field", [
    (dict(fit="squash"), "images.fit"), (dict(background="blurple"), "images.background"),
    (dict(background=[0, 0, 256]), "images.background"), (dict(min_side=0), "images.min_side"),
    (dict(max_pixels=-1), "images.max_pixels"), (dict(min_side=True), "images.min_side"),
    (dict(colour="red"), "images.colour"),
])
def test_policy_validation_names_the_key(settings, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        ImagePolicy.from_config(settings)


def test_policy_accepts_config_values():
    from omegaconf import OmegaConf

    pol = ImagePolicy.from_config({"fit": "pad", "background": [10, 20, 30], "min_side": 4, "max_pixels": 1000})
    assert pol.background == (10, 20, 30) and pol.fit == "pad"
    red = ImagePolicy.from_config(OmegaConf.create({"background": "#ff0000"}))  # the `images:` node as Hydra gives it
    assert red.background == RED
    assert ImagePolicy.from_config(None) == ImagePolicy.from_config({}) == ImagePolicy()
    assert not hasattr(images, "configure") and not hasattr(images, "policy")  # no module-level policy to set


def test_tensor_loaders_use_the_policy(tmp_path, caplog):
    from steerexp.images import load_folder, load_image
    folder = tmp_path / "targets"
    folder.mkdir()
    stripes(folder)
    Image.fromarray(np.full((16, 16), 32896, np.uint16)).save(folder / "grey16.png")
    with caplog.at_level(logging.WARNING, "steerexp.images"):
        batch, names = load_folder(folder, 16, KEY)
    assert names == ["grey16.png", "wide.png"] and tuple(batch.shape) == (2, 3, 16, 16)
    assert abs(batch[0].mean().item() - 128 / 255) < 1e-3
    assert batch[1, 1].min().item() > 0.99 and batch[1, 0].max().item() < 0.01  # green: cropped, not squashed
    assert len(warnings_of(caplog)) == 2
    assert tuple(load_image(folder / "wide.png", "objective reconstruction.image").shape) == (1, 3, 32, 64)
    assert read_image(folder / "grey16.png", KEY)[0, 0].tolist() == [128, 128, 128]
    save(np.zeros((2, 2, 3), np.uint8), folder / "dot.png")
    with pytest.raises(ValueError, match=r"technique\.exemplars: .*dot\.png is 2x2.*images\.min_side"):
        load_folder(folder, 16, key="technique.exemplars")


def test_strict_reading_for_inversion_uses_the_shared_decoding(tmp_path, caplog):
    def load_image(path, resolution, resize=False, convert=False):  # as DDIMInversion.load_targets reads files
        return read_image(path, "technique.targets.files", resolution, switches="technique.targets",
                          resize=resize, convert=convert)

    Image.fromarray(np.full((32, 32), 32896, np.uint16)).save(tmp_path / "grey16.png")
    with pytest.raises(ValueError, match=r"technique\.targets\.files: .*mode I;16.*convert"):
        load_image(tmp_path / "grey16.png", 32)
    with pytest.warns(UserWarning, match="converting"):
        assert np.all(load_image(tmp_path / "grey16.png", 32, convert=True) == 128)
    p = stripes(tmp_path)
    with pytest.raises(ValueError, match=r"64x32.*32x32.*resize"):
        load_image(p, 32)
    with caplog.at_level(logging.WARNING, "steerexp.images"), pytest.warns(UserWarning, match="resizing"):
        assert np.all(load_image(p, 32, resize=True) == GREEN)
    assert any("centre-cropped" in line for line in warnings_of(caplog))
    with pytest.raises(ValueError, match="images.max_pixels"):
        load_image(bomb_png(tmp_path / "huge.png"), 32)


def test_importing_images_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, steerexp.images; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_tensors_grids_png_and_distances(tmp_path):
    import torch

    from steerexp.images import image_grid, nn_rms, rms_distances, save_png, side_by_side_grid, to_tensor

    x = to_tensor(np.full((2, 4, 6, 3), 255, np.uint8))
    assert tuple(x.shape) == (2, 3, 4, 6) and x.dtype == torch.float32 and float(x.min()) == 1.0

    class Paired:  # 2 prompts x 3 seeds
        baseline, edited = torch.zeros(6, 3, 4, 4), torch.ones(6, 3, 4, 4)

    grid = side_by_side_grid(Paired, n_seeds=3, gap=2)
    assert tuple(grid.shape) == (3, 2 * (4 + 2), 3 * 4 + 4 + 3 * 4)
    assert float(grid[:, :4, :12].max()) == 0.0 and float(grid[:, :4, 16:].min()) == 1.0
    columns = [torch.zeros(5, 3, 4, 4), torch.ones(5, 3, 4, 8)]
    assert tuple(image_grid(columns, rows=2, gap=2).shape) == (3, 4 + 2 + 4, 4 + 2 + 8)
    save_png(tmp_path / "samples" / "g.png", grid)
    assert Image.open(tmp_path / "samples" / "g.png").size == (2 * grid.shape[-1], 2 * grid.shape[-2])
    refs = torch.stack([torch.zeros(3, 4, 4), torch.full((3, 4, 4), 0.5)])
    d = rms_distances(torch.full((1, 3, 8, 8), 0.25), refs)  # resized to the refs' size
    assert d.shape == (1, 2) and torch.allclose(d, torch.tensor([[0.25, 0.25]]))
    assert float(nn_rms(torch.full((1, 3, 4, 4), 0.4), refs)) == pytest.approx(0.1)
