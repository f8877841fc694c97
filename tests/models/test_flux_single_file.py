"""Single-file Flux checkpoints (issue 22): BFL's transformer file, ComfyUI's diffusion-model and all-in-one files.
Each loads every weight of the diffusers directory it was written from; Ray actors give the in-process bytes; our
transformer conversion equals diffusers' own at FLUX.1's width; every file that cannot load is refused in one line
from its header, before any model loads. Also the weights each mode is estimated to hold for FLUX.1-dev
(``models.weights.weights_gb``), from its shipped configs."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from helpers import (
    RUN,
    as_bytes,
    assert_one_error_line,
    block_groups,
    cli,
    largest_leaf,
    offload_group_sizes,
    parameter_count,
    resident_share,
    small_config,
)

from cupscale_dist import UserError, upscale
from cupscale_dist.execution.worker import ModelWorker
from cupscale_dist.models.backbones.flux.backbone import Flux
from cupscale_dist.models.backbones.flux.header import flux_layout
from cupscale_dist.models.backbones.flux.single_file import transformer_state
from cupscale_dist.models.single_file import checkpoint_kind, shipped_config
from cupscale_dist.models.spec import ModelSpec
from cupscale_dist.models.weights import weights_gb
from cupscale_dist.testing.single_file import (
    bfl_transformer_state,
    copy_configs,
    save_flux_single_file,
)
from cupscale_dist.testing.tiny_flux import build_tiny_flux, flux_transformer

LAYOUTS = ("bfl", "comfy", "comfy-all-in-one")


def flux_config(model, **changes):
    return small_config(str(model), **{"steps": 2, "guidance_scale": 3.5, "lambda_global": 0.5, **changes})


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """Tiny dev and schnell: the diffusers directory, its configs alone (no weights), and one file per layout."""
    root = tmp_path_factory.mktemp("flux-single-file")
    models = {}
    for variant in ("dev", "schnell"):
        directory = build_tiny_flux(root / variant, variant=variant)
        models[variant] = dict(dir=str(directory), config=str(copy_configs(directory, root / f"{variant}-config")),
                               **{layout: str(save_flux_single_file(directory, root / f"{variant}-{layout}.safetensors",
                                                                    layout)) for layout in LAYOUTS})
    return models


@pytest.fixture(scope="module")
def references(flux, photo_module):
    return {variant: as_bytes(upscale(photo_module, flux_config(flux[variant]["dir"]), progress=False))
            for variant in ("dev", "schnell")}


@pytest.fixture(scope="module")
def photo_module():
    ys, xs = np.mgrid[0:48, 0:64]
    rgb = np.stack([xs * 3, ys * 4, 255 - xs * 2], axis=-1)
    from PIL import Image

    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8))


def model_config_for(model: dict, layout: str) -> str:
    """A transformer-only file takes its VAE and text encoders from a directory with weights; an all-in-one file
    needs only configs (it holds every weight), so it gets the weightless copy."""
    return model["config"] if layout == "comfy-all-in-one" else model["dir"]


def test_the_header_tells_layout_and_variant(flux):
    from cupscale_dist.models.single_file import checkpoint_keys

    for variant in ("dev", "schnell"):
        for layout in LAYOUTS:
            path = flux[variant][layout]
            assert flux_layout(checkpoint_keys(path)) == layout
            assert checkpoint_kind(path) == f"flux-{variant}"


@pytest.fixture(scope="module")
def directory_pipes(flux):
    return {variant: ModelWorker.load(flux[variant]["dir"], device="cpu", dtype="float32").pipe
            for variant in ("dev", "schnell")}


@pytest.mark.parametrize("variant,layout", [("dev", "bfl"), ("dev", "comfy"), ("dev", "comfy-all-in-one"),
                                            ("schnell", "bfl"), ("schnell", "comfy-all-in-one")])
def test_a_single_file_loads_the_weights_of_its_diffusers_directory(flux, directory_pipes, references, photo_module,
                                                                     variant, layout):
    """Every tensor of every component equal to the directory's. The pictures agree to one level in a few pixels:
    not bytes, because from_pretrained leaves weights where the file's offsets put them (measured: 24 bytes past a
    64-byte boundary) and CPU BLAS rounds by operand alignment; Ray == local bytes is checked from the file."""
    model = flux[variant]
    config = flux_config(model[layout], model_config=model_config_for(model, layout))
    worker = ModelWorker.for_config(config)
    assert worker.spec.family == "flux" and worker.spec.path == model[layout]
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        ours, theirs = getattr(worker.pipe, name).state_dict(), getattr(directory_pipes[variant], name).state_dict()
        assert ours.keys() == theirs.keys(), name
        assert [key for key in ours if not torch.equal(ours[key], theirs[key])] == [], name
    picture = np.asarray(upscale(photo_module, config, model=worker, progress=False)).astype(int)
    reference = np.frombuffer(references[variant], dtype=np.uint8).reshape(picture.shape).astype(int)
    assert np.abs(picture - reference).max() <= 1 and (picture != reference).mean() < 1e-3


def test_ray_actors_load_a_single_flux_file(local_ray, flux, photo_module):
    from cupscale_dist.execution.pool import RayExecutor, WorkerPool
    from cupscale_dist.execution.raycluster import ClusterOptions

    model = flux["dev"]
    config = flux_config(model["comfy-all-in-one"], model_config=model["config"], view_batch_size=2)
    local = as_bytes(upscale(photo_module, config, progress=False))
    spec = ModelSpec.load(config.model, model_config=config.model_config)
    pool = WorkerPool(config, ClusterOptions(actors=2, cpus_per_actor=0.5), spec)
    assert as_bytes(upscale(photo_module, config, executor=RayExecutor(pool, spec, config.view_batch_size),
                            progress=False)) == local


def test_our_transformer_conversion_equals_diffusers_at_flux_width():
    """At FLUX.1's own width (3072; diffusers' converter knows no other) with one block of each kind: every tensor
    the same. Each BFL tensor holds its key's number and its row index, so a swapped q/k, a wrong split or an
    unswapped (shift, scale) shows; stride-0 columns keep it small."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import (
        convert_flux_transformer_checkpoint_to_diffusers,
    )

    config = FluxTransformer2DModel.load_config(shipped_config("flux-dev"), subfolder="transformer")
    config = {k: v for k, v in config.items() if not k.startswith("_")} | {"num_layers": 1, "num_single_layers": 1}
    with torch.device("meta"):
        shapes = bfl_transformer_state(FluxTransformer2DModel(**config).state_dict())
    bfl = {}
    for number, (key, tensor) in enumerate(sorted(shapes.items())):
        rows = torch.arange(tensor.shape[0], dtype=torch.float64) + number * 1_000_000
        bfl[key] = rows.view(-1, *([1] * (tensor.dim() - 1))).expand(tensor.shape)
    ours = transformer_state(dict(bfl))
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    assert ours.keys() == theirs.keys()
    assert [key for key in ours if not torch.equal(ours[key], theirs[key])] == []


def test_shipped_flux_configs_are_the_published_models():
    """FLUX.1-dev's transformer has 11,901,408,320 parameters (its published config, built on the meta device)."""
    from diffusers import FluxTransformer2DModel

    for kind, guidance in (("flux-dev", True), ("flux-schnell", False)):
        config = FluxTransformer2DModel.load_config(shipped_config(kind), subfolder="transformer")
        assert config["guidance_embeds"] is guidance
        with torch.device("meta"):
            model = FluxTransformer2DModel.from_config(config)
        guidance_embedder = 256 * 3072 + 3072 * 3072 + 2 * 3072  # schnell has none
        assert sum(p.numel() for p in model.parameters()) == 11_901_408_320 - (0 if guidance else guidance_embedder)


# -- the weights estimate of each mode (models.weights.weights_gb: --dry-run, a worker's GPU share check) -------------
# FLUX.1-dev's published parameter counts, in models.weights' names (its shipped configs built on the meta device)
FLUX_DEV = {"unet": 11_901_408_320, "text_encoder": 123_060_480, "text_encoder_2": 4_762_310_656, "vae": 83_819_683}


def test_flux_weights_estimates_follow_its_published_parameter_counts():
    """FLUX.1-dev in bf16 (dtype auto on a GPU): full, every parameter at 2 bytes; fp8, the transformer's and both
    encoders' at one; offload, two of the transformer's 340 M double-stream blocks and the 64 M outside its block
    lists, T5's 132 M token embedding (leaf level; CLIP's leaves are smaller) and the VAE: 1.92 GB, not SDXL's rule
    (40 % of the denoiser and an eighth of T5: 10.88 GB)."""
    transformer, clip, t5, vae = FLUX_DEV.values()
    estimate = {mode: weights_gb(FLUX_DEV, mode, "bfloat16", Flux) for mode in ("full", "fp8", "offload")}
    assert estimate["full"] == round((transformer + clip + t5 + vae) * 2 / 1e9, 2) == 33.74
    assert estimate["fp8"] == round((transformer + clip + t5 + vae * 2) / 1e9, 2) == 16.95
    assert estimate["offload"] == round((2 * 339_831_296 + 64_124_992 + 131_596_288 + vae) * 2 / 1e9, 2) == 1.92
    assert estimate["offload"] < estimate["fp8"] < estimate["full"]
    assert weights_gb(FLUX_DEV, "offload", "bfloat16") == 10.88  # the rule of a model whose family is not known


def test_flux_offload_shares_are_what_group_offloading_keeps_of_the_published_models():
    """``Flux.offload_resident`` from FLUX.1-dev's shipped configs built on the meta device: the transformer's largest
    two consecutive block groups and the rest (block level, a stream), T5's largest leaf (leaf level, the encoders
    one after the other: T5's is the larger). Checked against diffusers' own hooks on the same classes, tiny."""
    from diffusers import FluxTransformer2DModel
    from diffusers.hooks import apply_group_offloading
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    configs = shipped_config("flux-dev")
    with torch.device("meta"):
        transformer = FluxTransformer2DModel.from_config(FluxTransformer2DModel.load_config(configs,
                                                                                            subfolder="transformer"))
        clip = CLIPTextModel(CLIPTextConfig.from_pretrained(configs, subfolder="text_encoder"))
        t5 = T5EncoderModel(T5Config.from_pretrained(configs, subfolder="text_encoder_2"))
    assert [parameter_count(m) for m in (transformer, clip, t5)] == [FLUX_DEV[name] for name in
                                                                     ("unet", "text_encoder", "text_encoder_2")]
    assert largest_leaf(t5) > largest_leaf(clip)
    shares = {"unet": resident_share(transformer), "text_encoder_2": largest_leaf(t5) / FLUX_DEV["text_encoder_2"]}
    assert dict(Flux.offload_resident) == pytest.approx(shares, rel=1e-12)
    tiny = flux_transformer(0, guidance_embeds=True, num_layers=2, num_single_layers=2)
    blocks, rest = block_groups(tiny)
    tiny.enable_group_offload(onload_device=torch.device("cpu"), offload_device="cpu", offload_type="block_level",
                              num_blocks_per_group=1, use_stream=False)
    assert offload_group_sizes(tiny) == sorted([*blocks, rest])
    tiny_t5 = T5EncoderModel(T5Config(vocab_size=96, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=2))
    apply_group_offloading(tiny_t5, onload_device=torch.device("cpu"), offload_type="leaf_level")
    assert offload_group_sizes(tiny_t5)[-1] == largest_leaf(tiny_t5) == 96 * 16  # the token embedding


def test_the_dry_run_estimates_a_flux_directory_by_the_flux_rule(tmp_path, capsys):
    """``--dry-run`` of a FLUX.1-dev directory (its configs, weight files of the published counts: headers only, all
    a plan reads) estimates each mode as FLUX.1's, from the family its model_index.json names."""
    import json
    import struct

    from PIL import Image

    from cupscale_dist.cli.main import main

    model = tmp_path / "FLUX.1-dev"
    shutil.copytree(shipped_config("flux-dev"), model)
    files = {"unet": "transformer/diffusion_pytorch_model", "text_encoder": "text_encoder/model",
             "text_encoder_2": "text_encoder_2/model", "vae": "vae/diffusion_pytorch_model"}
    for name, stem in files.items():
        header = json.dumps({"weight": {"dtype": "BF16", "shape": [FLUX_DEV[name]],
                                        "data_offsets": [0, 2 * FLUX_DEV[name]]}}).encode()
        (model / f"{stem}.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    Image.new("RGB", (1024, 1024), (120, 80, 40)).save(tmp_path / "in.png")
    assert main(["upscale", str(tmp_path / "in.png"), "-o", str(tmp_path / "out.png"), "--config", "flux-4k",
                 "--model", str(model), "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["est_weights_gb_per_actor_by_mode"] == {mode: weights_gb(FLUX_DEV, mode, "bfloat16", Flux)
                                                        for mode in ("full", "fp8", "offload")}
    assert plan["est_weights_gb_per_actor_by_mode"]["offload"] == 1.92


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty hub cache (the machine's own is never read by these tests)."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


# -- the presets' dry run before the model is fetched (Flux.published) ------------------------------------------------
DEV, SCHNELL = "black-forest-labs/FLUX.1-dev", "black-forest-labs/FLUX.1-schnell"


def test_flux_published_facts_are_the_shipped_configs_built_on_the_meta_device():
    """``Flux.published``: each component's parameters and the VAE's geometry of FLUX.1-dev and -schnell are those of
    their shipped configs (the published ones) built on the meta device, nothing fetched; schnell's transformer lacks
    dev's guidance embedder (10,229,760 parameters), the rest is the same."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from cupscale_dist.models.spec import read_json, vae_geometry

    assert set(Flux.published) == {DEV, SCHNELL}
    assert Flux.published[DEV]["parameters"] == FLUX_DEV
    for repo, kind in ((DEV, "flux-dev"), (SCHNELL, "flux-schnell")):
        configs = shipped_config(kind)
        with torch.device("meta"):
            models = {"unet": FluxTransformer2DModel.from_config(FluxTransformer2DModel.load_config(
                          configs, subfolder="transformer")),
                      "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(configs, subfolder="text_encoder")),
                      "text_encoder_2": T5EncoderModel(T5Config.from_pretrained(configs, subfolder="text_encoder_2")),
                      "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(configs, subfolder="vae"))}
        assert Flux.published[repo]["parameters"] == {name: parameter_count(m) for name, m in models.items()}
        vae = vae_geometry(configs, read_json(configs, "vae/config.json"))
        assert Flux.published[repo]["geometry"] == vae == (8, 16)
    guidance_embedder = 256 * 3072 + 3072 * 3072 + 2 * 3072
    assert Flux.published[SCHNELL]["parameters"] == {**FLUX_DEV, "unet": 11_901_408_320 - guidance_embedder}


@pytest.mark.parametrize("preset,repo,scale,full,fp8", [
    ("flux-2k", DEV, 2, 33.74, 16.95), ("flux-4k", DEV, 4, 33.74, 16.95), ("flux-8k", DEV, 8, 33.74, 16.95),
    ("flux-16k", DEV, 16, 33.74, 16.95), ("flux-schnell-4k", SCHNELL, 4, 33.72, 16.94)])
def test_the_flux_presets_dry_run_as_flux_before_the_model_is_fetched(preset, repo, scale, full, fp8, hub_cache,
                                                                       monkeypatch, capsys, tmp_path):
    """The dry run of a 1K input with a flux preset, offline with an empty hub cache: the latent of FLUX.1's VAE (a
    factor 8, 16 channels: the host memory of 16, not SDXL's 4) and the weights of its published counts in each mode
    (offload by Flux's rule), not SDXL base's guesses (full 6.94, fp8 3.55, offload 2.39 GB)."""
    import json

    import huggingface_hub.constants
    from PIL import Image

    from cupscale_dist import UpscaleConfig
    from cupscale_dist.cli.main import main
    from cupscale_dist.plan import make_plan

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    config = UpscaleConfig.load(preset)
    assert config.model == repo and config.scale == scale
    Image.new("RGB", (1024, 1024), (120, 80, 40)).save(tmp_path / "in.png")
    assert main(["upscale", str(tmp_path / "in.png"), "-o", str(tmp_path / "out.png"), "--config", preset,
                 "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["stages"][-1]["latent"] == [1024 * scale // 8] * 2
    assert plan["stages"] == make_plan((1024, 1024), config, (8, 16)).describe()["stages"]
    assert plan["stages"] != make_plan((1024, 1024), config, (8, 4)).describe()["stages"]
    counts = Flux.published[repo]["parameters"]
    assert plan["est_weights_gb_per_actor_by_mode"] == {mode: weights_gb(counts, mode, "bfloat16", Flux)
                                                        for mode in ("full", "fp8", "offload")}
    assert plan["est_weights_gb_per_actor_by_mode"] == {"full": full, "fp8": fp8, "offload": 1.92}


def test_a_flux_presets_knobs_are_checked_before_the_model_is_fetched(hub_cache):
    """The preset's model is known to be FLUX.1 before it is fetched (Flux.published): a knob Flux refuses is one
    line at the plan, not after a 34 GB download."""
    from cupscale_dist import UpscaleConfig
    from cupscale_dist.plan import check_inputs

    for preset in ("flux-4k", "flux-schnell-4k"):
        with pytest.raises(UserError, match="mask_mode=pixel is not implemented for Flux"):
            check_inputs((1024, 1024), UpscaleConfig.load(preset, mask_mode="pixel"))


def test_no_t5_tokenizer_is_refused_then_found_in_the_hub_cache(flux, photo_module, hub_cache, tmp_path):
    model = flux["dev"]
    configs = tmp_path / "configs"
    shutil.copytree(model["config"], configs)
    shutil.rmtree(configs / "tokenizer_2")
    config = flux_config(model["comfy-all-in-one"], model_config=str(configs))
    with pytest.raises(UserError, match="huggingface-cli download black-forest-labs/FLUX.1-dev") as refused:
        ModelSpec.load(config.model, model_config=config.model_config)
    assert "\n" not in str(refused.value)
    snapshot = hub_cache / "models--black-forest-labs--FLUX.1-dev" / "snapshots" / ("0" * 40)
    shutil.copytree(model["dir"] + "/tokenizer_2", snapshot / "tokenizer_2")
    (hub_cache / "models--black-forest-labs--FLUX.1-dev" / "refs").mkdir()
    (hub_cache / "models--black-forest-labs--FLUX.1-dev" / "refs" / "main").write_text("0" * 40)
    own = flux_config(model["comfy-all-in-one"], model_config=model["config"])  # its tokenizer in its configs
    assert as_bytes(upscale(photo_module, config, progress=False)) == as_bytes(upscale(photo_module, own,
                                                                                       progress=False))


def test_the_shipped_configs_serve_a_flux_file_when_t5s_tokenizer_is_cached(flux, hub_cache):
    """No model_config: the spec comes from the shipped FLUX.1 configs (16 latent channels, factor 8)."""
    snapshot = hub_cache / "models--black-forest-labs--FLUX.1-schnell" / "snapshots" / ("1" * 40)
    shutil.copytree(flux["schnell"]["dir"] + "/tokenizer_2", snapshot / "tokenizer_2")
    (hub_cache / "models--black-forest-labs--FLUX.1-schnell" / "refs").mkdir()
    (hub_cache / "models--black-forest-labs--FLUX.1-schnell" / "refs" / "main").write_text("1" * 40)
    spec = ModelSpec.read(flux["schnell"]["comfy-all-in-one"])
    assert spec.family == "flux" and spec.config_dir == shipped_config("flux-schnell")
    assert (spec.vae_scale_factor, spec.latent_channels, spec.native_size) == (8, 16, 1024)
    assert spec.scheduler_config["use_dynamic_shifting"] is False


def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("cupscale_dist.execution.worker.load_pipeline", refuse)


@pytest.mark.parametrize("case,named", [
    ("transformer-only", "is a transformer-only Flux checkpoint"),
    ("configs-without-weights", "has no text_encoder weights"),
    ("dev-file-schnell-config", "is a FLUX.1-dev checkpoint but"),
    ("ckpt", "read as .safetensors only"),
])
def test_flux_files_that_cannot_load_are_refused_in_one_line_before_any_model_loads(flux, tmp_path, monkeypatch,
                                                                                   case, named):
    no_model_loads(monkeypatch)
    model = flux["dev"]
    path, model_config = model["bfl"], None
    if case == "configs-without-weights":
        model_config = model["config"]
    elif case == "dev-file-schnell-config":
        model_config = flux["schnell"]["dir"]
    elif case == "ckpt":
        path = str(tmp_path / "flux.ckpt")
        torch.save({"double_blocks.0.img_attn.proj.bias": torch.zeros(1)}, path)
    with pytest.raises(UserError) as refused:
        ModelWorker.for_config(flux_config(path, model_config=model_config))
    assert named in str(refused.value) and "\n" not in str(refused.value)


def test_sd3_stays_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "sd3.safetensors"
    save_file({"model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias": torch.zeros(1)}, path)
    with pytest.raises(UserError, match="is a Stable Diffusion 3 checkpoint"):
        checkpoint_kind(path)


def test_the_cli_refuses_a_transformer_only_file_with_exit_2_and_writes_nothing(flux, photo_module, tmp_path, capsys):
    source, out = tmp_path / "in.png", tmp_path / "out.png"
    photo_module.save(source)
    code, _, err = cli(capsys, "upscale", source, "-o", out, "--model", flux["dev"]["bfl"], "--scale", "2", *RUN,
                       "-q")
    line = assert_one_error_line(code, err)
    assert code == 2 and "model_config" in line and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png"]


def test_weights_fp8_stores_a_single_files_transformer_in_float8(flux, photo_module):
    model = flux["dev"]
    config = flux_config(model["comfy-all-in-one"], model_config=model["config"], weights="fp8", mask_mode="off")
    worker = ModelWorker.for_config(config)
    assert worker.unet.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
    assert upscale(photo_module, config, model=worker, progress=False).size == (128, 96)
