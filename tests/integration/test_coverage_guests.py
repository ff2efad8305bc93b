"""Coverage and traces from the interpreter: a guest with known blocks, turned on from the config and at
run time through the embedding API."""

from __future__ import annotations

import pytest

from elfgen import JMP_SELF, OUT_F4_AL, mov_al, pvh_elf
from pyvmm import accel
from pyvmm.api import VM
from pyvmm.vmm.coverage import CoverageError, read_trace
from drcov import read_drcov

# mov ecx, 3 / loop: dec ecx; jnz loop / mov al, 0x11; out 0xf4, al; jmp $
CODE = b"\xb9\x03\x00\x00\x00" + b"\x49\x75\xfd" + mov_al(0x11) + OUT_F4_AL + JMP_SELF
BLOCKS = {(0x0, 8), (0x5, 3)}  # offsets from the image's base: the entry block and the loop body
TAIL = 0x8


@pytest.fixture
def guest(tmp_path):
    probe = accel.probe("interp")
    if not probe.usable:
        pytest.skip(f"the interpreter is not usable: {probe.reason}")
    kernel = tmp_path / "blocks.elf"
    kernel.write_bytes(pvh_elf(CODE))
    return kernel


def test_the_drcov_file_holds_exactly_the_blocks_the_guest_ran(tmp_path, guest):
    vm = VM.from_dict({"machine": {"memory_mib": 16, "accel": "interp"}, "boot": {"kernel": str(guest)},
                       "debug": {"coverage": str(tmp_path / "out.drcov"), "trace": str(tmp_path / "out.trace")}})  # fmt: skip
    with vm:
        assert vm.run(timeout=60).code == 0x11
    modules, bbs = read_drcov(tmp_path / "out.drcov")
    assert modules[0]["path"] == str(guest) and int(modules[0]["base"], 16) == 0x100000
    ours = {(start, size) for start, size, module in bbs if module == 0}
    tail = [size for start, size in ours if start == TAIL]
    assert ours - {(TAIL, s) for s in tail} == BLOCKS, ours
    assert tail and tail[0] >= len(mov_al(0) + OUT_F4_AL), ours  # the last block reaches the out at least
    blocks, dropped = read_trace(tmp_path / "out.trace")
    # every execution in order: the entry block, the loop body twice more, then the tail
    assert [address for _, address, _ in blocks][:4] == [0x100000, 0x100005, 0x100005, 0x100008], blocks
    assert dropped == 0


def test_coverage_of_a_window_only_and_on_a_backend_that_cannot(tmp_path, guest):
    vm = VM.from_dict({"machine": {"memory_mib": 16, "accel": "interp"}, "boot": {"kernel": str(guest)}})
    with vm:
        vm.start_coverage(tmp_path / "window.drcov")
        with pytest.raises(CoverageError, match="already"):
            vm.start_coverage(tmp_path / "again.drcov")
        assert vm.run(timeout=60).code == 0x11
        assert vm.stop_coverage() >= 3
    kvm = accel.probe("kvm")
    if kvm.usable:
        with VM.from_dict({"machine": {"memory_mib": 16, "accel": "kvm"}, "boot": {"kernel": str(guest)}}) as other:
            with pytest.raises(CoverageError, match="cannot trace"):
                other.start_coverage(tmp_path / "kvm.drcov")


def test_coverage_and_a_trace_turned_on_and_off_over_the_api(tmp_path, guest):
    from pyvmm.server.routes import FirecrackerApi

    vm = VM.from_dict({"machine": {"memory_mib": 16, "accel": "interp"}, "boot": {"kernel": str(guest)}})
    with vm:
        api = FirecrackerApi.for_vm(vm)
        on = api.handle("PUT", "/pyvmm/coverage", f'{{"state": "On", "path": "{tmp_path / "api.drcov"}"}}'.encode())
        assert on.status == 204, on.body
        assert api.handle("PUT", "/pyvmm/trace", f'{{"state": "On", "path": "{tmp_path / "api.trace"}", "limit_mib": 1}}'.encode()).status == 204
        assert vm.run(timeout=60).code == 0x11
        off = api.handle("PUT", "/pyvmm/coverage", b'{"state": "Off"}')
        assert off.status == 200 and off.body["blocks"] >= 3
        trace = api.handle("PUT", "/pyvmm/trace", b'{"state": "Off"}')
        assert trace.status == 200 and trace.body["records"] >= 4 and trace.body["dropped"] == 0
        again = api.handle("PUT", "/pyvmm/coverage", b'{"state": "Off"}')
        assert again.status == 400 and "not being recorded" in again.body["fault_message"]
        bad = api.handle("PUT", "/pyvmm/trace", b'{"state": "Maybe"}')
        assert bad.status == 400 and "'state'" in bad.body["fault_message"]
    modules, bbs = read_drcov(tmp_path / "api.drcov")
    assert {(s, z) for s, z, m in bbs if m == 0} >= BLOCKS
