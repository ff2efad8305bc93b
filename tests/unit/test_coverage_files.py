"""vmm/coverage.py: drcov files read back by a reader written from DynamoRIO's format description,
and bounded traces."""

from __future__ import annotations

import pytest

from conftest import ASSETS, GUESTS
from drcov import read_drcov
from pyvmm.vmm.coverage import Coverage, CoverageError, Module, Trace, kernel_module, read_trace


def test_blocks_in_a_module_and_in_guest_physical_memory_are_written_as_drcov(tmp_path):
    coverage = Coverage([Module(0xFFFF_FFFF_8100_0000, 0xFFFF_FFFF_8200_0000, "/k/vmlinux")], physical_size=64 << 20)
    coverage.add(0xFFFF_FFFF_8100_1000, 12, None)
    coverage.add(0xFFFF_FFFF_8100_1000, 12, None)  # seen twice, one block
    coverage.add(0x40_1000, 7, 0x123_4000)  # user code: by its guest-physical address
    coverage.add(0x40_2000, 7, None)  # not translatable: dropped
    coverage.add(0x40_3000, 7, 1 << 40)  # beyond RAM: dropped
    assert coverage.write(tmp_path / "out.drcov") == 2
    modules, bbs = read_drcov(tmp_path / "out.drcov")
    assert [m["id"] for m in modules] == ["0", "1"] and modules[0]["path"] == "/k/vmlinux"
    assert int(modules[0]["base"], 16) == 0xFFFF_FFFF_8100_0000 and modules[1]["path"] == "[guest-physical]"
    assert int(modules[1]["end"], 16) == 64 << 20
    assert sorted(bbs) == [(0x1000, 12, 0), (0x123_4000, 7, 1)]


def test_the_kernel_module_is_the_elf_images_loaded_range():
    module = kernel_module(GUESTS / "hello.elf")
    assert module is not None and module.base < module.end and module.path.endswith("hello.elf")
    assert kernel_module(GUESTS / "hello.S") is None
    if (ASSETS / "vmlinux").exists():
        vmlinux = kernel_module(ASSETS / "vmlinux")
        assert vmlinux.base == 0xFFFF_FFFF_8100_0000 and vmlinux.end > vmlinux.base + (16 << 20)


def test_a_trace_stops_at_its_limit_and_says_how_many_records_it_dropped(tmp_path):
    trace = Trace(tmp_path / "t.trace", limit_bytes=12 + 12 * 5)
    for i in range(10):
        trace.block(1, 0x1000 + i, 3)
    trace.close()
    blocks, dropped = read_trace(tmp_path / "t.trace")
    assert blocks == [(1, 0x1000 + i, 3) for i in range(4)] and dropped == 6
    assert (tmp_path / "t.trace").stat().st_size <= 12 + 12 * 5


def test_bad_paths_and_limits_are_one_line_errors(tmp_path):
    with pytest.raises(CoverageError, match="too small"):
        Trace(tmp_path / "t", limit_bytes=10)
    with pytest.raises(CoverageError, match="cannot write the trace file"):
        Trace(tmp_path / "missing" / "t", limit_bytes=1 << 20)
    with pytest.raises(CoverageError, match="cannot write the coverage file"):
        Coverage([], 4096).write(tmp_path / "missing" / "c.drcov")
