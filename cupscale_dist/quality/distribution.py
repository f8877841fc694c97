"""FID, KID and IS on whole images and on random crops, and CLIP score, from local weights only (issue #10).

What high-resolution upscaling papers report: the metrics on whole images resized to the Inception input, and the
"patch" variants on random crops at the Inception input size, so the detail an upscaler adds is seen at full
resolution (DemoFusion / HiDiffusion-style evaluations, 10 crops per image). The statistics are torchmetrics'
(`FrechetInceptionDistance`, `KernelInceptionDistance`, `InceptionScore`, `CLIPScore`); the feature extractor is
not, for this reason: torchmetrics' default InceptionV3 is torch-fidelity's, and torch-fidelity both declares a
dependency on torchvision and imports it in its package `__init__` (via its CLIP and VGG extractors), while this
project's environments run without torchvision (PyPI's wheels for this torch are CUDA-linked and break imports).
So `FidInceptionV3` below is the FID InceptionV3 written out here: the ImageNet InceptionV3 of the TensorFlow graph
`inception-2015-12-05` (Szegedy et al. 2016; Heusel et al. 2017 for FID), with that graph's quirks (average pools
that do not count padding, a max pool in the last block's pool branch, 1008 classes, input scaled as
(x - 128) / 128). Its parameter names are the ones of the published PyTorch ports, so it loads, unchanged:

- `pt_inception-2015-12-05-6726825d.pth` (pytorch-fid,
  https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth), or
- `weights-inception-2015-12-05-6726825d.pth` (torch-fidelity and hence torchmetrics' default,
  https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth).

The network runs once per image; torchmetrics receives its outputs through `PrecomputedFeatures` (a `feature`
module whose inputs already are features) instead of running it again inside each of FID, KID and IS.

Inputs reach the network at 299 x 299: whole images are resized with PIL's antialiased bicubic (as clean-fid
recommends; torch-fidelity resizes inside the network with TF1's aliased bilinear, so whole-image values can differ
from its), crops are cut at 299 x 299 and need no resize. CLIP score is torchmetrics' (100 x cosine of image and
prompt embeddings, averaged, clamped at 0, so in [0, 100]) on a local transformers CLIP directory.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..errors import UserError
from ..files.userfile import MAX_JSON_CONFIG_BYTES, read_capped
from .inception import (
    INCEPTION_CLASSES,
    INCEPTION_FEATURES,
    INCEPTION_SIZE,
    FidInceptionV3,
    load_fid_inception,
    read_inception_weights,
)

METRICS_EXTRA = "pip install 'cupscale-dist[metrics]'"
MIN_TORCHMETRICS = (1, 7)  # CLIPScore takes a (model, processor) callable from 1.7 on; earlier versions only hub ids

CROP_SIZE = INCEPTION_SIZE  # patch metrics: crops enter the network at full resolution, never resized
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000  # Binkowski et al. 2018 / torchmetrics defaults; size capped at n
IS_SPLITS = 10  # Salimans et al. 2016; fewer with fewer than 20 samples, so every split holds 2 or more
BATCH_SIZE = 32  # images per network call: 299 x 299 inputs keep this a few hundred MB of activations


# --- inputs: whole images and crops ------------------------------------------------------------------------------
def crop_boxes(size: tuple[int, int], count: int, seed: int, index: int) -> list[tuple[int, int, int, int]]:
    """`count` CROP_SIZE boxes (left, top, right, bottom) at uniform random positions in an image of `size` (w, h).

    Seeded per image (`seed`, `index`), so an image's crops do not depend on the images before it.
    """
    width, height = size
    rng = np.random.default_rng([seed, index])
    lefts = rng.integers(0, width - CROP_SIZE, count, endpoint=True)
    tops = rng.integers(0, height - CROP_SIZE, count, endpoint=True)
    return [(int(x), int(y), int(x) + CROP_SIZE, int(y) + CROP_SIZE) for x, y in zip(lefts, tops)]


def scale_box(box: tuple[int, int, int, int], from_size: tuple[int, int], to_size: tuple[int, int]):
    """`box` in an image of `from_size` -> the same region of an image of `to_size` (float pixel coordinates)."""
    sx, sy = to_size[0] / from_size[0], to_size[1] / from_size[1]
    return (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


def crops(image: Image.Image, boxes: list[tuple[int, int, int, int]], drawn_on: tuple[int, int]
          ) -> Iterator[np.ndarray]:
    """The regions `boxes` (drawn on an image of size `drawn_on`) of `image`, as uint8 CROP_SIZE arrays.

    On an image of another size a region is scaled to it and resampled (bicubic, antialiased) to CROP_SIZE, so an
    original and its output are compared on the same part of the picture.
    """
    image = rgb(image)
    for box in boxes:
        if image.size == drawn_on:
            yield np.array(image.crop(box))
        else:
            region = scale_box(box, drawn_on, image.size)
            yield np.array(image.resize((CROP_SIZE, CROP_SIZE), Image.Resampling.BICUBIC, box=region))


def resized(image: Image.Image) -> np.ndarray:
    """A whole image at INCEPTION_SIZE square (bicubic, antialiased: no aliasing on large downscales)."""
    return np.array(rgb(image).resize((INCEPTION_SIZE, INCEPTION_SIZE), Image.Resampling.BICUBIC))


def rgb(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB, converted only when it is not (no copy of a large RGB output)."""
    return image if image.mode == "RGB" else image.convert("RGB")


def inception_outputs(network: FidInceptionV3, arrays: Iterable[np.ndarray], total: int, progress: bool,
                      description: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, logits) on the CPU for uint8 H x W x 3 arrays, BATCH_SIZE at a time, streamed."""
    from tqdm.auto import tqdm

    device = next(network.parameters()).device
    features, logits = [], []

    def run(batch: list[np.ndarray]) -> None:
        f, lg = network(torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).to(device))
        features.append(f.cpu())
        logits.append(lg.cpu())
        bar.update(len(batch))

    batch: list[np.ndarray] = []
    with torch.inference_mode(), tqdm(total=total, desc=description, disable=not progress) as bar:
        for array in arrays:
            batch.append(array)
            if len(batch) == BATCH_SIZE:
                run(batch)
                batch = []
        if batch:
            run(batch)
    return torch.cat(features), torch.cat(logits)


# --- the statistics ----------------------------------------------------------------------------------------------
class PrecomputedFeatures(nn.Module):
    """torchmetrics' `feature` module for features computed once by `FidInceptionV3`: its inputs are the features."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features  # FID reads it instead of probing the module with a dummy image

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def fid_kid_is(real: torch.Tensor, fake: torch.Tensor, fake_logits: torch.Tensor, seed: int) -> dict[str, float]:
    """FID and KID between feature sets, IS of the fake set's logits (torchmetrics); KID subsets and IS splits seeded.

    KID's subset size is min(KID_SUBSET_SIZE, n) and IS uses min(IS_SPLITS, n // 2) splits, so small sets still
    give a value (with one split is_std is nan).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.inception import InceptionScore
    from torchmetrics.image.kid import KernelInceptionDistance

    n = min(len(real), len(fake))
    with warnings.catch_warnings():  # "will save all extracted features in buffer": 2048 floats a sample, known
        warnings.filterwarnings("ignore", message=".*will save all extracted features")
        fid = FrechetInceptionDistance(feature=PrecomputedFeatures(INCEPTION_FEATURES))
        kid = KernelInceptionDistance(feature=PrecomputedFeatures(INCEPTION_FEATURES), subsets=KID_SUBSETS,
                                      subset_size=min(KID_SUBSET_SIZE, n))
        inception_score = InceptionScore(feature=PrecomputedFeatures(INCEPTION_CLASSES),
                                         splits=min(IS_SPLITS, n // 2))
    for metric in (fid, kid):
        metric.update(real, real=True)
        metric.update(fake, real=False)
    inception_score.update(fake_logits)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(seed)  # KID subsets and IS splits draw from torch's global generator
        warnings.filterwarnings("ignore", message=r"std\(\): degrees of freedom")  # one IS split: std is nan
        kid_mean, kid_std = kid.compute()
        is_mean, is_std = inception_score.compute()
    return {"fid": float(fid.compute()), "kid_mean": float(kid_mean), "kid_std": float(kid_std),
            "is_mean": float(is_mean), "is_std": float(is_std)}


class TensorFeaturesCLIP(nn.Module):
    """A transformers CLIPModel whose `get_image_features` / `get_text_features` return the projected embeddings.

    torchmetrics 1.9's CLIPScore normalises what these return as a tensor; transformers 5 returns a
    BaseModelOutputWithPooling carrying it as `pooler_output` (torchmetrics issue #3407, fixed after 1.9.0).
    """

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config  # CLIPScore reads the text length limit from it

    @staticmethod
    def embeddings(output) -> torch.Tensor:
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.embeddings(self.model.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.embeddings(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


def clip_score(outputs: list[Image.Image], prompts: list[str], clip: str, device: str | torch.device,
               progress: bool) -> float:
    """torchmetrics' CLIPScore of each output against its prompt: max(100 x mean cosine, 0)."""
    from torchmetrics.multimodal.clip_score import CLIPScore
    from tqdm.auto import tqdm
    from transformers import CLIPModel, CLIPProcessor

    model = TensorFeaturesCLIP(CLIPModel.from_pretrained(clip, local_files_only=True)).eval().to(device)
    processor = CLIPProcessor.from_pretrained(clip, local_files_only=True)
    metric = CLIPScore(model_name_or_path=lambda: (model, processor))  # a callable: local files, no hub id
    with torch.inference_mode():
        for start in tqdm(range(0, len(outputs), BATCH_SIZE), desc="CLIP score", disable=not progress):
            images = [torch.from_numpy(np.array(rgb(image))).permute(2, 0, 1).to(device)
                      for image in outputs[start:start + BATCH_SIZE]]
            metric.update(images, prompts[start:start + BATCH_SIZE])
    return float(metric.compute())


# --- checks and the entry point ----------------------------------------------------------------------------------
def check_metric_sources(inception: str | None, clip: str | None) -> None:
    """Fail fast, before any upscaling, with a one-line UserError naming what is missing and the fix: the optional
    extra not installed (say `pip install 'cupscale-dist[metrics]'`), a weights path that does not exist or is not
    the expected kind of file/dir."""
    if inception is None and clip is None:
        return
    try:
        import torchmetrics
    except ImportError:
        raise UserError(f"--inception / --clip need torchmetrics, not installed; {METRICS_EXTRA}") from None
    version = tuple(int(part) for part in torchmetrics.__version__.split(".")[:2])
    if version < MIN_TORCHMETRICS:
        raise UserError(f"--inception / --clip need torchmetrics >= {'.'.join(map(str, MIN_TORCHMETRICS))}, found "
                        f"{torchmetrics.__version__}; {METRICS_EXTRA}")
    if inception is not None:
        read_inception_weights(inception)
    if clip is not None:
        check_clip_dir(clip)


def check_clip_dir(clip: str) -> None:
    """A local transformers CLIP directory: config.json of model_type "clip", a tokenizer and an image processor."""
    fix = ("pass a local CLIP directory, e.g. `hf download openai/clip-vit-large-patch14 --local-dir DIR "
           "--include '*.json' '*.txt' model.safetensors`")
    path = Path(clip)
    if not path.is_dir():
        what = "is a file" if path.exists() else "no such directory (nothing is downloaded)"
        raise UserError(f"--clip {clip}: {what}; {fix}")
    try:
        config = json.loads(read_capped(path / "config.json", MAX_JSON_CONFIG_BYTES, f"--clip {clip}: config.json",
                                        fix).decode("utf-8"))
    except (OSError, ValueError, RecursionError):  # RecursionError: JSON nested past Python's recursion limit
        config = None
    if not isinstance(config, dict):
        raise UserError(f"--clip {clip}: no readable config.json; {fix}")
    model_type = config.get("model_type")
    if model_type != "clip":
        raise UserError(f"--clip {clip}: config.json is a {model_type!r} model, expected 'clip'; {fix}")
    has_tokenizer = (path / "tokenizer.json").is_file() or (path / "vocab.json").is_file()
    has_weights = any((path / name).is_file() for name in ("model.safetensors", "pytorch_model.bin",
                                                           "model.safetensors.index.json"))
    for present, name in ((has_weights, "model weights (model.safetensors)"),
                          (has_tokenizer, "a tokenizer (tokenizer.json or vocab.json + merges.txt)"),
                          ((path / "preprocessor_config.json").is_file(), "preprocessor_config.json")):
        if not present:
            raise UserError(f"--clip {clip}: no {name}; {fix}")


def check_image_sets(originals: list[Image.Image], outputs: list[Image.Image], prompts: list[str], clip: str | None,
                     crops_per_image: int) -> None:
    """Paired sets of 2 or more images, large enough for CROP_SIZE crops when patch metrics are asked for."""
    if len(originals) != len(outputs):
        raise UserError(f"{len(originals)} originals but {len(outputs)} outputs; metrics compare them in pairs")
    if len(outputs) < 2:
        raise UserError(f"FID/KID/IS need at least 2 image pairs, got {len(outputs)}; evaluate more images")
    if clip is not None and len(prompts) != len(outputs):
        raise UserError(f"{len(prompts)} prompts for {len(outputs)} outputs; CLIP score needs one prompt per output")
    if crops_per_image < 0:
        raise UserError(f"crops_per_image={crops_per_image}; use 0 (no patch metrics) or more")
    if crops_per_image:
        for kind, images in (("original", originals), ("output", outputs)):
            for index, image in enumerate(images):
                if min(image.size) < CROP_SIZE:
                    raise UserError(f"{kind} {index} is {image.size[0]}x{image.size[1]}, smaller than the "
                                    f"{CROP_SIZE}x{CROP_SIZE} patch-metric crops; use larger images or "
                                    "crops_per_image=0")


def distribution_metrics(originals: list[Image.Image], outputs: list[Image.Image], prompts: list[str], *,
                         inception: str | None, clip: str | None, crops_per_image: int = 10, seed: int = 0,
                         progress: bool = False, device: str | torch.device = "cpu") -> dict[str, float]:
    """FID/KID/IS on whole images resized to the extractor's input and on `crops_per_image` seeded random crops per
    image (fid, kid_mean, kid_std, is_mean, is_std, fid_patch, kid_patch_mean, kid_patch_std, is_patch_mean,
    is_patch_std) when `inception` is given; clip_score (mean over outputs vs prompts) when `clip` is given.

    Args:
        originals (`list[PIL.Image.Image]`): the reference images ("real"), paired with `outputs` by position.
        outputs (`list[PIL.Image.Image]`): the upscaled images ("fake"); IS and CLIP score use these only.
        prompts (`list[str]`): one per output, for CLIP score.
        inception (`str`, *optional*): path of the FID Inception weights file (see the module docstring).
        clip (`str`, *optional*): a local transformers CLIP directory.
        crops_per_image (`int`, *optional*, defaults to 10): CROP_SIZE crops per image pair; 0 skips the patch
            metrics. Crop positions are drawn on the output and scaled onto an original of another size.
        seed (`int`, *optional*, defaults to 0): crop positions, KID subsets and IS splits.
        progress (`bool`, *optional*, defaults to False): progress bars.
        device (`str`, *optional*, defaults to "cpu"): where the networks run.
    """
    # 1. Check inputs
    check_metric_sources(inception, clip)
    check_image_sets(originals, outputs, prompts, clip, crops_per_image if inception else 0)
    metrics: dict[str, float] = {}

    # 2. Inception features of the whole images, then FID / KID / IS
    if inception is not None:
        network = load_fid_inception(inception, device)
        n = len(outputs)
        real, _ = inception_outputs(network, map(resized, originals), n, progress, "Inception, originals")
        fake, fake_logits = inception_outputs(network, map(resized, outputs), n, progress, "Inception, outputs")
        metrics.update(fid_kid_is(real, fake, fake_logits, seed))

        # 3. The same on crops: positions drawn on each output, the same regions cut from its original
        if crops_per_image:
            boxes = [crop_boxes(output.size, crops_per_image, seed, index) for index, output in enumerate(outputs)]
            total = crops_per_image * n
            real, _ = inception_outputs(network, (c for image, b, out in zip(originals, boxes, outputs)
                                                  for c in crops(image, b, out.size)), total, progress,
                                        "Inception, original crops")
            fake, fake_logits = inception_outputs(network, (c for out, b in zip(outputs, boxes)
                                                            for c in crops(out, b, out.size)), total, progress,
                                                  "Inception, output crops")
            patch = fid_kid_is(real, fake, fake_logits, seed)
            metrics.update({"fid_patch": patch["fid"], "kid_patch_mean": patch["kid_mean"],
                            "kid_patch_std": patch["kid_std"], "is_patch_mean": patch["is_mean"],
                            "is_patch_std": patch["is_std"]})

    # 4. CLIP score of the outputs against their prompts
    if clip is not None:
        metrics["clip_score"] = clip_score(outputs, prompts, clip, device, progress)
    return metrics
