"""A merged graph's forward that reaches its layers through the module dicts, not nn.Module attributes.

fx writes the call of layer ``a.hidden.0`` as ``getattr(self.a.hidden, "0")(x)``: three Python-level
``nn.Module.__getattr__`` calls (about 0.4 µs each) per layer call. A member model run on its own
does not pay them (its Sequential iterates its children), so a MultiNet of small models ran slower
than its members one after another. The same code written as
``self._modules['a']._modules['hidden']._modules['0'](x)`` does plain dict lookups and reads the
dicts at every call, so a layer replaced later (surgery, fusion, ``setattr``) is the one that runs.
"""
from __future__ import annotations

from collections.abc import Callable

import torch.fx as fx


def fx_target_expression(target: str, root: str = "self") -> str:
    """The expression fx's code generator writes for ``root``'s submodule ``target``."""
    expression = root
    for part in target.split("."):
        expression = f"{expression}.{part}" if part.isidentifier() else f'getattr({expression}, "{part}")'
    return expression


def dict_expression(target: str, root: str = "self") -> str:
    return root + "".join(f"._modules[{part!r}]" for part in target.split("."))


def direct_source(gm: fx.GraphModule) -> str:
    """``gm``'s generated code with every layer call rewritten to module-dict lookups."""
    source = gm.code
    targets = sorted({n.target for n in gm.graph.nodes if n.op == "call_module"}, key=len, reverse=True)
    for target in targets:  # longest first: "self.a.b(" is never a part of another target's call
        source = source.replace(fx_target_expression(target) + "(", dict_expression(target) + "(")
    return source


def direct_forward(gm: fx.GraphModule) -> Callable | None:
    """``direct_source`` compiled, as a function of (gm, *inputs); None when ``gm`` is not a plain
    generated GraphModule (then call it as it is)."""
    forward = getattr(type(gm), "forward", None)
    if not isinstance(gm, fx.GraphModule) or getattr(gm, "_code", None) is None \
            or not hasattr(forward, "__globals__"):
        return None
    namespace = dict(forward.__globals__)
    try:
        exec(compile(direct_source(gm), f"<multinet direct forward {id(gm):x}>", "exec"), namespace)
    except SyntaxError:  # a code generator this rewrite does not know: keep fx's own forward
        return None
    return namespace.get("forward")
