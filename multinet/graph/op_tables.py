"""Which fx call targets follow which channel rule.

Anything not listed here is *unknown*: the channel analysis fails closed on it (its tracked inputs
become unprunable, with the op named in the reason) instead of guessing it is elementwise.
"""
from __future__ import annotations

import builtins
import operator

import torch
import torch.nn as nn
import torch.nn.functional as F

_FUNCTION_RULES: dict[object, str] = {}


def _add(rule: str, *fns: object) -> None:
    for fn in fns:
        _FUNCTION_RULES[fn] = rule


_add(
    "unary",
    torch.relu, torch.relu_, F.relu, F.relu_, F.relu6, F.gelu, F.silu, F.mish, torch.sigmoid, F.sigmoid,
    torch.tanh, F.tanh, F.hardswish, F.hardsigmoid, F.hardtanh, F.leaky_relu, F.elu, F.selu, F.celu,
    F.softplus, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, torch.abs, torch.neg,
    operator.neg, torch.exp, torch.sqrt, torch.rsqrt, torch.square, torch.clamp, torch.clip, torch.erf,
    torch.sin, torch.cos, torch.log, torch.nn.functional.logsigmoid, torch.detach,
)
_add(
    "binary",
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
    operator.imul, operator.itruediv, operator.pow, torch.add, torch.sub, torch.mul, torch.div,
    torch.true_divide, torch.maximum, torch.minimum, torch.pow,
)
_add("cat", torch.cat, torch.concat, torch.concatenate)
_add("stack", torch.stack)
_add("split", torch.split)
_add("chunk", torch.chunk)
_add("getitem", operator.getitem)
_add("flatten", torch.flatten)
_add("view", torch.reshape)
_add("permute", torch.permute)
_add("transpose", torch.transpose, torch.swapaxes, torch.swapdims)
_add("unsqueeze", torch.unsqueeze)
_add("squeeze", torch.squeeze)
_add("reduce", torch.mean, torch.sum, torch.amax, torch.amin)
_add(
    "spatial",
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate, F.upsample,
)
_add("softmax", F.softmax, torch.softmax, F.log_softmax, torch.log_softmax)
_add("layer_norm", F.layer_norm)
_add("batch_norm", F.batch_norm)
_add("conv", F.conv1d, F.conv2d, F.conv3d)
_add("linear", F.linear)
_add("meta", builtins.getattr, torch._assert, builtins.len, builtins.isinstance)
_add("pad", F.pad)
_add("roll", torch.roll)
_add("sdpa", F.scaled_dot_product_attention)
_add("matmul", torch.matmul, torch.bmm, operator.matmul)
_add("repeat_interleave", torch.repeat_interleave)
_add("embedding", F.embedding)
_add("einsum", torch.einsum)


def _aten(*names: str) -> list[object]:
    """ATen overloads by ``op.overload`` name; ones this torch lacks are skipped."""
    found = []
    for name in names:
        op, _, overload = name.partition(".")
        packet = getattr(torch.ops.aten, op, None)
        target = getattr(packet, overload or "default", None) if packet is not None else None
        if target is not None:
            found.append(target)
    return found


# torch.export graphs: call_function on ATen overloads, with the same argument order as the
# functional forms above (so the same rules read them).
_add("unary", *_aten(
    "relu", "relu_", "gelu", "silu", "mish", "sigmoid", "tanh", "hardswish", "hardsigmoid", "hardtanh",
    "leaky_relu", "elu", "abs", "neg", "exp", "sqrt", "rsqrt", "erf", "clamp", "clamp.Tensor", "dropout",
    "clone", "contiguous", "alias", "detach", "_to_copy", "to.dtype", "to.device", "to.dtype_layout",
    "type_as", "relu6", "softplus", "log", "sin", "cos", "square", "lift_fresh_copy", "clamp_min", "clamp_max",
))
_add("binary", *_aten(
    "add.Tensor", "add.Scalar", "add_.Tensor", "sub.Tensor", "sub.Scalar", "rsub.Scalar", "mul.Tensor",
    "mul.Scalar", "mul_.Tensor", "div.Tensor", "div.Scalar", "div.Tensor_mode", "pow.Tensor_Scalar",
    "maximum", "minimum",
))
_add("cat", *_aten("cat", "concat"))
_add("stack", *_aten("stack"))
_add("split", *_aten("split.Tensor", "split_with_sizes"))
_add("chunk", *_aten("chunk"))
_add("flatten", *_aten("flatten.using_ints"))
_add("view", *_aten("view", "reshape", "_unsafe_view"))
_add("permute", *_aten("permute"))
_add("transpose", *_aten("transpose.int", "swapaxes", "swapdims"))
_add("unsqueeze", *_aten("unsqueeze"))
_add("squeeze", *_aten("squeeze.dim", "squeeze.dims", "squeeze"))
_add("reduce", *_aten("mean.dim", "sum.dim_IntList", "amax", "amin"))
_add("expand", *_aten("expand"))
_add("softmax", *_aten("softmax.int", "_softmax", "log_softmax.int", "_log_softmax"))
_add("layer_norm", *_aten("layer_norm"))
_add("linear", *_aten("linear"))
_add("conv", *_aten("conv1d", "conv2d", "conv3d"))
_add("sdpa", *_aten("scaled_dot_product_attention"))
_add("matmul", *_aten("matmul", "bmm"))
_add("repeat_interleave", *_aten("repeat_interleave.self_int"))
_add("einsum", *_aten("einsum"))
_add("embedding", *_aten("embedding"))
_add("aten_slice", *_aten("slice.Tensor"))
_add("aten_select", *_aten("select.int"))
_add("spatial", *_aten(
    "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "adaptive_avg_pool1d", "max_pool1d", "avg_pool1d",
    "upsample_nearest2d.vec", "upsample_bilinear2d.vec",
))
_add("sym_size", *_aten("sym_size.int"))
_add("pad", *_aten("pad", "constant_pad_nd"))
_add("roll", *_aten("roll"))
_add("vector_norm", *_aten("linalg_vector_norm"))
_add("aten_index", *_aten("index.Tensor"))
_add("binary", *_aten("expand_as"))
_add("fresh", *_aten("new_zeros", "new_ones", "new_full", "new_empty"))
_add("meta", *_aten("_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range_for_size"))

_METHOD_RULES: dict[str, str] = {}
for _name in (
    "relu relu_ sigmoid sigmoid_ tanh tanh_ abs neg exp sqrt rsqrt square clamp clamp_ clip erf sin cos log "
    "contiguous clone detach float half double bfloat16 to type_as cpu cuda hardswish"
).split():
    _METHOD_RULES[_name] = "unary"
for _name in "add add_ sub sub_ mul mul_ div div_ pow maximum minimum".split():
    _METHOD_RULES[_name] = "binary"
_METHOD_RULES.update(
    view="view", reshape="view", flatten="flatten", permute="permute", transpose="transpose",
    unsqueeze="unsqueeze", squeeze="squeeze", mean="reduce", sum="reduce", amax="reduce", amin="reduce",
    split="split", chunk="chunk", size="meta", dim="meta", numel="meta", expand="expand",
    softmax="softmax", log_softmax="softmax", roll="roll",
    new_zeros="fresh", new_ones="fresh", new_full="fresh", new_empty="fresh", matmul="matmul", bmm="matmul", repeat_interleave="repeat_interleave",
)

UNARY_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid,
    nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.LogSigmoid, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)
POOL_MODULES: dict[type, int] = {
    nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3, nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3,
    nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3, nn.AdaptiveMaxPool1d: 1,
    nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3, nn.Upsample: -1, nn.UpsamplingNearest2d: 2,
    nn.UpsamplingBilinear2d: 2,
}
BATCHNORM_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
INSTANCENORM_MODULES = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# a transposed conv's weight is (in, out / groups, *kernel): its outputs along dim 1 (see weight_output_dim)
CONV_TRANSPOSE_MODULES = (nn.ConvTranspose1d, nn.ConvTranspose2d)


def weight_output_dim(module: nn.Module | None) -> int:
    """The dim of a layer's weight that holds its output channels: 1 for a transposed conv, 0 elsewhere."""
    return 1 if isinstance(module, nn.modules.conv._ConvTransposeNd) else 0


# Functions of optional libraries, matched by qualified name so that importing them is not needed.
_QUALNAME_RULES: dict[str, str] = {
    # per-sample random scaling of the whole input (identity in eval): channels pass through
    "torchvision.ops.stochastic_depth.stochastic_depth": "unary",
}


def register_elementwise(fn: object) -> None:
    """Declare that ``fn`` (e.g. a function passed to ``autowrap_functions``) treats each channel
    of its first argument independently, so channels pass through it like through an activation."""
    _FUNCTION_RULES[fn] = "unary"


def function_rule(target: object) -> str | None:
    try:
        rule = _FUNCTION_RULES.get(target)
    except TypeError:  # unhashable target
        return None
    if rule is None:
        rule = _QUALNAME_RULES.get(f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', '')}")
    return rule


def method_rule(name: str) -> str | None:
    return _METHOD_RULES.get(name)
