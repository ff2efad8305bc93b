"""accel/interp/engine.py: the unicorn offsets are found by value, safely, and the same every time."""

import ctypes
import platform
import sys

import pytest

pytest.importorskip("unicorn")

from pyvmm.accel.interp import engine  # noqa: E402


@pytest.mark.skipif(not (sys.platform.startswith("linux") and platform.machine() == "x86_64"),
                    reason="the pinned offsets are those of unicorn 2.1.4's Linux x86-64 wheel")  # fmt: skip
def test_the_offsets_found_by_value_are_the_known_linux_ones():
    assert engine.layout() == engine.LINUX_X86_64_LAYOUT


def test_discovery_gives_the_same_answer_every_time():
    first = engine._discover_layout()
    assert all(engine._discover_layout() == first for _ in range(15))


def test_peek_reads_valid_memory_and_refuses_invalid_addresses_without_crashing():
    peek = engine._Peek()
    try:
        buffer = ctypes.create_string_buffer(b"pyvmm-peek", 16)
        assert peek(ctypes.addressof(buffer), 10) == b"pyvmm-peek"
        assert peek(0x1000, 8) is None  # the first pages are never mapped
        assert peek(1 << 47, 8) is None  # beyond user space
    finally:
        peek.close()
