"""virtio-vsock configuration: TOML ``[vsock]``, Firecracker's ``PUT /vsock`` and ``--config-file``
``"vsock"``, ``GET /vm/config``, and what a snapshot keeps of it."""

from __future__ import annotations

import json

import pytest

from pyvmm.config import config_from_dict
from pyvmm.errors import ConfigError
from pyvmm.server.firecracker import FaultError, FirecrackerConfig
from pyvmm.server.routes import FirecrackerApi
from pyvmm.vmm.snapshot import config_from_data, config_to_data


def toml(kernel_file, vsock) -> dict:
    return {"boot": {"kernel": kernel_file.name}, "vsock": vsock}


def test_vsock_section_paths_are_relative_to_the_config(kernel_file, tmp_path):
    config = config_from_dict(toml(kernel_file, {"guest_cid": 3, "uds_path": "v.sock"}), base_dir=tmp_path)
    assert config.vsock.guest_cid == 3
    assert config.vsock.uds_path == tmp_path / "v.sock"
    assert config.virtio_device_count == 1


@pytest.mark.parametrize(("vsock", "key", "words"), [
    ({"uds_path": "v.sock"}, "vsock.guest_cid", "missing"),
    ({"guest_cid": 3}, "vsock.uds_path", "missing"),
    ({"guest_cid": 2, "uds_path": "v.sock"}, "vsock.guest_cid", "between 3 and 4294967294"),
    ({"guest_cid": 1 << 32, "uds_path": "v.sock"}, "vsock.guest_cid", "between 3"),
    ({"guest_cid": 0xFFFFFFFF, "uds_path": "v.sock"}, "vsock.guest_cid", "between 3"),
    ({"guest_cid": True, "uds_path": "v.sock"}, "vsock.guest_cid", "not a boolean"),
    ({"guest_cid": "3", "uds_path": "v.sock"}, "vsock.guest_cid", "not a string"),
    ({"guest_cid": 3, "uds_path": ""}, "vsock.uds_path", "non-empty"),
    ({"guest_cid": 3, "uds_path": "no/such/folder/v.sock"}, "vsock.uds_path", "does not exist"),
    ({"guest_cid": 3, "uds_path": "x" * 120}, "vsock.uds_path", "longer than the 107 bytes"),
    ({"guest_cid": 3, "uds_path": "vmlinux"}, "vsock.uds_path", "not a socket"),
    ({"guest_cid": 3, "uds_path": "v.sock", "port": 5}, "vsock.port", "unknown key"),
])  # fmt: skip
def test_bad_vsock_sections_are_one_line_errors(kernel_file, tmp_path, vsock, key, words):
    with pytest.raises(ConfigError) as err:
        config_from_dict(toml(kernel_file, vsock), base_dir=tmp_path, source="vm.toml")
    message = str(err.value)
    assert key in message and words in message and "\n" not in message


def test_put_vsock_before_boot_shows_in_vm_config_and_becomes_the_pyvmm_config(kernel_file, tmp_path):
    api = FirecrackerApi(lambda config: pytest.fail("not started here"))
    body = {"guest_cid": 52, "uds_path": str(tmp_path / "v.sock"), "vsock_id": "vsock0"}
    assert api.handle("PUT", "/vsock", json.dumps(body).encode()).status == 204
    assert api.handle("GET", "/vm/config").body["vsock"] == body
    api.handle("PUT", "/boot-source", json.dumps({"kernel_image_path": str(kernel_file)}).encode())
    config = api.config.to_vm_config()
    assert (config.vsock.guest_cid, config.vsock.uds_path) == (52, tmp_path / "v.sock")


@pytest.mark.parametrize(("body", "field"), [
    ({"guest_cid": 3}, "uds_path"),
    ({"uds_path": "/tmp/v.sock"}, "guest_cid"),
    ({"guest_cid": 2, "uds_path": "/tmp/v.sock"}, "guest_cid"),
    ({"guest_cid": 1 << 32, "uds_path": "/tmp/v.sock"}, "guest_cid"),
    ({"guest_cid": "3", "uds_path": "/tmp/v.sock"}, "guest_cid"),
    ({"guest_cid": 3, "uds_path": 5}, "uds_path"),
    ({"guest_cid": 3, "uds_path": ""}, "uds_path"),
    ({"guest_cid": 3, "uds_path": "/tmp/v\0sock"}, "uds_path"),
    ({"guest_cid": 3, "uds_path": "/tmp/v.sock", "cid": 3}, "cid"),
])  # fmt: skip
def test_put_vsock_refusals_name_the_field(body, field):
    api = FirecrackerApi(lambda config: None)
    answer = api.handle("PUT", "/vsock", json.dumps(body).encode())
    assert answer.status == 400
    assert f"'{field}'" in answer.body["fault_message"] and answer.body["fault_message"].startswith("vsock:")


def test_put_vsock_after_boot_is_refused(kernel_file):
    class Vm:
        config = None

    api = FirecrackerApi(lambda config: Vm())
    api.handle("PUT", "/boot-source", json.dumps({"kernel_image_path": str(kernel_file)}).encode())
    assert api.handle("PUT", "/actions", b'{"action_type": "InstanceStart"}').status == 204
    answer = api.handle("PUT", "/vsock", b'{"guest_cid": 3, "uds_path": "/tmp/v.sock"}')
    assert answer.status == 400 and "after starting" in answer.body["fault_message"]


def test_firecracker_config_file_vsock(kernel_file, tmp_path):
    data = {"boot-source": {"kernel_image_path": str(kernel_file)},
            "vsock": {"guest_cid": 3, "uds_path": str(tmp_path / "v.sock")}}  # fmt: skip
    config = FirecrackerConfig.from_json(data)
    assert config.as_json()["vsock"] == data["vsock"]
    assert config.to_vm_config().vsock.uds_path == tmp_path / "v.sock"
    with pytest.raises(FaultError, match="'guest_cid'"):
        FirecrackerConfig.from_json({**data, "vsock": {"guest_cid": 0, "uds_path": "v.sock"}})


def test_a_toml_vm_shows_its_vsock_and_a_snapshot_keeps_it(kernel_file, tmp_path):
    config = config_from_dict(toml(kernel_file, {"guest_cid": 9, "uds_path": "v.sock"}), base_dir=tmp_path)
    assert FirecrackerConfig.from_vm_config(config).as_json()["vsock"] == {"guest_cid": 9, "uds_path": str(tmp_path / "v.sock")}
    again = config_from_data(json.loads(json.dumps(config_to_data(config))), ["interp"], "state.json")
    assert again.vsock == config.vsock
