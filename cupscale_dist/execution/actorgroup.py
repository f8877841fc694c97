"""One actor-pool lifecycle for every pool: reserve a placement group, start one actor per bundle, wait until each
answers, know which node each one lives on, kill them and free the group. The model-worker pool and the captioner
pool differ only in their policy (what a call is, what a death means), which stays in each pool.

Why the group tracks nodes: when a whole machine is lost, Ray declares its node dead after its health checks
fail, but an actor with restarts left stays "restarting" until a bundle for it is placed again, and its calls wait
with it - forever when the nodes left have no room. A pool that waits on a call asks :meth:`ActorGroup.lost_node`
instead, and moves on (docs/distributed.md, "Several machines").
"""

from __future__ import annotations

import contextlib
import logging
import time

from .placement import reserve

log = logging.getLogger(__name__)

# A wait on a call checks its actor's node this often; one read of the GCS's node table, nothing beside a step.
HEALTH_POLL_S = 1.0


class NotReady(Exception):
    """Some actors were placed but did not answer within the wait (a slow or hung load)."""

    def __init__(self, ready: int, total: int):
        super().__init__(f"{ready} of {total} ready")
        self.ready, self.total = ready, total


def _node_id(actor) -> str:
    """Runs inside an actor (``__ray_call__``): the id of the node it lives on."""
    import ray

    return ray.get_runtime_context().get_node_id()


class NotPlaced(Exception):
    """A node holding some bundles was lost while the actors started, and the nodes left had no room for them."""

    def __init__(self, lost: list[str]):
        self.lost = list(dict.fromkeys(lost))
        super().__init__(", ".join(self.lost))


class ActorGroup:
    """``count`` actors of ``actor_class``, one per bundle of (``num_cpus``, ``num_gpus``, ``memory_bytes``) in one
    placement group.

    ``what`` and ``hint`` word the one-line error when the bundles cannot be placed within ``placement_timeout_s``;
    ``actor_options`` go to ``.options()`` (restarts, runtime env). A replacement goes into its slot's bundle.
    """

    def __init__(self, actor_class, count: int, *, num_cpus: float, num_gpus: float, placement_timeout_s: float,
                 what: str, hint: str, memory_bytes: int = 0, **actor_options):
        import ray

        self.group = reserve(count, num_cpus, num_gpus, placement_timeout_s, what, hint, memory_bytes)
        self.remote_cls = ray.remote(actor_class)
        self.options = dict(num_cpus=num_cpus, num_gpus=num_gpus, **actor_options)
        if memory_bytes:
            self.options["memory"] = memory_bytes
        self.actors: list = [None] * count  # live handles, by slot
        self.located: list = [None] * count  # per slot: a ref to its actor's node id, answered once the actor is up
        self.nodes: list[str | None] = [None] * count  # per slot: the node its actor lives on, once known
        self._table: dict[str, dict] = {}  # the GCS's node table, read at most once per HEALTH_POLL_S
        self.bundle_nodes: dict[int, str] = {}  # per slot: the live node its bundle was last seen on (names a loss)
        self._table_at = float("-inf")

    def start(self, slot: int, *args):
        """Start (or restart) the actor of ``slot`` in its bundle; returns its handle."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        options = dict(self.options)
        if self.group is not None:
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(self.group,
                                                                              placement_group_bundle_index=slot)
        actor = self.actors[slot] = self.remote_cls.options(**options).remote(*args)
        self.nodes[slot] = None
        self.located[slot] = actor.__ray_call__.remote(_node_id)  # queued behind __init__: answers once it is up
        return actor

    def wait_ready(self, method: str, timeout_s: float, placement_timeout_s: float | None = None) -> list:
        """Every actor's answer to ``method()`` once all are up. On a timeout (:class:`NotReady`), a bundle whose node
        was lost and that is not placed again on a live node within ``placement_timeout_s`` (:class:`NotPlaced`), or
        an actor that failed to start (Ray's error), the group is released before the error goes up.

        Why the bundles are watched: an actor whose node is lost while it loads is restarted by Ray only once its
        bundle is placed again, which never happens when the nodes left have no room; the wait would last the whole
        model-load limit (15 minutes) with nothing to show."""
        import ray

        answers = [getattr(actor, method).remote() for actor in self.actors]
        deadline = time.monotonic() + timeout_s
        unplaced_since: float | None = None
        try:
            if placement_timeout_s is not None:
                self.unplaced_bundles()  # where each bundle is now: names the node if one is lost later
            pending = answers + self.located
            while pending:
                _ready, pending = ray.wait(pending, num_returns=len(pending), timeout=HEALTH_POLL_S)
                if not pending:
                    break
                if time.monotonic() > deadline:
                    raise NotReady(len([ref for ref in answers if ref not in pending]), len(answers))
                lost = self.unplaced_bundles() if placement_timeout_s is not None else []
                if not lost:
                    unplaced_since = None
                    continue
                unplaced_since = unplaced_since or time.monotonic()
                if time.monotonic() - unplaced_since > placement_timeout_s:
                    raise NotPlaced(lost)
            self.nodes = ray.get(self.located)
            return ray.get(answers)
        except BaseException:
            self.release()
            raise

    def unplaced_bundles(self) -> list[str]:
        """The bundles that are not on a live node now (``"node IP (id)"`` of the node each was on when first seen
        placed): their actors wait for Ray to place them again. Every bundle was placed when ``reserve`` returned."""
        from ray.util import placement_group_table

        if self.group is None:
            return []
        where = placement_group_table(self.group).get("bundles_to_node_id", {})
        nodes = self._node_table(fresh=True)
        lost = []
        for slot in range(len(self.actors)):
            node = where.get(slot)
            if nodes.get(node, {}).get("Alive"):
                self.bundle_nodes[slot] = node
                continue
            was = self.bundle_nodes.get(slot) or node or "?"
            entry = nodes.get(was, {})
            lost.append(f"node {entry.get('NodeManagerAddress', '?')} ({str(was)[:12]})")
        return lost

    def up(self, slot: int, timeout_s: float = 0) -> bool:
        """Whether the actor of ``slot`` has started (its node is known), waiting up to ``timeout_s``; Ray's error
        if it failed to start."""
        import ray

        if self.nodes[slot] is None:
            if not ray.wait([self.located[slot]], timeout=timeout_s)[0]:
                return False
            self.nodes[slot] = ray.get(self.located[slot])
        return True

    def lost_node(self, slot: int) -> str | None:
        """``"node IP (id)"`` when Ray has declared the node of ``slot``'s actor dead, else None (alive, or not
        started yet)."""
        node = self.nodes[slot]
        if node is None:
            return None
        entry = self._node_table().get(node)
        if entry is not None and entry.get("Alive"):
            return None
        return f"node {entry.get('NodeManagerAddress', '?') if entry else '?'} ({node[:12]})"

    def _node_table(self, fresh: bool = False) -> dict[str, dict]:
        import ray

        if fresh or time.monotonic() - self._table_at > HEALTH_POLL_S:
            self._table = {entry["NodeID"]: entry for entry in ray.nodes()}
            self._table_at = time.monotonic()
        return self._table

    def kill(self, slot: int) -> None:
        """End the actor of ``slot`` for good: no restart by Ray (its calls fail at once instead of waiting)."""
        import ray

        with contextlib.suppress(Exception):  # already gone with its node
            ray.kill(self.actors[slot], no_restart=True)

    def placed(self, slots: list[int], timeout_s: float) -> bool:
        """Whether the bundle of one of ``slots`` is on a live node, waiting up to ``timeout_s``: after a node is
        lost, Ray places the bundles it held again on the nodes left, if they have room."""
        from ray.util import placement_group_table

        deadline = time.monotonic() + timeout_s
        while self.group is not None:
            where, nodes = placement_group_table(self.group).get("bundles_to_node_id", {}), self._node_table(True)
            if any(nodes.get(where.get(slot), {}).get("Alive") for slot in slots):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(HEALTH_POLL_S)
        return True

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
