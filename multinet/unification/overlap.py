"""Overlapped members: the parts of a MultiNet that different members compute alone run at the same time.

Fusion (fusion.py, batching.py) turns structurally parallel layers into one op; what it cannot merge
(different architectures, layers of different shapes) still runs one layer after another. Yet once
the graph is cut by *which members' outputs a node's value reaches*, the pieces form a small DAG:
a node's inputs reach every member it reaches (and maybe more), so a piece only reads pieces whose
member set contains its own. A trunk two members share comes before each member's own branch, and
the branches of different members never read each other: they can run at the same time.

- On a GPU each piece runs on its own CUDA stream, ordered by events where one reads another, so the
  small kernels of several members fill the device together (the members' work is queued from one
  thread; nothing waits for the host).
- On a CPU each piece runs on a worker thread (torch releases the GIL inside its kernels): members'
  small layers, which do not keep every core busy on their own, share the cores. The caller's grad
  mode, inference mode and CPU autocast are carried to the workers (torch keeps them per thread).

Outputs equal the graph run in one thread, bit for bit: every piece runs the same ops in the same order.
Whether overlap pays depends on the device and the members' sizes (two tiny MLPs lose to the thread
hand-off), so ``multinet.infer`` times it (``overlap="auto"``).

Each piece is the original graph's nodes copied into a graph of its own and compiled into code that
reaches the layers through the MultiNet's module dicts at every call (direct_call.py), so a layer
replaced after the pieces were cut is the one that runs.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from ..errors import MultinetError
from ..graph.counting import count
from ..graph.in_place import writes_in_place
from .direct_call import direct_forward


def members_reached(gm: fx.GraphModule) -> dict[fx.Node, frozenset[str]]:
    """Per node, the members whose outputs its value reaches (empty for dead nodes)."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    if not isinstance(output.args[0], dict):
        raise MultinetError("overlap needs a MultiNet's graph: one that returns {member: output}")
    reached: dict[fx.Node, set[str]] = {n: set() for n in gm.graph.nodes}
    for member, value in output.args[0].items():
        stack = list(_nodes_in(value))
        while stack:
            node = stack.pop()
            if member not in reached[node]:
                reached[node].add(member)
                stack.extend(node.all_input_nodes)
    return {n: frozenset(m) for n, m in reached.items()}


def _nodes_in(value) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(value, lambda n: found.append(n) or n)
    return found


# where a piece's argument comes from: ("input", placeholder index) or ("piece", piece index, output index)
Source = tuple


@dataclass
class Piece:
    """The nodes whose values reach exactly ``members``, as one compiled function of (gm, *args)."""

    members: frozenset[str]
    forward: Callable
    sources: list[Source]   # one per argument
    needs: list[int]        # the pieces it reads (earlier in the list)


class OverlapPlan:
    """A MultiNet graph cut into pieces by the members they reach, in an order that respects reads."""

    def __init__(self, gm: fx.GraphModule):
        reached = members_reached(gm)
        nodes = list(gm.graph.nodes)
        self.placeholders = [n for n in nodes if n.op == "placeholder"]
        output = nodes[-1]
        keys: list[frozenset[str]] = []
        for node in nodes:
            if node.op not in ("placeholder", "output") and reached[node] and reached[node] not in keys:
                keys.append(reached[node])
        members = {k: [n for n in nodes if n.op not in ("placeholder", "output") and reached[n] == k] for k in keys}
        keys.sort(key=len, reverse=True)  # a piece reads only pieces whose member sets strictly contain its own
        where: dict[fx.Node, Source] = {p: ("input", i) for i, p in enumerate(self.placeholders)}
        exported = {k: _exported(members[k], reached, output) for k in keys}
        for i, k in enumerate(keys):
            where.update({n: ("piece", i, j) for j, n in enumerate(exported[k])})
        self.pieces = [self._piece(gm, k, members[k], exported[k], where) for k in keys]
        flops = {layer.name: layer.flops for layer in count(gm).layers}  # from the shapes recorded in the graph
        self.work = [_work(gm, members[k], flops) for k in keys]
        if not all(self.work):  # a graph without recorded shapes (rebuilt from code): parameters instead
            self.work = [_work(gm, members[k], None) for k in keys]
        self.output = output.args[0]
        self.where = where
        # a node that writes into a tensor (x.relu_(), masked_fill_, +=) needs graph order: unused, it is
        # in no piece; used, a piece running beside it may read the tensor before or after the write
        self.in_place = [n.format_node() for n in nodes if writes_in_place(gm, n)]

    @staticmethod
    def _piece(gm: fx.GraphModule, key: frozenset[str], nodes: list[fx.Node], exported: list[fx.Node],
               where: dict[fx.Node, Source]) -> Piece:
        inside = set(nodes)
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        sources: list[Source] = []
        for node in nodes:
            for used in node.all_input_nodes:
                if used not in inside and used not in env:
                    env[used] = graph.placeholder(used.name)
                    sources.append(where[used])
            env[node] = graph.node_copy(node, lambda n: env[n])
        graph.output(tuple(env[n] for n in exported))
        code = fx.GraphModule(gm, graph, "MultiNetPiece")
        forward = direct_forward(code)
        if forward is None:  # fx's own code generator always gives one; never run the copy's stale attributes
            raise MultinetError("could not compile a piece of the MultiNet's graph for overlapped runs")
        needs = sorted({s[1] for s in sources if s[0] == "piece"})
        return Piece(key, forward, sources, needs)

    def partnered(self) -> list[bool]:
        """Per piece, whether another piece can run at the same time (neither reads the other, however
        indirectly); none can where the graph writes in place."""
        if self.in_place:
            return [False] * len(self.pieces)
        before: list[set[int]] = []
        for piece in self.pieces:
            before.append(set(piece.needs).union(*(before[j] for j in piece.needs)))
        n = len(self.pieces)
        return [any(j != i and j not in before[i] and i not in before[j] for j in range(n)) for i in range(n)]

    def concurrent(self) -> bool:
        """Whether two pieces can run at the same time."""
        return any(self.partnered())


def _exported(nodes: list[fx.Node], reached: dict, output: fx.Node) -> list[fx.Node]:
    """A piece's nodes that another piece or the output reads."""
    key = reached[nodes[0]]
    return [n for n in nodes if any(u is output or reached[u] != key for u in n.users)]


class OverlappedRun:
    """Runs an OverlapPlan's pieces at the same time: CUDA streams on a GPU, worker threads on a CPU."""

    def __init__(self, plan: OverlapPlan, workers: int | None = None):
        self.plan = plan
        self.concurrent = any(plan.partnered())
        self.order = _thread_order(plan)
        self.workers = workers or max(1, min(len(plan.pieces) - 1, _usable_cpus()))
        self._pool: ThreadPoolExecutor | None = None
        self._pid = os.getpid()
        self._streams: dict[torch.device, list] = {}

    def where_to_run(self, gm: fx.GraphModule, inputs: tuple, named_inputs: dict) -> str | None:
        """How to run this call: "streams" (an input is on a GPU), "threads" (every input on the CPU)
        or None: run the graph in one thread, as written. None where there is nothing to overlap, the net is training
        (dropout would draw from the random generator in thread order, batch norm update its
        statistics from several threads), or state that torch keeps per thread or per call would not
        reach the workers or the streams: dispatch and function modes (FlopCounterMode, torch.device
        as a context), saved-tensor hooks (save_on_cpu), functorch transforms (vmap, grad), tracing
        and compiling."""
        if not self.concurrent or gm.training or _per_thread_state():
            return None
        devices = {t.device.type for t in pytree.tree_leaves((inputs, named_inputs)) if isinstance(t, torch.Tensor)}
        if "cuda" in devices:
            return "streams"
        return "threads" if devices <= {"cpu"} else None

    def __call__(self, gm: fx.GraphModule, *inputs, how: str = "threads", **named_inputs):
        """The graph's outputs, its pieces run on ``how`` ("threads" or "streams"; see where_to_run)."""
        values = self._bind(inputs, named_inputs)
        if how == "streams":
            device = next(v.device for v in pytree.tree_leaves(values) if isinstance(v, torch.Tensor) and v.is_cuda)
            results = self._on_streams(gm, values, device)
        else:
            results = self._on_threads(gm, values)
        return fx.node.map_arg(self.plan.output, lambda n: _value(self.plan.where[n], values, results))

    def _bind(self, inputs: tuple, named: dict) -> list:
        """The placeholders' values, as the graph's own forward binds them (positions, names, defaults)."""
        placeholders = self.plan.placeholders
        if len(inputs) > len(placeholders):
            raise TypeError(f"forward() takes {len(placeholders)} inputs but {len(inputs)} were given")
        values = list(inputs)
        for node in placeholders[len(inputs):]:
            if node.target in named:
                values.append(named.pop(node.target))
            elif node.args:
                values.append(node.args[0])
            else:
                raise TypeError(f"forward() missing input {node.target!r}")
        if named:
            raise TypeError(f"forward() got unexpected inputs {sorted(named)}")
        return values

    def _on_threads(self, gm: fx.GraphModule, values: list) -> list:
        """The pieces in ``self.order``, each submitted to the pool or run on the calling thread (see
        ``_thread_order``); a piece waits for the results of those it reads, the caller's as futures too."""
        if self._pool is None or self._pid != os.getpid():  # a forked child has the pool but not its threads
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="multinet-overlap")
            self._pid = os.getpid()
        grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
        autocast = torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")
        results: list = [None] * len(self.plan.pieces)

        def run(i: int):
            piece = self.plan.pieces[i]
            with torch.inference_mode(inference), torch.set_grad_enabled(grad), \
                    torch.autocast("cpu", dtype=autocast[1], enabled=autocast[0]):
                args = [_value(s, values, results) for s in piece.sources]
                return piece.forward(gm, *args)

        for i, inline in self.order:
            if inline:
                results[i] = Future()
        submitted: list[Future] = []
        try:
            for i, inline in self.order:
                if not inline:
                    results[i] = self._pool.submit(run, i)
                    submitted.append(results[i])
                    continue
                try:
                    results[i].set_result(run(i))
                except BaseException as exc:
                    results[i].set_exception(exc)  # pieces waiting for it on the pool fail too
                    raise
            for i, result in enumerate(results):
                if isinstance(result, Future):
                    results[i] = result.result()
        except BaseException:
            # nothing of this call keeps running into the next one. A submitted piece reads only pieces
            # that come earlier in the plan, whose results (or errors) are all set by now, so it ends;
            # the caller's pieces not reached yet are never waited for
            for future in submitted:
                future.cancel()
            wait(submitted)
            raise
        return results

    def _on_streams(self, gm: fx.GraphModule, values: list, device: torch.device) -> list:
        """Every piece queued on its own stream after the events of the pieces it reads; the caller's
        stream then waits for all of them. A tensor read on a stream other than the one that made it
        is recorded on the reading stream, so the caching allocator does not hand its memory out early."""
        streams = self._streams.get(device)
        if streams is None:
            streams = self._streams[device] = [torch.cuda.Stream(device) for _ in self.plan.pieces]
        caller = torch.cuda.current_stream(device)
        results: list = [None] * len(self.plan.pieces)
        done: list = [None] * len(self.plan.pieces)
        for i, piece in enumerate(self.plan.pieces):
            stream = streams[i]
            stream.wait_stream(caller)
            for j in piece.needs:
                stream.wait_event(done[j])
            with torch.cuda.stream(stream):
                args = [_value(s, values, results) for s in piece.sources]
                _record_on(args, stream)
                results[i] = piece.forward(gm, *args)
                done[i] = torch.cuda.Event()
                done[i].record(stream)
        for event in done:
            caller.wait_event(event)
        _record_on(results, caller)
        return results

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def __del__(self):
        self.close()


def _work(gm: fx.GraphModule, nodes: list[fx.Node], flops: dict[str, int] | None) -> int:
    """A piece's FLOPs (``flops``: per layer, as counting.count names them), or without them its
    layers' parameter count."""
    if flops is None:
        return sum(p.numel() for n in nodes if n.op == "call_module" for p in gm.get_submodule(n.target).parameters())
    return sum(flops.get(n.target if n.op == "call_module" else n.name, 0) for n in nodes)


def _thread_order(plan: OverlapPlan) -> list[tuple[int, bool]]:
    """(piece, runs on the calling thread) in the order the caller starts them. A piece nothing can
    run beside (a trunk the members share) runs on the caller; of a run of pieces that can run at the
    same time, the caller runs the one with the most work (FLOPs) after handing the others to the pool: a
    hand-off costs, and work the caller's thread does meets its own warm intra-op threads.

    No wait can deadlock, whatever the number of workers: the pool takes pieces first in, first out;
    a piece reads only pieces before it in the plan; the pieces the caller's piece reads are handed
    out before any piece after it, so they start first and never wait for a later one."""
    partnered, order, i, n = plan.partnered(), [], 0, len(plan.pieces)
    while i < n:
        if not partnered[i]:
            order.append((i, True))
            i += 1
            continue
        j = i
        while j < n and partnered[j]:
            j += 1
        heaviest = max(range(i, j), key=lambda k: (plan.work[k], k))
        order += [(k, False) for k in range(i, j) if k != heaviest] + [(heaviest, True)]
        i = j
    return order


def _per_thread_state() -> bool:
    """Whether torch state is active that worker threads or a side stream's ops would not see."""
    return bool(torch._C._len_torch_dispatch_stack() or torch._C._len_torch_function_stack()
                or torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
                or torch._C._functorch.maybe_current_level() is not None
                or torch.jit.is_tracing() or torch.compiler.is_compiling())


def _usable_cpus() -> int:
    """The CPUs this process may run on (its affinity, which a container or Ray worker may narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _value(source: Source, values: list, results: list):
    """An argument's value: a placeholder's, or one output of an earlier piece (waited for on a CPU)."""
    if source[0] == "input":
        return values[source[1]]
    result = results[source[1]]
    if isinstance(result, Future):
        result = result.result()
    return result[source[2]]


def _record_on(tree, stream) -> None:
    for leaf in pytree.tree_leaves(tree):
        if isinstance(leaf, torch.Tensor) and leaf.is_cuda:
            leaf.record_stream(stream)
