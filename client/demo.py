"""The demo lives in `ti2i.app.demo` (the app shell sits above the library); kept importable here."""

from ti2i.app.demo import run_demo  # noqa: F401
