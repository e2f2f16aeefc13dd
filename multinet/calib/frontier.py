"""Cached activations at a cut through a traced model, so each segment of the graph runs once.

A compression run used to re-run the whole compressed and the whole original model over the
calibration set for every group. The cached-input pipeline (the shape of llm-compressor's
sequential pipeline) keeps instead, per calibration batch, the values at the current *frontier*:
the nodes already run whose results later nodes still read. Moving the frontier forward runs only
the nodes between the old and the new cut. Values live in memory up to a byte limit and spill to
memory-mapped files beyond it; they can be stored in half precision to halve that memory.
"""
from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from ..errors import InputShapeError, MultinetError
from ..graph.in_place import writes_in_place
from .batches import as_args

Env = dict[str, Any]  # node name -> value
STORE_DTYPES = {"float32": None, "float16": torch.float16, "bfloat16": torch.bfloat16}


class MemoryBudget:
    """Bytes of activations that several stores (one shard's frontiers) may keep in memory together:
    values that arrive while it has room stay in memory, the others spill."""

    def __init__(self, limit: int | None):
        self.limit, self.used = limit, 0

    def take(self, size: int) -> bool:
        if self.limit is not None and self.used + size > self.limit:
            return False
        self.used += size
        return True

    def give(self, size: int) -> None:
        self.used -= size


AUTO_MEMORY_SHARE = 0.5  # of the memory available when a run starts: what "auto" lets its frontiers keep


def frontier_budget(memory: int | str | None, shards: int = 1) -> MemoryBudget:
    """The budget of one shard: ``memory`` bytes, no limit (None), or "auto": AUTO_MEMORY_SHARE of the
    memory this machine has available now, split between the ``shards`` that may share it."""
    if memory == "auto":
        from ..runtime.devices import available_memory

        free = available_memory()
        memory = None if free is None else int(AUTO_MEMORY_SHARE * free / max(shards, 1))
    return MemoryBudget(memory)


class ActivationStore:
    """Per-batch environments kept in memory up to ``limit_bytes`` (or within a MemoryBudget shared
    with other stores), then in memory-mapped files.

    ``dtype`` (float16/bfloat16) stores floating tensors in half precision; they are read back in
    the precision they had (a measured trade: half the memory, small input perturbations)."""

    def __init__(self, limit_bytes: int | MemoryBudget | None = None, dtype: torch.dtype | None = None,
                 directory: str | Path | None = None):
        self.budget = limit_bytes if isinstance(limit_bytes, MemoryBudget) else MemoryBudget(limit_bytes)
        self.dtype = dtype
        self.parent = Path(directory) if directory is not None else None
        self._memory: dict[int, tuple[Env, dict[str, torch.dtype]]] = {}
        self._files: dict[int, tuple[Path, dict[str, torch.dtype]]] = {}
        self._dir: Path | None = None
        self.bytes_in_memory = 0
        self.spilled = 0  # environments written to disk so far (for reports and tests)

    def put(self, index: int, env: Env) -> None:
        self.discard(index)
        stored, dtypes = self._encode(env)
        size = _nbytes(stored)
        if not self.budget.take(size):
            path = self._directory() / f"batch-{index}.pt"
            _save(stored, path, size)
            self._files[index] = (path, dtypes)
            self.spilled += 1
            return
        self._memory[index] = (stored, dtypes)
        self.bytes_in_memory += size

    def get(self, index: int) -> Env:
        if index in self._memory:
            stored, dtypes = self._memory[index]
        else:
            path, dtypes = self._files[index]
            stored = torch.load(path, mmap=True, weights_only=True)
        return {k: (v.to(dtypes[k]) if k in dtypes else v) for k, v in stored.items()}

    def discard(self, index: int) -> None:
        if index in self._memory:
            size = _nbytes(self._memory.pop(index)[0])
            self.bytes_in_memory -= size
            self.budget.give(size)
        if index in self._files:
            self._files.pop(index)[0].unlink(missing_ok=True)

    def close(self) -> None:
        self._memory.clear()
        self._files.clear()
        self.budget.give(self.bytes_in_memory)
        self.bytes_in_memory = 0
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def _encode(self, env: Env) -> tuple[Env, dict[str, torch.dtype]]:
        if self.dtype is None:
            return dict(env), {}
        stored, dtypes = {}, {}
        for k, v in env.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype != self.dtype:
                stored[k], dtypes[k] = v.to(self.dtype), v.dtype
            else:
                stored[k] = v
        return stored, dtypes

    def _directory(self) -> Path:
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="multinet-frontier-", dir=self.parent))
        return self._dir


class KeptValues:
    """Values kept per batch for later reads, each stored on its own (in memory or in its own file).

    The original model's frontier passes, in one run, values that many later groups read (a
    transformer's width group spans every block: ViT-B/16 keeps ~50 MB per image for the blocks'
    heads and MLP groups). Each group then drops only its own. Stored as one environment per batch,
    every drop rewrote the whole rest of it: ViT-B/16 at 1,024 images of 224² spilled ~39 GB and
    wrote them again for every one of its 24 later groups. One entry per value makes a drop a deletion."""

    def __init__(self, store: ActivationStore):
        self.store = store
        self._entries: dict[int, dict[str, int]] = {}  # batch -> key -> the store's entry
        self._next = 0

    @property
    def spilled(self) -> int:
        return self.store.spilled

    def keys(self, batch: int) -> set[str]:
        return set(self._entries.get(batch, ()))

    def get(self, batch: int, key: str) -> Any:
        entry = self._entries.get(batch, {}).get(key)
        return None if entry is None else self.store.get(entry)["value"]

    def add(self, batch: int, key: str, value: Any) -> None:
        self.drop(batch, [key])
        self._entries.setdefault(batch, {})[key] = self._next
        self.store.put(self._next, {"value": value})
        self._next += 1

    def drop(self, batch: int, keys: Iterable[str]) -> None:
        entries = self._entries.get(batch, {})
        for key in list(keys):
            if key in entries:
                self.store.discard(entries.pop(key))

    def close(self) -> None:
        self._entries.clear()
        self.store.close()


def _save(env: Env, path: Path, size: int) -> None:
    """torch.save, with a full disk reported as what it is: the frontier spilling past its memory."""
    try:
        torch.save(env, path)
    except (OSError, RuntimeError) as exc:
        path.unlink(missing_ok=True)
        used = sum(f.stat().st_size for f in path.parent.iterdir())
        raise MultinetError(
            f"could not spill {size / 2**20:.0f} MB of the pipeline's frontier to {path.parent} ({used / 2**30:.1f} GB "
            f"there so far): {str(exc).strip().splitlines()[0]}. Free disk space there (TMPDIR chooses the folder), "
            f"keep more in memory (frontier_memory), store it in half precision (frontier_dtype='bfloat16'), or "
            f"calibrate on fewer samples") from exc


def _nbytes(env: Env) -> int:
    return sum(t.numel() * t.element_size() for t in pytree.tree_leaves(env) if isinstance(t, torch.Tensor))


class _Stepper(fx.Interpreter):
    """Runs single nodes of a GraphModule against an environment the caller holds."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.mutating = {n.name for n in gm.graph.nodes if writes_in_place(gm, n)}

    def step(self, node: fx.Node, env: dict[fx.Node, Any]) -> Any:
        self.env = env
        args, kwargs = self.fetch_args_kwargs_from_env(node)
        return getattr(self, node.op)(node.target, args, kwargs)


class GraphRunner:
    """One model's nodes in execution order, run segment by segment over cached environments.

    ``run(env, start, stop)`` runs nodes ``start .. stop-1`` on a batch's environment and returns
    the environment at ``stop``: only values that nodes at ``stop`` or later still read are kept.
    ``watch`` hands the first input of chosen nodes to a callback as they are about to run."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.nodes = [n for n in gm.graph.nodes if n.op != "output"]
        self.position = {n.name: i for i, n in enumerate(self.nodes)}
        self.placeholders = [n for n in self.nodes if n.op == "placeholder"]
        last: dict[str, int] = {}
        for i, n in enumerate(gm.graph.nodes):
            for used in n.all_input_nodes:
                last[used.name] = i
        self.last_use = last
        self.stepper = _Stepper(gm)
        self.end = len(self.nodes)

    def start(self, batch) -> Env:
        """The environment before the first node: the batch bound to the inputs (a dict by name)."""
        inputs = as_args(batch, [p.name for p in self.placeholders])
        if len(inputs) != len(self.placeholders):
            raise InputShapeError(f"the model takes {len(self.placeholders)} inputs, the batch has {len(inputs)}")
        return {p.name: x for p, x in zip(self.placeholders, inputs)}

    def required(self, start: int, stop: int, watched: Iterable[str], tapped: Iterable[str] = ()) -> set[str]:
        """The nodes among ``start .. stop-1`` that the first inputs of ``watched`` nodes and the outputs
        of ``tapped`` nodes depend on: all a run whose environment is thrown away needs to run (the
        watched layers themselves need not run to hand over their inputs)."""
        nodes = {n.name: n for n in self.gm.graph.nodes}
        out: set[str] = set()

        def inside(node: fx.Node) -> bool:
            return start <= self.position.get(node.name, -1) < stop

        def add(stack: list[fx.Node]) -> None:
            while stack:
                node = stack.pop()
                if node.name not in out and inside(node) and node.op != "placeholder":
                    out.add(node.name)
                    stack.extend(node.all_input_nodes)

        add([nodes[n].all_input_nodes[0] for n in watched if nodes[n].all_input_nodes] + [nodes[n] for n in tapped])
        # an in-place op changes its argument under every later reader: it runs whenever that argument is
        # computed here or comes from the environment (to a fixed point: it may pull in more nodes)
        mutating = [n for n in self.nodes[start:stop] if n.name in self.stepper.mutating and n.args
                    and isinstance(n.args[0], fx.Node)]
        grew = True
        while grew:
            grew = False
            for node in mutating:
                if node.name not in out and (node.args[0].name in out or not inside(node.args[0])):
                    add([node])
                    grew = True
        return out

    def run(self, env: Env, start: int, stop: int,
            watch: dict[str, Callable[[torch.Tensor], None]] | None = None,
            taps: dict[str, Callable[[torch.Tensor], None]] | None = None, only: set[str] | None = None) -> Env:
        """``taps`` hears the *output* of chosen nodes: as they run, or at once for those already
        in ``env`` (computed in an earlier segment and still live). ``only``: run just these nodes
        (``required``), for a run that exists for its watches and taps."""
        nodes = {n.name: n for n in self.gm.graph.nodes}
        live = {nodes[k]: v for k, v in env.items()}
        cached = set(live)  # values the caller keeps: an in-place op gets its own copy (copy on write)
        watch = watch or {}
        taps = taps or {}
        for name, tap in taps.items():
            if name in env:
                tap(env[name])
        for i in range(start, stop):
            node = self.nodes[i]
            if node.op == "placeholder":
                continue
            if node.name in watch:
                first = node.all_input_nodes[0]
                watch[node.name](live[first])
            if only is not None and node.name not in only:
                continue
            if node.name in self.stepper.mutating and node.args and node.args[0] in cached:
                live[node.args[0]] = live[node.args[0]].clone()
                cached.discard(node.args[0])
            try:
                live[node] = self.stepper.step(node, live)
            except MultinetError:
                raise
            except Exception as exc:
                raise InputShapeError(f"calibration batch does not fit the model at `{node.name}`: "
                                      f"{str(exc).strip().splitlines()[0]}") from exc
            if node.name in taps:
                taps[node.name](live[node])
            for used in node.all_input_nodes:
                if self.last_use.get(used.name, -1) <= i and used in live:
                    del live[used]
        return {n.name: v for n, v in live.items() if self.last_use.get(n.name, -1) >= stop}


def model_outputs(runner: GraphRunner, env: Env):
    """What the model returns, from an environment at the end of its nodes (``run(..., stop=end)``)."""
    output = runner.gm.graph.output_node()
    return fx.node.map_arg(output.args[0], lambda n: env[n.name])


def call_positions(runner: GraphRunner, node_names: Iterable[str]) -> list[int]:
    return sorted(runner.position[n] for n in node_names)
