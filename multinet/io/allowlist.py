"""What a multinet model file may call: one explicit table, checked node by node at save and load.

Why explicit: a namespace is not a safe unit. ``torch`` alone holds ``load``, ``hub``, ``ops``,
``compile``, ``from_file`` and ``jit``; ``operator`` holds ``attrgetter`` and ``methodcaller``;
``getattr`` reaches ``__globals__``; a tensor method such as ``type`` imports a dotted name.
So a model file may name only the pure tensor functions and methods below, and ``getattr`` only
for the tensor attributes below.

How the table was derived: by tracing every zoo model, each of them compressed, two MultiNets and
the hand-written architectures in tests/test_hard_cases.py, and collecting every call_function and
call_method target (that set is marked ``# traced`` in a comment above each group); the rest are
the elementwise, reduction, shape and layer functions a traced CNN, MLP or transformer uses.

How to extend it: add the name to the group it belongs to, only if the function is pure tensor
math (no files, no imports, no attribute access, no callables as arguments), then add a
round-trip test. A name absent from the installed torch is skipped, so the table can name
functions of newer releases.
"""
from __future__ import annotations

import builtins
import keyword
import math
import operator
import re

import torch
import torch.nn.functional as F

# traced: cat chunk conv2d cumsum flatten relu sigmoid split adaptive_avg_pool1d
_TORCH = """
    abs neg exp log log1p sqrt rsqrt square reciprocal sign floor ceil round trunc erf sin cos tanh
    sigmoid relu relu_ clamp clip clamp_min clamp_max pow add sub mul div true_divide floor_divide
    remainder fmod maximum minimum where lerp addcmul addcdiv nan_to_num isnan isfinite masked_fill
    eq ne lt le gt ge logical_not logical_and logical_or
    matmul mm bmm addmm baddbmm einsum outer softmax log_softmax
    cat concat concatenate stack split chunk tensor_split unbind flatten unflatten reshape permute
    transpose swapaxes swapdims movedim squeeze unsqueeze narrow select index_select gather flip roll
    t tril triu broadcast_to repeat_interleave tile diff
    mean sum amax amin max min argmax argmin std var norm prod cumsum cumprod logsumexp all any
    zeros ones full arange eye linspace zeros_like ones_like full_like detach
    conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d batch_norm layer_norm
    group_norm instance_norm avg_pool1d max_pool1d max_pool2d adaptive_avg_pool1d adaptive_max_pool1d
    _assert
"""

# traced: adaptive_avg_pool2d gelu layer_norm linear max_pool2d relu relu6
_FUNCTIONAL = """
    relu relu_ relu6 gelu silu mish hardswish hardsigmoid hardtanh leaky_relu elu selu celu softplus
    softsign sigmoid tanh logsigmoid glu prelu softmax log_softmax normalize
    dropout dropout1d dropout2d dropout3d alpha_dropout
    linear bilinear conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d
    max_pool1d max_pool2d max_pool3d avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d
    adaptive_avg_pool2d adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool2d adaptive_max_pool3d
    interpolate upsample pad layer_norm group_norm batch_norm instance_norm rms_norm embedding one_hot
    scaled_dot_product_attention pixel_shuffle pixel_unshuffle unfold fold cosine_similarity
"""

# traced: add mul sub floordiv getitem (what fx records for x + y, x[i], n // 2, ...)
_OPERATOR = """
    add sub mul truediv floordiv mod pow matmul neg pos invert and_ or_ xor lshift rshift
    eq ne lt le gt ge getitem
    iadd isub imul itruediv ifloordiv imod ipow imatmul iand ior ixor
"""

# fx wraps math functions applied to sizes (scale = math.sqrt(q.size(-1)))
_MATH = "sqrt floor ceil log exp"

# traced: getattr (x.shape); checked further: only the attributes in TENSOR_ATTRIBUTES
_BUILTINS = "getattr"

# traced (all-MiniLM-L6-v2, BERT and torchvision's Swin-T captured by torch.export, then compressed;
# Swin adds pad.default roll.default adaptive_avg_pool2d.default, Swin V2 linalg_vector_norm.default
# clamp_min.default expand_as.default; Llama, Qwen2 and Mistral cos.default sin.default (rotary positions),
# RoBERTa and OPT cumsum.default (position ids), Gemma type_as.default): bitwise_and.Tensor
# (capture renames __and__.Tensor) add.Tensor arange.default dropout.default expand.default gather.default ge.Scalar gelu.default
# index.Tensor new_ones.default reshape.default scaled_dot_product_attention.default slice.Tensor
# sym_size.int to.device to.dtype_layout transpose.int unsqueeze.default view.default.
# ATen overloads by name; ``out=`` variants and in-place ops are deliberately absent.
_ATEN = """
    add.Tensor add.Scalar sub.Tensor sub.Scalar rsub.Scalar mul.Tensor mul.Scalar div.Tensor div.Scalar neg.default
    pow.Tensor_Scalar sqrt.default rsqrt.default exp.default log.default abs.default erf.default
    bitwise_and.Tensor bitwise_or.Tensor bitwise_not.default logical_not.default
    eq.Scalar eq.Tensor ne.Scalar ne.Tensor ge.Scalar ge.Tensor gt.Scalar gt.Tensor le.Scalar le.Tensor lt.Scalar
    lt.Tensor where.self masked_fill.Scalar masked_fill.Tensor clamp.default minimum.default maximum.default
    relu.default gelu.default silu.default sigmoid.default tanh.default hardswish.default hardsigmoid.default
    softmax.int _softmax.default log_softmax.int _log_softmax.default
    view.default reshape.default _unsafe_view.default permute.default transpose.int unsqueeze.default
    squeeze.dim squeeze.dims squeeze.default expand.default flatten.using_ints contiguous.default clone.default
    slice.Tensor select.int index.Tensor gather.default index_select.default cat.default stack.default
    split.Tensor split_with_sizes.default chunk.default repeat_interleave.self_int
    mean.dim sum.dim_IntList amax.default amin.default
    linear.default conv1d.default conv2d.default conv3d.default layer_norm.default embedding.default
    matmul.default bmm.default scaled_dot_product_attention.default dropout.default
    arange.default arange.start arange.start_step zeros.default ones.default full.default new_ones.default
    new_zeros.default to.dtype to.device to.dtype_layout _to_copy.default alias.default detach.default
    lift_fresh_copy.default sym_size.int pad.default constant_pad_nd.default roll.default
    adaptive_avg_pool1d.default adaptive_avg_pool2d.default avg_pool1d.default avg_pool2d.default
    max_pool1d.default max_pool2d.default upsample_nearest2d.vec upsample_bilinear2d.vec hardtanh.default
    leaky_relu.default elu.default relu6.default mean.default sum.default linalg_vector_norm.default diff.default
    clamp_min.default clamp_max.default expand_as.default cos.default sin.default cumsum.default type_as.default
"""

_SPACES = {"torch": (torch, _TORCH), "torch.nn.functional": (F, _FUNCTIONAL), "operator": (operator, _OPERATOR),
           "math": (math, _MATH), "builtins": (builtins, _BUILTINS)}

# traced: chunk flatten mean permute reshape size sum transpose view
METHODS = frozenset("""
    view view_as reshape reshape_as flatten unflatten permute transpose t swapaxes movedim squeeze
    unsqueeze expand expand_as repeat repeat_interleave contiguous chunk split tensor_split unbind
    narrow select index_select gather flip roll tril triu size dim numel
    to type_as float half double bfloat16 int long bool cpu cuda clone detach
    add add_ sub sub_ mul mul_ div div_ true_divide floor_divide pow matmul bmm mm neg abs exp log
    sqrt rsqrt square reciprocal clamp clamp_ clip clamp_min clamp_max maximum minimum sign floor
    ceil round erf sin cos relu relu_ sigmoid sigmoid_ tanh tanh_ hardswish softmax log_softmax
    masked_fill where lerp eq ne lt le gt ge
    mean sum amax amin max min argmax argmin std var norm prod cumsum logsumexp all any
    new_zeros new_ones new_full
""".split())

# what getattr(tensor, name) may read: shapes, types and transposes, nothing that reaches code
TENSOR_ATTRIBUTES = frozenset("shape dtype device ndim T mT".split())

# the device strings a model file may name (torch.device arguments)
DEVICE = re.compile(r"(cpu|cuda|meta|mps|xpu)(:\d{1,3})?")


def _table() -> dict[str, object]:
    functions = {}
    for space, (namespace, names) in _SPACES.items():
        for name in names.split():
            fn = getattr(namespace, name, None)
            if callable(fn):
                functions[f"{space}.{name}"] = fn
    for name in _ATEN.split():
        packet, _, overload = name.partition(".")
        fn = getattr(getattr(torch.ops.aten, packet, None), overload, None)
        if isinstance(fn, torch._ops.OpOverload):
            functions[f"torch.ops.aten.{name}"] = fn
    return functions


FUNCTIONS: dict[str, object] = _table()
_NAMES: dict[object, str] = {}
for _name, _fn in FUNCTIONS.items():
    _NAMES.setdefault(_fn, _name)  # torch.conv2d is F.conv2d: the first name is the one written


def function_name(fn) -> str:
    """The name a model file stores for ``fn``: its table name, else its own (which the check refuses)."""
    try:
        known = _NAMES.get(fn)
    except TypeError:  # an unhashable callable
        known = None
    if known is not None:
        return known
    module = getattr(fn, "__module__", None) or type(fn).__module__
    return f"{module.removeprefix('_')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"


def is_dunder(name: str) -> bool:
    """``__class__``, ``__globals__``, ``__reduce_ex__``: the doors from data into code."""
    return name.startswith("__")


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PATH_PART = re.compile(r"[A-Za-z0-9_-]+")  # "features.0.conv", a MultiNet's "resnet-18.fc"


def is_variable(name) -> bool:
    """A node name or placeholder: a plain identifier that the generated forward() can bind."""
    return (isinstance(name, str) and _IDENTIFIER.fullmatch(name) is not None and not is_dunder(name)
            and not keyword.iskeyword(name) and name != "self")


def is_path(path) -> bool:
    """A module, parameter or buffer path: dotted plain parts, none a dunder (``_tensor_constant0`` is fine)."""
    return isinstance(path, str) and all(_PATH_PART.fullmatch(p) and not is_dunder(p) for p in path.split("."))
