"""TileDenoiser: a thin Ray actor around :func:`cupscale_dist.step.predict_views` (no algorithm here).

It loads the UNet once; receives the stage context by object reference (wrapped in a list, so Ray does not
re-send it with every call: the actor fetches it once per stage, and again after a restart); per call it takes
a batch of view windows and returns their CFG noise predictions as float32 numpy.
"""

from __future__ import annotations

import os

import numpy as np
import ray
import torch


class TileDenoiser:
    def __init__(self, model: str, device: str, dtype: str, torch_threads: int | None, index: int):
        from cupscale_dist.models import load_unet

        if torch_threads:  # same thread count as the reference => same CPU bits (architecture.md)
            torch.set_num_threads(torch_threads)
        self.index = index
        self.unet = load_unet(model, device, dtype)
        self.context_ref = None  # which stage context is loaded
        self.context = None

    def __repr__(self) -> str:
        return f"TileDenoiser(index={self.index}, pid={os.getpid()})"

    def where(self) -> dict:
        """Placement, for the driver's log."""
        context = ray.get_runtime_context()
        return {"index": self.index, "pid": os.getpid(), "node": context.get_node_id()[:12],
                "gpus": [str(g) for g in ray.get_gpu_ids()], "device": str(self.unet.device)}

    def predict(self, context_ref: list, windows: np.ndarray, timestep: float, input_scale: float,
                view_ids: np.ndarray, rects: np.ndarray) -> np.ndarray:
        from cupscale_dist.step import predict_views

        if self.context_ref != context_ref[0]:
            context = ray.get(context_ref[0])  # once per stage (and again after a restart)
            self.context, self.context_ref = context.to(self.unet.device, self.unet.dtype), context_ref[0]
        # Ray hands numpy arguments over read-only (zero copy); predict_views only reads them.
        eps = predict_views(self.unet, torch.from_numpy(np.array(windows)), timestep, input_scale, self.context,
                            view_ids, rects)
        return eps.numpy()
