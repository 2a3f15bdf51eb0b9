"""Group norms that keep fp32 accuracy over large images: the exported graph's statistics in two levels.

Why: torch exports `GroupNorm` as Reshape([N, G, -1]) -> InstanceNormalization -> Reshape, and ONNX
Runtime's CPU InstanceNormalization (like its ReduceMean) sums a group's values into one fp32 running total.
A group of a VAE's first block at 512x512 holds 4 channels x 512² ≈ 1 M values; there the normalised output
is off by ~6e-5 (torch's by ~9e-7), and through an SDXL VAE encoder the latents by 5e-4 of their range
against an fp64 reference, 90x torch fp32's error. Rewritten here, each group's mean and variance are the
mean over its last axis (the image width), then over the rest: no total runs over more than a row or a
column of rows, and the latents are within torch fp32's error. Applied to fp32 graphs only: an fp16 graph's
own rounding is far larger, and a decomposed variance would overflow in fp16.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


_SMALL = 1 << 16  # elements: a shape or a norm's scale; never a weight worth reading from disk here


def _constants(model: Any, base_dir: Path) -> Callable[[str], np.ndarray | None]:
    """The value of a small constant tensor of the graph by name (None for anything else); one in external
    data is read from `base_dir`, the graph's folder."""
    from onnx import TensorProto, numpy_helper
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    tensors = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            tensors[node.output[0]] = node.attribute[0].t

    def value(name: str) -> np.ndarray | None:
        tensor = tensors.get(name)
        if tensor is None or int(np.prod(tensor.dims)) > _SMALL:
            return None
        if uses_external_data(tensor):
            copy = TensorProto()
            copy.CopyFrom(tensor)
            load_external_data_for_tensor(copy, str(base_dir))
            tensor = copy
        return numpy_helper.to_array(tensor)

    return value


def two_level_group_norms(model: Any, base_dir: Path) -> int:
    """Rewrite, in place, each InstanceNormalization fed by a Reshape to [0, G, -1] with constant scale and
    bias (torch's `GroupNorm`); returns how many. The Reshape's source supplies the last axis to split at.
    `base_dir`: where the graph's external data is."""
    from onnx import helper, numpy_helper

    value = _constants(model, base_dir)
    producer = {out: node for node in model.graph.node for out in node.output}
    nodes, initializers, count = [], [], 0
    for node in model.graph.node:
        source = producer.get(node.input[0]) if node.op_type == "InstanceNormalization" else None
        grouping = value(source.input[1]) if source is not None and source.op_type == "Reshape" else None
        scale, bias = (value(node.input[1]), value(node.input[2])) if grouping is not None else (None, None)
        if (grouping is None or grouping.shape != (3,) or grouping[0] != 0 or grouping[2] != -1
                or scale is None or bias is None):
            nodes.append(node)
            continue
        count += 1
        p = f"{node.name or node.output[0]}/two_level"
        x = node.input[0]
        epsilon = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        const = {f"{p}/lead": np.array([0, 0, -1], np.int64), f"{p}/epsilon": np.array(epsilon, np.float32)}

        def mean(of: str, name: str) -> list[Any]:  # over the row, then over the rows and channels of the group
            return [helper.make_node("ReduceMean", [of], [f"{p}/{name}_row"], axes=[3], keepdims=1),
                    helper.make_node("ReduceMean", [f"{p}/{name}_row"], [f"{p}/{name}"], axes=[2], keepdims=1)]

        nodes += [helper.make_node("Shape", [source.input[0]], [f"{p}/width"], start=-1),
                  helper.make_node("Concat", [f"{p}/lead", f"{p}/width"], [f"{p}/rows"], axis=0),
                  helper.make_node("Reshape", [x, f"{p}/rows"], [f"{p}/x"]),  # [N, G, rest, width]
                  *mean(f"{p}/x", "mean"),
                  helper.make_node("Sub", [f"{p}/x", f"{p}/mean"], [f"{p}/centred"]),
                  helper.make_node("Mul", [f"{p}/centred", f"{p}/centred"], [f"{p}/squares"]),
                  *mean(f"{p}/squares", "variance"),
                  helper.make_node("Add", [f"{p}/variance", f"{p}/epsilon"], [f"{p}/variance_eps"]),
                  helper.make_node("Sqrt", [f"{p}/variance_eps"], [f"{p}/std"]),
                  helper.make_node("Div", [f"{p}/centred", f"{p}/std"], [f"{p}/normed"])]
        last = f"{p}/normed"
        for name, op, affine, neutral in (("scale", "Mul", scale, 1), ("bias", "Add", bias, 0)):
            if not np.all(affine == neutral):  # GroupNorm's own affine comes after, outside the pattern
                const[f"{p}/{name}"] = affine.astype(np.float32).reshape(-1, 1, 1)
                nodes.append(helper.make_node(op, [last, f"{p}/{name}"], [f"{p}/{name}d"]))
                last = f"{p}/{name}d"
        nodes += [helper.make_node("Shape", [x], [f"{p}/shape"]),
                  helper.make_node("Reshape", [last, f"{p}/shape"], [node.output[0]])]
        initializers += [numpy_helper.from_array(v, k) for k, v in const.items()]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(initializers)
    return count
