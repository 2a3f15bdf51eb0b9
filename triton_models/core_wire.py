"""The one convention between a family's entry-point models and its engine core (`core_server.py`).

Every served model of a family (each method model, its `_stream` twin, each component model) is a thin
entry point that forwards its request by BLS to the family's one core model (`core`, or ``<family>.core``),
which holds the engines once. The core's request is:

- `request` (BYTES, one JSON object): ``kind`` (``method``, ``component``, ``cancel`` or ``orphaned``),
  ``name`` (the method or component; for ``orphaned``, an entry model whose stub died: its requests are
  cancelled), ``token`` (this request's name, which a ``cancel`` names: the HTTP guard's `TOKEN_HEADER`
  when it sent one, else the entry's), ``secret`` (the repository's, `SECRET_FILE` in the core's folder: the
  core answers its entry points and the guard only, never a client that calls it by name), and for a method
  ``call`` (its parameters as the method's keywords), ``origin`` (the entry model's name), ``format``, ``outputs`` (the result outputs wanted),
  ``stream`` (send progress responses), ``preview_every`` and ``timeout_s`` (the client's own queue limit);
- a method's image inputs as BYTES tensors under their own names (`IMAGE_INPUTS`);
- a component's inputs as ``<component>.<input>`` with the declared dims, batch included; its outputs come
  back as ``<component>.<output>``.

Its responses carry the method outputs (`pixels` always with a leading frame dim: [1, H, W, 3] for an image),
the progress tensors of a stream, or the component's outputs. A failure is an error response, except in a
stream: there it is a response whose `ERROR` tensor holds the error's text (``Type: message``), because
Triton 2.51's python backend lost the error response of a streamed request whose loop had begun (an engine
refusing it at the first step): the BLS caller, and its client, waited for good.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

from ti2i.client.registry import METHODS
from ti2i.families import served_name

CORE_MODEL = "core"
SECRET_FILE = "secret"
# The HTTP guard names each request it forwards (Triton forwards the header as a request parameter): when
# its client hangs up, it cancels the request in the core by that name (Triton's HTTP frontend does not).
TOKEN_HEADER = "ti2i-request-token"
REQUEST = "request"
ERROR = "error"
METHOD, COMPONENT, CANCEL, ORPHANED = "method", "component", "cancel", "orphaned"
IMAGE_INPUTS = tuple(sorted({name for method in METHODS.values() for name in method.all_images}))


def core_name(family: str | None) -> str:
    return served_name(family, CORE_MODEL)


def component_tensor(component: str, tensor: str) -> str:
    """A component's tensor as the core names it: components share tensor names (`sample`, `image`)."""
    return f"{component}.{tensor}"


def core_of(model: str) -> str:
    """The core of the family that serves `model` (``sd.sdedit`` -> ``sd.core``, ``sdedit`` -> ``core``)."""
    family, dot, _ = model.rpartition(".")
    return f"{family}{dot}{CORE_MODEL}"


def write_secret(core_dir: Path) -> None:
    path = core_dir / SECRET_FILE
    path.write_text(secrets.token_hex(16))
    path.chmod(0o600)


def read_secret(core_dir: Path) -> str:
    return (core_dir / SECRET_FILE).read_text().strip()


def envelope(kind: str, name: str, token: str, secret: str, **fields: Any) -> bytes:
    return json.dumps({"kind": kind, "name": name, "token": token, "secret": secret, **fields}).encode()


def generate_body(kind: str, name: str, token: str, secret: str) -> bytes:
    """A `cancel` or `orphaned` request as the JSON body of Triton's HTTP generate endpoint for the core (the HTTP
    guard's and the supervisor's way in, on loopback)."""
    return json.dumps({REQUEST: envelope(kind, name, token, secret).decode()}).encode()


def read_envelope(data: bytes) -> dict[str, Any]:
    return json.loads(data)
