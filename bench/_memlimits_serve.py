"""`meterlane serve` with the limits counted in each worker's own memory (bench only; see
bench/_memlimits.py): app's command line, with every limit store it builds a
MemoryLimitStore. gunicorn's workers are forked from this process after the patch and build
their app from the same `app` module. Nothing is imported here that the master of a real
serve would not load (the store and its SQLAlchemy come with the worker's app).

    python -m bench._memlimits_serve serve --workers 2
"""

from __future__ import annotations

import sys
from typing import Any


def _memory_store(*_args: Any) -> Any:
    from bench._memlimits import MemoryLimitStore

    return MemoryLimitStore()


def main() -> int:
    import app

    app.limit_store = _memory_store
    app.main()  # click: exits with the command's status
    return 0


if __name__ == "__main__":
    sys.exit(main())
