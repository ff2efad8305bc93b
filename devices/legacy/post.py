"""Port 0x80, the POST code port: boot-progress markers from firmware and guests.

Linux also writes here as an I/O delay (``io_delay``: ``outb %al, $0x80``),
thousands of times during boot, so only the first ``LOUD_CODES`` writes are
logged at INFO; later ones go to DEBUG and are counted.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Callable

LOUD_CODES = 64
KEPT_CODES = 1024


class PostCode:
    """Insert at ``layout.PORT_POST`` with size 1."""

    def __init__(self, log: logging.Logger = logging.getLogger("pyvmm.post"), *,
                 clock: Callable[[], float] = time.monotonic):
        self.log = log
        self._clock = clock
        self._start = clock()
        self._lock = threading.Lock()
        #: the last ``KEPT_CODES`` writes as (milliseconds since creation, value)
        self.codes: collections.deque[tuple[float, int]] = collections.deque(maxlen=KEPT_CODES)
        self.count = 0  # every write, including those no longer in ``codes``
        self.last = 0

    def read(self, offset: int, data: memoryview) -> None:
        data[:] = bytes((self.last,)) * len(data)

    def write(self, offset: int, data) -> None:
        if not len(data):
            return
        value = data[0]
        elapsed_ms = (self._clock() - self._start) * 1000.0
        with self._lock:
            self.count += 1
            count = self.count
            self.last = value
            self.codes.append((elapsed_ms, value))
        level = logging.INFO if count <= LOUD_CODES else logging.DEBUG
        self.log.log(level, "POST code %#04x at %.3f ms", value, elapsed_ms)
        if count == LOUD_CODES:
            self.log.info("more POST codes are logged at DEBUG (Linux uses port 0x80 as an I/O delay)")
