"""The user's terminal as a guest console: raw keyboard input, restored afterwards, on every OS.

``Keyboard`` switches the terminal to raw mode (every key goes to the guest,
Ctrl-C included) and ``read()`` returns the bytes typed, as a serial line would
carry them. POSIX: termios/tty on the stdin fd. Windows: the console's own
key reader (``msvcrt.getwch``), with Enter as CR and the arrow, Home/End,
Insert/Delete and PgUp/PgDn keys as the VT100 sequences a Linux console expects.
"""

from __future__ import annotations

import os
import sys

#: Windows scan codes (after the 0x00/0xE0 prefix) -> the VT100 sequence a serial terminal sends
WINDOWS_KEYS = {
    "H": b"\x1b[A", "P": b"\x1b[B", "M": b"\x1b[C", "K": b"\x1b[D",  # arrows
    "G": b"\x1b[H", "O": b"\x1b[F",  # Home, End
    "R": b"\x1b[2~", "S": b"\x1b[3~", "I": b"\x1b[5~", "Q": b"\x1b[6~",  # Insert, Delete, PgUp, PgDn
}  # fmt: skip


class Keyboard:
    """Raw keyboard input from ``stream`` (a terminal). Use ``enter()``/``restore()`` around ``read()``."""

    def __init__(self, stream=None, *, msvcrt_module=None):
        self.stream = stream or sys.stdin
        self._msvcrt = msvcrt_module
        if self._msvcrt is None and os.name == "nt":
            import msvcrt

            self._msvcrt = msvcrt
        self._saved = None

    def enter(self) -> None:
        if self._msvcrt is not None:
            return  # getwch already reads keys one by one, unechoed, Ctrl-C included
        import termios
        import tty

        fd = self.stream.fileno()
        self._saved = termios.tcgetattr(fd)
        tty.setraw(fd)

    def read(self) -> bytes:
        """The next keys typed (blocks); b"" at end of input."""
        if self._msvcrt is None:
            return os.read(self.stream.fileno(), 1024)
        key = self._msvcrt.getwch()
        if key in ("\x00", "\xe0"):
            return WINDOWS_KEYS.get(self._msvcrt.getwch(), b"")
        if key == "\x1a" and not self.stream.isatty():
            return b""  # Ctrl-Z from a redirected stdin: end of input
        return key.encode("utf-8")

    def restore(self) -> None:
        if self._saved is not None:
            import termios

            termios.tcsetattr(self.stream.fileno(), termios.TCSADRAIN, self._saved)
            self._saved = None
