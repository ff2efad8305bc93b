"""scripts/kvm_unit_tests.py without the suite: unittests.cfg parsing, skip rules, and how a run's
status and console output become PASS / FAIL (the failing sub-tests) / SKIP (the reason) / TIMEOUT."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "kvm_unit_tests.py"
spec = importlib.util.spec_from_file_location("kvm_unit_tests", SCRIPT)
kut = importlib.util.module_from_spec(spec)
sys.modules["kvm_unit_tests"] = kut  # dataclasses look their module up
spec.loader.exec_module(kut)

CFG = """
# comment
[x2apic]
file = apic.flat
smp = 2
qemu_params = -cpu qemu64,+x2apic,+tsc-deadline
arch = x86_64
timeout = 30
groups = apic

[vmexit_ipi]
file = vmexit.flat
smp = 2
test_args = 'ipi'
qemu_params = -machine pit=off

[svm]
file = svm.flat
test_args = "-pause_filter_test -svm_unsupported_instruction_intercept_test"
qemu_params = -cpu max,+svm -m 4g

[old]
file = old.flat
extra_params = -cpu max -append 'a b' -m 2048

[pmu]
file = pmu.flat
accel = kvm
check = /nonexistent/enable_pmu=Y

[access_fep]
file = access_test.flat
groups = nodefault

[cmpxchg8b]
file = cmpxchg8b.flat
arch = i386
"""


def test_the_cfg_entries_with_their_parameters():
    entries = {e.name: e for e in kut.parse_unittests_cfg(CFG)}
    assert list(entries) == ["x2apic", "vmexit_ipi", "svm", "old", "pmu", "access_fep", "cmpxchg8b"]
    x2apic = entries["x2apic"]
    assert (x2apic.file, x2apic.smp, x2apic.timeout, x2apic.groups, x2apic.arch) == ("apic.flat", 2, 30, ("apic",), "x86_64")
    assert entries["vmexit_ipi"].test_args == "ipi"
    assert entries["svm"].test_args == "-pause_filter_test -svm_unsupported_instruction_intercept_test"
    assert entries["svm"].memory_mib() == 4096 and x2apic.memory_mib() == kut.DEFAULT_MEMORY_MIB
    old = entries["old"]
    assert (old.qemu_params, old.test_args, old.memory_mib()) == ("-cpu max  -m 2048", "a b", 2048)
    with pytest.raises(ValueError, match=r"line 2: expected \[name\]"):
        kut.parse_unittests_cfg("[a]\nno equals sign here\n")


def test_skip_rules_follow_run_tests(tmp_path):
    (tmp_path / "x86").mkdir()
    for name in ("apic.flat", "pmu.flat", "access_test.flat", "cmpxchg8b.flat"):
        (tmp_path / "x86" / name).write_bytes(b"")
    entries = {e.name: e for e in kut.parse_unittests_cfg(CFG)}
    assert kut.skip_reason(entries["x2apic"], "interp", tmp_path) is None
    assert kut.skip_reason(entries["vmexit_ipi"], "tcg", tmp_path) == "x86/vmexit.flat not built"
    assert kut.skip_reason(entries["pmu"], "tcg", tmp_path) == "kvm only"
    assert kut.skip_reason(entries["pmu"], "interp", tmp_path) == "kvm only"
    assert kut.skip_reason(entries["pmu"], "kvm", tmp_path) == "/nonexistent/enable_pmu is not Y"
    assert kut.skip_reason(entries["access_fep"], "kvm", tmp_path) == "manual run only (nodefault)"
    assert kut.skip_reason(entries["cmpxchg8b"], "kvm", tmp_path) == "i386 only"


def test_results_from_the_status_and_the_console():
    passed = kut.classify(0, "PASS: a\nPASS: b\nSUMMARY: 2 tests\n")
    assert (passed.status, passed.detail) == ("PASS", [])
    failed = kut.classify(1, "PASS: a\nFAIL: mov reg, r/m (1)\nFAIL: or\nSUMMARY: 3 tests, 2 unexpected failures\n")
    assert (failed.status, failed.detail) == ("FAIL", ["mov reg, r/m (1)", "or"])
    skipped = kut.classify(38, "SKIP: SVM not supported\nSUMMARY: 0 tests\n")
    assert (skipped.status, skipped.detail) == ("SKIP", ["SVM not supported"])
    timed_out = kut.classify(None, "FAIL: x\n")
    assert (timed_out.status, timed_out.detail) == ("TIMEOUT", ["x"])
    crashed = kut.classify(-1, "enabling apic\n", "pyvmm: error: guest error (vcpu 0, rip 0x401000): triple fault")
    assert crashed.status == "FAIL" and crashed.detail == ["pyvmm: error: guest error (vcpu 0, rip 0x401000): triple fault"]
    odd = kut.classify(63, "SUMMARY: 0 tests\n")
    assert odd.status == "FAIL" and odd.detail == ["status 63", "last output: SUMMARY: 0 tests"]
    assert failed.cell() == "FAIL (mov reg, r/m (1); or)"


def test_the_table_and_its_totals():
    entries = kut.parse_unittests_cfg(CFG)[:2]
    results = {("x2apic", "interp"): kut.Result("PASS"), ("x2apic", "tcg"): kut.Result("FAIL", ["a|b"]),
               ("vmexit_ipi", "interp"): kut.Result("TIMEOUT"), ("vmexit_ipi", "tcg"): kut.Result("SKIP", ["why"])}
    table = kut.markdown_table(entries, results, ("interp", "tcg"))
    assert "| x2apic | PASS | FAIL (a\\|b) |" in table
    assert "- **pyvmm interp**: 1 PASS, 0 FAIL, 0 SKIP, 1 TIMEOUT" in table
    assert "- **QEMU TCG**: 0 PASS, 1 FAIL, 1 SKIP, 0 TIMEOUT" in table
