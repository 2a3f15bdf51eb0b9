"""Make a graph traced from an fp16 module uniformly fp16, apart from its declared float32 islands.

A module loaded in fp16 traces to an fp16 graph, but the TorchScript exporter's type analysis
turns some 0-d constants into float32 and then promotes whatever they touch (CLIP's causal mask
makes half of each attention block float32), leaving ops whose inputs disagree in type
(LayerNormalization with a float32 input and float16 weights), which ONNX Runtime rejects and
TensorRT's strongly typed networks would run in float32. This pass keeps float32 only where the
module computes in float32 on purpose: everything reachable from the float32 inputs (the
timestep's sinusoidal embedding, cast to fp16 by the module itself) and whatever feeds it.
Everything else becomes float16.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

# Op inputs the ONNX spec requires to be float32 whatever the data type (Resize's scales).
ALWAYS_FLOAT_INPUTS = {"Resize": (2,), "Upsample": (1,)}


def unify_fp16(model: onnx.ModelProto, fp32_inputs: set[str]) -> onnx.ModelProto:
    """Return `model` with every float32 tensor outside the float32 islands turned float16."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type
             for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    types.update({i.name: i.data_type for i in inferred.graph.initializer})
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for slot, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, slot))

    island = _float32_island(graph, types, producer, fp32_inputs)
    for node in graph.node:
        if id(node) in island:
            continue
        if node.op_type == "Cast" and _attr(node, "to").i == TensorProto.FLOAT:
            _attr(node, "to").i = TensorProto.FLOAT16
        elif node.op_type in ("Constant", "ConstantOfShape"):
            value = _attr(node, "value")
            if value is not None and value.t.data_type == TensorProto.FLOAT and _may_convert(node.output[0],
                                                                                               consumers, island):
                value.t.CopyFrom(_to_fp16(value.t))
    for i, init in enumerate(graph.initializer):
        if init.data_type == TensorProto.FLOAT and _may_convert(init.name, consumers, island):
            graph.initializer[i].CopyFrom(_to_fp16(init))
    for value in (*graph.input, *graph.output):
        if value.type.tensor_type.elem_type == TensorProto.FLOAT and value.name not in fp32_inputs:
            value.type.tensor_type.elem_type = TensorProto.FLOAT16
    del graph.value_info[:]
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)


def _float32_island(graph: onnx.GraphProto, types: dict[str, int], producer: dict[str, onnx.NodeProto],
                    fp32_inputs: set[str]) -> set[int]:
    """Ids of the nodes that stay float32: downstream of the float32 inputs until a cast to fp16, plus
    everything that produces their float32 inputs (constants of the frequency table, ...)."""
    fp32_values = set(fp32_inputs)
    island: set[int] = set()
    for node in graph.node:  # topological order
        if any(i in fp32_values for i in node.input) and not _casts_to_fp16(node):
            island.add(id(node))
            fp32_values.update(o for o in node.output if types.get(o) == TensorProto.FLOAT)
    stack = [n for n in graph.node if id(n) in island]
    while stack:
        node = stack.pop()
        for name in node.input:
            source = producer.get(name)
            if source is not None and id(source) not in island and types.get(name) != TensorProto.FLOAT16:
                island.add(id(source))
                stack.append(source)
    return island


def _casts_to_fp16(node: onnx.NodeProto) -> bool:
    return node.op_type == "Cast" and _attr(node, "to").i == TensorProto.FLOAT16


def _may_convert(name: str, consumers: dict, island: set[int]) -> bool:
    uses = consumers.get(name, [])
    return all(id(node) not in island and slot not in ALWAYS_FLOAT_INPUTS.get(node.op_type, ())
               for node, slot in uses)


def _attr(node: onnx.NodeProto, name: str):
    return next((a for a in node.attribute if a.name == name), None)


def _to_fp16(tensor: onnx.TensorProto) -> onnx.TensorProto:
    array = numpy_helper.to_array(tensor)
    return numpy_helper.from_array(np.clip(array, -65504, 65504).astype(np.float16), tensor.name)
