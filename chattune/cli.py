"""Shared CLI behaviour: user errors print one clear message and exit non-zero, never a traceback."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from chattune.errors import Stopped, UserError
from chattune.quiet import quiet_third_party

# Every script imports this module first, before the heavy libraries: their known noise is filtered from the start.
quiet_third_party()

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM


def log(message: str) -> None:
    """Progress and reports go to stderr, so stdout stays free for results (estimates, chat answers)."""
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def main_guard() -> Iterator[None]:
    try:
        yield
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR) from None
    except KeyboardInterrupt:
        print("\ninterrupted (Ctrl-C)", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except Stopped as e:
        import signal

        print(f"stopped by {signal.Signals(e.signum).name} before training started: nothing was trained, temporary "
              "files were removed; run the same command again to start", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_TERMINATED) from None
