"""The directory of a multi-family server: a model named `families` that says which families are served
and their models, to every client.

The repository index says the same but is restricted to the server's key (its API also loads and unloads
models); model configurations and inference are open. So a client without the key or a `--family` reads
this model's configuration (parameter ``families``: JSON ``{family: [served model names]}``) and finds a
method's family; an inference returns the same JSON (one BYTES element), for curl.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from ti2i.errors import ModelNotFoundError
from ti2i.families import served_name

DIRECTORY_MODEL = "families"
PARAMETER = "families"
OUTPUT = "families"


def directory_config(families: Mapping[str, Sequence[str]]) -> mc.ModelConfig:
    config = mc.ModelConfig(name=DIRECTORY_MODEL, backend="python", max_batch_size=0)
    config.output.add(name=OUTPUT, data_type=mc.TYPE_STRING, dims=[1])
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)
    config.parameters[PARAMETER].string_value = json.dumps({f: sorted(m) for f, m in families.items()})
    return config


def listing(config: Mapping[str, Any]) -> dict[str, list[str]]:
    """The families and their served models from the directory model's configuration (as JSON)."""
    return json.loads(config.get("parameters", {}).get(PARAMETER, {}).get("string_value", "{}"))


def family_serving(families: Mapping[str, Sequence[str]], model: str) -> str:
    """The one family that serves `model` (a plain name such as ``sdedit``), or an error naming the families."""
    serving = [family for family, models in families.items() if served_name(family, model) in models]
    if len(serving) == 1:
        return serving[0]
    names = ", ".join(sorted(families))
    if serving:
        raise ModelNotFoundError(f"{model!r} is served by several families ({', '.join(serving)}): name one "
                                 f"(family= / --family)")
    raise ModelNotFoundError(f"no family serves {model!r} (families: {names})")


class DirectoryModel:
    """The python-backend model: answers every request with the listing."""

    def initialize(self, args: dict[str, str]) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        self.listing = json.loads(args["model_config"])["parameters"][PARAMETER]["string_value"].encode()

    def execute(self, requests: list[Any]) -> list[Any]:
        tensor = self.pb.Tensor(OUTPUT, np.array([self.listing], dtype=object))
        return [self.pb.InferenceResponse(output_tensors=[tensor]) for _ in requests]
