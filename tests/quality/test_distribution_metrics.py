"""FID / KID / IS, their patch variants and CLIP score (issue #10) on stand-in extractors with seeded random weights.

The stand-ins are saved to files and enter through the same paths users pass: the FID InceptionV3 as a state-dict
file, a tiny transformers CLIP as a `save_pretrained` directory with a real small BPE tokenizer. Random weights make
the values meaningless as quality scores; the tests check what the plumbing must guarantee with any weights.
"""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from cupscale_dist.errors import UserError
from cupscale_dist.quality import distribution as dm
from cupscale_dist.quality.distribution import (
    CROP_SIZE,
    METRICS_EXTRA,
    check_metric_sources,
    crop_boxes,
    crops,
    distribution_metrics,
    load_fid_inception,
)
from cupscale_dist.quality.inception import FidInceptionV3

SIZE = (352, 320)  # (w, h): above the 299 crop on both sides, not square, so crops land at different positions
PROMPTS = ["a photo of a cat", "a house by the lake", "a red apple on a table"]


# --- stand-in extractors, saved and loaded back by path ----------------------------------------------------------
def standin_inception() -> FidInceptionV3:
    """The FID InceptionV3 with seeded random weights: He-normal convolutions keep activations at scale through the
    ~50 layers (PyTorch's default init shrinks them towards 0), batch-norm variances away from 1 make its eps count."""
    torch.manual_seed(0)
    network = FidInceptionV3()
    for module in network.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.running_var, 0.5, 1.5)
    return network


@pytest.fixture(scope="module")
def inception_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("inception") / "pt_inception-standin.pth"
    torch.save(standin_inception().state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> str:
    """A tiny CLIPModel (2-layer towers, 32-d) with a real small CLIP BPE tokenizer and a CLIP image-processor
    config."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    from cupscale_dist.testing.tiny import write_clip_tokenizer

    directory = tmp_path_factory.mktemp("clip")
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(directory))
    tower = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    config = CLIPConfig(
        text_config=dict(**tower, vocab_size=len(tokenizer), max_position_embeddings=77,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(**tower, image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(1)  # a seed whose cosines average above 0 for the test's pairs: the score's clamp stays open
    CLIPModel(config).save_pretrained(directory)
    # openai/clip-vit-large-patch14's preprocessor_config.json, at the tiny model's 32 px
    processor = dict(image_processor_type="CLIPImageProcessor", do_resize=True, size={"shortest_edge": 32},
                     resample=3, do_center_crop=True, crop_size={"height": 32, "width": 32}, do_rescale=True,
                     rescale_factor=1 / 255, do_normalize=True, image_mean=[0.48145466, 0.4578275, 0.40821073],
                     image_std=[0.26862954, 0.26130258, 0.27577711], do_convert_rgb=True)
    (directory / "preprocessor_config.json").write_text(json.dumps(processor), encoding="utf-8")
    return str(directory)


# --- image sets ---------------------------------------------------------------------------------------------------
def smooth_images(count: int = 3, size=SIZE) -> list[Image.Image]:
    """Gradients with a disc, colours and positions seeded per image: photo-like smooth content."""
    rng = np.random.default_rng(1)
    ys, xs = np.mgrid[0:size[1], 0:size[0]]
    images = []
    for _ in range(count):
        a, b, c = rng.uniform(0.2, 0.8, 3)
        cy, cx, r = rng.uniform(0.3, 0.7) * size[1], rng.uniform(0.3, 0.7) * size[0], rng.uniform(30, 80)
        rgb = np.stack([xs * a, ys * b, (xs + ys) * c / 2], axis=-1)
        rgb[(ys - cy) ** 2 + (xs - cx) ** 2 < r**2] = rng.uniform(0, 255, 3)
        images.append(Image.fromarray(rgb.clip(0, 255).astype(np.uint8)))
    return images


def perturbed(images: list[Image.Image], amplitude: int = 4) -> list[Image.Image]:
    """The same pictures with seeded +-`amplitude` noise."""
    rng = np.random.default_rng(2)
    return [Image.fromarray((np.array(image, dtype=np.int16)
                             + rng.integers(-amplitude, amplitude, (*image.size[::-1], 3), endpoint=True))
                            .clip(0, 255).astype(np.uint8))
            for image in images]


def noise_images(count: int = 3, size=SIZE) -> list[Image.Image]:
    rng = np.random.default_rng(3)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(count)]


# --- the network --------------------------------------------------------------------------------------------------
def test_fid_inception_matches_torch_fidelity(inception_path):
    """FidInceptionV3 loaded by path gives torch-fidelity 0.4.0's FeatureExtractorInceptionV3 outputs ("2048",
    "logits_unbiased") on the same weights and input; reference values recorded with torch-fidelity offline (it
    cannot be imported here: it imports torchvision)."""
    image = torch.randint(0, 256, (1, 3, 299, 299), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        features, logits = load_fid_inception(inception_path)(image)
    assert features.shape == (1, 2048) and logits.shape == (1, 1008)
    expected_features = [0.44728, 6.93337, 1.15617, 0.0, 0.34666, 4.71983, 0.48851, 0.01178]
    expected_logits = [0.93722, 0.00406, 2.5713, 0.55114, 0.93279, -0.77458, -1.39098, 1.33008]
    np.testing.assert_allclose(features[0, 3::256].numpy(), expected_features, atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(logits[0, ::126].numpy(), expected_logits, atol=2e-4, rtol=1e-4)


def test_weights_without_batch_norm_counters_load(tmp_path):
    """Ports saved without BatchNorm's num_batches_tracked (a training counter) load with every weight in place."""
    state_dict = {k: v for k, v in standin_inception().state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state_dict, tmp_path / "ported.pth")
    loaded = load_fid_inception(tmp_path / "ported.pth").state_dict()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in state_dict.items())


# --- FID / KID / IS -----------------------------------------------------------------------------------------------
def run(originals, outputs, inception_path, **kwargs) -> dict[str, float]:
    return distribution_metrics(originals, outputs, [], inception=inception_path, clip=None, **kwargs)


@pytest.fixture(scope="module")
def compared(inception_path) -> SimpleNamespace:
    """Smooth originals against themselves, a slightly perturbed copy and noise (2 crops per image, seed 7), and the
    arrays the network saw for the perturbed pair. One FID costs ~2 s on CPU (torchmetrics' 2048 x 2048 eigvals),
    so the tests share these runs."""
    originals, outputs = smooth_images(), perturbed(smooth_images())
    seen: list[list[np.ndarray]] = []
    inception_outputs = dm.inception_outputs

    def recording(network, arrays, *args):
        seen.append(list(arrays))
        return inception_outputs(network, iter(seen[-1]), *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dm, "inception_outputs", recording)
        near = run(originals, outputs, inception_path, crops_per_image=2, seed=7)
    return SimpleNamespace(originals=originals, outputs=outputs, near=near, seen=seen,
                           same=run(originals, originals, inception_path, crops_per_image=2, seed=7),
                           far=run(originals, noise_images(), inception_path, crops_per_image=2, seed=7))


def test_identical_sets_give_zero_distance(compared):
    same, far = compared.same, compared.far
    assert far["fid"] > 1 and far["fid_patch"] > 1
    assert abs(same["fid"]) < 1e-6 * far["fid"] and abs(same["fid_patch"]) < 1e-6 * far["fid_patch"]
    # KID is an unbiased estimate: 0 in expectation for one distribution, small against the noise set's
    assert abs(same["kid_mean"]) < 0.05 * far["kid_mean"]
    assert abs(same["kid_patch_mean"]) < 0.05 * far["kid_patch_mean"]


def test_distances_grow_with_the_difference(compared):
    near, far = compared.near, compared.far
    assert 0 < near["fid"] < far["fid"] and 0 < near["fid_patch"] < far["fid_patch"]
    # KID's unbiased estimate goes below 0 for close sets of 3 (its subsets are the whole set: kid_std 0)
    assert near["kid_mean"] < far["kid_mean"] and near["kid_patch_mean"] < far["kid_patch_mean"]
    for result in (near, far):
        assert 1 <= result["is_mean"] <= 1008 and 1 < result["is_patch_mean"] <= 1008  # exp(KL), 1008 classes


def test_patch_metrics_use_the_seeded_crops(compared):
    """The network sees each image resized, then 2 crops per image at crop_boxes' positions, the same positions in
    the original and its output; patch values differ from whole-image ones."""
    assert [len(arrays) for arrays in compared.seen] == [3, 3, 6, 6]  # originals, outputs, their crops
    for seen, images in zip(compared.seen[2:], (compared.originals, compared.outputs)):
        expected = [np.array(image.crop(box)) for index, image in enumerate(images)
                    for box in crop_boxes(image.size, 2, 7, index)]
        assert all(np.array_equal(a, b) for a, b in zip(seen, expected))
    assert len({box for index in range(3) for box in crop_boxes(SIZE, 2, 7, index)}) == 6  # positions vary
    assert compared.near["fid_patch"] != pytest.approx(compared.near["fid"], rel=1e-3)
    assert compared.near["kid_patch_mean"] != pytest.approx(compared.near["kid_mean"], rel=1e-3)


def test_seed_fixes_crops_kid_subsets_and_is_splits(compared, inception_path):
    np.testing.assert_equal(run(compared.originals, compared.outputs, inception_path, crops_per_image=2, seed=7),
                            compared.near)  # nan == nan here: with 3 images IS has one split
    assert crop_boxes(SIZE, 2, 8, 0) != crop_boxes(SIZE, 2, 7, 0)


def test_crops_of_an_original_of_another_size_cover_the_same_region():
    """Boxes drawn on a 2x output, scaled onto its original: the crops show the same part of the picture."""
    ys, xs = np.mgrid[0:640, 0:704]
    output = Image.fromarray(np.stack([xs * 255 / 703, ys * 255 / 639, np.zeros_like(xs)], -1).astype(np.uint8))
    original = output.resize((352, 320), Image.Resampling.BICUBIC)
    boxes = crop_boxes(output.size, 5, seed=0, index=0)
    assert len(boxes) == 5 and all(0 <= l and 0 <= t and r <= 704 and b <= 640 for l, t, r, b in boxes)
    for _box, original_crop, output_crop in zip(boxes, crops(original, boxes, output.size),
                                               crops(output, boxes, output.size)):
        assert original_crop.shape == output_crop.shape == (CROP_SIZE, CROP_SIZE, 3)
        # red = x, green = y: equal means at the same region, whatever the source size
        np.testing.assert_allclose(original_crop[..., :2].mean((0, 1)), output_crop[..., :2].mean((0, 1)), atol=1.0)


def test_small_sets_are_adjusted_or_refused(inception_path):
    """2 pairs: KID's subset size drops to 2 and IS runs 1 split (is_std nan); 1 pair, unpaired sets or images smaller
    than the crops are UserErrors that name the fix, raised before any network runs."""
    small = [image.resize((64, 48)) for image in smooth_images(2)]
    result = run(small, small[::-1], inception_path, crops_per_image=0)
    assert set(result) == {"fid", "kid_mean", "kid_std", "is_mean", "is_std"}  # crops_per_image=0: no patch metrics
    assert result["kid_std"] >= 0 and np.isfinite(result["kid_mean"]) and np.isnan(result["is_std"])

    with pytest.raises(UserError, match="at least 2 image pairs"):
        distribution_metrics(small[:1], small[:1], [], inception=inception_path, clip=None, crops_per_image=0)
    with pytest.raises(UserError, match="2 originals but 1 outputs"):
        distribution_metrics(small, small[:1], [], inception=inception_path, clip=None)
    with pytest.raises(UserError, match="smaller than the 299x299 patch-metric crops; .*crops_per_image=0"):
        distribution_metrics(small, small, [], inception=inception_path, clip=None, crops_per_image=10)


# --- CLIP score ---------------------------------------------------------------------------------------------------
def expected_clip_score(clip_dir: str, images: list[Image.Image], prompts: list[str]) -> float:
    """max(100 x mean cosine(image i, prompt i), 0), computed with transformers directly."""
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(clip_dir), CLIPProcessor.from_pretrained(clip_dir)
    with torch.inference_mode():
        pixels = processor(images=[np.array(image) for image in images], return_tensors="pt")["pixel_values"]
        image_embeds = model.get_image_features(pixel_values=pixels).pooler_output
        text = processor(text=prompts, return_tensors="pt", padding=True)
        text_embeds = model.get_text_features(input_ids=text["input_ids"],
                                              attention_mask=text["attention_mask"]).pooler_output
    return max(100 * F.cosine_similarity(image_embeds, text_embeds).mean().item(), 0.0)


def test_clip_score_pairs_each_output_with_its_prompt(clip_dir):
    outputs = smooth_images() + noise_images(1)
    prompts = [*PROMPTS, "a dog running in the park"]
    shuffled = prompts[1:] + prompts[:1]
    score = distribution_metrics(outputs, outputs, prompts, inception=None, clip=clip_dir)
    assert set(score) == {"clip_score"} and 0 <= score["clip_score"] <= 100
    assert score["clip_score"] == pytest.approx(expected_clip_score(clip_dir, outputs, prompts), abs=1e-3)
    assert score["clip_score"] > 0  # the clamp at 0 does not hide the pairing (the stand-in's seed)
    other = distribution_metrics(outputs, outputs, shuffled, inception=None, clip=clip_dir)["clip_score"]
    assert other == pytest.approx(expected_clip_score(clip_dir, outputs, shuffled), abs=1e-3)
    assert other != pytest.approx(score["clip_score"], abs=1e-2)

    with pytest.raises(UserError, match="3 prompts for 4 outputs"):
        distribution_metrics(outputs, outputs, prompts[:3], inception=None, clip=clip_dir)


# --- checks before any work ---------------------------------------------------------------------------------------
def one_line_error(inception=None, clip=None) -> str:
    with pytest.raises(UserError) as error:
        check_metric_sources(inception, clip)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_missing_extra_names_the_install_command(monkeypatch, inception_path):
    for name in [name for name in sys.modules if name.split(".")[0] == "torchmetrics"]:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed: importing it raises ImportError
    monkeypatch.setitem(sys.modules, "torchmetrics", None)
    assert METRICS_EXTRA == "pip install 'cupscale-dist[metrics]'"
    assert METRICS_EXTRA in one_line_error(inception=inception_path)
    assert METRICS_EXTRA in one_line_error(clip="clip-dir")
    check_metric_sources(None, None)  # nothing asked for: nothing needed


def test_old_torchmetrics_names_the_install_command(monkeypatch, inception_path):
    import torchmetrics

    monkeypatch.setattr(torchmetrics, "__version__", "1.6.3")
    assert "found 1.6.3; " + METRICS_EXTRA in one_line_error(inception=inception_path)


def test_wrong_inception_weights_are_refused(tmp_path, inception_path):
    check_metric_sources(inception_path, None)
    assert "no such file" in one_line_error(inception=str(tmp_path / "nope.pth"))
    assert "is a directory" in one_line_error(inception=str(tmp_path))
    (tmp_path / "notes.txt").write_text("not weights")
    assert "not a PyTorch weights file" in one_line_error(inception=str(tmp_path / "notes.txt"))
    # torchvision's ImageNet InceptionV3 has 1000 classes, not the TF graph's 1008
    state_dict = standin_inception().state_dict()
    state_dict["fc.weight"], state_dict["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    torch.save(state_dict, tmp_path / "imagenet.pth")
    message = one_line_error(inception=str(tmp_path / "imagenet.pth"))
    assert "not the FID InceptionV3 (shape of fc.weight (1000, 2048)" in message
    del state_dict["Mixed_7c.branch_pool.conv.weight"]
    torch.save(state_dict, tmp_path / "partial.pth")
    assert "missing Mixed_7c.branch_pool.conv.weight" in one_line_error(inception=str(tmp_path / "partial.pth"))
    assert "pt_inception-2015-12-05-6726825d.pth" in message  # every message names the file to pass


def test_wrong_clip_directory_is_refused(tmp_path, clip_dir, inception_path):
    check_metric_sources(None, clip_dir)
    assert "no such directory (nothing is downloaded)" in one_line_error(clip="openai/clip-vit-large-patch14")
    assert "is a file" in one_line_error(clip=inception_path)
    assert "no readable config.json" in one_line_error(clip=str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "siglip"}))
    assert "is a 'siglip' model, expected 'clip'" in one_line_error(clip=str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "vocab.json").write_text("{}")
    message = one_line_error(clip=str(tmp_path))
    assert "no preprocessor_config.json" in message and "hf download openai/clip-vit-large-patch14" in message


# --- through `cupscale eval` --------------------------------------------------------------------------------------
def test_cupscale_eval_adds_the_distribution_metrics(tmp_path, sdxl_dir, inception_path, clip_dir, capsys):
    """The CLI checks the sources before upscaling, then reports FID/KID/IS (whole and 2 crops each) and CLIP score
    of the real upscales; a missing weights file is one line before any model loads."""
    import json

    from cupscale_dist.cli.main import main

    paths = []
    for i, image in enumerate(smooth_images(2, size=(320, 320))):
        paths.append(str(tmp_path / f"orig{i}.png"))
        image.save(paths[-1])
    common = ["eval", *paths, "--config", "cpu-demo", "--model", str(sdxl_dir), "--scale", "2", "--tile", "8",
              "--stride", "4", "--steps", "3", "--json", "-q", "--crops-per-image", "2"]
    assert main([*common, "--inception", inception_path, "--clip", clip_dir]) == 0
    overall = json.loads(capsys.readouterr().out)["overall"]
    for key in ("fid", "kid_mean", "is_mean", "fid_patch", "kid_patch_mean", "is_patch_mean", "clip_score"):
        assert np.isfinite(overall[key]), key
    assert 0 <= overall["clip_score"] <= 100 and overall["psnr"] > 0

    assert main([*common, "--inception", str(tmp_path / "missing.pth")]) == 2
    err = capsys.readouterr().err.strip()
    assert "missing.pth" in err and "\n" not in err
