"""The gdb stub's errors: one base type, and the ones a ``DebugTarget`` raises to refuse a request."""

from __future__ import annotations

from pyvmm.errors import PyvmmError


class GdbError(PyvmmError):
    """Something about the gdb stub: a bad address to serve on, a bad register image, ..."""


class DebugTargetError(GdbError):
    """A target refused a debugger request (no free debug register, a breakpoint kind it lacks, ...).

    The stub answers the request with an ``E`` reply and keeps serving.
    """


class UnmappedAddress(DebugTargetError):
    """A guest-virtual (or guest-physical) address with nothing behind it: names the address."""

    def __init__(self, address: int, what: str = "guest-virtual"):
        self.address = address
        super().__init__(f"{what} address {address:#x} is not mapped")
