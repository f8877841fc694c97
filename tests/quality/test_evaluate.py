"""`cupscale eval`'s figures (issue #10): each against an independent reference or a constructed case it must detect."""

import json

import numpy as np
import pytest
from helpers import REPO
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from cupscale_dist import UpscaleConfig
from cupscale_dist.cli.main import main
from cupscale_dist.method.views import make_views
from cupscale_dist.plan import make_plan
from cupscale_dist.quality.evaluate import CROP_PX, prepare_pair, view_boundaries
from cupscale_dist.quality.image_metrics import high_frequency_energy, psnr, seam_score, ssim

ASTRONAUT = REPO / "examples" / "astronaut.png"  # held out of training


def photo(size=(256, 192)) -> Image.Image:
    return Image.open(ASTRONAUT).convert("RGB").resize(size, Image.Resampling.BICUBIC)


def test_psnr_and_ssim_match_skimage():
    a = np.asarray(photo())
    b = np.clip(a + np.random.default_rng(0).normal(0, 8, a.shape), 0, 255).astype(np.uint8)
    assert psnr(a, b) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=255), abs=1e-9)
    reference = structural_similarity(a, b, channel_axis=2, gaussian_weights=True, sigma=1.5,
                                      use_sample_covariance=False, data_range=255)
    assert ssim(a, b) == pytest.approx(reference, abs=1e-6)
    assert ssim(a, a) == pytest.approx(1.0) and psnr(a, a) == float("inf")


def test_detail_orders_sharp_blurred_and_bicubic():
    sharp = photo((256, 256))
    bicubic = sharp.resize((128, 128), Image.Resampling.BICUBIC).resize((256, 256), Image.Resampling.BICUBIC)
    assert high_frequency_energy(sharp) > 2 * high_frequency_energy(bicubic)  # bicubic loses the top octave
    flat = Image.new("RGB", (64, 64), (90, 120, 30))
    assert high_frequency_energy(flat) == 0.0


def blocky(image: Image.Image, block: int, offset: int = 0) -> Image.Image:
    """A simulated no-overlap tiling: every block gets its own brightness shift (a seam at every block edge)."""
    a = np.asarray(image).astype(np.float64)
    rng = np.random.default_rng(1)
    for top in range(-offset, a.shape[0], block):
        for left in range(-offset, a.shape[1], block):
            a[max(0, top) : top + block, max(0, left) : left + block] += rng.uniform(-12, 12)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def test_seam_score_sees_seams_on_the_boundaries_only():
    image = photo((256, 256))
    lines = np.arange(64, 256, 64)
    assert seam_score(image, image, lines, lines) == 1.0
    tiled = blocky(image, 64)
    assert seam_score(tiled, image, lines, lines) > 1.5
    shifted = lines - 32  # the same seams, but the score is told the wrong lines
    assert seam_score(tiled, image, shifted, shifted) < seam_score(tiled, image, lines, lines) / 1.3
    blurred = image.resize((128, 128), Image.Resampling.BICUBIC).resize((256, 256), Image.Resampling.BICUBIC)
    assert seam_score(blurred, image, lines, lines) == pytest.approx(1.0, abs=0.15)  # no seams: near 1


def test_view_boundaries_are_every_stages_view_edges_in_the_output_grid():
    config = UpscaleConfig.load("cpu-demo", model="demo", scale=4, tile=8, stride=6)
    columns, rows = view_boundaries(make_plan((64, 32), config, geometry=(4, 4)))
    # stage 1: 128x64 px -> latent 32x16; stage 2: 256x128 -> latent 64x32; output 256x128
    expected_columns = set()
    for width, height, grid in ((128, 64, 2), (256, 128, 1)):
        views = make_views(height // 4, width // 4, 8, 6)
        expected_columns |= {int(v) * 4 * grid for v in np.unique(views[:, [1, 3]])}
    assert set(columns.tolist()) == {c for c in expected_columns if 0 < c < 256}
    assert rows.max() < 128 and rows.min() > 0


def test_prepare_pair_crops_to_whole_stages_and_refuses_tiny_originals():
    original, low = prepare_pair(photo((300, 200)), 2)
    assert original.size == (256, 192) and low.size == (128, 96)
    with pytest.raises(Exception, match="too small to evaluate at x4"):
        prepare_pair(photo((100, 100)), 4)


def test_eval_cli_writes_report_and_side_by_side(tmp_path, sdxl_dir, capsys):
    photo((256, 256)).save(tmp_path / "orig.png")
    out = tmp_path / "eval"
    code = main(["eval", str(tmp_path / "orig.png"), "--config", "cpu-demo", "--model", str(sdxl_dir), "--scale", "2",
                 "--tile", "8", "--stride", "4", "--steps", "3", "--out", str(out), "--json", "-q"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    row = report["images"][0]
    assert row["input"] == [128, 128] and row["output"] == [256, 256]
    assert row["psnr_bicubic"] > 20 and report["overall"]["seam"] == row["seam"]
    assert json.loads((out / "eval.json").read_text())["images"][0]["image"] == row["image"]
    sheet = Image.open(out / "orig-x2.png")
    assert sheet.size == (3 * CROP_PX + 2 * 4, CROP_PX)


def test_eval_cli_bad_inputs_are_one_line(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "missing.png"), "--config", "cpu-demo"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no such file" in err and "\n" not in err
    photo((40, 40)).save(tmp_path / "small.png")
    assert main(["eval", str(tmp_path / "small.png"), "--config", "cpu-demo", "--scale", "4"]) == 2
    assert "too small to evaluate" in capsys.readouterr().err
