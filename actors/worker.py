"""PipelineWorker: a thin Ray actor around :class:`cupscale_dist.execution.worker.ModelWorker` (no algorithm here).

It loads the whole pipeline once (UNet, VAE, text encoders) on its GPU share and answers ``call(method, args)``
with ``ModelWorker.method(*args)``: view predictions, VAE tiles, prompt chunks, the attention probe. A per-stage
value arrives wrapped in :class:`cupscale_dist.execution.contract.Shared` (an object reference Ray does not resolve on
every call) and is fetched once per stage, and again after a restart.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import ray
import torch


class PipelineWorker:
    def __init__(self, load, index: int):
        """``load``: the driver's :class:`~cupscale_dist.execution.contract.WorkerLoad`; ``index``: this worker's
        slot in the pool."""
        from cupscale_dist.execution.worker import ModelWorker
        from cupscale_dist.models.hub import resolve_model

        if load.torch_threads:  # same thread count as the reference => same CPU bits (architecture.md)
            torch.set_num_threads(load.torch_threads)
        if load.memory_fraction and load.device == "cuda":  # a GPU shared with a captioner: stay inside the share
            from cupscale_dist.models.weights import check_fits_share

            check_fits_share(load.device_gb, load.memory_fraction, torch.cuda.get_device_properties(0).total_memory,
                             load.weights)
            torch.cuda.set_per_process_memory_fraction(load.memory_fraction)
        self.index = index
        # The driver resolved the model once; on a node that does not share its path, resolve (fetch) it here.
        here = Path(load.model_dir).is_file() or Path(load.model_dir, "model_index.json").is_file()
        path = load.model_dir if here else resolve_model(load.model, load.variant)
        self.worker = ModelWorker(path, load.device, load.dtype, load.variant, addons=load.addons,
                                  model_config=load.model_config, weights=load.weights, compile=load.compile)
        self.shared: tuple[object, object] = (None, None)  # (object ref, the value) of the current stage
        self.owner = None  # the PartOwner of this worker's bands of the stage latent (step_design='actors')

    def __repr__(self) -> str:
        return f"PipelineWorker(index={self.index}, pid={os.getpid()})"

    def where(self) -> dict:
        """Placement, for the driver's log."""
        context = ray.get_runtime_context()
        return {"index": self.index, "pid": os.getpid(), "node": context.get_node_id()[:12],
                "gpus": [str(g) for g in ray.get_gpu_ids()], "device": str(self.worker.device)}

    def call(self, method: str, args: tuple):
        from cupscale_dist.execution.contract import Shared

        args = [self._fetch(a.ref) if isinstance(a, Shared) else a for a in args]
        return getattr(self.worker, method)(*args)

    def own(self, method: str, *args):
        """A :class:`~cupscale_dist.execution.partowner.PartOwner` call; references among ``args`` (halos, other
        workers' predictions) are resolved by Ray before the call, from wherever they were made. Returns Ray's
        ``num_returns`` objects: the messages for other workers, then a status."""
        import dataclasses

        from cupscale_dist.execution.contract import Shared
        from cupscale_dist.execution.partowner import PartOwner

        if getattr(self, "owner", None) is None:  # (bench stand-ins skip __init__)
            self.owner = PartOwner(self.worker.predict, self.index, getattr(self.worker, "decode_tile", None),
                                   getattr(self.worker, "encode_tile", None))
        if method == "load" and isinstance(args[1].context, Shared):  # the stage context, fetched once per stage
            args = (args[0], dataclasses.replace(args[1], context=self._fetch(args[1].context.ref)), *args[2:])
        out = getattr(self.owner, method)(*args)
        return out[0] if len(out) == 1 else tuple(out)

    def _fetch(self, ref):
        if self.shared[0] != ref:
            self.shared = (ref, ray.get(ref))
        return self.shared[1]

    def usage(self) -> dict:
        """CPU seconds of this process and (on a GPU) its peak GPU memory, for the benches."""
        gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
        return {"index": self.index, "pid": os.getpid(), "cpu_s": time.process_time(), "gpu_peak_bytes": gpu}
