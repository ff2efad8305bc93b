"""A one-port "debug exit" device: the guest ends the VM with a status of its choice.

Test guests write their result here (``outb %al, $0xf4``) instead of needing
ACPI or a keyboard-controller reset. Unlike QEMU's isa-debug-exit, which exits
with ``(v << 1) | 1``, the status is the byte itself, so 0 means success.
"""

from __future__ import annotations

from typing import Callable


class DebugExit:
    """Insert at ``layout.PORT_DEBUG_EXIT`` with size 1."""

    def __init__(self, request_exit: Callable[[int, str], None]):
        self.request_exit = request_exit

    def read(self, offset: int, data: memoryview) -> None:
        data[:] = b"\xff" * len(data)

    def write(self, offset: int, data) -> None:
        if len(data):
            # A wider write (outw/outl) uses its low byte.
            self.request_exit(data[0], "debug-exit")
