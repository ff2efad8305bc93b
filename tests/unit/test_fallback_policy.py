"""accel/fallback/policy.py: its table of the interpreter's feature leaves is what the engine really offers."""

import pytest

from pyvmm.accel.fallback.policy import FEATURE_LEAVES, INTERP_FEATURES


def test_the_feature_table_matches_the_interpreter():
    """The policy avoids loading unicorn at boot with a copy of these leaves: the copy must not drift."""
    pytest.importorskip("unicorn")
    from pyvmm.accel.fallback.policy import interp_supported_cpuid

    live = {(e.function, e.index): e for e in interp_supported_cpuid()}
    for entry in INTERP_FEATURES:
        other = live[(entry.function, entry.index)]
        fields = ("ecx", "edx") if entry.function in (1, 0x80000001) else ("eax", "ebx", "ecx", "edx")
        assert {f: getattr(entry, f) for f in fields} == {f: getattr(other, f) for f in fields}, hex(entry.function)
    assert FEATURE_LEAVES == {(1, 0), (7, 0), (0xD, 0), (0xD, 1), (0x80000001, 0)}
