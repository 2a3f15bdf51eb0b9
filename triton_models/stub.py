"""What every python-backend model of ti2i shares in its stub process.

A stub that crashes while it serves (a native library's fault, the python backend's own: see
docs/design-notes.md, "Faults of the python backend") leaves every thread's Python stack in the server log
(`faulthandler`). Triton 2.51's stub also segfaults as it tears itself down after `finalize`, at every unload
(upstream python_backend #433): harmless, its requests all answered, but with `faulthandler` still on each
model's unload wrote a "Fatal Python error" and a hundred lines of stacks. So it is on from the model's import
until its `finalize` has run.

A stub that is alive but hung (no request of its model answered) writes every thread's Python stack into the
server log on ``SIGUSR1`` (``kill -USR1 <stub pid>``; `supervisor.stub_processes` lists the stubs).
"""

from __future__ import annotations

import faulthandler
import signal
from typing import Any


def served(model: type) -> type:
    """`model` as a stub's ``TritonPythonModel``: Python stacks on a crash from now until its `finalize` ran,
    and on ``SIGUSR1``."""
    faulthandler.enable(all_threads=True)
    faulthandler.register(signal.SIGUSR1, all_threads=True)

    class TritonPythonModel(model):  # type: ignore[misc, valid-type]
        def finalize(self) -> Any:
            try:
                base = getattr(super(), "finalize", None)
                return base() if base is not None else None
            finally:
                faulthandler.disable()

    TritonPythonModel.__doc__ = model.__doc__
    return TritonPythonModel
