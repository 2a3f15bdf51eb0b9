"""Import ti2i from this checkout when it is not installed (a GPU machine with torch and CUDA only).

The package maps its sub-packages onto the repository's top-level folders (``ti2i.engines`` is
``engines/``), so the repository root joins ``ti2i.__path__``.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def ensure_ti2i() -> None:
    try:
        import ti2i.engines.base  # noqa: F401
        return
    except ImportError:
        pass
    sys.path.insert(0, str(ROOT))
    import ti2i

    if str(ROOT) not in ti2i.__path__:
        ti2i.__path__.append(str(ROOT))


ensure_ti2i()
