"""Image helpers, all in one place: reading user image files (targets, inversion sources, objective
images) the same way everywhere, tensors, grids, saving PNGs and RMS distances.

    read_image / read_images        file(s) -> RGB uint8 numpy [H, W, 3] / [K, H, W, 3]
    load_image / load_folder        file / folder of PNG/JPG -> float tensor [1|K, 3, H, W] in [0, 1]
    image_files_in                  the PNG/JPG files of a folder, sorted by name
    to_tensor                       uint8 [N, H, W, 3] -> float [N, 3, H, W] in [0, 1]
    side_by_side_grid, image_grid   sample grids [3, H, W] in [0, 1]
    side_by_side_labels, image_grid_labels   what a grid's rows and columns show (GridLabels)
    labelled_image, save_png        a grid as an (upscaled) image / PNG file, with its labels drawn around it
    rms_distances, nn_rms           per-pixel RMS between image sets

One policy, an `ImagePolicy` (the `images:` config node: run.build makes ONE per run,
`ImagePolicy.from_config(cfg.images)`, and passes it to what reads image files; a function given none
uses the shipped defaults, `ImagePolicy()`; nothing here holds a run's policy) says how a file
becomes an RGB uint8 array:

0. Only a regular file is opened: a FIFO, a device (a symlink to /dev/zero named x.png), a socket
   or a folder is refused from `os.stat` alone, without opening it (opening a FIFO blocks).
1. Opened lazily and size-checked first: more than `images.max_pixels` pixels is refused with a
   one-line error (the decompression-bomb guard). Pillow's own guard stays on; the setting only
   ever *raises* Pillow's limit, for the duration of one open, when it is above Pillow's.
2. EXIF orientation is applied (`ImageOps.exif_transpose`), so the image is the way viewers show it.
3. Converted to RGB: 16-bit grey (`I;16*`, and `I` with values in 0..65535) is scaled by /257
   (65535 -> 255), not clipped; float grey `F` in [0, 1] is scaled by 255 (other ranges are
   min-max scaled); transparency (RGBA, LA, PA, premultiplied modes, P or L/RGB with a tRNS key)
   is composited onto `images.background`; other modes go through Pillow's `convert("RGB")`.
4. Images with a side below `images.min_side` are refused (a 1x1 file is almost always a mistake),
   and so are thin ones: a longer side more than `images.max_aspect` times the shorter (default 4,
   so 1024x256 passes and 5000x1 or 5000x100 does not; a centre crop of a thinner image keeps too
   little of it, a pad is mostly background). `image_size` applies 0, 1 and 4 to a file's header
   alone: the config validator checks every user image with it before any model loads.
5. Fitted to the run's image size when one is asked for (the generator's image_size: height x width,
   generator.height / width, square by default): `images.fit` = crop (the centre region of the target's
   aspect ratio, the default), pad (onto `images.background`, to that aspect ratio) or stretch (aspect
   ratio not kept), then resized bicubically. `size` arguments are one side (a square) or (height, width).

Everything that changed the pixels (scaled bit depth, composited transparency, EXIF rotation,
a lossy mode conversion, crop/pad/stretch, up- or downscaling) is reported in ONE warning line
per image on the `steerexp.images` logger, naming the file; a folder (`read_images`) says it once
per kind of change, with the count and an example file. Lossless conversions (L, 1, P without
transparency, fully opaque RGBA/LA) and an RGB image already at the target size say nothing.
A folder holds at most MAX_IMAGES (1,000) images: more is refused (10,000 target images took 3.7 GB).

Errors are ValueError (steerexp.errors.ConfigError, or FileNotFoundError for a missing file) with one
line naming the config key the caller passed and the fix. Importing this module imports only PIL and
numpy; the tensor helpers import torch when they are called.
"""
from __future__ import annotations

import logging
import math
import os
import re
import stat
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageColor, ImageOps, UnidentifiedImageError

from steerexp.errors import ConfigError

if TYPE_CHECKING:
    import torch

log = logging.getLogger("steerexp.images")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
FITS = ("crop", "pad", "stretch")
PILLOW_MAX_PIXELS = 89_478_485  # Pillow's default Image.MAX_IMAGE_PIXELS
UPSCALE_WARN = 2.0  # upscaling by this factor or more adds "expect a blurry image" to the report
MAX_IMAGES = 1000   # image files one setting (a folder or a list) may hold
EXIF_ORIENTATION = {2: "mirrored", 3: "rotated 180°", 4: "flipped", 5: "transposed",
                    6: "rotated 90° clockwise", 7: "transversed", 8: "rotated 90° counter-clockwise"}


@dataclass(frozen=True)
class ImagePolicy:
    """How image files are read; each field is the config key `images.<field>`."""
    fit: str = "crop"                                     # crop | pad | stretch
    background: str | tuple[int, int, int] = "white"      # colour name/#hex, or [r, g, b] in 0-255
    min_side: int = 8                                     # smaller images are refused
    max_pixels: int = PILLOW_MAX_PIXELS                   # larger images are refused (bomb guard)
    max_aspect: float = 4.0                               # longer side / shorter side above this is refused

    def __post_init__(self):
        if self.fit not in FITS:
            raise ConfigError("images.fit", f"{self.fit!r} is not one of {list(FITS)}", "use crop (centre square), "
                              "pad (onto images.background) or stretch (aspect ratio not kept)")
        object.__setattr__(self, "background", _colour(self.background))
        for name, lo in (("min_side", 1), ("max_pixels", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
                raise ConfigError(f"images.{name}", f"must be an integer >= {lo}, got {value!r}")
            object.__setattr__(self, name, int(value))
        aspect = self.max_aspect
        if isinstance(aspect, bool) or not isinstance(aspect, (int, float, np.integer, np.floating)) \
                or not math.isfinite(aspect) or aspect < 1:
            raise ConfigError("images.max_aspect", f"must be a number >= 1 (longer side / shorter side), got "
                              f"{aspect!r}", "set e.g. images.max_aspect=4")
        object.__setattr__(self, "max_aspect", float(aspect))

    @classmethod
    def from_config(cls, node=None) -> ImagePolicy:
        """The policy of an `images:` config node (a mapping or DictConfig; None: the defaults): unset fields take
        their defaults, an unknown key or a bad value is one ConfigError naming it."""
        if node is None:
            return cls()
        if not isinstance(node, dict):
            from omegaconf import DictConfig, OmegaConf

            if not isinstance(node, DictConfig):
                raise ConfigError("images", f"must be a mapping of settings, got {node!r}",
                                  "see conf/config.yaml: images")
            node = OmegaConf.to_container(node, resolve=True)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(node) - known)
        if unknown:
            raise ConfigError(f"images.{unknown[0]}", "is not a setting of the images node", f"its settings are "
                              f"{sorted(known)}")
        return cls(**node)

    @property
    def background_name(self) -> str:
        return "#%02x%02x%02x" % self.background if self.background not in _NAMES else _NAMES[self.background]


_NAMES = {(255, 255, 255): "white", (0, 0, 0): "black", (128, 128, 128): "grey"}


def _colour(value) -> tuple[int, int, int]:
    """A colour name/#hex string or an [r, g, b] sequence of 0-255 integers, as an RGB tuple."""
    if isinstance(value, str):
        try:
            return tuple(ImageColor.getrgb(value)[:3])
        except ValueError:
            raise ConfigError("images.background", f"unknown colour {value!r}", "use a name (white, black, grey), "
                              "'#rrggbb' or [r, g, b] in 0-255") from None
    if isinstance(value, Sequence) or hasattr(value, "__iter__"):
        rgb = list(value)
        if len(rgb) == 3 and all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) and 0 <= c <= 255
                                 for c in rgb):
            return tuple(int(c) for c in rgb)
    raise ConfigError("images.background", f"{value!r} is not a colour", "use a name (white), '#rrggbb' "
                      "or [r, g, b] with integers in 0-255")


# ---------------------------------------------------------------------------- decoding
_pillow_limit_lock = threading.Lock()
_FILE_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def not_regular(path: str | Path) -> str | None:
    """What `path` is when it is no regular file ("a FIFO (named pipe)", "a character device"...), from os.stat
    (symlinks followed) alone: nothing is opened, so a FIFO cannot block. None for a regular file; a missing
    path (or a broken link) raises FileNotFoundError."""
    mode = os.stat(path).st_mode
    if stat.S_ISREG(mode):
        return None
    kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")
    return kind + (f" (a link to {os.path.realpath(path)})" if os.path.islink(path) else "")


def _regular_file(path: Path, key: str) -> None:
    """A missing file is FileNotFoundError, anything but a regular file one ConfigError (nothing is opened)."""
    try:
        kind = not_regular(path)
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(f"{key}: image not found: {path}; give an existing PNG/JPG file") from None
    except OSError as err:
        raise ConfigError(key, f"cannot read image file {path} ({err.strerror or err})",
                          "check the file and its permissions") from None
    if kind is not None:
        raise ConfigError(key, f"{path} is {kind}, not an image file",
                          "replace it with a PNG/JPG file, or move it out of the folder")


def check_size(path: str | Path, key: str, w: int, h: int, pol: ImagePolicy | None = None) -> None:
    """The size rules of the policy: at most images.max_pixels pixels, at least images.min_side a side, and a
    longer side at most images.max_aspect times the shorter. One ConfigError naming the file and the limit."""
    pol = pol or ImagePolicy()
    if w * h > pol.max_pixels:
        raise ConfigError(key, f"image {path} is {w}x{h} = {w * h} pixels, over images.max_pixels={pol.max_pixels} "
                          "(a decompression-bomb guard)", f"downscale the file, or raise images.max_pixels (now "
                          f"{pol.max_pixels}) above its pixel count if you trust it")
    if min(w, h) < pol.min_side:
        raise ConfigError(key, f"image {path} is {w}x{h}, below images.min_side={pol.min_side} px",
                          f"use a larger image (at least {pol.min_side} px a side) or lower images.min_side")
    if max(w, h) > pol.max_aspect * min(w, h):
        ratio = max(w, h) / min(w, h)
        raise ConfigError(key, f"image {path} is {w}x{h}, its longer side {ratio:.3g} times the shorter, above "
                          f"images.max_aspect={pol.max_aspect:g}", f"crop it to at most {pol.max_aspect:g}:1 (a "
                          "centre crop of it would keep too little), or raise images.max_aspect")


def image_size(path: str | Path, key: str, pol: ImagePolicy | None = None) -> tuple[int, int]:
    """(width, height) from the file's header alone (no pixel is decoded), after the checks that need no pixels:
    a regular file (os.stat: a FIFO or /dev/zero is never opened), an image Pillow can identify, and check_size
    (EXIF rotation only swaps the sides). The config validator runs this on every user image before any model
    loads. Errors as open_image's."""
    pol = pol or ImagePolicy()
    path = Path(path).expanduser()
    _regular_file(path, key)
    try:
        with warnings.catch_warnings(), _pillow_limit_lock:
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            saved = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None  # the header only: check_size applies images.max_pixels
            try:
                with Image.open(path) as im:
                    w, h = im.size
            finally:
                Image.MAX_IMAGE_PIXELS = saved
    except UnidentifiedImageError:
        raise ConfigError(key, f"cannot read image file {path}: not an image Pillow can identify",
                          "remove it or replace it with a valid PNG/JPG") from None
    except OSError as err:
        raise ConfigError(key, f"cannot read image file {path} ({err.strerror or err})",
                          "remove it or replace it with a valid PNG/JPG") from None
    check_size(path, key, w, h, pol)
    return w, h


def _open(path: Path, key: str, pol: ImagePolicy) -> tuple[Image.Image, int]:
    """Open and fully load `path` (refusing more than pol.max_pixels pixels before decoding), with
    its EXIF orientation applied; returns the image and that orientation (1: none)."""
    fix = (f"downscale the file, or raise images.max_pixels (now {pol.max_pixels}) above its pixel count "
           "if you trust it")
    try:
        with _pillow_limit_lock:
            saved = Image.MAX_IMAGE_PIXELS
            if saved is not None and pol.max_pixels > saved:
                Image.MAX_IMAGE_PIXELS = pol.max_pixels  # raised for this open only, never removed
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below instead
                    src = Image.open(path)
            finally:
                Image.MAX_IMAGE_PIXELS = saved
        with src:
            check_size(path, key, *src.size, pol)  # before decoding (EXIF rotation below only swaps the sides)
            src.load()
            orientation = src.getexif().get(0x0112, 1)
            if orientation not in EXIF_ORIENTATION:
                return src.copy(), 1
            im = ImageOps.exif_transpose(src)
            return (im if im.mode == src.mode else im.convert(src.mode)), orientation
    except Image.DecompressionBombError as err:
        raise ValueError(f"{key}: image {path} is over Pillow's decompression-bomb limit ({err}); {fix}") from None
    except FileNotFoundError:
        raise FileNotFoundError(f"{key}: image not found: {path}; give an existing PNG/JPG file") from None
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{key}: cannot read image file {path}: {err}; "
                         "remove it or replace it with a valid PNG/JPG") from None


def open_image(path: str | Path, key: str, pol: ImagePolicy | None = None) -> tuple[Image.Image, list[str]]:
    """A loaded image in its file's mode with EXIF orientation applied, and notes of what was done.
    Refuses missing, unreadable, non-regular (a FIFO, a device), too large (images.max_pixels), too small
    (images.min_side) and too thin (images.max_aspect) files."""
    pol = pol or ImagePolicy()
    path = Path(path).expanduser()
    _regular_file(path, key)
    im, orientation = _open(path, key, pol)
    notes = [f"applied EXIF orientation {orientation} ({EXIF_ORIENTATION[orientation]})"] if orientation != 1 else []
    return im, notes


def _grey_to_8bit(im: Image.Image) -> tuple[Image.Image, str]:
    a = np.asarray(im)
    if im.mode.startswith("I;16") or (im.mode == "I" and a.size and a.min() >= 0 and a.max() <= 65535):
        out, note = a.astype(np.float64) / 257.0, f"scaled 16-bit grey (mode {im.mode}) to 8-bit (value/257)"
    elif im.mode == "F" and a.size and a.min() >= 0.0 and a.max() <= 1.0:
        out, note = a.astype(np.float64) * 255.0, "scaled float grey in [0, 1] to 8-bit"
    else:
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 1.0)
        out = (a.astype(np.float64) - lo) * (255.0 / (hi - lo) if hi > lo else 0.0)
        note = f"scaled mode {im.mode} grey from its range [{lo:g}, {hi:g}] to 0-255"
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "L"), note


def to_rgb(im: Image.Image, pol: ImagePolicy | None = None) -> tuple[Image.Image, list[str]]:
    """`im` as an RGB image, and notes of lossy steps (bit-depth scaling, compositing, mode conversion)."""
    pol = pol or ImagePolicy()
    notes = []
    if im.mode == "RGB" and "transparency" not in im.info:
        return im, notes
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        im, note = _grey_to_8bit(im)
        notes.append(note)
    if "A" in im.mode or "a" in im.mode or "transparency" in im.info:
        rgba = im.convert("RGBA")
        alpha = np.asarray(rgba)[..., 3]
        if (alpha < 255).any():
            bg = Image.new("RGBA", rgba.size, pol.background + (255,))
            notes.append(f"composited transparency ({(alpha < 255).mean():.0%} of pixels not opaque) onto "
                         f"{pol.background_name} (images.background)")
            return Image.alpha_composite(bg, rgba).convert("RGB"), notes
        return rgba.convert("RGB"), notes
    if im.mode not in ("L", "1", "P", "RGB"):
        notes.append(f"converted mode {im.mode} to RGB")
    return im.convert("RGB"), notes


def hw(size: int | Sequence[int]) -> tuple[int, int]:
    """(height, width) of a size given as one side (a square) or as (height, width)."""
    if isinstance(size, (tuple, list)):
        return int(size[0]), int(size[1])
    return int(size), int(size)


def fit(im: Image.Image, size: int | Sequence[int], pol: ImagePolicy | None = None) -> tuple[Image.Image, list[str]]:
    """An RGB image fitted to `size` (one side, or (height, width)) per images.fit, and notes of what was done:
    crop takes the centre region of the target's aspect ratio, pad extends the image to it, stretch ignores it."""
    pol = pol or ImagePolicy()
    H, W = hw(size)
    w, h = im.size
    if (w, h) == (W, H):
        return im, []
    notes = []
    if w * H != h * W and pol.fit == "stretch":
        notes.append(f"stretched {w}x{h} to {W}x{H}, aspect ratio not kept (images.fit=stretch)")
        return im.resize((W, H), Image.BICUBIC), notes
    wider = w * H > h * W  # than the target's aspect ratio
    if w * H != h * W and pol.fit == "crop":
        cw, ch = (min(w, round(h * W / H)), h) if wider else (w, min(h, round(w * H / W)))
        left, top = (w - cw) // 2, (h - ch) // 2
        im = im.crop((left, top, left + cw, top + ch))
        notes.append(f"centre-cropped {w}x{h} to {cw}x{ch} (images.fit=crop)")
    elif w * H != h * W:
        cw, ch = (w, max(h, round(w * H / W))) if wider else (max(w, round(h * W / H)), h)
        canvas = Image.new("RGB", (cw, ch), pol.background)
        canvas.paste(im, ((cw - w) // 2, (ch - h) // 2))
        im = canvas
        notes.append(f"padded {w}x{h} to {cw}x{ch} with {pol.background_name} (images.fit=pad)")
    cw, ch = im.size
    if (cw, ch) == (W, H):
        return im, notes
    # a square onto a square says sides ("upscaled 16->32 px"), other shapes width x height
    was, to = (f"{cw}", f"{W}") if cw == ch and W == H else (f"{cw}x{ch}", f"{W}x{H}")
    factor = max(W / cw, H / ch)
    if factor > 1:
        notes.append(f"upscaled {was}->{to} px ({factor:.2g}x)" + (
            f": expect a blurry image; give images of at least {to} px" if factor >= UPSCALE_WARN else ""))
    else:
        notes.append(f"downscaled {was}->{to} px")
    return im.resize((W, H), Image.BICUBIC), notes


def report(path: str | Path, key: str, notes: list[str]) -> None:
    """The one warning line for an image whose pixels were changed (nothing when `notes` is empty)."""
    if notes:
        log.warning("image %s (%s): %s", path, key, "; ".join(notes))


def _kind_of_change(notes: list[str]) -> tuple[str, ...]:
    """What was done to an image, without its numbers: images changed the same way share one warning line."""
    return tuple(re.sub(r"[\d.]+", "#", n.split(":")[0]) for n in notes)


def report_many(changed: list[tuple[Path, list[str]]], key: str, total: int) -> None:
    """One warning line per kind of change over a folder's images (the count and an example file), not one per
    image: 10,000 images downscaled the same way are one line."""
    groups: dict[tuple[str, ...], list[tuple[Path, list[str]]]] = {}
    for path, notes in changed:
        if notes:
            groups.setdefault(_kind_of_change(notes), []).append((path, notes))
    for items in groups.values():
        path, notes = items[0]
        if len(items) == 1:
            report(path, key, notes)
        else:
            log.warning("%d of %d images (%s) were changed the same way, e.g. %s: %s", len(items), total, key, path,
                        "; ".join(notes))


def read_image(path: str | Path, key: str, resolution: int | Sequence[int] | None = None,
               pol: ImagePolicy | None = None, *,
               switches: str | None = None, convert: bool = False, resize: bool = False) -> np.ndarray:
    """One image file as RGB uint8 [H, W, 3] (at its own size, or fitted to `resolution`: one side, or
    (height, width)), read per the policy, with one warning line if anything was changed. `key` names the
    config setting.

    Strict reading (inversion sources): with `switches`, the config prefix of a `convert` and a `resize`
    switch (e.g. "technique.targets"), the file must already be RGB and of that size. Other
    modes are refused unless `convert`, other sizes unless `resize` (EXIF orientation is applied first,
    so the size checked is the displayed one); a fix opted into is also warned about (warnings.warn)
    naming its switch."""
    array, notes = _read(path, key, resolution, pol, switches=switches, convert=convert, resize=resize)
    report(path, key, notes)
    return array


def _read(path: str | Path, key: str, resolution: int | Sequence[int] | None = None,
          pol: ImagePolicy | None = None, *,
          switches: str | None = None, convert: bool = False, resize: bool = False) -> tuple[np.ndarray, list[str]]:
    """read_image without its warning line: the array and the notes of what was changed."""
    pol = pol or ImagePolicy()
    im, notes = open_image(path, key, pol)
    if switches is not None and im.mode != "RGB":
        if not convert:
            raise ValueError(f"{key}: image {path} has mode {im.mode}; inversion needs RGB images. Convert it "
                             f"(PIL: Image.open(p).convert('RGB')) or set {switches}.convert=true")
        warnings.warn(f"converting {path} from mode {im.mode} to RGB ({switches}.convert=true)")
    im, more = to_rgb(im, pol)
    notes += more
    if resolution is not None:
        H, W = hw(resolution)  # (width x height in the messages, as PIL and image viewers give sizes)
        if switches is not None and im.size != (W, H):
            if not resize:
                raise ValueError(f"{key}: image {path} is {im.width}x{im.height} but the generator works at "
                                 f"{W}x{H}; resize it (PIL: im.resize(({W}, {H}), "
                                 f"Image.BICUBIC)) or set {switches}.resize=true to resize it here "
                                 f"(images.fit={pol.fit} for another aspect ratio)")
            warnings.warn(f"resizing {path} from {im.width}x{im.height} to {W}x{H} (bicubic; "
                          f"{switches}.resize=true; another aspect ratio: images.fit={pol.fit})")
        im, more = fit(im, (H, W), pol)
        notes += more
    return np.asarray(im), notes


def read_images(paths: Sequence[str | Path], key: str, resolution: int | Sequence[int],
                pol: ImagePolicy | None = None) -> np.ndarray:
    """Several image files fitted to `resolution` (one side, or (height, width)), as uint8 [K, H, W, 3]: at most
    MAX_IMAGES of them
    (one ConfigError naming `key` otherwise), written into one preallocated array, and one warning line per kind
    of change (report_many)."""
    if len(paths) > MAX_IMAGES:
        raise ConfigError(key, f"lists {len(paths)} images, over the cap of {MAX_IMAGES}",
                          f"use at most {MAX_IMAGES} (3-10 is typical for a concept)")
    out = np.zeros((len(paths), *hw(resolution), 3), np.uint8)
    changed = []
    for i, p in enumerate(paths):
        out[i], notes = _read(p, key, resolution, pol)
        changed.append((Path(p), notes))
    report_many(changed, key, len(paths))
    return out


# ---------------------------------------------------------------------------- config-time file checks
# The config validator (steerexp.validate) runs these on every file and folder setting before any model loads:
# from os.stat and the images' headers alone, one ConfigError naming the key. No torch here either.
def check_regular_file(key: str, p: Path, missing: str, fix: str) -> None:
    """`p` is a regular file, or one ConfigError: `missing` (e.g. "prompt file not found") or what it is instead
    (not_regular: from os.stat alone, so a FIFO or /dev/zero cannot block or fill memory)."""
    try:
        kind = not_regular(p)
    except (FileNotFoundError, NotADirectoryError):
        raise ConfigError(key, f"{missing}: {p}", fix) from None
    except OSError as err:
        raise ConfigError(key, f"cannot read {p} ({err.strerror or err})", "check the file and its permissions") \
            from None
    if kind is not None:
        raise ConfigError(key, f"{p} is {kind}, not a regular file", fix)


def check_image_count(key: str, n: int, verb: str = "holds") -> None:
    if n > MAX_IMAGES:
        raise ConfigError(key, f"{verb} {n} PNG/JPG images, over the cap of {MAX_IMAGES}",
                          f"use at most {MAX_IMAGES} (3-10 is typical for a concept)")


def check_user_image(key: str, f: Path, pol: ImagePolicy, missing: str = "image file not found",
                     fix: str = "give existing PNG/JPG files") -> None:
    """One user image, from its header: a regular file Pillow reads, within images.min_side / max_aspect /
    max_pixels of the policy `pol` (image_size: the same rules the run applies)."""
    try:
        image_size(f, key, pol)
    except FileNotFoundError:
        raise ConfigError(key, f"{missing}: {f}", fix) from None


def check_folder_images(key: str, p: Path, pol: ImagePolicy, allow_empty: bool = False) -> None:
    """Every PNG/JPG file of a folder (as image_files_in lists them): at most MAX_IMAGES, each one a readable
    image within the policy's size rules."""
    try:
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    except OSError as err:
        raise ConfigError(key, f"cannot list {p} ({err.strerror or err})", "check the folder's permissions") from None
    if not files and not allow_empty:
        raise ConfigError(key, f"no PNG/JPG images in {p}", "add some (3-10 is typical)")
    check_image_count(key, len(files))
    for f in files:
        check_user_image(key, f, pol)


def check_image_list(key: str, value: list, pol: ImagePolicy) -> None:
    """A list of image files (technique.targets.files as a list): not empty, at most MAX_IMAGES, each a user image."""
    if not value:
        raise ConfigError(key, "is an empty list", f"give image paths or a folder, or set {key}=null")
    check_image_count(key, len(value), "lists")
    for i, f in enumerate(value):
        if not isinstance(f, str):
            raise ConfigError(f"{key}[{i}]", f"must be an image path, got {f!r}", "give existing PNG/JPG files")
        check_user_image(f"{key}[{i}]", Path(f).expanduser(), pol)


def check_image_folder(key: str, value: str, p: Path, pol: ImagePolicy) -> None:
    if not p.is_dir():
        raise ConfigError(key, f"image folder not found: {p}", "point it at a folder of PNG/JPG images")
    check_folder_images(key, p, pol)


def check_image_files(key: str, value: str, p: Path, pol: ImagePolicy) -> None:
    if not p.exists():
        raise ConfigError(key, f"no such folder or file: {p}", "give a folder of PNG/JPG images or a list of files")
    if p.is_dir():
        check_image_folder(key, value, p, pol)
    else:
        check_user_image(key, p, pol)


def check_folder(key: str, value: str, p: Path, pol: ImagePolicy) -> None:
    if not p.is_dir():
        raise ConfigError(key, f"folder not found: {p}", f"point it at a folder of PNG/JPG images, or {key}=null")
    check_folder_images(key, p, pol, allow_empty=True)


def check_image_file(key: str, value: str, p: Path, pol: ImagePolicy) -> None:
    check_user_image(key, p, pol, "image not found", "give an existing PNG/JPG file")


# the validator's path kinds (steerexp.validate.PATH_RULES) whose settings are images: kind -> check(key, value, p, pol)
FILE_CHECKS = {"image_folder": check_image_folder, "image_files": check_image_files, "folder": check_folder,
               "image_file": check_image_file}


# ---------------------------------------------------------------------------- tensors and loading
def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [0, 1]."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0


def image_files_in(folder: Path) -> list[Path]:
    """The PNG/JPG files of a folder, sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def load_image(path: str | Path, key: str, resolution: int | Sequence[int] | None = None,
               pol: ImagePolicy | None = None) -> torch.Tensor:
    """One image file (read_image: at its own size, or fitted to `resolution`: one side or (height, width)) as
    [1, 3, H, W] in [0, 1], read per the policy `pol`; `key` names the config field in errors."""
    return to_tensor(read_image(path, key, resolution, pol)[None])


def load_folder(folder: str | Path, resolution: int | Sequence[int], key: str,
                pol: ImagePolicy | None = None) -> tuple[torch.Tensor, list[str]]:
    """All PNG/JPG images of `folder`, sorted by name, fitted to `resolution` (one side, or (height, width)) per
    the policy `pol`, as [K, 3, H, W] in [0, 1], and their file names. `key` is the config setting named in
    errors."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{key}: image folder not found: {folder}; point it at a folder of PNG/JPG images")
    files = image_files_in(folder)
    if not files:
        raise ValueError(f"{key}: no PNG/JPG images in {folder} (K = 0); add some")
    if len(files) > MAX_IMAGES:
        raise ConfigError(key, f"{folder} holds {len(files)} PNG/JPG images, over the cap of {MAX_IMAGES}",
                          f"use a folder of at most {MAX_IMAGES} (3-10 is typical for a concept)")
    return to_tensor(read_images(files, key, resolution, pol)), [f.name for f in files]


# ---------------------------------------------------------------------------- grids and saving
def side_by_side_grid(paired, n_seeds: int, gap: int = 2) -> torch.Tensor:
    """`paired.baseline` and `paired.edited` ([P * n_seeds, 3, H, W], prompt-major, e.g. an
    evaluators.base.Paired) as one grid: rows are prompts, columns seeds; baseline block | edited
    block. [3, H, W] in [0, 1]."""
    import torch

    b, e = paired.baseline, paired.edited
    n_prompts = len(b) // n_seeds
    _, c, h, w = b.shape
    rows = []
    for i in range(n_prompts):
        sl = slice(i * n_seeds, (i + 1) * n_seeds)
        left = torch.cat(list(b[sl]), dim=-1)
        right = torch.cat(list(e[sl]), dim=-1)
        rows.append(torch.cat([left, torch.ones(c, h, gap * 2), right], dim=-1))
    return torch.cat([torch.cat([r, torch.ones(c, gap, r.shape[-1])], dim=-2) for r in rows], dim=-2)


def image_grid(columns: list[torch.Tensor], rows: int, gap: int = 2) -> torch.Tensor:
    """columns: [N, 3, H, W] each; one row per image (the first `rows`), a gap between columns."""
    import torch

    out = []
    for i in range(min(rows, len(columns[0]))):
        cells = []
        for c in columns:
            cells += [c[i], torch.ones(3, c.shape[-2], gap)]
        out += [torch.cat(cells[:-1], dim=-1), torch.ones(3, gap, sum(x.shape[-1] for x in cells[:-1]))]
    return torch.cat(out[:-1], dim=-2)


@dataclass
class GridLabels:
    """What a grid shows, for a reader: a title per row (drawn on the left) and per image column (on
    top), titles over spans of columns (`groups`, e.g. baseline | edited), where rows and columns sit
    in the unscaled grid (pixels), and `what`: one line saying what rows and columns are."""
    rows: list[str]
    columns: list[str]
    row_tops: list[int]
    column_lefts: list[int]
    cell: tuple[int, int]                                       # (height, width) of one image
    groups: list[tuple[str, int, int]] = field(default_factory=list)   # (title, left, right) pixels
    what: str = ""

    def caption(self) -> str:
        """One line for W&B and the report: what the grid shows and its rows."""
        rows = "; ".join(f"{i + 1}: {r}" for i, r in enumerate(self.rows))
        return f"{self.what}. Rows {rows}" if self.what else f"Rows {rows}"

    def as_dict(self) -> dict:
        return {"what": self.what, "rows": list(self.rows), "columns": list(self.columns),
                "groups": [g[0] for g in self.groups], "caption": self.caption()}


def side_by_side_labels(paired, n_seeds: int, gap: int = 2) -> GridLabels:
    """The labels of `side_by_side_grid(paired, n_seeds, gap)`: a row per prompt, a column per seed in
    each block, the blocks titled baseline and edited."""
    h, w = paired.baseline.shape[-2:]
    n_rows = len(paired.baseline) // n_seeds
    block = n_seeds * w + 2 * gap  # one block and the gap after it
    seeds = [f"seed {s}" for s in paired.seeds[:n_seeds]]
    return GridLabels(
        rows=[paired.prompts[i * n_seeds] for i in range(n_rows)],
        columns=seeds + seeds,
        row_tops=[i * (h + gap) for i in range(n_rows)],
        column_lefts=[b * block + j * w for b in (0, 1) for j in range(n_seeds)],
        cell=(h, w),
        groups=[("baseline", 0, n_seeds * w), ("edited", block, block + n_seeds * w)],
        what="rows: prompts ({} = the concept slot); columns: seeds; left block baseline, right block edited",
    )


def image_grid_labels(columns: list[torch.Tensor], rows: int, row_names: list[str], column_names: list[str],
                      what: str = "", gap: int = 2) -> GridLabels:
    """The labels of `image_grid(columns, rows, gap)`: `row_names` for its rows (the first ones shown),
    `column_names` for its columns."""
    h, w = columns[0].shape[-2:]
    n_rows = min(rows, len(columns[0]))
    return GridLabels(rows=[str(r) for r in row_names[:n_rows]], columns=[str(c) for c in column_names],
                      row_tops=[i * (h + gap) for i in range(n_rows)],
                      column_lefts=[j * (w + gap) for j in range(len(columns))], cell=(h, w), what=what)


def _font(size: int):
    """DejaVu Sans (shipped with matplotlib, a dependency) at `size` px; Pillow's own font otherwise."""
    from importlib.util import find_spec

    from PIL import ImageFont

    spec = find_spec("matplotlib")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
        if path.is_file():
            return ImageFont.truetype(str(path), size)
    return ImageFont.load_default(size)


def _fit_text(draw, text: str, font, width: int) -> str:
    """`text`, shortened with an ellipsis to fit `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def labelled_image(grid: torch.Tensor, labels: GridLabels | None = None, upscale: int = 2,
                   font_size: int = 12, max_label: int = 320) -> Image.Image:
    """A [3, H, W] grid in [0, 1] as an RGB image upscaled `upscale` times (nearest neighbour), with
    `labels` drawn around it: row titles on the left (at most `max_label` px), group and column
    titles on top."""
    from PIL import ImageDraw

    img = Image.fromarray((grid.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
    img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    if labels is None:
        return img
    font = _font(font_size)
    probe = ImageDraw.Draw(img)
    line = font_size + 6
    left = min(max_label, 10 + math.ceil(max((probe.textlength(r, font=font) for r in labels.rows), default=0)))
    top = line * (2 if labels.groups else 1)
    canvas = Image.new("RGB", (img.width + left + 4, img.height + top), "white")
    canvas.paste(img, (left + 4, top))
    draw = ImageDraw.Draw(canvas)
    h, w = labels.cell[0] * upscale, labels.cell[1] * upscale
    for title, x0, x1 in labels.groups:
        a, b = left + 4 + x0 * upscale, left + 4 + x1 * upscale
        draw.text(((a + b) / 2, line / 2), _fit_text(draw, title, font, b - a), font=font, fill="black", anchor="mm")
        draw.line([(a + 2, line - 2), (b - 2, line - 2)], fill="#888888")
    small = _font(font_size - 2)  # a column title wider than its image gets a smaller font, then an ellipsis
    for title, x in zip(labels.columns, labels.column_lefts):
        cx = left + 4 + x * upscale + w / 2
        f = font if draw.textlength(title, font=font) <= w - 2 else small
        draw.text((cx, top - line / 2), _fit_text(draw, title, f, w - 2), font=f, fill="#333333", anchor="mm")
    for title, y in zip(labels.rows, labels.row_tops):
        draw.text((4, top + y * upscale + h / 2), _fit_text(draw, title, font, left - 8), font=font,
                  fill="black", anchor="lm")
    return canvas


def save_png(path: Path, grid: torch.Tensor, upscale: int = 2, labels: GridLabels | None = None) -> None:
    """A [3, H, W] grid in [0, 1] as a PNG, upscaled `upscale` times (nearest neighbour), with its
    labels drawn around it when given (labelled_image)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    labelled_image(grid, labels, upscale).save(path)


# ---------------------------------------------------------------------------- distances
def rms_distances(images: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
    """[N, M] per-pixel RMS from each image to each reference (images resized to the refs' size)."""
    import torch.nn.functional as F

    if images.shape[-2:] != refs.shape[-2:]:
        images = F.interpolate(images, size=refs.shape[-2:], mode="bilinear", antialias=True, align_corners=False)
    return (images.flatten(1)[:, None, :] - refs.flatten(1)[None, :, :]).pow(2).mean(-1).sqrt()


def nn_rms(images: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
    """Per image, the smallest per-pixel RMS to any reference."""
    return rms_distances(images, refs).min(dim=1).values
