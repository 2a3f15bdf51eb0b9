"""The one convention between a family's entry-point models and its engine core (`core_server.py`).

Every served model of a family (each method model, its `_stream` twin, each component model) is a thin
entry point that forwards its request by BLS to the family's one core model (`core`, or ``<family>.core``),
which holds the engines once. The core's request is:

- `request` (BYTES, one JSON object): ``kind`` (``method``, ``component`` or ``cancel``), ``name`` (the method
  or component), ``token`` (the entry's name for this request, which a ``cancel`` names), and for a method
  ``call`` (its parameters as the method's keywords), ``format``, ``outputs`` (the result outputs wanted),
  ``stream`` (send progress responses), ``preview_every`` and ``timeout_s`` (the client's own queue limit);
- a method's image inputs as BYTES tensors under their own names (`IMAGE_INPUTS`);
- a component's inputs as ``<component>.<input>`` with the declared dims, batch included; its outputs come
  back as ``<component>.<output>``.

Its responses carry the method outputs (`pixels` always with a leading frame dim: [1, H, W, 3] for an image),
the progress tensors of a stream, or the component's outputs.
"""

from __future__ import annotations

import json
from typing import Any

from ti2i.client.registry import METHODS
from ti2i.families import served_name

CORE_MODEL = "core"
REQUEST = "request"
METHOD, COMPONENT, CANCEL = "method", "component", "cancel"
IMAGE_INPUTS = tuple(sorted({name for method in METHODS.values() for name in method.images}))


def core_name(family: str | None) -> str:
    return served_name(family, CORE_MODEL)


def component_tensor(component: str, tensor: str) -> str:
    """A component's tensor as the core names it: components share tensor names (`sample`, `image`)."""
    return f"{component}.{tensor}"


def envelope(kind: str, name: str, token: str, **fields: Any) -> bytes:
    return json.dumps({"kind": kind, "name": name, "token": token, **fields}).encode()


def read_envelope(data: bytes) -> dict[str, Any]:
    return json.loads(data)
