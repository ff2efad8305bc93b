"""[debug] in the TOML config and pyvmm boot's --gdb / --gdb-wait: checked in one line each."""

from __future__ import annotations

import pytest

from conftest import GUESTS
from pyvmm.cli import main
from pyvmm.config import config_from_dict
from pyvmm.errors import ConfigError


def config(debug: dict, tmp_path):
    return config_from_dict({"boot": {"kernel": str(GUESTS / "hello.elf")}, "debug": debug}, base_dir=tmp_path)


def test_debug_keys_are_read_with_paths_relative_to_the_config(tmp_path):
    debug = config({"gdb": "127.0.0.1:1234", "gdb_wait": True, "coverage": "c.drcov", "trace": "t.trace",
                    "trace_limit_mib": 8}, tmp_path).debug  # fmt: skip
    assert (debug.gdb, debug.gdb_wait, debug.trace_limit_mib) == ("127.0.0.1:1234", True, 8)
    assert debug.coverage == tmp_path / "c.drcov" and debug.trace == tmp_path / "t.trace"
    assert config({}, tmp_path).debug.gdb is None


@pytest.mark.parametrize("debug, words", [
    ({"gdb": "host:port"}, "debug.gdb: gdb address 'host:port': port 'port' is not a number"),
    ({"gdb": ""}, "debug.gdb: gdb address is empty"),
    ({"gdb_wait": True}, "debug.gdb_wait: needs debug.gdb"),
    ({"coverage": "missing/c.drcov"}, "debug.coverage: the folder"),
    ({"trace_limit_mib": 0}, "debug.trace_limit_mib: 0 must be between 1"),
    ({"gdb": 1234}, "debug.gdb"),
    ({"wait": True}, "debug.wait"),
])  # fmt: skip
def test_bad_debug_keys_are_one_line_errors(tmp_path, debug, words):
    with pytest.raises(ConfigError) as caught:
        config(debug, tmp_path)
    assert words in str(caught.value) and "\n" not in str(caught.value)


def test_gdb_wait_without_an_address_is_refused_before_anything_runs(tmp_path, capsys):
    vm_toml = tmp_path / "vm.toml"
    vm_toml.write_text(f'[boot]\nkernel = "{GUESTS / "hello.elf"}"\n')
    assert main(["boot", str(vm_toml), "--gdb-wait"]) == 2
    assert "--gdb-wait needs --gdb ADDR" in capsys.readouterr().err
    assert main(["boot", str(vm_toml), "--gdb", "x:y"]) == 2
    assert "port 'y' is not a number" in capsys.readouterr().err
