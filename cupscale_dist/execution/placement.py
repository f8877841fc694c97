"""Where the actor pools go: GPU shares that fit together on one GPU, and reservations that fail fast.

Two pools can want a GPU in one run: the model workers (UNet, VAE, text encoders, probe) and the captioner (a
VLM, only while a stage's regional prompts are written). On a machine with one GPU both must fit on it, so when a
captioner is on and nobody chose shares, the captioner takes ``CAPTIONER_GPU_SHARE`` of each GPU it lands on and
the workers the rest; each actor caps its memory to its share (torch's per-process fraction for the workers,
vLLM's ``gpu_memory_utilization`` for the captioner). Reservations are Ray placement groups: whether a pool *can*
be placed is known within ``--start-timeout``, apart from how long its models take to load.
"""

from __future__ import annotations

import math

from ..errors import UserError

# The captioner's part of a GPU it shares with a model worker when none is chosen: a 7B VLM in bf16 (~15 GB)
# plus its KV cache fits in 0.4 of an 80 GB card, and SDXL's worker (~7 GB of weights plus 4 tiles' activations)
# in the other 0.6. Smaller cards need smaller shares or a smaller VLM (`captioner_gpus`, `--gpus-per-actor`).
CAPTIONER_GPU_SHARE = 0.4


def captioner_share(cluster_gpus: float, chosen: float | None, beside_workers: bool) -> float:
    """GPU share per captioner actor: the chosen one, else none without GPUs, else a part beside the workers or a
    whole GPU when nothing else runs (``cupscale caption``)."""
    if chosen is not None:
        return chosen
    if not cluster_gpus:
        return 0.0
    return CAPTIONER_GPU_SHARE if beside_workers else 1.0


def worker_share(cluster_gpus: float, chosen: float | None, captioners: int, captioner_gpus: float) -> float:
    """GPU share per model worker: the chosen one, else none without GPUs, else what the captioners leave of a GPU
    (1 without a captioner). The captioners spread over the GPUs, so a GPU holds ceil(captioners / GPUs) of them."""
    if chosen is not None:
        return chosen
    if not cluster_gpus:
        return 0.0
    per_gpu = math.ceil(captioners / cluster_gpus) if captioners else 0
    left = 1.0 - per_gpu * captioner_gpus
    if left <= 0:
        raise UserError(f"{captioners} captioner actors with {captioner_gpus:g} GPU each leave no GPU for the model "
                        f"workers on {cluster_gpus:g} GPUs; lower captioner_actors or captioner_gpus")
    return round(left, 6)


def uses_captioner(config) -> bool:
    """A VLM captioner pool runs beside the workers (a prompts file takes precedence over the captioner)."""
    return config.captioner != "none" and not config.regional_prompts


def model_worker_share(config, chosen: float | None, cluster_gpus: float, spread_over: float) -> float:
    """A model worker's GPU share when ``config``'s captioner pool (if any) shares its GPUs: the captioner actors
    spread over ``spread_over`` GPUs (the cluster's for `upscale`'s one pool; 1 for a batch image worker, whose
    upscale starts its own captioner pool)."""
    captioners = config.captioner_actors if uses_captioner(config) else 0
    shared = captioner_share(cluster_gpus, config.captioner_gpus, beside_workers=True) if captioners else 0.0
    return worker_share(spread_over, chosen, captioners, shared)


def worker_count(cluster_gpus: float, share: float, chosen: int | None) -> int:
    """How many workers: the chosen count, else as many as the GPUs hold at ``share`` each (fractions do not
    span GPUs), else one CPU worker."""
    if chosen:
        return chosen
    if not share or not cluster_gpus:
        return 1
    per_gpu = int(1 / share + 1e-9) if share <= 1 else 0
    return max(1, int(cluster_gpus) * per_gpu if per_gpu else int(cluster_gpus // share))


def memory_fraction(share: float) -> float | None:
    """The GPU memory a worker with ``share`` of a GPU may take (None: a whole GPU, no cap)."""
    return share if 0 < share < 1 else None


def reserve(count: int, cpus: float, gpus: float, timeout_s: float, what: str, hint: str, memory_bytes: int = 0):
    """A placement group of ``count`` bundles of (``cpus``, ``gpus``, ``memory_bytes`` of a node's memory), or a
    one-line UserError naming what was asked and what is free after ``timeout_s``. None when the bundles ask for
    nothing (always placeable)."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    bundle = {k: v for k, v in (("CPU", cpus), ("GPU", gpus), ("memory", memory_bytes)) if v}
    if not bundle:
        return None
    group = placement_group([dict(bundle)] * count, strategy="PACK")
    if group.wait(timeout_seconds=timeout_s):
        return group
    remove_placement_group(group)
    free, total = ray.available_resources(), ray.cluster_resources()
    free, total = ({k: round(r.get(k, 0.0) / (1e9 if k == "memory" else 1), 3) for k in ("CPU", "GPU", "memory")}
                   for r in (free, total))  # memory in GB
    asked = ", ".join(f"{round(v / 1e9, 2):g} GB memory" if k == "memory" else f"{v:g} {k}" for k, v in bundle.items())
    raise UserError(f"{what}: {count} x ({asked}) could not be placed within {timeout_s:g} s; the cluster has "
                    f"{free} free of {total} (a fractional GPU must fit on one GPU); {hint}")
