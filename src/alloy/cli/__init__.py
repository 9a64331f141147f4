"""The `alloy` command line: one typer app, each command a thin wrapper over a library call."""

from __future__ import annotations

import signal
import sys
from types import FrameType


def _terminate(signum: int, frame: FrameType | None) -> None:
    # Turn SIGTERM into an exception so `finally` blocks and atomic writers clean up.
    raise KeyboardInterrupt(f"signal {signum}")


def run() -> None:
    """The console script: import the app (which can take a moment) and run it."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        from alloy.cli.main import main
    except KeyboardInterrupt as exc:
        # A signal before the app exists still gets the one-line answer, not a traceback.
        how = "terminated" if str(exc).startswith("signal") else "interrupted"
        print(f"{how}: alloy stopped while starting; nothing was written", file=sys.stderr)
        sys.exit(130)
    sys.exit(main())
