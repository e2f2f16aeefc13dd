"""MultiNet: several models that read the same input, as one network with one output per model.

Each model is traced on its own, then its nodes are copied into one graph whose single
placeholder feeds every model; submodules live under the model's name (``a.conv1``), so groups,
surgery and counting work on the merged network exactly as on one model. Nothing is shared yet:
the outputs equal running the models one by one, bit for bit. Sharing is what unification adds.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from ..calib import batches
from ..errors import InputShapeError, MultinetError, TraceError
from ..graph import count, trace
from ..graph.tracing import as_tuple, positional_inputs, propagate_shapes
from .direct_call import direct_forward
from .similarity import ancestors

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def named_models(models) -> dict[str, nn.Module]:
    """{name: model} from a dict, a list of (name, model) pairs, or a list of models (m0, m1, ...)."""
    if isinstance(models, Mapping):
        pairs = list(models.items())
    else:
        models = list(models)
        pairs = [m if isinstance(m, tuple) else (f"m{i}", m) for i, m in enumerate(models)]
    if len(pairs) < 1:
        raise MultinetError("a MultiNet needs at least one model")
    names = [n for n, _ in pairs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise MultinetError(f"duplicate model names: {', '.join(dup)}; every model needs its own name")
    for name, model in pairs:
        if not isinstance(name, str) or not _NAME.match(name):
            raise MultinetError(f"model name {name!r} must be a Python identifier (letters, digits, _)")
        if not isinstance(model, nn.Module):
            raise MultinetError(f"model {name!r} is a {type(model).__name__}, not a torch.nn.Module")
    return dict(pairs)


def _check_outputs(name: str, gm: fx.GraphModule) -> None:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    bad = []

    def visit(a):
        if isinstance(a, fx.Node) and "tensor_meta" not in a.meta:
            bad.append(a.name)
        return a

    fx.node.map_arg(out.args[0], visit)
    leaves = torch.utils._pytree.tree_leaves(out.args[0])
    if bad or any(not isinstance(v, fx.Node) for v in leaves):
        raise MultinetError(f"model {name!r} returns something other than tensors (a tensor, or a tuple/list/dict "
                            f"of tensors): its outputs must be tensors to be merged and compared")


def input_layout(example_inputs) -> tuple[list[str], tuple]:
    """The MultiNet's input names and the example as positional tensors: one tensor (or a one-tensor
    sequence) is the input ``x``; a dict ({"input_ids": ..., "attention_mask": ...}) names several
    inputs, which each member binds by its own argument names (a member may read only some)."""
    if isinstance(example_inputs, Mapping):
        names = list(example_inputs)
        bad = [n for n in names if not isinstance(n, str) or not _NAME.match(n)]
        if bad:
            raise MultinetError(f"input names {bad} must be Python identifiers")
        return names, tuple(example_inputs[n] for n in names)
    inputs = as_tuple(example_inputs)
    if len(inputs) != 1:
        raise MultinetError("a MultiNet's models share their inputs: give one example tensor, or a dict of named "
                            "inputs ({'input_ids': ..., 'attention_mask': ...})")
    return ["x"], inputs


def _merge(models: dict[str, nn.Module], example_inputs, leaf_modules, autowrap_functions) -> fx.GraphModule:
    """One GraphModule running every model on the same inputs; forward returns {name: output}."""
    names, inputs = input_layout(example_inputs)
    root = nn.Module()
    graph = fx.Graph()
    shared = {n: graph.placeholder(n) for n in names}
    outputs = {}
    for name, model in models.items():
        try:
            if isinstance(example_inputs, Mapping):  # bound by the member's argument names
                args = batches.model_args(model, example_inputs)
                arg_names = batches.input_names(model)[:len(args)]
            else:
                args, arg_names = inputs, names
            gm = trace(model, args, leaf_modules, autowrap_functions).module
        except InputShapeError as exc:
            raise MultinetError(f"model {name!r} does not accept the shared input: {exc}") from None
        except TraceError as exc:
            raise MultinetError(f"model {name!r}: {exc}") from None
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(args):
            raise MultinetError(f"model {name!r} takes {len(placeholders)} inputs, the shared example gives it "
                                f"{len(args)} ({', '.join(arg_names)})")
        _check_outputs(name, gm)
        root.add_module(name, gm)
        env: dict[fx.Node, fx.Node] = dict(zip(placeholders, (shared[a] for a in arg_names)))
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "output":
                outputs[name] = fx.node.map_arg(node.args[0], lambda n: env[n])
            else:
                new = graph.node_copy(node, lambda n: env[n])
                if node.op in ("call_module", "get_attr"):
                    new.target = f"{name}.{node.target}"
                env[node] = new
    graph.output(outputs)
    net = fx.GraphModule(root, graph, "MultiNetGraph")
    propagate_shapes(net, inputs)
    return net


@dataclass(frozen=True)
class Link:
    """Member ``model``'s layer ``layer`` reads the input of member ``source``'s layer ``source_layer``
    (a bridge that unification added): ``model`` then computes less of its own."""

    model: str
    layer: str
    source: str
    source_layer: str

    def as_list(self) -> list[str]:
        return [self.model, self.layer, self.source, self.source_layer]


class MultiNet(nn.Module):
    """Several models that read the same input, run as one network; ``forward(x) -> {member: output}``.

    ``MultiNet(models, example_inputs)`` merges the models (a dict {name: model}, (name, model)
    pairs, or a list named m0, m1, ...) into one fx graph; nothing is shared yet, so outputs equal
    the members run one by one, bit for bit. The type carries what the graph alone does not say:
    ``members`` (in output order), ``links`` (which member's layer reads which other member's
    layer, after :func:`multinet.unify`), ``outputs`` (per member, the names of its output tensors)
    and whether the graph is ``fused`` (see :meth:`fused`; a fused graph's links still name the
    unfused layers, some of which fusion merged into wider ones).

    The graph lives in ``graph_module``; the MultiNet shares its submodules, parameters and
    buffers (same dicts), so ``named_modules()``, ``state_dict()`` and ``.to()`` see the members'
    layers under their own names (``a.conv1``) exactly as the graph does.
    """

    def __init__(self, models, example_inputs, leaf_modules=(), autowrap_functions=()):
        super().__init__()
        named = named_models(models)
        gm = _merge(named, example_inputs, leaf_modules, autowrap_functions)
        self._attach(gm, list(named), [], False)

    @classmethod
    def from_graph(cls, gm: fx.GraphModule, members, links=(), fused: bool = False,
                   overlapped: bool = False) -> "MultiNet":
        """A MultiNet around a graph that already returns {member: output} (compressed, fused, loaded)."""
        net = cls.__new__(cls)
        nn.Module.__init__(net)
        net._attach(gm, list(members), [lk if isinstance(lk, Link) else Link(*lk) for lk in links], fused)
        net.__dict__["is_overlapped"] = bool(overlapped)
        net.training = gm.training  # its layers' mode, which a copy's train(training) would otherwise reset
        return net

    def _attach(self, gm: fx.GraphModule, members: list[str], links: list[Link], fused: bool) -> None:
        """Hold ``gm`` and share its module, parameter and buffer dicts (checked against ``members``)."""
        found = output_members(gm)
        if found != members:
            raise MultinetError(f"the graph returns outputs for {found}, but the MultiNet's members are {members}")
        layers = {n.target for n in gm.graph.nodes if n.op == "call_module"}
        for link in links:  # a fused graph may have merged a linked layer into a wider one
            if link.model not in members or link.source not in members or not (fused or link.layer in layers):
                raise MultinetError(f"link {link.as_list()} does not name a member's layer in the graph")
        self.__dict__["_graph_module"] = gm
        for key in ("_modules", "_parameters", "_buffers", "_non_persistent_buffers_set"):
            self.__dict__[key] = gm.__dict__[key]
        self.__dict__["members"] = list(members)
        self.__dict__["links"] = list(links)
        self.__dict__["is_fused"] = bool(fused)
        self.__dict__["is_overlapped"] = False

    def forward(self, *inputs, **named_inputs):
        gm = self._graph_module
        if self.is_overlapped:
            run = self._overlapped_run()
            how = run.where_to_run(gm, inputs, named_inputs)
            if how is not None:
                return run(gm, *inputs, how=how, **named_inputs)
        cached = self.__dict__.get("_direct")
        if cached is None or cached[0] is not getattr(gm, "_code", None):  # built again after a recompile
            cached = self.__dict__["_direct"] = (getattr(gm, "_code", None), direct_forward(gm))
        if cached[1] is None:
            return gm.forward(*inputs, **named_inputs)
        return cached[1](gm, *inputs, **named_inputs)

    def train(self, mode: bool = True) -> "MultiNet":
        """Sets the layers' mode (the dicts are the graph's) and the graph's own flag, which MultiNets
        made from this graph (fused, overlapped, compressed, copied) take theirs from."""
        super().train(mode)
        self._graph_module.training = mode
        return self

    def _overlapped_run(self):
        """The pieces and their runner, cut again after the graph was recompiled."""
        from .overlap import OverlappedRun, OverlapPlan

        code = getattr(self._graph_module, "_code", None)
        cached = self.__dict__.get("_overlap")
        if cached is None or cached[0] is not code:
            cached = self.__dict__["_overlap"] = (code, OverlappedRun(OverlapPlan(self._graph_module)))
        return cached[1]

    @property
    def graph_module(self) -> fx.GraphModule:
        """The network as one fx graph (what compression traces, save writes and fusion rewrites)."""
        return self._graph_module

    @property
    def graph(self) -> fx.Graph:
        return self._graph_module.graph

    @property
    def meta(self) -> dict:
        """The graph's meta (input shapes of a loaded file); nothing about the MultiNet lives there."""
        return self._graph_module.meta

    @property
    def outputs(self) -> dict[str, list[str]]:
        """Per member, the names of its output tensors: ``a`` for one tensor, ``b.0``, ``b.1`` for a tuple."""
        return output_names_of(self._graph_module)

    def output_names(self) -> list[str]:
        """Every output tensor's name, in the order the flattened outputs come (ONNX output names)."""
        return [name for member in self.members for name in self.outputs[member]]

    def costs(self, example_inputs=None) -> dict[str, dict[str, int]]:
        """FLOPs and params per member, shared by several members, and in total (see :func:`model_costs`)."""
        return model_costs(self, example_inputs)

    def fused(self, batched: bool = False, export: bool = False, timed_on=None) -> "MultiNet":
        """The same MultiNet with structurally parallel layers fused (one wider layer per shared input):
        for inference and export; compress the unfused one (it keeps every member's own layers).
        ``batched``: also run same-shaped layers of different members as one batched/grouped op
        (see batching.py: fewer, larger ops, a win where launches cost, e.g. on a GPU; on a CPU often
        not, so it is not the default). ``export``: keep the links' average pools as pools (a deployment
        runtime has its own pooling kernels; their strided sums, pooling.py, pay off in eager CPU
        inference only). ``timed_on``: a batch of the inputs it will run (on the device where its
        parameters are); each set of layers is then fused only where the wider layer is not slower on
        that batch (fusion_timing.py: a CPU's conv kernels charge by blocks of output channels, so two
        16-channel convs fused ran 1.18x the pair at a batch of 256 here, and 0.86x at 32). A fused MultiNet is returned as it is, or batched
        where asked."""
        if self.is_fused and not batched:
            return self
        from .fusion import fuse_parallel

        gm = self._graph_module if self.is_fused else fuse_parallel(self._graph_module, halve=not export,
                                                                    timed_on=timed_on)
        if batched:
            from .batching import batch_members

            gm = batch_members(gm)
        return MultiNet.from_graph(gm, self.members, self.links, fused=True, overlapped=self.is_overlapped)

    def overlapped(self, enabled: bool = True) -> "MultiNet":
        """The same MultiNet (same graph and layers) run with the parts that different members compute
        alone at the same time: each on its own CUDA stream on a GPU, on worker threads on a CPU
        (overlap.py). Outputs are unchanged, bit for bit; whether it is faster depends on the device
        and the members (``multinet.infer(..., overlap="auto")`` times it). ``enabled=False``: run
        in one thread again. Composes with :meth:`fused` in either order. The two MultiNets share
        their layers (``train()``/``eval()`` on one sets the other's layers too). Where overlap is
        not safe the graph runs in one thread as written: a graph that writes a tensor in place, a
        net in training mode, inputs on other devices than the CPU and CUDA, and torch modes kept per
        thread (see ``OverlappedRun.where_to_run``)."""
        net = MultiNet.from_graph(self._graph_module, self.members, self.links, self.is_fused, enabled)
        if "_overlap" in self.__dict__:  # the same graph: its pieces need not be cut again
            net.__dict__["_overlap"] = self.__dict__["_overlap"]
        return net

    def can_overlap(self) -> bool:
        """Whether two parts of the graph could run at the same time (two members with work of their own,
        and no tensor written in place)."""
        return self._overlapped_run().concurrent

    def with_graph(self, gm: fx.GraphModule) -> "MultiNet":
        """This MultiNet's members around another graph of it (a compressed one); links to layers
        that no longer exist are dropped."""
        return MultiNet.from_graph(gm, self.members, surviving_links(self.links, gm, self.graph_module), self.is_fused,
                                   self.is_overlapped)

    def extra_repr(self) -> str:
        return (f"members={self.members}, links={len(self.links)}, fused={self.is_fused}"
                + (", overlapped=True" if self.is_overlapped else ""))

    def __getstate__(self) -> dict:
        return {"graph_module": self._graph_module, "members": self.members, "links": self.links,
                "fused": self.is_fused, "overlapped": self.is_overlapped, "training": self.training}

    def __setstate__(self, state: dict) -> None:
        """Pickle and deepcopy: rebuild the shared dicts around the (copied) graph."""
        nn.Module.__init__(self)
        self._attach(state["graph_module"], state["members"], state["links"], state["fused"])
        self.__dict__["is_overlapped"] = bool(state.get("overlapped", False))
        self.train(state["training"])


def surviving_links(links: list[Link], gm: fx.GraphModule, before: fx.GraphModule | None = None) -> list[Link]:
    """The links whose two layers are still in ``gm`` (compression may remove either). A link whose
    source layer was already gone in ``before`` (a skip link collapsed it; the tensor it read lives on)
    stays while its reading layer does."""
    layers = _layers(gm)
    gone = set() if before is None else {lk.source_layer for lk in links} - _layers(before)
    return [lk for lk in links if lk.layer in layers and (lk.source_layer in layers or lk.source_layer in gone)]


def _layers(gm: fx.GraphModule) -> set[str]:
    return {n.target for n in gm.graph.nodes if n.op == "call_module"}


def _output_dict(gm: fx.GraphModule) -> dict | None:
    out = next((n for n in gm.graph.nodes if n.op == "output"), None)
    value = out.args[0] if out is not None and out.args else None
    return value if isinstance(value, dict) else None


def output_members(gm: fx.GraphModule) -> list[str]:
    """The member names a MultiNet graph returns outputs for (the keys of its output dict)."""
    value = _output_dict(gm)
    if value is None or not all(isinstance(k, str) for k in value):
        raise MultinetError("not a MultiNet graph: its output is not a {model name: output} mapping")
    return list(value)


def output_names_of(gm: fx.GraphModule) -> dict[str, list[str]]:
    """Per member, its output leaves named by their path (``b``, or ``b.0``, ``b.logits``)."""
    names = {}
    for member, value in (_output_dict(gm) or {}).items():
        leaves = torch.utils._pytree.tree_flatten_with_path(value)[0]
        names[member] = [".".join([member, *(str(_key(k)) for k in path)]) for path, _ in leaves]
    return names


def _key(entry) -> object:
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return getattr(entry, attr)
    return entry


def model_names(net) -> list[str]:
    """A MultiNet's members; anything else is refused (the type says what a MultiNet is)."""
    if not isinstance(net, MultiNet):
        raise MultinetError("not a MultiNet: build one with multinet.MultiNet([...], example_inputs)")
    return list(net.members)


def model_costs(net: MultiNet, example_inputs=None) -> dict[str, dict[str, int]]:
    """FLOPs (MACs) and params each model needs, and what is shared by several models.

    A layer belongs to every model whose output depends on it; ``shared`` holds the layers more
    than one model depends on; ``total`` is the whole network (each layer counted once).
    """
    names = model_names(net)
    gm = net.graph_module
    counts = count(gm, positional_inputs(gm, example_inputs) if example_inputs is not None else None)
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    users: dict[str, set[str]] = {}
    for name in names:
        for node in _ancestors_of_output(out_node, name):
            key = node.target if node.op == "call_module" else node.name
            users.setdefault(key, set()).add(name)
    per = {name: {"flops": 0, "params": 0} for name in names} | {"shared": {"flops": 0, "params": 0}}
    for layer in counts.layers:
        owners = users.get(layer.name, set())
        for name in owners:
            per[name]["flops"] += layer.flops
            per[name]["params"] += layer.params
        if len(owners) > 1:
            per["shared"]["flops"] += layer.flops
            per["shared"]["params"] += layer.params
    per["total"] = {"flops": counts.flops, "params": counts.params}
    return per


def _ancestors_of_output(out_node: fx.Node, name: str) -> set[fx.Node]:
    outputs = out_node.args[0]
    roots: list[fx.Node] = []
    fx.node.map_arg(outputs[name], lambda n: roots.append(n) or n)
    found = set(roots)
    for r in roots:
        found |= ancestors(r)
    return found


def combine(parts: list[MultiNet], members: list[str]) -> MultiNet:
    """One MultiNet running several MultiNets with disjoint members on the same input, its outputs
    in ``members`` order: how unify puts members compressed apart back together."""
    root = nn.Module()
    graph = fx.Graph()
    shared: dict[str, fx.Node] = {}  # the parts' inputs, by name (one tensor "x", or named inputs)
    outputs, links, examples = {}, [], {}
    for part in parts:
        gm = part.graph_module
        for name, child in gm.named_children():
            if hasattr(root, name):
                raise MultinetError(f"members overlap: {name!r} is in two of the parts")
            root.add_module(name, child)
        env: dict[fx.Node, fx.Node] = {}
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                if node.name not in shared:
                    shared[node.name] = graph.placeholder(node.name)
                env[node] = shared[node.name]
                examples.setdefault(node.name, node.meta.get("tensor_meta"))
            elif node.op == "output":
                outputs.update({k: fx.node.map_arg(v, lambda n: env[n]) for k, v in node.args[0].items()})
            else:
                env[node] = graph.node_copy(node, lambda n: env[n])
        links += part.links
    graph.output({m: outputs[m] for m in members})
    gm = fx.GraphModule(root, graph, "MultiNetGraph")
    gm.training = any(part.training for part in parts)  # the flag only: the layers keep their own modes
    if examples and all(hasattr(m, "shape") for m in examples.values()):
        propagate_shapes(gm, tuple(torch.zeros(m.shape, dtype=m.dtype, device=_device(gm)) for m in examples.values()))
    return MultiNet.from_graph(gm, members, links)


def _device(gm: nn.Module) -> torch.device:
    return next((p.device for p in gm.parameters()), torch.device("cpu"))
