"""The `ti2i` command line lives in `ti2i.app.cli` (the app shell sits above the library); kept importable here."""

import sys

from ti2i.app.cli import EXIT_USAGE, build_parser, main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
