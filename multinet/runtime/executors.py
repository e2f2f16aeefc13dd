"""Where independent jobs run: in this process (the default; no Ray needed at run time) or on a
Ray cluster. Both have the same contract — ``map(fn, items)`` returns results in order, ``put``
shares a large object once — so callers do not care which one they hold. Jobs receive tensors and
plain specs (models travel as multinet model bytes: tensors and JSON), never nn.Module objects.
"""
from __future__ import annotations

import socket
from collections.abc import Callable, Iterable
from typing import Any, Protocol, TypeVar

from ..errors import MultinetError

T = TypeVar("T")
R = TypeVar("R")


class ExecutorError(MultinetError):
    """A cluster that cannot be reached or cannot run what was asked."""


class Executor(Protocol):
    name: str
    workers: int

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """Results of ``fn`` on every item, in order."""
        ...

    def put(self, obj: Any) -> Any:
        """A handle to share ``obj`` with every job (the object itself when local)."""
        ...

    def map_with(self, setup: Callable[..., Any], args: tuple, fn: Callable[[Any, T], R], items: Iterable[T]) -> list[R]:
        """``fn(state, item)`` for every item, where each worker builds ``state = setup(*args)`` once
        (a pool of long-lived workers for many small jobs on one big object)."""
        ...

    def release(self) -> None:
        """Free what map_with and the shard actors kept for the next run hold (their CPUs/GPUs)."""
        ...

    def shards(self, factory: Callable[..., Any], per_worker: list[tuple]) -> "Shards":
        """One long-lived object per entry of ``per_worker``, built by ``factory(*args)`` where it
        lives (a Ray actor, or this process); ``Shards.call`` runs a method on all of them."""
        ...


class Shards(Protocol):
    def call(self, method: str, *args: Any) -> list[Any]:
        """``getattr(shard, method)(*args)`` on every shard at once; results in shard order."""
        ...

    def close(self) -> None:
        ...


class LocalShards:
    """Shards in this process: plain objects, called one after another."""

    def __init__(self, objects: list[Any]):
        self.objects = objects

    def call(self, method: str, *args: Any) -> list[Any]:
        return [getattr(o, method)(*args) for o in self.objects]

    def close(self) -> None:
        self.objects = []


class LocalExecutor:
    """Runs jobs here, one after another: deterministic, and no process start-up to pay."""

    name = "local"
    workers = 1

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        return [fn(item) for item in items]

    def put(self, obj: Any) -> Any:
        return obj

    def map_with(self, setup, args, fn, items):
        state = setup(*args)
        return [fn(state, item) for item in items]

    def release(self) -> None:
        pass

    def shards(self, factory, per_worker):
        return LocalShards([factory(*args) for args in per_worker])


def fetch(obj: Any) -> Any:
    """The object behind a handle from ``put`` (a Ray object reference, or the object itself)."""
    try:
        import ray
    except ImportError:
        return obj
    return ray.get(obj) if isinstance(obj, ray.ObjectRef) else obj


class _ShardActor:
    """A Ray actor holding one shard: built once, then called method by method. A finished run's
    actor may be given the next run's shard (``reset``): its process, imports and CUDA context stay."""

    def __init__(self, factory, args):
        self.shard = factory(*[fetch(a) for a in args])

    def reset(self, factory, args) -> None:
        self.shard, self.error = None, None  # the old shard's memory goes before the new one is built
        try:
            self.shard = factory(*[fetch(a) for a in args])
        except Exception as exc:  # nobody waits on a reset: the next call reports it
            self.error = exc

    def drop(self) -> None:
        self.shard = None

    def call(self, method, args):
        if getattr(self, "error", None) is not None:
            raise self.error
        return getattr(self.shard, method)(*[fetch(a) for a in args])


# Shard actors of finished runs, kept for their executor's next run: (owner token, actor). They hold
# their CPUs/GPUs, so any executor of this process that needs resources kills the others' first.
_IDLE_SHARDS: list[tuple[object, Any]] = []


def _take_idle(owner: object) -> list[Any]:
    mine = [a for o, a in _IDLE_SHARDS if o is owner]
    _IDLE_SHARDS[:] = [(o, a) for o, a in _IDLE_SHARDS if o is not owner]
    return mine


def _kill_idle(ray, keep: object | None = None) -> None:
    """Kill every kept shard actor except those of ``keep`` (an executor's token)."""
    for owner, actor in [(o, a) for o, a in _IDLE_SHARDS if o is not keep]:
        ray.kill(actor)
    _IDLE_SHARDS[:] = [(o, a) for o, a in _IDLE_SHARDS if o is keep]


class RayShards:
    """Shards as Ray actors; arguments are put in the object store once and shared by all of them.
    ``close`` keeps the actors (their shards dropped) for the next ``shards`` call of the executor
    ``owner`` names, or kills them when there is none."""

    def __init__(self, ray, actors, owner: object | None = None):
        self._ray, self.actors, self._owner = ray, actors, owner

    def call(self, method: str, *args: Any) -> list[Any]:
        shared = [self._ray.put(a) for a in args]  # one copy in the object store, however many actors
        return self._ray.get([a.call.remote(method, shared) for a in self.actors])

    def close(self) -> None:
        if self._owner is None:
            for actor in self.actors:
                self._ray.kill(actor)
        else:
            self._ray.get([a.drop.remote() for a in self.actors])
            _IDLE_SHARDS.extend((self._owner, a) for a in self.actors)
        self.actors = []


class _Stateful:
    """A Ray actor holding one worker's state for map_with."""

    def __init__(self, setup, args):
        self.state = setup(*[fetch(a) for a in args])

    def call(self, fn, item):
        return fn(self.state, item)


def _reachable(address: str, timeout: float) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ExecutorError(f"Ray address {address!r} must be 'auto', 'local' or host:port")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ExecutorError(f"cannot reach a Ray cluster at {address} within {timeout:.0f} s: {exc.strerror or exc}") \
            from None


class RayExecutor:
    """Jobs as Ray tasks (retried when a worker dies; idempotent by construction)."""

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: float = 1, num_gpus: float | str = "auto",
                 max_retries: int = 3, connect_timeout: float = 10.0, resources: dict[str, float] | None = None):
        try:
            import ray
        except ImportError:
            raise ExecutorError("the Ray executor needs ray: pip install 'multinet[ray]'") from None
        self._ray = ray
        if not ray.is_initialized():
            target = address or "local"
            if target not in ("auto", "local"):
                _reachable(target.removeprefix("ray://"), connect_timeout)
            try:
                ray.init(address=target, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise ExecutorError(f"cannot connect to Ray at {target}: {str(exc).strip().splitlines()[0]}") from None
        available = ray.cluster_resources()
        if num_gpus == "auto":  # GPU jobs when the cluster has GPUs, CPU jobs otherwise
            num_gpus = 1 if available.get("GPU", 0) >= 1 else 0
        wanted = {"CPU": num_cpus, "GPU": num_gpus, **(resources or {})}
        missing = {k: v for k, v in wanted.items() if v and available.get(k, 0) < v}
        if missing:  # a task asking for what no node has would wait forever
            have = {k: available.get(k, 0) for k in missing}
            raise ExecutorError(f"the Ray cluster cannot run these jobs: each asks for {missing}, the cluster has {have}")
        self.options = {"num_cpus": num_cpus, "num_gpus": num_gpus, "max_retries": max_retries,
                        "resources": resources or {}}
        self.workers = max(1, int(available.get("CPU", 1) // max(num_cpus, 1e-9)))
        if num_gpus:
            self.workers = max(1, min(self.workers, int(available.get("GPU", 0) // num_gpus)))
        self.gpu = bool(num_gpus)
        self._token = object()  # names this executor's kept shard actors

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        _kill_idle(self._ray)  # kept shard actors hold CPUs/GPUs the tasks may need
        remote = self._ray.remote(fn).options(**self.options)
        return self._ray.get([remote.remote(item) for item in items])

    def put(self, obj: Any) -> Any:
        return self._ray.put(obj)

    def map_with(self, setup, args, fn, items):
        from ray.util import ActorPool

        if not hasattr(self, "_pools"):
            self._pools = {}
        _kill_idle(self._ray)
        key = (setup, tuple(id(a) for a in args))
        if key not in self._pools:  # long-lived actors: the state is built once per worker, reused per call
            actor = self._ray.remote(_Stateful).options(num_cpus=self.options["num_cpus"],
                                                        num_gpus=self.options["num_gpus"],
                                                        resources=self.options["resources"], max_restarts=1)
            shared = [self._ray.put(a) for a in args]
            self._pools = {key: ActorPool([actor.remote(setup, shared) for _ in range(self.workers)])}
        return list(self._pools[key].map(lambda a, item: a.call.remote(fn, item), list(items)))

    def shards(self, factory, per_worker):
        """Actors of this executor's finished run are reused (``_ShardActor.reset``) before new ones
        are started: a new actor costs a process start and the torch import (1.5-2 s on the zoo ResNet's
        whole run of 3-4 s), paid once per executor instead of once per run (``unify`` runs a dozen
        compressions). Other executors' kept actors are killed first: they hold the CPUs/GPUs."""
        _kill_idle(self._ray, keep=self._token)
        idle = self._alive(_take_idle(self._token))
        actor = self._ray.remote(_ShardActor).options(num_cpus=self.options["num_cpus"],
                                                      num_gpus=self.options["num_gpus"],
                                                      resources=self.options["resources"])
        actors = []
        for args in per_worker:
            shared = [self._ray.put(a) for a in args]
            if idle:
                actors.append(idle.pop(0))
                actors[-1].reset.remote(factory, shared)  # runs before any call: an actor's methods run in order
            else:
                actors.append(actor.remote(factory, shared))
        for extra in idle:  # more than this run needs
            self._ray.kill(extra)
        return RayShards(self._ray, actors, self._token)

    def _alive(self, actors: list, timeout: float = 30.0) -> list:
        """The kept actors, if all of them still answer (a node may have gone since the last run);
        otherwise none: they are killed and the run starts its own."""
        if not actors:
            return []
        try:
            self._ray.get([a.drop.remote() for a in actors], timeout=timeout)
            return actors
        except Exception:  # a dead actor (RayActorError) or no answer in time
            for actor in actors:
                self._ray.kill(actor)
            return []

    def release(self) -> None:
        """Kill the pool's actors and the shard actors kept for the next run: they hold their CPUs/GPUs,
        which tasks may need next (this process's other executors free them themselves)."""
        for pool in getattr(self, "_pools", {}).values():
            while pool.has_free():
                self._ray.kill(pool.pop_idle())
        self._pools = {}
        _kill_idle(self._ray)

    def __del__(self):
        """A dropped executor's kept shard actors go with it."""
        try:
            for actor in _take_idle(self._token):
                self._ray.kill(actor)
        except Exception:  # interpreter or Ray shutting down: the actors go with the cluster
            pass


def resolve_executor(executor: Executor | str | None) -> Executor:
    """None or "local" -> in-process; "ray" or "ray:ADDRESS" -> a Ray executor; an executor as is."""
    if executor is None or executor == "local":
        return LocalExecutor()
    if isinstance(executor, str):
        if executor == "ray" or executor.startswith("ray:"):
            return RayExecutor(executor.partition(":")[2] or None)
        raise ExecutorError(f"unknown executor {executor!r}; use 'local', 'ray' or 'ray:host:port'")
    return executor
