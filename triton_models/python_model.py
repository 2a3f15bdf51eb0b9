"""The python-backend model behind every served component: host the component's engine.

`execute` validates each request against the component's spec and the instance's memory budget (a
bad or unaffordable request gets INVALID_ARG and never affects the others), concatenates the valid
requests that share a shape along the batch dimension in chunks that fit the budget, runs the engine
once per chunk and splits the outputs back. Runs inside Triton's stub process, where
`triton_python_backend_utils` is importable.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from ti2i.engines.adapters import RANK_AXES, with_defaults
from ti2i.engines.batching import batch_size, budget_chunks, merge_requests, shape_key, split_outputs
from ti2i.engines.loader import load_engine
from ti2i.errors import InvalidInputError, Ti2iError
from ti2i.manifest import Manifest
from ti2i.spec import ComponentSpec, as_float32


def as_spec_rank(spec: ComponentSpec, name: str, value: np.ndarray) -> np.ndarray:
    """Per-sample scalars may arrive as [B, 1]; the engine takes [B]."""
    rank = spec.input(name).rank
    if value.ndim == rank + 1 and value.shape[-1] == 1:
        return value.reshape(value.shape[:-1])
    return value


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        threads = int(params.get("threads", "0")) or None
        budget = int(params["memory_budget"]) if params.get("memory_budget") else None
        self.engine = load_engine(Manifest.load(params["engine_dir"]), params["component"], threads=threads,
                                  budget=budget)
        self.spec = self.engine.spec.interface()  # float32 on the wire; the engine casts for fp16 graphs
        self.batched = int(config.get("max_batch_size", 0)) > 0
        # next to an fp16 network (native repositories) a tensor is declared fp16: cast to what is declared
        self.out_dtypes = {o["name"]: pb_utils.triton_string_to_numpy(o["data_type"]) for o in config.get("output", [])}

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        groups: dict[Any, list[tuple[int, dict[str, np.ndarray]]]] = {}
        bounds: dict[Any, dict[str, int]] = {}
        for i, request in enumerate(requests):
            try:
                inputs = with_defaults(self.spec, as_float32({
                    t.name: as_spec_rank(self.spec, t.name, self._input(request, t.name)) for t in self.spec.inputs
                    if t.name not in RANK_AXES or self.pb.get_input_tensor_by_name(request, t.name) is not None}))
                bound = self.engine.check(inputs, self.spec)
            except Ti2iError as err:
                responses[i] = self._error(err, self.pb.TritonError.INVALID_ARG)
                continue
            key = shape_key(inputs) if self.batched else i
            groups.setdefault(key, []).append((i, inputs))
            bounds[key] = bound
        for key, members in groups.items():
            for chunk in self._chunks(members, bounds[key]):
                self._run_group(chunk, responses)
        return responses

    def _chunks(self, members: list[tuple[int, dict[str, np.ndarray]]],
                bound: dict[str, int]) -> list[list[tuple[int, dict[str, np.ndarray]]]]:
        """Consecutive members in groups whose merged batch fits the memory budget."""
        sizes = [batch_size(inputs) for _, inputs in members]
        chunks, start = [], 0
        for count in budget_chunks(self.engine, bound, sizes):
            chunks.append(members[start:start + count])
            start += count
        if len(chunks) > 1:
            self.pb.Logger.log_info(f"{self.spec.name}: {len(members)} requests of {sum(sizes)} items run in "
                                    f"{len(chunks)} batches of {[len(c) for c in chunks]} requests within the "
                                    f"memory budget")
        return chunks

    def _run_group(self, members: list[tuple[int, dict[str, np.ndarray]]], responses: list[Any]) -> None:
        try:
            if len(members) == 1:
                results = [self.engine.run(members[0][1])]
            else:
                batches = [inputs for _, inputs in members]
                merged = self.engine.run(merge_requests(batches))
                results = split_outputs(merged, [batch_size(b) for b in batches])
        except Ti2iError as err:
            if len(members) > 1:  # find the bad request(s): each member alone
                for member in members:
                    self._run_group([member], responses)
                return
            invalid = isinstance(err, InvalidInputError)  # else the component failed (non-finite outputs)
            code = self.pb.TritonError.INVALID_ARG if invalid else self.pb.TritonError.INTERNAL
            responses[members[0][0]] = self._error(err, code)
            return
        except Exception as err:  # an engine failure fails these requests, never the server
            for i, _ in members:
                responses[i] = self._error(err, self.pb.TritonError.INTERNAL)
            return
        for (i, _), outputs in zip(members, results):
            tensors = [self.pb.Tensor(name, np.ascontiguousarray(value, dtype=self.out_dtypes.get(name)))
                       for name, value in outputs.items()]
            responses[i] = self.pb.InferenceResponse(output_tensors=tensors)

    def _input(self, request: Any, name: str) -> np.ndarray:
        tensor = self.pb.get_input_tensor_by_name(request, name)
        if tensor is None:
            raise InvalidInputError(f"{self.spec.name}: missing input {name!r}")
        return tensor.as_numpy()

    def _error(self, err: Exception, code: int) -> Any:
        return self.pb.InferenceResponse(error=self.pb.TritonError(f"{type(err).__name__}: {err}", code))

    def finalize(self) -> None:
        self.engine.close()
