"""Progress of long loops: a tqdm bar on a terminal, plain lines on a pipe or in a batch job's log
(where a bar would print nothing useful), nothing when disabled."""
from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator


class Progress:
    """Iterate `iterable` (`total` items after `initial` done) with progress shown on stderr.
    enabled: True/False, or None = on (bar on a TTY, else a line every `every` items and at the end)."""

    def __init__(self, iterable: Iterable, total: int, desc: str, initial: int = 0, every: int = 10,
                 enabled: bool | None = None) -> None:
        self.iterable, self.total, self.desc, self.done = iterable, total, desc, initial
        self.every, self.enabled = max(1, every), enabled is not False
        self.postfix: dict[str, str] = {}
        self._bar = None
        self._t0, self._start = time.perf_counter(), initial
        if self.enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm
            self._bar = tqdm(total=total, initial=initial, desc=desc)

    def set_postfix(self, values: dict) -> None:
        self.postfix = {k: f"{v:.3g}" if isinstance(v, float) else str(v) for k, v in values.items()}
        if self._bar is not None:
            self._bar.set_postfix(self.postfix)

    def _line(self) -> None:
        elapsed = time.perf_counter() - self._t0
        n = self.done - self._start
        rate = n / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        extra = " ".join(f"{k}={v}" for k, v in self.postfix.items())
        print((f"{self.desc}: {self.done}/{self.total} [{elapsed:.0f}s, {rate:.3g} it/s, "
               f"eta {eta:.0f}s] {extra}").rstrip(),
              file=sys.stderr, flush=True)

    def tick(self) -> None:
        """One more item done (for work that reports its steps by callback instead of iterating)."""
        self.done += 1
        if self._bar is not None:
            self._bar.update(1)
        elif self.enabled and (self.done % self.every == 0 or self.done == self.total):
            self._line()

    def end_early(self, note: str) -> None:
        """The current item is the last (a stop condition; the loop breaks out after this): count
        it and end the display on it, with `note` saying why."""
        self.postfix["stopped"] = note
        self.done += 1
        if self._bar is not None:
            self._bar.set_postfix(self.postfix, refresh=False)
            self._bar.update(1)
        elif self.enabled:
            self._line()
        self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable:
                yield item
                self.tick()
        finally:
            self.close()
