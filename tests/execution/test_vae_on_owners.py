"""Steps 2-4 and 10 on the owners (issue 34): each worker encodes the VAE tiles that reach its band of the latent
from the pixel rows it is sent, makes its rows of the prior and the start point, and at the end decodes its band and
hands on 8-bit rows. The latent, the prior and the output are byte for byte the driver's tiled encode/decode of the
whole latent, for any split of the rows (uneven bands, a band narrower than a tile, a band inside one tile), and the
whole latent never goes to or comes from the driver.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import small_config
from hypothesis import given, settings, strategies as st

from cupscale_dist import upscale
from cupscale_dist.execution.executor import LocalExecutor
from cupscale_dist.execution.partowner import PartOwner
from cupscale_dist.method.prior import stage_noise, stage_start
from cupscale_dist.method.vae import (
    TileGrid,
    decode_float_bands,
    decode_float_rows,
    encode_rows,
    encode_tiled,
    latent_tiles,
    to_uint8,
)


def tile_decoder(calls: list):
    """A stand-in decoder whose pixels depend on the whole tile (its mean): a wrong tile, or a tile cut at a band's
    edge instead of the grid's, changes them."""
    def decode_tile(latents: np.ndarray) -> np.ndarray:
        calls.append(latents.shape)
        z = torch.from_numpy(np.array(latents))
        up = torch.nn.functional.interpolate(z[None, :3] * 0.6 + z[None, 3:] * 0.3, scale_factor=8)[0]
        return torch.tanh(up + z.mean()).numpy()

    return lambda method, calls_: (decode_tile(*call) for call in calls_)


def whole_decode(latents, tile_px, overlap):
    bands = decode_float_bands(tile_decoder([]), latents, 8, tile_px, overlap)
    return np.concatenate([to_uint8(band) for band in bands])


def split_decode(latents, tile_px, overlap, bounds):
    """Each band decoded alone from the rows its tiles read (what an owner holds with its halo), then joined."""
    height, width = latents.shape[-2:]
    grid = TileGrid(height, width, *latent_tiles(tile_px, overlap, 8))
    out = []
    for lo, hi in zip(bounds, bounds[1:]):
        a, b = grid.span(lo, hi)
        chunks = list(decode_float_rows(tile_decoder([]), latents[..., a:b, :].clone(), a, grid, 8, (lo, hi)))
        assert [rows for rows, _ in chunks] == grid.chunks(lo, hi)  # what the driver expects, chunk for chunk
        assert chunks[0][0][0] == lo and chunks[-1][0][1] == hi
        out += [to_uint8(band) for _, band in chunks]
    return np.concatenate(out)


@settings(max_examples=40, deadline=None)
@given(height=st.integers(3, 40), width=st.integers(3, 20), tile_px=st.sampled_from([64, 96, 128]),
       overlap=st.sampled_from([0.0, 0.25, 0.5]), cuts=st.lists(st.integers(1, 39), max_size=4), seed=st.integers(0, 9))
def test_any_split_of_the_rows_decodes_to_the_whole_decodes_bytes(height, width, tile_px, overlap, cuts, seed):
    latents = torch.randn(1, 4, height, width, generator=torch.Generator().manual_seed(seed))
    bounds = (0, *sorted({c for c in cuts if c < height}), height)
    assert np.array_equal(split_decode(latents, tile_px, overlap, bounds), whole_decode(latents, tile_px, overlap))


def tile_encoder():
    """A stand-in encoder whose latent depends on the whole tile (its mean)."""
    def encode_tile(pixels: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.asarray(pixels, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
        low = torch.nn.functional.avg_pool2d(x[None], 8)[0]
        return torch.cat([low, low.mean(0, keepdim=True)]).add(x.mean()).numpy()

    return lambda method, calls: (encode_tile(*call) for call in calls)


@settings(max_examples=40, deadline=None)
@given(height=st.integers(1, 10), width=st.integers(2, 10), tile_px=st.sampled_from([64, 96, 128]),
       overlap=st.sampled_from([0.0, 0.25, 0.5]), cuts=st.lists(st.integers(1, 9), max_size=3),
       seed=st.integers(0, 9), scheduler=st.sampled_from(["ddim", "euler"]))
def test_any_split_of_the_rows_encodes_and_starts_with_the_whole_latents_bytes(height, width, tile_px, overlap,
                                                                               cuts, seed, scheduler):
    """z_L, G = LL(z_L), LL(eps) and z_S = add_noise(z_L, eps, t_S) of a band (2-aligned, J = 1) are the whole
    latent's rows, bit for bit."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    height, width = 2 * height, 2 * width  # latents of 2^J-aligned sizes, as the planner makes them
    pixels = np.random.default_rng(seed).integers(0, 256, (height * 8, width * 8, 3), dtype=np.uint8)
    grid = TileGrid(height, width, *latent_tiles(tile_px, overlap, 8))
    cut = lambda t, l, b, r: pixels[t * 8 : b * 8, l * 8 : r * 8]  # noqa: E731
    sched = (DDIMScheduler if scheduler == "ddim" else EulerDiscreteScheduler)()
    sched.set_timesteps(10)
    shape = (1, 4, height, width)
    z_low = encode_tiled(tile_encoder(), cut, height, width, 4, grid.tile, grid.stride)
    whole_prior, whole_start = stage_start(sched, 3, z_low, z_low, stage_noise(shape, 7, 1), "haar", 1)
    bounds = (0, *sorted({2 * c for c in cuts if 2 * c < height}), height)
    for lo, hi in zip(bounds, bounds[1:]):
        band = encode_rows(tile_encoder(), cut, grid, 4, (lo, hi))
        assert torch.equal(band, z_low[..., lo:hi, :]), (lo, hi)
        prior, start = stage_start(sched, 3, band, band, stage_noise(shape, 7, 1, (lo, hi)), "haar", 1)
        assert torch.equal(start, whole_start[..., lo:hi, :])
        assert torch.equal(prior.low, whole_prior.low[..., lo // 2 : hi // 2, :])
        assert torch.equal(prior.noise_low, whole_prior.noise_low[..., lo // 2 : hi // 2, :])


def test_a_band_reads_only_the_tiles_that_reach_it():
    grid = TileGrid(24, 32, *latent_tiles(64, 0.25, 8))  # 8-row tiles every 6: tops 0, 6, 12, 16
    assert [t for t, _, _ in grid.tile_rows(0, 12)] == [0, 6] and grid.span(0, 12) == (0, 14)
    assert [t for t, _, _ in grid.tile_rows(12, 24)] == [6, 12, 16] and grid.span(12, 24) == (6, 24)
    assert grid.span(2, 4) == (0, 8) and grid.chunks(2, 4) == [(2, 4)]
    assert grid.chunks(0, 24) == [(0, 6), (6, 12), (12, 16), (16, 24)]  # the whole decode's bands


# --- the pipeline: owners decode, the driver never gathers ---------------------------------------------------------
# The tiny pipelines' stage: 96x128 px -> 192x256, a 24x32 latent; vae_tile 64 px: 8-row tiles every 6 rows.
LAYOUTS = [(1, None), (2, None), (3, None), (3, (0, 2, 4, 24)), (2, (0, 20, 24)), (3, (0, 8, 10, 24))]


def test_owners_decode_the_reference_bytes_and_the_driver_never_gathers(sdxl_model, photo, monkeypatch):
    config = small_config(sdxl_model.name, view_batch_size=2, vae_tile=64)
    reference = np.asarray(upscale(photo, config, executor=LocalExecutor(sdxl_model, 2), progress=False))
    decoded = []
    real_decode = PartOwner.decode

    def counted(self, *args):
        out = real_decode(self, *args)
        decoded.append(len(out) - 1)
        return out

    def refuse(*args):  # no callback, no checkpoint, no snapshot_every: nothing asks for the whole latent
        raise AssertionError("the owners' bands were gathered to the driver")

    real_load = PartOwner.load

    def from_pixels(self, generation, job, parts, step, pixels=None):  # no latent rows sent: pixel rows instead
        assert pixels is not None and all(latents is None for latents, _ in parts.values())
        return real_load(self, generation, job, parts, step, pixels)

    monkeypatch.setattr(PartOwner, "decode", counted)
    monkeypatch.setattr(PartOwner, "gather", refuse)
    monkeypatch.setattr(PartOwner, "load", from_pixels)
    for owners, bounds in LAYOUTS:
        decoded.clear()
        image = upscale(photo, config, executor=LocalExecutor(sdxl_model, 2, owners=owners, bounds=bounds),
                        progress=False)
        assert np.array_equal(np.asarray(image), reference), (owners, bounds)
        assert len(decoded) == owners and sum(decoded) >= 4, (owners, bounds, decoded)


def test_the_prior_of_another_picture_is_encoded_on_the_owners_too(sdxl_model, photo, monkeypatch):
    """resize='model' with prior_source='input': the prior's picture is not the start point's (here a mirrored one,
    so mixing them up shows); its rows go to the owners beside the stage input's and the output is the reference's."""
    from PIL import Image

    def mirrored(image, size, config):
        return image.resize(size, Image.Resampling.BICUBIC).transpose(Image.Transpose.FLIP_LEFT_RIGHT)

    monkeypatch.setattr("cupscale_dist.pipeline.prior_picture", mirrored)
    config = small_config(sdxl_model.name, view_batch_size=2, vae_tile=64, prior_scale=1.0)
    reference = np.asarray(upscale(photo, config, executor=LocalExecutor(sdxl_model, 2), progress=False))
    image = upscale(photo, config, executor=LocalExecutor(sdxl_model, 2, owners=3, bounds=(0, 8, 10, 24)),
                    progress=False)
    assert np.array_equal(np.asarray(image), reference)


def test_a_sink_closed_early_frees_the_owners_bands(sdxl_model, photo):
    """A file writer that fails on its first band (and keeps the iterator it was given) stops the decode; every
    owner drops its bands."""
    from cupscale_dist.execution.partloop import InProcessTransport

    config = small_config(sdxl_model.name, view_batch_size=2, vae_tile=64)
    owners = []
    real_init = InProcessTransport.__init__

    def keep(self, held):
        real_init(self, held)
        owners.extend(held.values())

    class Full(Exception):
        pass

    held = []

    def failing_sink(bands):
        held.append(bands)  # still referenced: only the pipeline's own close frees the owners
        next(iter(bands))
        raise Full

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(InProcessTransport, "__init__", keep)
        with pytest.raises(Full):
            upscale(photo, config, executor=LocalExecutor(sdxl_model, 2, owners=2), progress=False, sink=failing_sink)
    assert len(owners) == 2 and all(not owner.parts and owner.generation is None for owner in owners)


def test_a_cancel_after_the_owners_encoded_their_bands_stops_before_any_step(sdxl_model, photo, monkeypatch):
    """The encode is one load call per worker: the preparation's last tick comes after it, so a cancel raised
    there stops the stage before any prediction (issue 35's cancel while preparing, with the VAE on the owners)."""
    config = small_config(sdxl_model.name, view_batch_size=2, vae_tile=64)
    events = []
    real_load, real_predict = PartOwner.load, PartOwner.predict
    monkeypatch.setattr(PartOwner, "load", lambda self, *a: events.append("load") or real_load(self, *a))
    monkeypatch.setattr(PartOwner, "predict", lambda self, *a: events.append("predict") or real_predict(self, *a))

    class Cancelled(Exception):
        pass

    def cancel_after_load(info):
        if info["step"] == 0 and info["stage_input"] is None:
            events.append("tick")
            if "load" in events:
                raise Cancelled

    with pytest.raises(Cancelled):
        upscale(photo, config, executor=LocalExecutor(sdxl_model, 2, owners=2), callback=cancel_after_load,
                progress=False)
    assert events[-3:] == ["load", "load", "tick"] and "predict" not in events


# --- a worker lost (in process: the transport below plays Ray's part) ----------------------------------------------
class Lost:
    """What a lost worker's call returns: fetching it (or anything made from it) raises WorkerLost, as Ray does."""

    def __init__(self, worker: int, method: str):
        self.worker, self.method = worker, method


class LosingTransport:
    """In-process owners; the ``at``-th ``method`` call to ``victim`` loses it for good (it leaves the pool)."""

    def __init__(self, owners: dict, victim: int, method: str, at: int):
        from cupscale_dist.execution.partloop import InProcessTransport

        self.inner, self.victim, self.method, self.at, self.calls = InProcessTransport(owners), victim, method, at, 0
        self.lost = False

    def workers(self) -> list[int]:
        return self.inner.workers()

    def submit(self, worker: int, method: str, count: int, *args) -> list:
        failed = next((a for a in args if isinstance(a, Lost)), None)
        if worker == self.victim and method == self.method and not self.lost:
            self.calls += 1
            if self.calls == self.at:
                self.lost = True
                del self.inner.owners[worker]
                failed = Lost(worker, method)
        if failed is not None or worker not in self.inner.owners:
            return [failed or Lost(worker, method)] * count
        return self.inner.submit(worker, method, count, *args)

    def fetch(self, handles: list) -> list:
        from cupscale_dist.execution.partloop import WorkerLost

        for handle in handles:
            if isinstance(handle, Lost):
                raise WorkerLost(handle.worker, "lost by the test", call=handle.method)
        return self.inner.fetch(handles)

    def lose(self, lost) -> None:
        pass  # already out of the pool


class LosingExecutor(LocalExecutor):
    def __init__(self, worker, owners: int, *loss):
        super().__init__(worker, 2, owners=owners)
        self.loss = loss

    def _denoise_on_owners(self, job):
        from cupscale_dist.execution.partloop import PartLoop

        worker = self.worker
        owners = {slot: PartOwner(worker.predict, slot, worker.decode_tile, worker.encode_tile)
                  for slot in range(self.owners)}
        self.transport = LosingTransport(owners, *self.loss)
        return PartLoop(self.transport, job).bands()


@pytest.mark.parametrize("victim,method,at", [(1, "decode", 1), (0, "decode", 1), (2, "load", 1), (1, "predict", 2),
                                              (1, "gather", 1)])
def test_a_worker_lost_at_any_call_gives_the_reference_bytes(sdxl_model, photo, victim, method, at):
    """Lost in its decode after the rows above it were handed on (the replay's decode goes on from the first row
    not yet handed on), before any row was, in its load (the bands encoded again from the stage input), mid-denoise,
    or in a checkpoint's gather: the output is the reference's, each row once."""
    config = small_config(sdxl_model.name, view_batch_size=2, vae_tile=64)
    reference = np.asarray(upscale(photo, config, executor=LocalExecutor(sdxl_model, 2), progress=False))
    executor = LosingExecutor(sdxl_model, 3, victim, method, at)

    def checkpoint(info):  # a checkpoint's gather after step 1 (only the 'gather' case loses a worker there)
        if info["gather"] is not None and info["step"] == 1:
            info["gather"]()

    image = upscale(photo, config, executor=executor, callback=checkpoint, progress=False)
    assert executor.transport.lost and victim not in executor.transport.workers()
    assert np.array_equal(np.asarray(image), reference)
