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
        """Free what map_with holds (its workers keep their CPUs/GPUs until then)."""
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
    """A Ray actor holding one shard: built once, then called method by method."""

    def __init__(self, factory, args):
        self.shard = factory(*[fetch(a) for a in args])

    def call(self, method, args):
        return getattr(self.shard, method)(*[fetch(a) for a in args])


class RayShards:
    """Shards as Ray actors; arguments are put in the object store once and shared by all of them."""

    def __init__(self, ray, actors):
        self._ray, self.actors = ray, actors

    def call(self, method: str, *args: Any) -> list[Any]:
        shared = [self._ray.put(a) for a in args]  # one copy in the object store, however many actors
        return self._ray.get([a.call.remote(method, shared) for a in self.actors])

    def close(self) -> None:
        for actor in self.actors:
            self._ray.kill(actor)
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

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        remote = self._ray.remote(fn).options(**self.options)
        return self._ray.get([remote.remote(item) for item in items])

    def put(self, obj: Any) -> Any:
        return self._ray.put(obj)

    def map_with(self, setup, args, fn, items):
        from ray.util import ActorPool

        if not hasattr(self, "_pools"):
            self._pools = {}
        key = (setup, tuple(id(a) for a in args))
        if key not in self._pools:  # long-lived actors: the state is built once per worker, reused per call
            actor = self._ray.remote(_Stateful).options(num_cpus=self.options["num_cpus"],
                                                        num_gpus=self.options["num_gpus"],
                                                        resources=self.options["resources"], max_restarts=1)
            shared = [self._ray.put(a) for a in args]
            self._pools = {key: ActorPool([actor.remote(setup, shared) for _ in range(self.workers)])}
        return list(self._pools[key].map(lambda a, item: a.call.remote(fn, item), list(items)))

    def shards(self, factory, per_worker):
        actor = self._ray.remote(_ShardActor).options(num_cpus=self.options["num_cpus"],
                                                      num_gpus=self.options["num_gpus"],
                                                      resources=self.options["resources"])
        return RayShards(self._ray, [actor.remote(factory, [self._ray.put(a) for a in args]) for args in per_worker])

    def release(self) -> None:
        """Kill the pool's actors: they hold their CPUs/GPUs, which tasks may need next."""
        for pool in getattr(self, "_pools", {}).values():
            while pool.has_free():
                self._ray.kill(pool.pop_idle())
        self._pools = {}


def resolve_executor(executor: Executor | str | None) -> Executor:
    """None or "local" -> in-process; "ray" or "ray:ADDRESS" -> a Ray executor; an executor as is."""
    if executor is None or executor == "local":
        return LocalExecutor()
    if isinstance(executor, str):
        if executor == "ray" or executor.startswith("ray:"):
            return RayExecutor(executor.partition(":")[2] or None)
        raise ExecutorError(f"unknown executor {executor!r}; use 'local', 'ray' or 'ray:host:port'")
    return executor
