"""The CLI: one-line errors with no traceback, exit statuses, `check` and `--version`."""

import subprocess
import sys

import pytest

from pyvmm import __version__, accel
from pyvmm.cli import main


def run_cli(*args, timeout=60):
    return subprocess.run(
        [sys.executable, "-m", "pyvmm", *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"pyvmm {__version__}"


def test_no_command_prints_help_and_fails():
    result = run_cli()
    assert result.returncode == 2
    assert "boot" in result.stdout and "check" in result.stdout


@pytest.mark.parametrize(
    "toml, expected",
    [
        ('[machine]\nvcpus = "x"\n[boot]\nkernel = "k"\n', "machine.vcpus: must be an integer, not a string"),
        ('[boot]\nkernel = "absent"\n', "boot.kernel: file not found"),
        ("[boot\n", "invalid TOML"),
        ('[boot]\nkernel = "k"\n[machine]\naccel = "qemu"\n', "machine.accel: unknown accelerator 'qemu'"),
    ],
)
def test_bad_config_is_one_line_no_traceback(tmp_path, toml, expected):
    (tmp_path / "k").write_bytes(b"\x7fELF" + bytes(60))
    cfg = tmp_path / "vm.toml"
    cfg.write_text(toml)
    result = run_cli("boot", str(cfg))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"pyvmm: error: {cfg}: ")
    assert expected in lines[0]
    assert "Traceback" not in result.stderr


def test_bad_accel_option_is_one_line(tmp_path):
    (tmp_path / "k").write_bytes(b"\x7fELF" + bytes(60))
    cfg = tmp_path / "vm.toml"
    cfg.write_text('[boot]\nkernel = "k"\n')
    result = run_cli("boot", str(cfg), "--accel", "bogus")
    assert result.returncode == 2
    assert result.stderr.strip() == "pyvmm: error: accel argument: accel: unknown accelerator 'bogus'; expected \"auto\" or one of: kvm, hvf, whpx, interp"


def test_check_lists_every_accelerator_with_a_reason(capsys):
    status = main(["check"])
    out = capsys.readouterr().out
    probes = accel.probe_all()
    assert status == (0 if any(p.usable for p in probes) else 1)
    for probe in probes:
        line = next(line for line in out.splitlines() if line.startswith(probe.name))
        assert ("usable" if probe.usable else "unusable") in line
        assert probe.reason in line
        assert probe.reason  # a reason is always given, also for usable backends
    # platforms pyvmm does not run on are named as such, not stubbed
    assert "only available on macOS" in out
    assert "only available on Windows" in out
