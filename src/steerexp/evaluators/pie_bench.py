"""pie_bench: the PIE-Bench evaluation protocol (Ju et al. 2023, "PnP Inversion / Direct Inversion: Boosting
Diffusion-based Editing with 3 Lines of Code"; 700 images, 10 edit types, hand-drawn edit masks).

The definitions follow the authors' evaluation code, read at https://github.com/cure-lab/PnPInversion
(evaluation/evaluate.py: mask_decode, calculate_metric, the default metric list; evaluation/matrics_calculator.py:
MetricsCalculator, LossG.calculate_global_ssim_loss, VitExtractor). Per image, with the source image S, the edit
E (8-bit RGB, values v in 0..255, x = v / 255), the prompts with PIE's "[ ]" markers removed, and the edit mask M
(1: the region the edit may change; after decoding, PIE's border rule below):

  structure_e3    DINO ViT-B/8 structure distance x 10^3 (Tumanyan et al.'s "Splicing ViT features" self-similarity
                  loss): each whole image, as 0..255 values (their code does not divide by 255), is resized so its
                  shorter side is 224 (longer side capped at 480; bilinear, no antialias: torchvision 0.13's tensor
                  Resize in their environment), normalised with ImageNet's mean / std, and run through DINO ViT-B/8;
                  the keys of the last (12th) block, all heads concatenated, of every token (CLS included) give the
                  cosine self-similarity matrix K K^T / clamp(|K| |K|^T, 1e-8); the distance is the mean squared
                  difference of the two matrices (no mask)
  psnr_unedit     PSNR (dB, data range 1) of E * (1 - M) against S * (1 - M): torchmetrics PeakSignalNoiseRatio,
                  i.e. the squared error summed outside M divided by all 3 H W values (the masked-out zeros count);
                  identical images give +inf, as theirs does (kept: a mean with an inf is inf)
  lpips_unedit_e3 LPIPS x 10^3 of the same masked images (torchmetrics, net_type=squeeze, inputs 2 x - 1)
  mse_unedit_e4   MSE x 10^4 of the same masked images (torchmetrics MeanSquaredError: over all 3 H W values)
  ssim_unedit_e2  SSIM x 10^2 of the same masked images (torchmetrics StructuralSimilarityIndexMeasure, data
                  range 1, its defaults: Gaussian kernel 11, sigma 1.5; the mean of the SSIM map)
  clip_source     CLIP score of S and the source prompt: torchmetrics CLIPScore's max(100 cos, 0) (their
                  calculator; its formula is computed here, see ClipScore), with CLIP ViT-L/14
                  (openai/clip-vit-large-patch14; its processor resizes and crops to 224)
  clip_whole      CLIP score of E and the target prompt (PIE's "CLIP Similarity, Whole")
  clip_edited     CLIP score of uint8(E * M) and the target prompt (PIE's "CLIP Similarity, Edited")

NaN rule: a metric outside the mask is NaN when 1 - M has no pixel (an all-image mask); clip_edited is NaN when M
has none (never, with the border rule). Aggregation: per method, the mean over the images whose value is not
NaN (evaluate.py writes the string "nan" into its per-image CSV and the repository ships no averaging script; a
column mean that skips NaN, as pandas' does, is the rule applied here); how many were dropped is reported
(`<group>/dropped/<metric>/<method>`). Keys: `pie_bench/<group>/<metric>/<method>`, the group `all` (every
evaluated image) and one per edit category (folder mode: PIE's editing_type_id, `type_<id>`; world mode: the edit
type). The scales (x 10^3, x 10^4, x 10^2) are the paper's Table 1 units, in the key names.

Masks: mapping_file.json holds per image {image_path, original_prompt, editing_prompt, editing_instruction,
editing_type_id, blended_word, mask}; `mask` is a run-length code, pairs (start, length) of runs of 1 on the
row-major flattened H x W array (a run is clipped at the array's end), and mask_decode then sets the outermost
rows and columns to 1 ("to avoid annotation errors in boundary"). Their shape is fixed at 512 x 512 (PIE's
size); here it is the source image's shape, the same on PIE-Bench.

Folder mode (`data`: the PIE-Bench folder): sources are `<data>/<images>/<image_path>`, an edit is
`<edited folder>/<image_path>` (their output/<method>/annotation_images layout); an edit larger than its source
keeps its bottom-right source-sized crop (their crop of non-square [source | reconstruction | edit] strips; a square
edit of another size, which their code would fail on, is cropped the same way). The learned
metrics need their weights by local path (nothing is downloaded): `dino` (a transformers ViTModel folder of
facebook/dino-vitb8; the PnPInversion code loads the same weights through torch.hub from facebookresearch/dino),
`clip` (a transformers CLIPModel folder with its processor), `lpips_backbone` (torchvision's squeezenet1_1
weights file; torchmetrics' LPIPS would fetch it through torchvision, so we load it ourselves and keep
torchmetrics' own shipped linear layers). A folder that would leave any weight of DINO or CLIP at its random
initialisation (transformers only warns) is refused in one line.

World mode (`data: null`): the run's inversion technique edits world scenes exactly as evaluator.edit_bench does
(each source, each edit type in `types`, one target drawn from `seed`; methods from `methods`), sources and edits
quantised to 8 bits as a saved PNG would be, and M is the world's exact edit region: the union of the source's and
the target's object masks (every pixel the shape touches), dilated by `dilate` px; for a background edit, every
pixel outside the object, dilated by `dilate` px into it. `border` applies PIE's border rule (default on, as
PIE). Reference rows: `ground_truth` (the exact target render) and `vae` (the source's VAE round trip, no edit).
A learned metric without its weights is replaced by a stand-in, and its key says so:
  structure_standin_classifier_selfsim_e3  the same self-similarity MSE x 10^3, of the concept classifier's last
                  conv feature map (4 x 4 positions on the classifier's 32 px input, 8 px each, as DINO's 8 px
                  patches) instead of DINO's keys, no CLS token
  lpips_unedit_standin_classifier_conv_e3  LPIPS' formula without its learned weights on the concept
                  classifier's four conv stages: per stage the squared distance of the unit-normalised feature
                  vectors, averaged over positions, then averaged over stages, x 10^3, of the same masked images
  clip_{source,whole,edited}_standin_tinyclip  the CLIP score formula with the shipped tiny CLIP (scorers.clip)
None of them is comparable with a PIE-Bench figure; PSNR, MSE and SSIM are the exact definitions. World mode also
reports `pie_bench/<type>/seconds/<method>`, CPU seconds per image of the edit plus the inversion it reads, as
evaluator.edit_bench counts them (edit_bench.timed_edit; not part of the protocol).
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from steerexp import progress
from steerexp.evaluators.base import EvalContext, EvalResult
from steerexp.evaluators.edit import dilate, scene_mask
from steerexp.evaluators.pie_bench_spec import CATEGORIES, MAPPING_KEYS, edited_folders

SCALES = {"structure": 1e3, "lpips_unedit": 1e3, "mse_unedit": 1e4, "ssim_unedit": 1e2}
UNEDIT = ("psnr_unedit", "lpips_unedit", "mse_unedit", "ssim_unedit")
REFERENCES = ("ground_truth", "vae")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------- masks and files
def mask_decode(encoded: list[int], shape: tuple[int, int] = (512, 512), border: bool = True) -> np.ndarray:
    """PIE-Bench's run-length mask: pairs (start, length) of runs of 1 on the row-major flattened array (a run is
    clipped at the end), reshaped to `shape`; `border`: the outermost rows and columns set to 1, as theirs."""
    if len(encoded) % 2:
        raise ValueError(f"a PIE-Bench mask is pairs (start, length); got {len(encoded)} numbers")
    n = shape[0] * shape[1]
    flat = np.zeros(n, dtype=bool)
    for start, length in zip(encoded[0::2], encoded[1::2]):
        start, length = int(start), int(length)
        if start < 0 or length < 0:
            raise ValueError(f"a PIE-Bench mask run has a negative start or length: ({start}, {length})")
        flat[start:start + max(min(length, n - start), 0)] = True
    mask = flat.reshape(shape)
    if border:
        mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = True
    return mask


def strip_markers(prompt: str) -> str:
    """PIE's prompts mark the edited words with [ ]; the metrics read them without."""
    return prompt.replace("[", "").replace("]", "")


def read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def fit_edit(edit: np.ndarray, shape: tuple[int, int], path) -> np.ndarray:
    """An edit of another size than its source keeps its bottom-right source-sized crop (their crop)."""
    h, w = shape
    if edit.shape[:2] != (h, w) and edit.shape[0] >= h and edit.shape[1] >= w:
        edit = edit[edit.shape[0] - h:, edit.shape[1] - w:]
    if edit.shape[:2] != (h, w):
        raise ValueError(f"evaluator.pie_bench.edited: {path} is {edit.shape[1]}x{edit.shape[0]}, its source "
                         f"{w}x{h}; give edits of the source's size (or strips ending with it)")
    return edit


@dataclass
class Entry:
    key: str
    image_path: str
    source_prompt: str
    target_prompt: str
    category: str
    mask: list


def load_mapping(path: Path, categories=None) -> list[Entry]:
    """The entries of a PIE-Bench mapping_file.json, in file order (only `categories`, when given)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"evaluator.pie_bench.mapping_file: cannot read {path} as JSON ({e})") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f"evaluator.pie_bench.mapping_file: {path} is not a non-empty JSON object "
                         "{image id: {image_path, original_prompt, editing_prompt, editing_type_id, mask, ...}}")
    wanted = None if categories is None else {str(c) for c in categories}
    entries = []
    for key, item in data.items():
        missing = [k for k in MAPPING_KEYS if not isinstance(item, dict) or k not in item]
        if missing:
            raise ValueError(f"evaluator.pie_bench.mapping_file: entry {key!r} of {path} has no {missing[0]!r}; "
                             f"each entry needs {list(MAPPING_KEYS)}")
        cat = str(item["editing_type_id"])
        rel = Path(str(item["image_path"]))
        if rel.is_absolute() or ".." in rel.parts:   # images are read inside the named folders only
            raise ValueError(f"evaluator.pie_bench.mapping_file: entry {key!r} of {path} has image_path {str(rel)!r}, "
                             "which leaves the images folder; each image_path must be relative, without '..'")
        if wanted is None or cat in wanted:
            entries.append(Entry(str(key), str(item["image_path"]), strip_markers(str(item["original_prompt"])),
                                 strip_markers(str(item["editing_prompt"])), cat, list(item["mask"])))
    if not entries:
        raise ValueError(f"evaluator.pie_bench.categories: no entry of {path} has editing_type_id in "
                         f"{sorted(wanted or [])}; choose from {list(CATEGORIES)}")
    return entries


# ---------------------------------------------------------------------------- the learned metrics
@contextlib.contextmanager
def quiet_loading():
    """No loading bars while transformers reads a folder (the console holds progress and metrics: cli.py)."""
    from transformers.utils import logging as transformers_logging

    was = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            transformers_logging.enable_progress_bar()


def refuse_missing(key: str, folder, info: dict) -> None:
    """A weights folder that leaves a weight of the network at its random initialisation is refused (transformers
    only reports it): the figures would silently come from a random network."""
    missing = [k for k in info.get("missing_keys", []) if not k.startswith("pooler.")]
    if missing:
        raise ValueError(f"evaluator.pie_bench.{key}: {folder} lacks {len(missing)} weights of the network (e.g. "
                         f"{missing[0]}); give the complete model folder (save_pretrained)")


def device_of(name: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def cosine_selfsim(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """[N, T, D] -> [N, T, T]: x x^T / clamp(|x| |x|^T, eps) (their attn_cosine_sim)."""
    norm = x.norm(dim=-1, keepdim=True)
    return (x @ x.transpose(1, 2)) / (norm @ norm.transpose(1, 2)).clamp(min=eps)


def protocol_resize(x: torch.Tensor, size: int = 224, max_size: int = 480) -> torch.Tensor:
    """torchvision's Resize(224, max_size=480) on a tensor (torchvision 0.13: bilinear, no antialias)."""
    h, w = x.shape[-2:]
    short, long = min(h, w), max(h, w)
    new_short, new_long = size, int(size * long / short)
    if new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    out = (new_short, new_long) if h <= w else (new_long, new_short)
    if out == (h, w):
        return x
    return F.interpolate(x, size=out, mode="bilinear", align_corners=False, antialias=False)


class DinoStructure:
    """The structure distance with a transformers ViTModel (DINO ViT-B/8): the last block's keys' self-similarity."""

    def __init__(self, folder: str, device: str = "cpu"):
        from transformers import ViTModel

        try:
            with quiet_loading():
                self.model, info = ViTModel.from_pretrained(str(Path(folder).expanduser()), add_pooling_layer=False,
                                                            local_files_only=True, output_loading_info=True,
                                                            use_safetensors=True)
        except (OSError, ValueError) as e:
            raise ValueError(f"evaluator.pie_bench.dino: cannot load a ViTModel from {folder} ({str(e)[:160]}); "
                             "set it to a transformers folder of facebook/dino-vitb8") from None
        refuse_missing("dino", folder, info)
        self.model.to(device).eval().requires_grad_(False)
        self.device = device
        layers = self.model.layers if hasattr(self.model, "layers") else self.model.encoder.layer   # transformers 5 | 4
        attention = layers[-1].attention
        self.key = getattr(attention, "k_proj", None) or attention.attention.key  # transformers 5 | 4
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    @torch.no_grad()
    def selfsim(self, images255: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] pixel values 0..255 -> [N, T, T] (T = 1 + patches)."""
        x = (protocol_resize(images255.to(self.device).float()) - self.mean) / self.std
        keys: list[torch.Tensor] = []
        hook = self.key.register_forward_hook(lambda module, inputs, output: keys.append(output))
        try:
            size = self.model.config.image_size
            self.model(pixel_values=x, interpolate_pos_encoding=tuple(x.shape[-2:]) != (size, size))
        finally:
            hook.remove()
        return cosine_selfsim(keys[-1].float())

    def distance(self, source255: torch.Tensor, edit255: torch.Tensor) -> np.ndarray:
        a, b = self.selfsim(source255), self.selfsim(edit255)
        return (a - b).pow(2).mean((1, 2)).cpu().numpy()


def lpips_squeeze(backbone: str, device: str = "cpu"):
    """torchmetrics' LPIPS (net_type=squeeze) with its shipped linear layers and torchvision's squeezenet1_1
    backbone read from a local .safetensors file (weights load without pickle; torchvision's .pth converts with
    `save_file(torch.load("squeezenet1_1-b8a52dc0.pth", weights_only=True), "squeezenet1_1.safetensors")`, once,
    by the user), where torchmetrics would download it. (torchmetrics' own small linear layers, shipped inside
    torchmetrics, load through its own torch.load: weights-only by default from torch 2.6.)"""
    from torchmetrics.functional.image.lpips import _NoTrainLpips

    net = _NoTrainLpips(net="squeeze", pnet_rand=True)   # pnet_rand: no download; the backbone is loaded below
    path = Path(backbone).expanduser()
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except Exception as e:  # noqa: BLE001 (any unreadable file: one line)
        raise ValueError(f"evaluator.pie_bench.lpips_backbone: cannot read {path} ({type(e).__name__}); give "
                         "torchvision's squeezenet1_1 weights as .safetensors") from None
    ours = {}
    for key in net.net.state_dict():   # slices.<j>.<i>.<param> (or slice<j>.<i>.<param>) hold features[i]
        parts = key.split(".")
        index, rest = (parts[2], parts[3:]) if parts[0] == "slices" else (parts[1], parts[2:])
        source = ".".join(["features", index, *rest])
        if source in state:
            ours[key] = state[source]
    expected = set(net.net.state_dict())
    if set(ours) != expected or any(ours[k].shape != v.shape for k, v in net.net.state_dict().items()):
        raise ValueError(f"evaluator.pie_bench.lpips_backbone: {path} is not torchvision's squeezenet1_1 state dict "
                         "(features.*); give squeezenet1_1-b8a52dc0.pth converted to .safetensors")
    net.net.load_state_dict(ours)
    return net.to(device).eval()


class ClipScore:
    """torchmetrics' CLIPScore formula, max(100 cos, 0), per image, with a local transformers CLIPModel folder and
    its processor. Computed here, not by torchmetrics.multimodal.CLIPScore: torchmetrics 1.9 reads
    get_image_features() as a tensor, which transformers 5 returns as a ModelOutput (its pooler_output). The steps
    are torchmetrics': processor(images=[uint8 CHW], padding=True) -> image features; processor(text, padding=True),
    cut to the text model's max_position_embeddings -> text features; both L2-normalised."""

    def __init__(self, folder: str, device: str = "cpu"):
        from transformers import CLIPModel, CLIPProcessor

        folder = str(Path(folder).expanduser())
        try:
            with quiet_loading():
                self.model, info = CLIPModel.from_pretrained(folder, local_files_only=True, output_loading_info=True,
                                                              use_safetensors=True)
                self.processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, TypeError) as e:
            raise ValueError(f"evaluator.pie_bench.clip: cannot load a CLIPModel and its processor from {folder} "
                             f"({str(e)[:160]}); set it to a transformers folder of openai/clip-vit-large-patch14") \
                from None
        refuse_missing("clip", folder, info)
        self.model.to(device).eval().requires_grad_(False)
        self.device = device

    @staticmethod
    def _features(out) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output   # transformers 4 | 5

    @torch.no_grad()
    def __call__(self, images_u8: torch.Tensor, texts: list[str]) -> np.ndarray:
        pixels = self.processor(images=[im.cpu() for im in images_u8], return_tensors="pt", padding=True)
        img = self._features(self.model.get_image_features(pixel_values=pixels["pixel_values"].to(self.device)))
        tok = self.processor(text=list(texts), return_tensors="pt", padding=True)
        n = self.model.config.text_config.max_position_embeddings
        ids, attention = tok["input_ids"][..., :n].to(self.device), tok["attention_mask"][..., :n].to(self.device)
        txt = self._features(self.model.get_text_features(input_ids=ids, attention_mask=attention))
        img, txt = img / img.norm(p=2, dim=-1, keepdim=True), txt / txt.norm(p=2, dim=-1, keepdim=True)
        return (100 * (img * txt).sum(-1)).clamp(min=0).float().cpu().numpy()


class TinyClipStandin:
    """The CLIP score formula, max(100 cos, 0), with the shipped tiny CLIP (a stand-in for CLIP ViT-L/14)."""

    def __init__(self, clip):
        self.clip = clip

    @torch.no_grad()
    def __call__(self, images_u8: torch.Tensor, texts: list[str]) -> np.ndarray:
        cos = (self.clip.encode_images(images_u8.float() / 255) * self.clip.encode_texts(texts)).sum(-1)
        return (100 * cos).clamp(min=0).cpu().numpy()


class ClassifierStandins:
    """Stand-ins for DINO structure and LPIPS from the concept classifier's conv stages (module docstring)."""

    def __init__(self, classifier):
        if not hasattr(classifier, "body") or not hasattr(classifier, "_prepare"):
            raise ValueError("evaluator.pie_bench: the world-mode stand-ins need the concept classifier "
                             "(scorers.classifier: null, the shipped one); or give dino and lpips_backbone")
        self.clf = classifier
        modules = list(classifier.body)
        flat = next((i for i, m in enumerate(modules) if isinstance(m, torch.nn.Flatten)), len(modules))
        self.stages = [i for i, m in enumerate(modules[:flat]) if isinstance(m, torch.nn.ReLU)]   # the conv stages

    @torch.no_grad()
    def features(self, images01: torch.Tensor) -> list[torch.Tensor]:
        x, out = self.clf._prepare(images01.float()), []
        for i, module in enumerate(self.clf.body):
            x = module(x)
            if i in self.stages:
                out.append(x)
            if i == self.stages[-1]:
                break
        return out

    def structure(self, source01: torch.Tensor, edit01: torch.Tensor) -> np.ndarray:
        a, b = self.features(source01)[-1], self.features(edit01)[-1]
        sa, sb = (cosine_selfsim(f.flatten(2).transpose(1, 2)) for f in (a, b))
        return (sa - sb).pow(2).mean((1, 2)).cpu().numpy()

    def lpips(self, source01: torch.Tensor, edit01: torch.Tensor) -> np.ndarray:
        per_stage = []
        for fa, fb in zip(self.features(source01), self.features(edit01)):
            ua = fa / (fa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)   # LPIPS' _normalize_tensor
            ub = fb / (fb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            per_stage.append((ua - ub).pow(2).sum(1).mean((1, 2)))
        return torch.stack(per_stage).mean(0).cpu().numpy()


# ---------------------------------------------------------------------------- the metrics of one batch
class Metrics:
    """The protocol's per-image metrics, with real weights where given, else (world mode) the stand-ins."""

    def __init__(self, dino=None, clip=None, lpips=None, standins: ClassifierStandins | None = None,
                 clip_standin: TinyClipStandin | None = None):
        self.dino, self.clip, self.lpips_net = dino, clip, lpips
        self.standins, self.clip_standin = standins, clip_standin
        if (dino is None or lpips is None) and standins is None or clip is None and clip_standin is None:
            raise ValueError("evaluator.pie_bench: set dino, clip and lpips_backbone (folder mode needs all three)")

    def names(self) -> dict[str, str]:
        """metric -> its output name (a stand-in's says so)."""
        return {
            "structure": "structure_e3" if self.dino else "structure_standin_classifier_selfsim_e3",
            "psnr_unedit": "psnr_unedit", "mse_unedit": "mse_unedit_e4", "ssim_unedit": "ssim_unedit_e2",
            "lpips_unedit": "lpips_unedit_e3" if self.lpips_net else "lpips_unedit_standin_classifier_conv_e3",
            **{k: k if self.clip else f"{k}_standin_tinyclip" for k in ("clip_source", "clip_whole", "clip_edited")},
        }

    @torch.no_grad()
    def __call__(self, source_u8: torch.Tensor, edit_u8: torch.Tensor, mask: torch.Tensor,
                 source_prompts: list[str], target_prompts: list[str]) -> dict[str, np.ndarray]:
        """source_u8, edit_u8 [N, 3, H, W] uint8; mask [N, H, W] bool (the edit region) -> {metric: [N]} in the
        reported units (x 10^k), NaN where the protocol says."""
        s, e = source_u8.float() / 255, edit_u8.float() / 255
        keep = (~mask)[:, None].float()
        sk, ek = s * keep, e * keep
        out: dict[str, np.ndarray] = {}
        if self.dino:
            out["structure"] = self.dino.distance(source_u8.float(), edit_u8.float())
        else:
            out["structure"] = self.standins.structure(s, e)
        out["psnr_unedit"] = peak_signal_noise_ratio(ek, sk, data_range=1.0, dim=(1, 2, 3), reduction="none").numpy()
        out["mse_unedit"] = (ek - sk).pow(2).mean((1, 2, 3)).numpy()
        out["ssim_unedit"] = structural_similarity_index_measure(ek, sk, data_range=1.0, reduction="none").numpy()
        if self.lpips_net is not None:
            dev = next(self.lpips_net.parameters()).device
            out["lpips_unedit"] = self.lpips_net(ek.to(dev) * 2 - 1, sk.to(dev) * 2 - 1).flatten().cpu().numpy()
        else:
            out["lpips_unedit"] = self.standins.lpips(sk, ek)
        clip = self.clip or self.clip_standin
        out["clip_source"] = clip(source_u8, source_prompts)
        out["clip_whole"] = clip(edit_u8, target_prompts)
        out["clip_edited"] = clip((edit_u8.float() * mask[:, None].float()).to(torch.uint8), target_prompts)
        empty_keep = ~(~mask).flatten(1).any(1).numpy()       # an all-image mask: nothing outside it
        empty_mask = ~mask.flatten(1).any(1).numpy()
        for k in UNEDIT:
            out[k] = np.where(empty_keep, np.nan, out[k].astype(np.float64))
        out["clip_edited"] = np.where(empty_mask, np.nan, out["clip_edited"].astype(np.float64))
        return {k: np.asarray(v, dtype=np.float64) * SCALES.get(k, 1.0) for k, v in out.items()}


def aggregate(values: np.ndarray) -> tuple[float, int]:
    """The protocol's mean: over the images whose value is not NaN (how many were dropped). An inf is kept."""
    values = np.asarray(values, dtype=np.float64)
    kept = values[~np.isnan(values)]
    return (float(np.mean(kept)) if len(kept) else float("nan")), int(len(values) - len(kept))


def quantise(images01: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats -> uint8 values, as a saved PNG holds them."""
    return (images01.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


class PieBench:
    name = "pie_bench"

    def __init__(self, data: str | None = None, mapping_file: str = "mapping_file.json",
                 images: str = "annotation_images", edited=None, categories=None, dino: str | None = None,
                 clip: str | None = None, lpips_backbone: str | None = None, device: str = "auto",
                 methods: list[str] | None = None, types: list[str] | None = None,
                 prompt_template: str = "a {size} {colour} {shape} {position} on a {background} background",
                 seed: int = 0, dilate: int = 1, border: bool = True):
        from steerexp.evaluators.edit_bench_spec import TYPES

        self.data, self.mapping_file, self.images, self.edited = data, mapping_file, images, edited
        self.categories = None if categories is None else [str(c) for c in categories]
        self.dino, self.clip, self.lpips_backbone, self.device = dino, clip, lpips_backbone, device
        self.methods, self.types = methods, list(types or TYPES)
        self.template, self.seed, self.dilate, self.border = prompt_template, seed, dilate, border

    def metrics(self, ctx: EvalContext | None, world_mode: bool) -> Metrics:
        """The metric set: real networks where their paths are set; in world mode, stand-ins for the others."""
        if not world_mode:
            missing = [k for k in ("dino", "clip", "lpips_backbone") if getattr(self, k) is None]
            if missing:
                raise ValueError(f"evaluator.pie_bench.{missing[0]}: folder mode needs it (a local path; nothing is "
                                 "downloaded)")
        dev = device_of(self.device)
        standins = None
        if world_mode and (self.dino is None or self.lpips_backbone is None):
            standins = ClassifierStandins(ctx.scorer("classifier"))
        return Metrics(dino=DinoStructure(self.dino, dev) if self.dino else None,
                       clip=ClipScore(self.clip, dev) if self.clip else None,
                       lpips=lpips_squeeze(self.lpips_backbone, dev) if self.lpips_backbone else None,
                       standins=standins,
                       clip_standin=TinyClipStandin(ctx.clip) if world_mode and self.clip is None else None)

    def evaluate(self, ctx: EvalContext) -> EvalResult:
        return self.evaluate_folder(ctx) if self.data is not None else self.evaluate_world(ctx)

    # ------------------------------------------------------------------ results
    def summarise(self, per_image: dict, names: dict[str, str]) -> dict:
        """per_image: {(group, method): {metric: [values]}} -> the metrics (module docstring: aggregation)."""
        m: dict = {}
        for (group, method), values in per_image.items():
            for metric, vals in values.items():
                mean, dropped = aggregate(np.concatenate(vals))
                m[f"{self.name}/{group}/{names[metric]}/{method}"] = mean
                if metric in UNEDIT or metric == "clip_edited":
                    m[f"{self.name}/{group}/dropped/{names[metric]}/{method}"] = dropped
        return m

    @staticmethod
    def add(per_image: dict, groups: tuple[str, ...], method: str, values: dict[str, np.ndarray]) -> None:
        for group in groups:
            slot = per_image.setdefault((group, method), {})
            for k, v in values.items():
                slot.setdefault(k, []).append(np.atleast_1d(v))

    # ------------------------------------------------------------------ folder mode
    def evaluate_folder(self, ctx: EvalContext | None) -> EvalResult:
        root = Path(str(self.data)).expanduser()
        entries = load_mapping(root / self.mapping_file, self.categories)
        folders = {name: Path(f).expanduser() for name, f in edited_folders(self.edited).items()}
        for name, folder in folders.items():   # every edit is there before any network loads
            absent = [e.image_path for e in entries if not (folder / e.image_path).is_file()]
            if absent:
                raise ValueError(f"evaluator.pie_bench.edited: {name}: {len(absent)} of {len(entries)} edits are "
                                 f"missing, e.g. {folder / absent[0]}; lay the folder out like {root / self.images}")
        metrics = self.metrics(ctx, world_mode=False)
        names = metrics.names()
        per_image: dict = {}
        rows = []
        with progress.phase(f"pie_bench: {len(entries)} images x {len(folders)} methods",
                            total=len(entries) * len(folders)):
            for entry in entries:
                source = read_rgb(root / self.images / entry.image_path)
                mask = torch.from_numpy(mask_decode(entry.mask, source.shape[:2], self.border))[None]
                src = torch.from_numpy(source).permute(2, 0, 1)[None]
                for method, folder in folders.items():
                    path = folder / entry.image_path
                    edit = torch.from_numpy(fit_edit(read_rgb(path), source.shape[:2], path)).permute(2, 0, 1)[None]
                    values = metrics(src, edit, mask, [entry.source_prompt], [entry.target_prompt])
                    self.add(per_image, ("all", f"type_{entry.category}"), method, values)
                    rows.append([entry.key, entry.category, method] + [float(values[k][0]) for k in names])
                    progress.advance(1)
        m = {f"{self.name}/images": len(entries), **self.summarise(per_image, names)}
        return EvalResult(metrics=m, tables={f"{self.name}/per_image": (["image", "type", "method", *names.values()],
                                                                        rows)})

    # ------------------------------------------------------------------ world mode
    def edit_region(self, source_scene, target_scene, kind: str, res, pol) -> torch.Tensor:
        """The world's exact edit region (module docstring), with PIE's border rule when `border`."""
        if kind == "background":
            region = dilate(~scene_mask(source_scene, res, pol), self.dilate)
        else:
            region = dilate(scene_mask(source_scene, res, pol) | scene_mask(target_scene, res, pol), self.dilate)
        if self.border:
            region = region.clone()
            region[0, :] = region[-1, :] = region[:, 0] = region[:, -1] = True
        return region

    def evaluate_world(self, ctx: EvalContext) -> EvalResult:
        from steerexp.evaluators.edit_bench import fill, target_scene, timed_edit
        from steerexp.evaluators.inversion import pick_methods, require_inversion
        from steerexp.images import to_tensor
        from steerexp.targets import fit_world
        from steerexp.worlds.shapes import world

        tech = ctx.technique
        require_inversion(tech)
        if getattr(tech, "scenes", None) is None:
            raise ValueError("evaluator.pie_bench: world mode needs the technique's targets to be world scenes; for "
                             "your own images, set evaluator.pie_bench.data to a folder in PIE-Bench's layout")
        methods = pick_methods(tech, self.methods, exclude=("vae",))
        metrics = self.metrics(ctx, world_mode=True)
        names = metrics.names()
        sources, scenes, res, pol = tech.images, tech.scenes, tuple(tech.images.shape[-2:]), ctx.image_policy
        src_u8 = quantise(sources)
        source_prompts = [fill(self.template, s) for s in scenes]
        vae = tech.reconstruct("vae")
        per_image: dict = {}
        m: dict = {f"{self.name}/images": len(scenes), f"{self.name}/edits": len(scenes) * len(self.types)}
        rows = []
        for kind in self.types:
            targets = [target_scene(s, kind, self.seed, i) for i, s in enumerate(scenes)]
            prompts = [fill(self.template, t) for t in targets]
            masks = torch.stack([self.edit_region(s, t, kind, res, pol) for s, t in zip(scenes, targets)])
            truth = to_tensor(np.stack([fit_world(world.render(t, max(res)), res, pol) for t in targets]))
            edits = {"ground_truth": truth, "vae": vae}
            with progress.phase(f"pie_bench: {kind} edits", total=len(scenes) * len(methods)):
                for method in methods:
                    edits[method], m[f"{self.name}/{kind}/seconds/{method}"] = timed_edit(tech, method, prompts,
                                                                                          len(scenes))
                    progress.advance(len(scenes))
            for method, images in edits.items():
                values = metrics(src_u8, quantise(images), masks, source_prompts, prompts)
                self.add(per_image, ("all", kind), method, values)
                rows += [[tech.names[i], kind, method, prompts[i]] + [float(values[k][i]) for k in names]
                         for i in range(len(scenes))]
        m.update(self.summarise(per_image, names))
        return EvalResult(metrics=m, tables={f"{self.name}/per_image": (
            ["image", "type", "method", "target prompt", *names.values()], rows)})
