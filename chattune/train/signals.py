"""Stop signals over the whole run, not only its training loop.

Training itself is covered by `callbacks.PreemptionCallback` (a checkpoint at the end of the step, exit 143). Around
it, `RunSignals`:
- before training (data preparation, model loading), SIGTERM and SIGUSR1 raise `Stopped`, which unwinds like Ctrl-C:
  the data cache's temporary files are removed on the way and the CLI exits 143 without a traceback (the default
  action would kill the process where it stands, leaving them);
- after the last step (evaluation, the final save), a signal is noted and the result is saved first: the run is
  finished, so it ends as usual (exit 0). A second Ctrl-C stops at once.
"""

from __future__ import annotations

import signal
import sys
from typing import Any

from chattune.errors import Stopped

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class RunSignals:
    def __init__(self) -> None:
        self.finished_training = False
        self.received = 0  # a signal that arrived after the last step
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> RunSignals:
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        while self._previous:
            sig, handler = self._previous.popitem()
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if not self.finished_training:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise Stopped(signum)
        if signum == signal.SIGINT and self.received:
            raise KeyboardInterrupt
        self.received = signum
        print(f"\n{signal.Signals(signum).name} after the last step: the result is saved first, then the run ends "
              "(Ctrl-C again to stop at once, without it)", file=sys.stderr, flush=True)
