"""One actor-pool lifecycle for every pool: reserve a placement group, start one actor per bundle, wait until each
answers, kill them and free the group. The model-worker pool and the captioner pool differ only in their policy
(what a call is, what a death means), which stays in each pool."""

from __future__ import annotations

import logging

from .placement import reserve

log = logging.getLogger(__name__)


class NotReady(Exception):
    """Some actors were placed but did not answer within the wait (a slow or hung load)."""

    def __init__(self, ready: int, total: int):
        super().__init__(f"{ready} of {total} ready")
        self.ready, self.total = ready, total


class ActorGroup:
    """``count`` actors of ``actor_class``, one per bundle of (``num_cpus``, ``num_gpus``) in one placement group.

    ``what`` and ``hint`` word the one-line error when the bundles cannot be placed within ``placement_timeout_s``;
    ``actor_options`` go to ``.options()`` (restarts, runtime env). A replacement goes into its slot's bundle.
    """

    def __init__(self, actor_class, count: int, *, num_cpus: float, num_gpus: float, placement_timeout_s: float,
                 what: str, hint: str, **actor_options):
        import ray

        self.group = reserve(count, num_cpus, num_gpus, placement_timeout_s, what, hint)
        self.remote_cls = ray.remote(actor_class)
        self.options = dict(num_cpus=num_cpus, num_gpus=num_gpus, **actor_options)
        self.actors: list = [None] * count  # live handles, by slot

    def start(self, slot: int, *args):
        """Start (or restart) the actor of ``slot`` in its bundle; returns its handle."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        options = dict(self.options)
        if self.group is not None:
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(self.group,
                                                                              placement_group_bundle_index=slot)
        self.actors[slot] = self.remote_cls.options(**options).remote(*args)
        return self.actors[slot]

    def wait_ready(self, method: str, timeout_s: float) -> list:
        """Every actor's answer to ``method()`` once all are up. On a timeout (:class:`NotReady`) or an actor that
        failed to start (Ray's error), the group is released before the error goes up."""
        import ray

        answers = [getattr(actor, method).remote() for actor in self.actors]
        try:
            ready, pending = ray.wait(answers, num_returns=len(answers), timeout=timeout_s)
            if pending:
                raise NotReady(len(ready), len(answers))
            return ray.get(answers)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Kill every actor (its memory, GPU included, goes with its process) and free the placement group."""
        import ray
        from ray.util.placement_group import remove_placement_group

        for actor in self.actors:
            if actor is not None:
                ray.kill(actor, no_restart=True)
        self.actors = []
        if self.group is not None:
            remove_placement_group(self.group)
            self.group = None
