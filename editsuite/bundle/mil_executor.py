"""A reference executor for converted Core ML programs: runs an `.mlpackage` with PyTorch ops on any OS.

coremltools can convert and save on Linux and Windows but cannot run a program there. To check a
conversion anywhere (and to run every task on a Core ML bundle off a Mac, slowly), this module reads the
program back with coremltools' own MIL loader and evaluates its ops one by one in PyTorch. Compressed
weights (int8, palettized) are expanded by the constexpr ops' own value inference, so what runs is what
Core ML would decode. Each intermediate is freed after its last use; `fp16=True` rounds every value the
program types as fp16 to fp16, as its fp16 arithmetic does on device (fp32 inputs and casts stay fp32:
Apple's text encoders take token ids as fp32, which fp16 would not hold above 2048).

Written here because no library runs MIL programs off Apple platforms.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from editsuite.errors import UserError

_OPS: dict[str, Callable[..., Any]] = {}


def op(*names: str):
    def register(fn):
        for name in names:
            _OPS[name] = fn
        return fn

    return register


def _ints(v) -> list[int]:
    return [int(i) for i in np.asarray(v).reshape(-1)]


def _axes(v, rank: int) -> list[int]:
    return [a % rank for a in _ints(v)]


# -- elementwise -------------------------------------------------------------------------------------------

_BINARY = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "real_div": torch.div, "pow": torch.pow,
           "maximum": torch.maximum, "minimum": torch.minimum, "floor_div": torch.floor_divide,
           "equal": torch.eq, "not_equal": torch.ne, "less": torch.lt, "less_equal": torch.le,
           "greater": torch.gt, "greater_equal": torch.ge, "logical_and": torch.logical_and,
           "logical_or": torch.logical_or, "mod": torch.remainder}
_UNARY = {"sin": torch.sin, "cos": torch.cos, "exp": torch.exp, "sqrt": torch.sqrt, "square": torch.square,
          "sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": F.relu, "silu": F.silu, "abs": torch.abs,
          "erf": torch.erf, "floor": torch.floor, "ceil": torch.ceil, "round": torch.round, "sign": torch.sign,
          "logical_not": torch.logical_not, "identity": lambda x: x}


def _binary(fn):
    return lambda x, y: fn(x, y)


for _name, _fn in _BINARY.items():
    _OPS[_name] = _binary(_fn)
for _name, _fn in _UNARY.items():
    _OPS[_name] = (lambda f: lambda x: f(x))(_fn)


@op("log")
def _log(x, epsilon=1e-45):
    return torch.log(x + float(epsilon))


@op("rsqrt")
def _rsqrt(x, epsilon=1e-12):
    return torch.rsqrt(x + float(epsilon))


@op("inverse")
def _inverse(x, epsilon=1e-4):
    return 1.0 / (x + float(epsilon))


@op("clip")
def _clip(x, alpha, beta):
    return x.clamp(float(alpha), float(beta))


@op("gelu")
def _gelu(x, mode="EXACT"):
    if mode == "TANH_APPROXIMATION":
        return F.gelu(x, approximate="tanh")
    if mode == "SIGMOID_APPROXIMATION":
        return x * torch.sigmoid(1.702 * x)
    return F.gelu(x)


@op("softmax")
def _softmax(x, axis=-1):
    return torch.softmax(x, dim=int(axis))


@op("select")
def _select(cond, a, b):
    return torch.where(cond.bool(), a, b)


@op("cast")
def _cast(x, dtype):
    return x.to({"int32": torch.int64, "int64": torch.int64, "bool": torch.bool}.get(str(dtype), torch.float32))


# -- reductions and normalisation --------------------------------------------------------------------------

def _reduce(fn):
    def run(x, axes=None, keep_dims=False):
        dims = list(range(x.ndim)) if axes is None else _axes(axes, x.ndim)
        return fn(x, dim=dims, keepdim=bool(keep_dims))

    return run


_OPS["reduce_mean"] = _reduce(torch.mean)
_OPS["reduce_sum"] = _reduce(torch.sum)
_OPS["reduce_max"] = _reduce(lambda x, dim, keepdim: torch.amax(x, dim=dim, keepdim=keepdim))
_OPS["reduce_min"] = _reduce(lambda x, dim, keepdim: torch.amin(x, dim=dim, keepdim=keepdim))




def _reduce_arg(fn):
    return lambda x, axis=-1, keep_dims=False: fn(x, dim=int(axis), keepdim=bool(keep_dims))


_OPS["reduce_argmax"] = _reduce_arg(torch.argmax)  # Apple's text encoders pool at argmax(input_ids)
_OPS["reduce_argmin"] = _reduce_arg(torch.argmin)


@op("layer_norm")
def _layer_norm(x, axes, gamma=None, beta=None, epsilon=1e-5):
    dims = _axes(axes, x.ndim)
    mean = x.mean(dim=dims, keepdim=True)
    var = (x - mean).square().mean(dim=dims, keepdim=True)
    out = (x - mean) * torch.rsqrt(var + float(epsilon))
    shape = [x.shape[d] if d in dims else 1 for d in range(x.ndim)]
    if gamma is not None:
        out = out * gamma.reshape(shape)
    if beta is not None:
        out = out + beta.reshape(shape)
    return out


@op("instance_norm")
def _instance_norm(x, gamma=None, beta=None, epsilon=1e-5):
    return F.instance_norm(x, weight=gamma, bias=beta, eps=float(epsilon))


@op("batch_norm")
def _batch_norm(x, mean, variance, gamma=None, beta=None, epsilon=1e-5):
    return F.batch_norm(x, mean, variance, weight=gamma, bias=beta, eps=float(epsilon))


# -- linear algebra ----------------------------------------------------------------------------------------

@op("linear")
def _linear(x, weight, bias=None):
    return F.linear(x, weight, bias)


@op("matmul")
def _matmul(x, y, transpose_x=False, transpose_y=False):
    if transpose_x:
        x = x.transpose(-1, -2)
    if transpose_y:
        y = y.transpose(-1, -2)
    return torch.matmul(x, y)


@op("einsum")
def _einsum(values, equation):
    return torch.einsum(str(equation), *values)


def _same_padding(size: int, kernel: int, stride: int, dilation: int, lower: bool) -> tuple[int, int]:
    total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    small = total // 2
    return (total - small, small) if lower else (small, total - small)


@op("conv")
def _conv(x, weight, bias=None, strides=None, pad_type="valid", pad=None, dilations=None, groups=1):
    nd = x.ndim - 2
    strides = _ints(strides) if strides is not None else [1] * nd
    dil = _ints(dilations) if dilations is not None else [1] * nd
    if pad_type == "custom":
        p = _ints(pad)  # (begin, end) per spatial axis
        pairs = [(p[2 * i], p[2 * i + 1]) for i in range(nd)]
    elif pad_type in ("same", "same_lower"):
        pairs = [_same_padding(x.shape[2 + i], weight.shape[2 + i], strides[i], dil[i], pad_type == "same_lower")
                 for i in range(nd)]
    else:
        pairs = [(0, 0)] * nd
    if any(a or b for a, b in pairs):
        x = F.pad(x, [v for a, b in reversed(pairs) for v in (a, b)])
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
    return fn(x, weight, bias, stride=strides, dilation=dil, groups=int(groups))


# -- shapes and indexing -----------------------------------------------------------------------------------

@op("reshape")
def _reshape(x, shape):
    return x.reshape(_ints(shape))


@op("transpose")
def _transpose(x, perm):
    return x.permute(_ints(perm))


@op("expand_dims")
def _expand_dims(x, axes):
    rank = x.ndim + len(_ints(axes))
    for a in sorted(a % rank for a in _ints(axes)):
        x = x.unsqueeze(a)
    return x


@op("squeeze")
def _squeeze(x, axes=None):
    if axes is None:
        return x.squeeze()
    for a in sorted(_axes(axes, x.ndim), reverse=True):
        x = x.squeeze(a)
    return x


@op("shape")
def _shape(x):
    return torch.tensor(list(x.shape), dtype=torch.int64)


@op("concat")
def _concat(values, axis, interleave=False):
    if interleave:
        raise NotImplementedError("concat with interleave")
    parts = [torch.as_tensor(v) for v in values]
    parts = [v.reshape(1) if v.ndim == 0 else v for v in parts]  # scalars in shape arithmetic
    if len({p.dtype for p in parts}) > 1:
        parts = [p.float() for p in parts]
    return torch.cat(parts, dim=int(axis))


@op("stack")
def _stack(values, axis):
    return torch.stack([torch.as_tensor(v) for v in values], dim=int(axis))


@op("split")
def _split(x, axis, num_splits=None, split_sizes=None):
    dim = int(axis)
    if split_sizes is not None:
        return tuple(torch.split(x, _ints(split_sizes), dim=dim))
    return tuple(torch.chunk(x, int(num_splits), dim=dim))


@op("slice_by_index")
def _slice_by_index(x, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    rank = x.ndim
    begin, end = _ints(begin), _ints(end)
    stride = _ints(stride) if stride is not None else [1] * rank
    bm = list(np.asarray(begin_mask).reshape(-1)) if begin_mask is not None else [False] * rank
    em = list(np.asarray(end_mask).reshape(-1)) if end_mask is not None else [False] * rank
    sm = list(np.asarray(squeeze_mask).reshape(-1)) if squeeze_mask is not None else [False] * rank
    index = []
    for i in range(rank):
        if sm[i]:
            index.append(begin[i])
            continue
        s = stride[i]
        b = None if bm[i] else begin[i]
        e = None if em[i] else end[i]
        if s < 0:
            raise NotImplementedError("slice_by_index with a negative stride")
        index.append(slice(b, e, s))
    return x[tuple(index)]


@op("slice_by_size")
def _slice_by_size(x, begin, size):
    index = []
    for i, (b, n) in enumerate(zip(_ints(begin), _ints(size))):
        b = b % x.shape[i] if b < 0 else b
        index.append(slice(b, None if n == -1 else b + n))
    return x[tuple(index)]


@op("gather")
def _gather(x, indices, axis=0, batch_dims=0, validate_indices=False):
    if int(batch_dims):
        raise NotImplementedError("gather with batch_dims")
    dim = int(axis) % x.ndim
    idx = torch.as_tensor(indices).long()
    idx = torch.where(idx < 0, idx + x.shape[dim], idx)
    out = torch.index_select(x, dim, idx.reshape(-1))
    return out.reshape((*x.shape[:dim], *idx.shape, *x.shape[dim + 1:]))


@op("gather_nd")
def _gather_nd(x, indices, batch_dims=0, validate_indices=False):
    """x[i_0, ..., i_{K-1}] for each K-vector of `indices` (..., K): shape indices[:-1] + x[K:]."""
    if int(batch_dims):
        raise NotImplementedError("gather_nd with batch_dims")
    idx = torch.as_tensor(indices).long()
    k = idx.shape[-1]
    flat = idx.reshape(-1, k)
    picked = x[tuple(flat[:, j] % x.shape[j] for j in range(k))]
    return picked.reshape(*idx.shape[:-1], *x.shape[k:])


@op("tile")
def _tile(x, reps):
    return x.repeat(_ints(reps))


@op("pad")
def _pad(x, pad, mode="constant", constant_val=0.0):
    p = _ints(pad)  # (begin, end) per axis from the first padded axis
    pairs = [(p[2 * i], p[2 * i + 1]) for i in range(len(p) // 2)]
    flat = [v for a, b in reversed(pairs) for v in (a, b)]
    if mode == "constant":
        return F.pad(x, flat, value=float(constant_val))
    return F.pad(x, flat, mode={"reflect": "reflect", "replicate": "replicate"}[str(mode)])


@op("upsample_nearest_neighbor")
def _upsample_nearest(x, scale_factor_height=1, scale_factor_width=1):
    return F.interpolate(x, scale_factor=(float(scale_factor_height), float(scale_factor_width)), mode="nearest")


@op("fill")
def _fill(shape, value=0.0):
    return torch.full(_ints(shape), float(value))


@op("range_1d")
def _range_1d(end, start, step):
    return torch.arange(float(start), float(end), float(step))


# -- the program -------------------------------------------------------------------------------------------

def _weights_dir(package: Path) -> Path:
    return package / "Data" / "com.apple.CoreML" / "weights"


def import_coremltools():
    """coremltools, imported quietly: off macOS it logs a line per missing native proxy, and a warning for
    any torch newer than it was tested with; neither means anything for editsuite's use of it."""
    import logging

    logging.getLogger("coremltools").setLevel(logging.ERROR)
    try:
        import coremltools
    except ImportError:
        raise UserError("Core ML conversion and bundles need coremltools; install it with: "
                        "pip install 'editsuite[coreml]'") from None
    return coremltools


def load_program(package: str | Path):
    """The package's MIL program (coremltools' Program), read back without Core ML."""
    ct = import_coremltools()
    from coremltools.converters.mil.frontend.milproto.load import load

    package = Path(package)
    if not (package / "Manifest.json").is_file():
        raise UserError(f"{package} is not a Core ML package (.mlpackage); convert again with `editsuite convert`")
    spec = ct.utils.load_spec(str(package))
    return load(spec, specification_version=spec.specificationVersion, file_weights_dir=str(_weights_dir(package)))


def _is_float(t: torch.Tensor) -> bool:
    return t.is_floating_point()


def _to_torch(value) -> Any:
    if isinstance(value, np.ndarray):
        if value.dtype == np.bool_:
            return torch.from_numpy(value.copy())
        if np.issubdtype(value.dtype, np.floating):
            return torch.from_numpy(value.astype(np.float32))
        return torch.from_numpy(value.astype(np.int64))
    if isinstance(value, (np.floating, float)):
        return float(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    return value  # strings, bools


class Program:
    """Runs one converted package. `program(**inputs)` -> {output name: tensor}, computed in fp32 (or with
    every value the program types as fp16 rounded to fp16 when `fp16`)."""

    def __init__(self, package: str | Path, *, fp16: bool = False):
        self.path = Path(package)
        self.fp16 = fp16
        program = load_program(self.path)
        main = program.functions["main"]
        self.input_names = list(main.inputs)
        from coremltools.converters.mil.mil import types

        # the values the program computes in fp16: only these are rounded when `fp16`
        self.half = {n for n, v in main.inputs.items() if v.dtype == types.fp16}
        self.half |= {v.name for o in main.operations for v in o.outputs if v.dtype == types.fp16}
        self.output_names = [v.name for v in main.outputs]
        self.consts: dict[str, Any] = {}
        # the largest rank of any tensor in the program (the Neural Engine wants at most 4)
        self.max_rank = max((len(v.shape) for o in main.operations for v in o.outputs if v.shape is not None),
                            default=0)
        self.steps: list[tuple[str, dict, list[str]]] = []  # (op type, {param: name | [names] | None}, outputs)
        for o in main.operations:
            if o.op_type == "const" or o.op_type.startswith("constexpr_"):
                value = o.outputs[0].val
                if value is None:  # compressed weights: expanded by the op's own value inference
                    value = o.materialized_val_inference() if hasattr(o, "materialized_val_inference") \
                        else o.value_inference()
                self.consts[o.outputs[0].name] = _to_torch(np.asarray(value) if not np.isscalar(value)
                                                           and not isinstance(value, str) else value)
                continue
            if o.op_type not in _OPS:
                raise UserError(f"{self.path.name}: op {o.op_type!r} is not supported by the reference executor")
            params = {}
            for key, var in o.inputs.items():
                params[key] = [v.name for v in var] if isinstance(var, (list, tuple)) else var.name
            self.steps.append((o.op_type, params, [v.name for v in o.outputs]))
        self.last_use = self._last_uses()

    def _last_uses(self) -> dict[str, int]:
        last: dict[str, int] = {}
        for i, (_, params, _) in enumerate(self.steps):
            for ref in params.values():
                for name in ref if isinstance(ref, list) else [ref]:
                    last[name] = i
        for name in self.output_names:
            last[name] = len(self.steps)  # never freed
        return last

    def op_histogram(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for kind, _, _ in self.steps:
            counts[kind] = counts.get(kind, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: -kv[1]))

    def _value(self, env, name):
        return env[name] if name in env else self.consts[name]

    @torch.inference_mode()
    def __call__(self, **inputs) -> dict[str, torch.Tensor]:
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise ValueError(f"{self.path.name} needs the inputs {missing}")
        env: dict[str, Any] = {}
        for name in self.input_names:
            t = torch.as_tensor(inputs[name])
            env[name] = self._round(name, t.float()) if t.is_floating_point() else t.long()
        for i, (kind, params, outs) in enumerate(self.steps):
            args = {k: ([self._value(env, n) for n in ref] if isinstance(ref, list) else self._value(env, ref))
                    for k, ref in params.items()}
            try:
                result = _OPS[kind](**args)
            except Exception as e:  # name the op: a failure deep in a program is otherwise unreadable
                raise RuntimeError(f"{self.path.name}: op {kind} -> {outs[0]} failed: {e}") from e
            results = result if isinstance(result, tuple) else (result,)
            for name, value in zip(outs, results):
                env[name] = self._round(name, value) if isinstance(value, torch.Tensor) else value
            for ref in params.values():
                for name in ref if isinstance(ref, list) else [ref]:
                    if self.last_use.get(name) == i and name in env:
                        del env[name]
        return {name: env[name] for name in self.output_names}

    def _round(self, name: str, t: torch.Tensor) -> torch.Tensor:
        if self.fp16 and name in self.half and t.is_floating_point():
            return t.half().float()
        return t
