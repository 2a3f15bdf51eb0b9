"""Tensor and component specifications: the part of a component's declaration that every layer reads.

A `ComponentSpec` names a component's inputs and outputs with their dtypes and shapes, where a shape
entry is either a fixed size or a symbolic dimension (``"batch"``, ``"height"``, ...) whose allowed
range is kept in `dims`. Export writes ONNX dynamic axes from it, engines validate their inputs
against it, the Triton generator renders ``config.pbtxt`` from it and the clients build requests
from it. It is plain data (JSON round-trip) so that none of those layers needs torch.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ti2i.errors import ComponentOutputError, InvalidInputError

Dim = int | str
BATCH = "batch"
FLOAT_DTYPES = ("float32", "float16")

# numpy dtype name -> Triton data type (model config enum suffix and the wire name).
TRITON_DTYPES: dict[str, str] = {
    "float32": "FP32",
    "float16": "FP16",
    "int32": "INT32",
    "int64": "INT64",
    "uint8": "UINT8",
    "bool": "BOOL",
    "object": "STRING",
}


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor: dtype (a numpy dtype name; ``object`` for strings) and shape."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]
    # Values that sample inputs are drawn from (export validation and tests), [low, high).
    sample_range: tuple[float, float] = (-1.0, 1.0)
    # Values an input may hold, [low, high] inclusive (None: any). Floating-point tensors must be finite
    # whatever the limits: NaN or inf in, a NaN image out.
    limits: tuple[float, float] | None = None

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def floating(self) -> bool:
        return self.dtype in ("float32", "float16")

    def to_json(self) -> dict[str, Any]:
        data = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape),
                "sample_range": list(self.sample_range)}
        if self.limits is not None:
            data["limits"] = list(self.limits)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TensorSpec:
        limits = data.get("limits")  # manifests written before value limits have none
        return cls(data["name"], data["dtype"], tuple(data["shape"]), tuple(data.get("sample_range", (-1.0, 1.0))),
                   None if limits is None else (float(limits[0]), float(limits[1])))


@dataclass(frozen=True)
class ComponentSpec:
    """A component's interface: inputs, outputs and the allowed range of each symbolic dimension.

    When `batched` is true every tensor's first dimension is ``"batch"``: the server may then
    concatenate requests along it (Triton's ``max_batch_size`` is the batch range's maximum).
    """

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dims: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    batched: bool = True
    # The size each symbolic dim usually takes (the model's default resolution, the CFG batch): the size
    # compiled engines tune for (TensorRT's profile "opt"). Optional: a dim without one tunes for its minimum.
    opt: Mapping[str, int] = field(default_factory=dict)

    @property
    def max_batch(self) -> int:
        return self.dims[BATCH][1] if self.batched else 0

    def input(self, name: str) -> TensorSpec:
        return _by_name(self.inputs, name, self.name)

    def output(self, name: str) -> TensorSpec:
        return _by_name(self.outputs, name, self.name)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "dims": {k: list(v) for k, v in self.dims.items()},
            "batched": self.batched,
            **({"opt": dict(self.opt)} if self.opt else {}),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ComponentSpec:
        return cls(
            name=data["name"],
            inputs=tuple(TensorSpec.from_json(t) for t in data["inputs"]),
            outputs=tuple(TensorSpec.from_json(t) for t in data["outputs"]),
            dims={k: (int(v[0]), int(v[1])) for k, v in data["dims"].items()},
            batched=bool(data.get("batched", True)),
            opt={k: int(v) for k, v in data.get("opt", {}).items()},
        )

    def with_float_dtype(self, dtype: str, keep: frozenset[str] = frozenset()) -> ComponentSpec:
        """The same interface with every floating tensor (but those named in `keep`) of `dtype`."""
        def cast(tensor: TensorSpec) -> TensorSpec:
            floating = tensor.dtype in FLOAT_DTYPES and tensor.name not in keep
            return replace(tensor, dtype=dtype) if floating else tensor

        return replace(self, inputs=tuple(map(cast, self.inputs)), outputs=tuple(map(cast, self.outputs)))

    def interface(self) -> ComponentSpec:
        """What callers exchange with this component: float32 wherever the graph holds float16."""
        return self.with_float_dtype("float32")

    def cast_inputs(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """float32 arrays cast to the float16 the spec declares (the engine boundary); nothing else changes."""
        out = dict(inputs)
        for tensor in self.inputs:
            value = out.get(tensor.name)
            if tensor.dtype == "float16" and isinstance(value, np.ndarray) and value.dtype == np.float32:
                out[tensor.name] = value.astype(np.float16)
        return out

    def validate_inputs(self, inputs: Mapping[str, np.ndarray]) -> dict[str, int]:
        """Check names, dtypes, ranks and dimension ranges; return the bound symbolic dims.

        Raises `InvalidInputError` naming the tensor, what was expected and what came.
        """
        expected = {t.name for t in self.inputs}
        missing = expected - inputs.keys()
        unknown = inputs.keys() - expected
        if missing or unknown:
            raise InvalidInputError(
                f"{self.name}: expected inputs {sorted(expected)}, got {sorted(inputs)}"
                + (f" (missing {sorted(missing)})" if missing else "")
                + (f" (unknown {sorted(unknown)})" if unknown else "")
            )
        bound: dict[str, int] = {}
        for tensor in self.inputs:
            value = inputs[tensor.name]
            _check_tensor(self, tensor, value, bound)
        for tensor in self.inputs:
            _check_values(f"{self.name}.{tensor.name}", tensor, inputs[tensor.name], InvalidInputError)
        return bound

    def validate_outputs(self, outputs: Mapping[str, np.ndarray]) -> None:
        """Refuse non-finite outputs: raises `ComponentOutputError` naming the component and the tensor."""
        for tensor in self.outputs:
            if tensor.floating and tensor.name in outputs:
                _check_finite(f"{self.name} produced non-finite values in {tensor.name}", outputs[tensor.name],
                              ComponentOutputError)


def as_float32(outputs: Mapping[str, Any]) -> dict[str, Any]:
    """float16 arrays widened to float32: what callers of an fp16 graph get back."""
    return {k: v.astype(np.float32) if isinstance(v, np.ndarray) and v.dtype == np.float16 else v
            for k, v in outputs.items()}


def _check_tensor(spec: ComponentSpec, tensor: TensorSpec, value: Any, bound: dict[str, int]) -> None:
    where = f"{spec.name}.{tensor.name}"
    if not isinstance(value, np.ndarray):
        raise InvalidInputError(f"{where}: expected a numpy array, got {type(value).__name__}")
    if (value.dtype != _np_dtype(tensor.dtype) and value.dtype.name != tensor.dtype  # the name: any byte order
            and not (tensor.dtype == "object" and value.dtype.kind in "OSU")):
        raise InvalidInputError(f"{where}: expected dtype {tensor.dtype}, got {value.dtype.name}")
    if value.ndim != tensor.rank:
        raise InvalidInputError(
            f"{where}: expected rank {tensor.rank} with shape {_shape_str(tensor.shape)}, got shape {value.shape}"
        )
    for axis, (dim, size) in enumerate(zip(tensor.shape, value.shape)):
        if isinstance(dim, int):
            if size != dim:
                raise InvalidInputError(
                    f"{where}: dimension {axis} must be {dim} (shape {_shape_str(tensor.shape)}), got {value.shape}"
                )
            continue
        low, high = spec.dims[dim]
        if not low <= size <= high:
            raise InvalidInputError(
                f"{where}: dimension {axis} ({dim}) must be in [{low}, {high}], got {size} in shape {value.shape}"
            )
        if bound.setdefault(dim, size) != size:
            raise InvalidInputError(
                f"{where}: dimension {axis} ({dim}) is {size} but another input has {dim}={bound[dim]}"
            )


@functools.lru_cache(maxsize=None)
def _np_dtype(name: str) -> np.dtype:
    return np.dtype(name)


def _check_values(where: str, tensor: TensorSpec, value: np.ndarray, error: type[Exception]) -> None:
    """Finite (floating tensors) and within the limits: both read from the smallest and largest value, which
    are NaN or infinite when any value is (every engine call checks its inputs: one pass each, no mask)."""
    if not value.size or tensor.dtype == "object" or (tensor.limits is None and not tensor.floating):
        return
    smallest, largest = value.min(), value.max()
    if tensor.floating and not (np.isfinite(smallest) and np.isfinite(largest)):
        _check_finite(f"{where}: values must be finite", value, error)
    if tensor.limits is not None:
        low, high = tensor.limits
        if smallest < low or largest > high:
            raise error(f"{where}: values must be in [{low:g}, {high:g}], got values in "
                        f"[{float(smallest):g}, {float(largest):g}]")


def _check_finite(what: str, value: np.ndarray, error: type[Exception]) -> None:
    finite = np.isfinite(value)
    if not finite.all():
        nan = int(np.isnan(value).sum())
        raise error(f"{what}, got {nan} NaN and {int(value.size - finite.sum()) - nan} infinite "
                    f"of {value.size} values")


def _shape_str(shape: tuple[Dim, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _by_name(tensors: tuple[TensorSpec, ...], name: str, component: str) -> TensorSpec:
    for tensor in tensors:
        if tensor.name == name:
            return tensor
    raise KeyError(f"{component} has no tensor named {name!r}")


def derived_sizes(dims: Mapping[str, Any], sizes: Mapping[str, int]) -> dict[str, int]:
    """The sizes of the dims named ``DIM/F`` (DIM downsampled F×, rounded up, as stride-2 convolutions do:
    a ControlNet's residuals) from the size of DIM, where `sizes` gives it."""
    out = {}
    for dim in dims:
        base, sep, factor = dim.partition("/")
        if sep and base in sizes:
            out[dim] = -(-sizes[base] // int(factor))
    return out


def sample_inputs(spec: ComponentSpec, sizes: Mapping[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs of the given symbolic sizes (a dim not given: derived from the one it downsamples, else
    its opt size, else its minimum), drawn from each tensor's sample range."""
    rng = np.random.default_rng(seed)
    given = dict(sizes)
    sizes = {**{dim: spec.opt.get(dim, low) for dim, (low, _) in spec.dims.items()}, **given}
    sizes.update({dim: size for dim, size in derived_sizes(spec.dims, sizes).items() if dim not in given})
    out: dict[str, np.ndarray] = {}
    for tensor in spec.inputs:
        shape = tuple(d if isinstance(d, int) else sizes[d] for d in tensor.shape)
        low, high = tensor.sample_range
        if tensor.dtype == "object":
            count = int(np.prod(shape))
            out[tensor.name] = np.array([f"sample text {i}" for i in range(count)], dtype=object).reshape(shape)
        elif np.issubdtype(np.dtype(tensor.dtype), np.integer):
            out[tensor.name] = rng.integers(int(low), int(high), size=shape).astype(tensor.dtype)
        else:
            out[tensor.name] = rng.uniform(low, high, size=shape).astype(tensor.dtype)
    return out
