"""Issue 21, round 2 of hardening, for user-supplied files: upscale-model files that would run code (4), a
checkpoint whose 'state_dict' contains itself (5), `cupscale eval --out` (6), bad parquet cells in a batch (7) and
broken LoRAs (9). Every adversarial file is built here, tiny; each case must end in one line (exit 2 from the CLI),
in bounded time, with nothing written or replaced."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from conftest import small_config
from cupscale_dist import UserError
from cupscale_dist.cli.main import main
from cupscale_dist.models import upscale_models as um

FAST_S = 1.0  # "refused in well under a second": the bound a hostile 1 KB file gets


def one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message, message
    return message


# -- 4. upscale-model files: nothing in them runs, only plain state dicts pass ----------------------------------
class Doubler(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


@pytest.fixture
def torch_spy(monkeypatch):
    """Every torch.load call's weights_only, and every torch.jit.load call (refused: it would run the archive)."""
    calls = SimpleNamespace(load=[], jit=[])
    real_load = torch.load

    def load(*args, **kwargs):
        calls.load.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    def jit_load(*args, **kwargs):
        calls.jit.append(args)
        raise RuntimeError("torch.jit.load was called on a user's file")

    monkeypatch.setattr(torch, "load", load)
    monkeypatch.setattr(torch.jit, "load", jit_load)
    return calls


def tiny_esrgan_state() -> dict[str, torch.Tensor]:
    um.import_spandrel()
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(0)
    model = ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=2)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def test_torchscript_and_non_state_dict_upscale_models_are_refused_before_torch_runs_them(tmp_path, torch_spy):
    scripted = torch.jit.script(Doubler())
    for name in ("script.pth", "script.pt", "script.ckpt"):
        torch.jit.save(scripted, str(tmp_path / name))
    selfish: dict = {}
    selfish["params_ema"] = selfish  # spandrel unwraps params_ema once: what is left is not a state dict
    torch.save(selfish, tmp_path / "cycle.pth")
    torch.save([torch.zeros(3)], tmp_path / "list.pth")
    torch.save({"conv_first.weight": torch.zeros(8, 3, 3, 3), "note": "hello"}, tmp_path / "mixed.pth")
    nan = tiny_esrgan_state()
    first = next(iter(nan))
    nan[first].view(-1)[0] = float("nan")
    torch.save(nan, tmp_path / "nan.pth")
    (tmp_path / "notzip.pth").write_bytes(b"PK\x03\x04" + bytes(60))  # torch would open it as an archive
    refused = {"script.pth": "TorchScript archive", "script.pt": "TorchScript archive",
               "script.ckpt": "TorchScript archive", "cycle.pth": "not a plain state dict",
               "list.pth": "holds a list, not a state dict", "mixed.pth": "not a plain state dict",
               "nan.pth": "holds NaN values", "notzip.pth": "not a readable weights archive"}
    for name, problem in refused.items():
        path = um.resolve_upscale_model(str(tmp_path / name))
        for load in (um.check_upscale_model, lambda p: um.load_upscale_model(p, "cpu")):
            started = time.monotonic()
            with pytest.raises(UserError) as error:
                load(path)
            assert problem in one_line(error), (name, str(error.value))
            assert ("as .safetensors" if "TorchScript" in problem else "resize=bicubic") in str(error.value)  # the fix
            assert time.monotonic() - started < FAST_S
    # The other readers of a user's pickled file refuse the archive by its names too (torch is not asked).
    from cupscale_dist.quality.inception import read_inception_weights
    from cupscale_dist.services.checkpoint import FILE_NAME, Checkpointer

    (tmp_path / "resume").mkdir()
    (tmp_path / "resume" / FILE_NAME).write_bytes((tmp_path / "script.pth").read_bytes())
    calls = len(torch_spy.load)
    for read in (lambda: read_inception_weights(tmp_path / "script.pth"),
                 lambda: Checkpointer(tmp_path / "resume", 1, "hash", "sha").load()):
        with pytest.raises(UserError) as error:
            read()
        assert "TorchScript archive" in one_line(error)
    assert len(torch_spy.load) == calls
    assert torch_spy.jit == []  # the archives never reached torch.jit.load
    assert torch_spy.load and all(weights_only is True for weights_only in torch_spy.load)


def test_valid_upscale_models_load_weights_only_and_give_spandrels_bytes(tmp_path, torch_spy):
    from safetensors.torch import save_file

    spandrel = um.import_spandrel()
    state = tiny_esrgan_state()
    torch.save({"params_ema": state}, tmp_path / "wrapped.pth")  # as BasicSR saves them
    save_file(state, str(tmp_path / "plain.safetensors"))
    tile = np.asarray(Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 20, 3), dtype=np.uint8)))
    for name in ("wrapped.pth", "plain.safetensors"):
        path = str(tmp_path / name)
        um.check_upscale_model(path)
        ours = um.run_upscale_model(um.load_upscale_model(path, "cpu"), tile)
        theirs = um.run_upscale_model(spandrel.ModelLoader("cpu").load_from_state_dict(
            spandrel.canonicalize_state_dict(state)).eval().float(), tile)
        assert ours.shape == (48, 40, 3) and ours.tobytes() == theirs.tobytes()
    assert torch_spy.jit == [] and torch_spy.load and all(w is True for w in torch_spy.load)


# -- 5. a checkpoint whose 'state_dict' is itself: refused at once --------------------------------------------------
def refused_within(call, seconds: float) -> str:
    """``call``'s one-line UserError, failing the test if it is still running after ``seconds`` (a hang)."""
    outcome = {}

    def target():
        try:
            call()
            outcome["error"] = None
        except Exception as exc:  # noqa: BLE001 - reported below
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)  # a hung walk must not keep pytest from exiting
    started = time.monotonic()
    thread.start()
    thread.join(seconds * 10)
    assert not thread.is_alive(), f"still running after {seconds * 10:.0f} s: the walk does not end"
    assert time.monotonic() - started < seconds
    assert isinstance(outcome["error"], UserError), repr(outcome["error"])
    assert "\n" not in str(outcome["error"])
    return str(outcome["error"])


def test_a_checkpoint_whose_state_dict_contains_itself_is_refused_at_once(tmp_path, monkeypatch):
    from cupscale_dist.models.single_file import checkpoint_family
    from cupscale_dist.models.spec import ModelSpec

    itself: dict = {}
    itself["state_dict"] = itself
    torch.save(itself, tmp_path / "itself.ckpt")
    a: dict = {}
    a["state_dict"] = {"state_dict": a}
    torch.save(a, tmp_path / "pair.ckpt")
    deep: dict = {"weight": torch.zeros(1)}
    for _ in range(30):
        deep = {"state_dict": deep}
    torch.save(deep, tmp_path / "deep.ckpt")
    assert (tmp_path / "itself.ckpt").stat().st_size < 2048
    for name, problem in (("itself.ckpt", "form a cycle"), ("pair.ckpt", "form a cycle"), ("deep.ckpt", "nested more")):
        path = str(tmp_path / name)
        assert problem in refused_within(lambda path=path: checkpoint_family(path), FAST_S)
        assert problem in refused_within(lambda path=path: ModelSpec.load(path), FAST_S)
    sdxl_keys = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1, 4, 1, 1),
                 "conditioner.embedders.1.model.ln_final.weight": torch.zeros(1)}
    torch.save({"state_dict": {"state_dict": sdxl_keys}, "epoch": 3}, tmp_path / "twice.ckpt")
    assert checkpoint_family(tmp_path / "twice.ckpt") == "sdxl"  # real wrappers still unwrap

    # The count bound, at a size a test can afford: the walks over keys are bounded by the file's entry count.
    from safetensors.torch import save_file

    from cupscale_dist.models import single_file, weightfiles

    save_file({k: v.contiguous() for k, v in sdxl_keys.items()}, str(tmp_path / "two.safetensors"))
    monkeypatch.setattr(single_file, "MAX_ENTRIES", 1)
    monkeypatch.setattr(weightfiles, "MAX_ENTRIES", 1)
    for name in ("twice.ckpt", "two.safetensors"):
        with pytest.raises(UserError, match="holds 2 .*over the 1 a model has") as error:
            checkpoint_family(tmp_path / name)
        one_line(error)


# -- 6. cupscale eval --out -----------------------------------------------------------------------------------------
@pytest.fixture
def cheap_eval(monkeypatch, sdxl_dir):
    """`cupscale eval` with the upscale replaced by bicubic (the figures are not under test) and a count of runs."""
    from cupscale_dist.models.spec import ModelSpec

    runs = []

    def fake_upscale(image, config, **_):
        runs.append(image.size)
        return image.resize((image.width * config.scale, image.height * config.scale), Image.Resampling.BICUBIC)

    executor = SimpleNamespace(spec=ModelSpec.read(sdxl_dir), release=lambda: None)
    monkeypatch.setattr("cupscale_dist.quality.evaluate.upscale", fake_upscale)
    monkeypatch.setattr("cupscale_dist.execution.executor.open_executor", lambda *a, **k: executor)
    return lambda *args: main(["eval", *map(str, args), "--config", "cpu-demo", "--model", sdxl_dir, "--scale", "2",
                               "-q", "--json"]), runs


def picture(seed: int, size=(64, 64)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size[::-1], 3), dtype=np.uint8))


def test_eval_out_is_checked_first_never_replaces_and_names_same_named_originals_apart(tmp_path, cheap_eval,
                                                                                       monkeypatch, capsys):
    run, runs = cheap_eval
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    picture(1).save(tmp_path / "a" / "x.png")
    picture(2).save(tmp_path / "b" / "x.png")
    afile = tmp_path / "report.txt"
    afile.write_text("mine")
    with monkeypatch.context() as patched:  # --out is checked before the originals are even read
        patched.setattr("cupscale_dist.files.imageio.load_image", lambda *a: pytest.fail("an original was read"))
        for out, problem in ((afile, "is a file"), ("/proc/cupscale-eval", "can't write there"),
                             (afile / "sub", "can't write there")):
            assert run(tmp_path / "a" / "x.png", "--out", out) == 2
            err = capsys.readouterr().err.strip()
            assert problem in err and "\n" not in err, err
    assert runs == [] and afile.read_text() == "mine"

    out = tmp_path / "eval"
    assert run(tmp_path / "a" / "x.png", tmp_path / "b" / "x.png", "--out", out) == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out)
    sheets = [Path(row["side_by_side"]) for row in report["images"]]
    assert len(set(sheets)) == 2 and all(p.is_file() for p in sheets)
    names = sorted(p.name for p in out.iterdir())  # the report, 2 sheets, 2 upscales: no temp file left
    assert names == sorted(["eval.json", *(p.name for p in sheets), *(f"{p.stem}-ours.png" for p in sheets)])
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    runs.clear()
    assert run(tmp_path / "a" / "x.png", tmp_path / "b" / "x.png", "--out", out) == 2  # no --overwrite
    err = capsys.readouterr().err.strip()
    assert "already exists; pass --overwrite" in err and "\n" not in err and runs == []
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    victim = out / f"{sheets[0].stem.rsplit('-x2', 1)[0]}-x2-ours.png"  # an input named like an output
    assert run(tmp_path / "a" / "x.png", tmp_path / "b" / "x.png", victim, "--out", out, "--overwrite") == 2
    err = capsys.readouterr().err.strip()
    assert "is one of the originals" in err and runs == [] and victim.read_bytes() == before[victim.name]

    assert run(tmp_path / "a" / "x.png", tmp_path / "a" / "x.png", "--out", tmp_path / "new") == 2
    assert "given more than once" in capsys.readouterr().err and not (tmp_path / "new").exists()
    assert run(tmp_path / "a" / "x.png", tmp_path / "b" / "x.png", "--out", out, "--overwrite") == 0
    assert len(runs) == 2 and sorted(p.name for p in out.iterdir()) == sorted(before)


# -- 7. a bad parquet cell is that row's error, the rest of the dataset runs ------------------------------------
def test_bad_parquet_cells_become_error_rows_and_the_rest_runs(sdxl_dir, tmp_path):
    from cupscale_dist.execution.raycluster import ClusterOptions
    from cupscale_dist.services.batch.manifest import MANIFEST_NAME
    from cupscale_dist.services.batch.run import run_batch

    picture(1).save(tmp_path / "one.png")
    picture(2).save(tmp_path / "two.png")
    pq.write_table(pa.table({"path": ["one.png", "one\0.png", "two.png"], "regional_prompts": [None, None, 5]}),
                   tmp_path / "numbers.parquet")
    pq.write_table(pa.table({"path": ["one.png", "two.png"], "regional_prompts": [None, ["a", "b"]]}),
                   tmp_path / "lists.parquet")
    config = small_config(sdxl_dir, steps=2)
    planned = run_batch(str(tmp_path / "lists.parquet"), tmp_path / "dry", config, dry_run=True, progress=False)
    assert [p["action"] for p in planned.planned] == ["upscale", "error"]

    summary = run_batch(str(tmp_path / "numbers.parquet"), tmp_path / "out", config, tile_parallel=True,
                        cluster=ClusterOptions(actors=0), progress=False)
    assert (summary.done, summary.errors, summary.failed) == (1, 2, 0)
    rows = {r["input_path"]: r for r in pq.read_table(tmp_path / "out" / MANIFEST_NAME).to_pylist()}
    assert rows[str(tmp_path / "one.png")]["status"] == "ok" and (tmp_path / "out" / "one.png").is_file()
    errors = sorted(r["error"] for r in rows.values() if r["status"] == "error")
    assert len(errors) == 2 and all("\n" not in e for e in errors)
    assert "contains a NUL byte" in errors[0] and "row 1" in errors[0]
    assert "'regional_prompts' is 5 (of type int), not a file path" in errors[1] and "row 2" in errors[1]


# -- 9. LoRAs: incomplete, non-finite, or for other layer sizes -----------------------------------------------------
@pytest.fixture(scope="module")
def lora_state(sdxl_dir, tmp_path_factory):
    from safetensors.torch import load_file

    from cupscale_dist.testing.tiny import build_tiny_lora

    path = build_tiny_lora(sdxl_dir, tmp_path_factory.mktemp("lora") / "good.safetensors", seed=1)
    return load_file(str(path))


class Records(logging.Handler):
    """Every record a logger (and its children) emits."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_broken_loras_are_refused_in_one_line_before_any_model_loads(sdxl_dir, lora_state, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from cupscale_dist.execution.worker import ModelWorker
    from cupscale_dist.models.addons import Addons, Lora

    down = next(k for k in lora_state if k.startswith("unet.") and "attn1.to_q.lora_A" in k)
    up = next(k for k in lora_state if k.startswith("unet.") and "lora_B" in k)
    files = {
        "only_a": ({k: v for k, v in lora_state.items() if "lora_B" not in k}, "but no up (lora_B) factor"),
        "nan": ({**lora_state, up: torch.full_like(lora_state[up], float("nan"))}, f"weight {up} holds NaN"),
        "inf": ({**lora_state, down: torch.full_like(lora_state[down], float("inf"))}, "holds infinite values"),
        "wide": ({**lora_state, down: torch.zeros(lora_state[down].shape[0], 2 * lora_state[down].shape[1])},
                 f"has {2 * lora_state[down].shape[1]} inputs"),
    }
    for name, (state, problem) in files.items():
        save_file(state, str(tmp_path / f"{name}.safetensors"))
    with monkeypatch.context() as patched:
        patched.setattr("cupscale_dist.execution.worker.load_pipeline", lambda *a, **k: pytest.fail("a model loaded"))
        for name, (_, problem) in files.items():
            with pytest.raises(UserError) as error:
                Addons.from_config(small_config(sdxl_dir, lora=(str(tmp_path / f"{name}.safetensors"),)))
            assert problem in one_line(error) and str(tmp_path / name) in str(error.value), (name, str(error.value))

    # A worker given a mismatched LoRA unchecked (the driver's check bypassed) still says it in one line: diffusers'
    # multi-line error log is not printed (its logger does not propagate to pytest's, so listen on it directly).
    diffusers_log, seen = logging.getLogger("diffusers"), Records()
    diffusers_log.addHandler(seen)
    try:
        with pytest.raises(UserError) as error:
            ModelWorker(sdxl_dir, "cpu", "float32", addons=Addons((Lora(str(tmp_path / "wide.safetensors"), 1.0),)))
    finally:
        diffusers_log.removeHandler(seen)
    assert "size mismatch" in one_line(error)
    assert not [r for r in seen.records if r.levelno >= logging.ERROR], [r.getMessage() for r in seen.records]
