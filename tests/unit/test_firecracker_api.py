"""Firecracker's API as pyvmm serves it (pyvmm/server/routes.py), sans-IO: every endpoint, good and bad
bodies, the pre-boot and post-boot rules, and the error shape (400 + fault_message)."""

from __future__ import annotations

import json
import threading

import pytest

from conftest import GUESTS
from pyvmm.server.firecracker import FirecrackerConfig
from pyvmm.server.routes import NOT_AFTER_BOOT, NOT_BEFORE_BOOT, FirecrackerApi
from pyvmm.vmm.states import VmState

KERNEL = str(GUESTS / "hello.elf")


class FakeKeyboard:
    def __init__(self):
        self.presses = 0

    def press_ctrl_alt_del(self):
        self.presses += 1
        return True


class FakeVm:
    """What FirecrackerApi needs of a started pyvmm.api.VM."""

    def __init__(self, config):
        self.config = config
        self.state = VmState.RUNNING
        self.keyboard = FakeKeyboard()
        self.machine = type("M", (), {"devices": {"i8042": self.keyboard}})()

    def pause(self):
        self.state = VmState.PAUSED

    def resume(self):
        self.state = VmState.RUNNING

    def replace_drive(self, index, path):
        self.replaced = (index, path)

    def set_drive_rate_limiter(self, index, config):
        self.drive_limits = (index, config)


@pytest.fixture
def api():
    started = []
    api = FirecrackerApi(lambda config: started.append(FakeVm(config)) or started[-1], instance_id="vm1")
    api.started_vms = started
    yield api
    api.close()


def call(api, method, path, body=None):
    response = api.handle(method, path, json.dumps(body).encode() if body is not None else b"")
    return response.status, response.body


def boot_configured(api, **boot):
    assert call(api, "PUT", "/boot-source", {"kernel_image_path": KERNEL, **boot})[0] == 204


def test_instance_info_and_version(api):
    assert call(api, "GET", "/") == (200, {"app_name": "Firecracker", "id": "vm1", "state": "Not started",
                                          "vmm_version": api.handle("GET", "/").body["vmm_version"]})  # fmt: skip
    status, body = call(api, "GET", "/version")
    assert status == 200 and body["firecracker_version"].count(".") == 2


def test_machine_config_put_patch_get(api):
    assert call(api, "PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 256})[0] == 204
    assert call(api, "PATCH", "/machine-config", {"mem_size_mib": 512})[0] == 204
    assert call(api, "GET", "/machine-config") == (200, {"vcpu_count": 2, "mem_size_mib": 512, "smt": False,
                                                         "track_dirty_pages": False})  # fmt: skip


@pytest.mark.parametrize("path, body, words", [
    ("/machine-config", {"vcpu_count": 2}, "missing required field 'mem_size_mib'"),
    ("/machine-config", {"vcpu_count": "2", "mem_size_mib": 64}, "field 'vcpu_count' must be an integer (1-32), not a string"),
    ("/machine-config", {"vcpu_count": 33, "mem_size_mib": 64}, "between 1 and 32, not 33"),
    ("/machine-config", {"vcpu_count": 1, "mem_size_mib": 64, "smt": True}, "SMT"),
    ("/machine-config", {"vcpu_count": 1, "mem_size_mib": 64, "cpu_template": "T2"}, "CPU templates are not supported"),
    ("/machine-config", {"vcpu_count": 1, "mem_size_mib": 64, "vcpus": 1}, "unknown field 'vcpus'"),
    ("/boot-source", {"boot_args": "x"}, "missing required field 'kernel_image_path'"),
    ("/drives/root", {"drive_id": "root", "is_root_device": True}, "missing required field 'path_on_host'"),
    ("/drives/root", {"drive_id": "other", "path_on_host": "/x", "is_root_device": True}, "differs from the path's 'root'"),
    ("/drives/bad-id!", {"drive_id": "bad-id!", "path_on_host": "/x", "is_root_device": False}, "must be 1-64 letters"),
    ("/network-interfaces/eth0", {"iface_id": "eth0"}, "missing required field 'host_dev_name'"),
    ("/logger", {"level": "Loud"}, "field 'level' must be one of"),
    ("/entropy", {"rate_limiter": 5}, "field 'rate_limiter' must be a rate limiter object, not an integer"),
    ("/actions", {"action_type": "Explode"}, "unknown action_type 'Explode'"),
    ("/actions", {}, "the body must be {\"action_type\": ...}"),
    ("/nowhere", {}, "Invalid request method and/or path: PUT /nowhere."),
    ("/snapshot/create", {"snapshot_path": "s", "mem_file_path": "m"}, "not supported before starting"),
    ("/snapshot/create", {"snapshot_path": "s"}, "missing required field 'mem_file_path'"),
    ("/snapshot/create", {"snapshot_path": "s", "mem_file_path": "m", "snapshot_type": "Half"}, "must be \"Full\" or \"Diff\""),
    ("/snapshot/load", {"snapshot_path": "s"}, "exactly one of 'mem_file_path' and 'mem_backend'"),
    ("/snapshot/load", {"snapshot_path": "s", "mem_backend": {"backend_type": "Uffd", "backend_path": "/x"}}, "only \"File\""),
    ("/vsock", {"guest_cid": 2, "uds_path": "/tmp/v"}, "field 'guest_cid' must be between 3 and 4294967294"),
])  # fmt: skip
def test_bad_bodies_are_400_with_a_message_naming_the_field(api, path, body, words):
    status, answer = call(api, "PUT", path, body)
    assert status == 400 and set(answer) == {"fault_message"}
    assert words in answer["fault_message"]


def test_a_body_that_is_not_json_is_refused(api):
    response = api.handle("PUT", "/machine-config", b"{vcpu_count: 1")
    assert response.status == 400 and "not valid JSON" in response.body["fault_message"]


def test_instance_start_needs_a_boot_source_and_gives_pyvmm_a_config(api):
    assert call(api, "PUT", "/actions", {"action_type": "InstanceStart"}) == (
        400, {"fault_message": "cannot start the microVM: no boot source (PUT /boot-source first)"})
    boot_configured(api, boot_args="console=ttyS0")
    assert call(api, "PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 64})[0] == 204
    assert call(api, "PUT", "/entropy", {})[0] == 204
    assert call(api, "PUT", "/actions", {"action_type": "InstanceStart"})[0] == 204
    (vm,) = api.started_vms
    assert (vm.config.machine.vcpus, vm.config.machine.memory_mib, vm.config.rng) == (2, 64, True)
    assert vm.config.boot.cmdline == "console=ttyS0"
    assert call(api, "GET", "/")[1]["state"] == "Running"


def test_a_missing_kernel_is_named_with_firecrackers_field(api):
    boot_configured(api)
    api.config.boot["kernel_image_path"] = "/nonexistent/vmlinux"
    status, body = call(api, "PUT", "/actions", {"action_type": "InstanceStart"})
    assert status == 400 and "boot-source.kernel_image_path" in body["fault_message"]
    assert "file not found" in body["fault_message"]


def test_the_root_drive_becomes_vda_and_the_command_line_says_so(api, tmp_path):
    image = tmp_path / "root.img"
    image.write_bytes(bytes(1 << 20))
    data = tmp_path / "data.img"
    data.write_bytes(bytes(1 << 20))
    boot_configured(api, boot_args="console=ttyS0")
    assert call(api, "PUT", "/drives/data", {"drive_id": "data", "path_on_host": str(data), "is_root_device": False})[0] == 204
    assert call(api, "PUT", "/drives/rootfs", {"drive_id": "rootfs", "path_on_host": str(image), "is_root_device": True,
                                               "is_read_only": True})[0] == 204  # fmt: skip
    status, body = call(api, "PUT", "/drives/two", {"drive_id": "two", "path_on_host": str(data), "is_root_device": True})
    assert status == 400 and "a root device is already configured" in body["fault_message"]
    assert call(api, "PUT", "/actions", {"action_type": "InstanceStart"})[0] == 204
    config = api.started_vms[0].config
    assert [d.path.name for d in config.drives] == ["root.img", "data.img"]
    assert config.drives[0].read_only and config.boot.cmdline.endswith("root=/dev/vda ro")
    assert [d["drive_id"] for d in call(api, "GET", "/vm/config")[1]["drives"]] == ["rootfs", "data"]


def test_pre_boot_objects_are_refused_after_start_and_post_boot_ones_before(api):
    assert call(api, "PATCH", "/vm", {"state": "Paused"}) == (400, {"fault_message": NOT_BEFORE_BOOT})
    assert call(api, "PUT", "/actions", {"action_type": "SendCtrlAltDel"}) == (400, {"fault_message": NOT_BEFORE_BOOT})
    boot_configured(api)
    assert call(api, "PUT", "/actions", {"action_type": "InstanceStart"})[0] == 204
    for path, body in (("/machine-config", {"vcpu_count": 1, "mem_size_mib": 64}), ("/boot-source", {"kernel_image_path": KERNEL}),
                       ("/drives/x", {"drive_id": "x", "path_on_host": KERNEL, "is_root_device": False}),
                       ("/network-interfaces/eth0", {"iface_id": "eth0", "host_dev_name": "tap0"}),
                       ("/entropy", {}), ("/metrics", {"metrics_path": "/tmp/m"})):  # fmt: skip
        assert call(api, "PUT", path, body) == (400, {"fault_message": NOT_AFTER_BOOT}), path
    assert call(api, "PUT", "/actions", {"action_type": "InstanceStart"}) == (400, {"fault_message": NOT_AFTER_BOOT})


def test_pause_resume_and_ctrl_alt_del_after_start(api):
    boot_configured(api)
    call(api, "PUT", "/actions", {"action_type": "InstanceStart"})
    vm = api.started_vms[0]
    assert call(api, "PATCH", "/vm", {"state": "Paused"})[0] == 204 and vm.state is VmState.PAUSED
    assert call(api, "GET", "/")[1]["state"] == "Paused"
    assert call(api, "PATCH", "/vm", {"state": "Resumed"})[0] == 204 and vm.state is VmState.RUNNING
    status, body = call(api, "PATCH", "/vm", {"state": "Sleeping"})
    assert status == 400 and '"Paused"' in body["fault_message"]
    assert call(api, "PUT", "/actions", {"action_type": "SendCtrlAltDel"})[0] == 204 and vm.keyboard.presses == 1
    status, body = call(api, "PUT", "/actions", {"action_type": "FlushMetrics"})
    assert status == 400 and "PUT /metrics first" in body["fault_message"]


def test_patching_a_drive_after_boot(api, tmp_path):
    image = tmp_path / "d.img"
    image.write_bytes(bytes(4096))
    boot_configured(api)
    call(api, "PUT", "/drives/d", {"drive_id": "d", "path_on_host": str(image), "is_root_device": False})
    call(api, "PUT", "/actions", {"action_type": "InstanceStart"})
    assert call(api, "PATCH", "/drives/d", {"drive_id": "d", "rate_limiter": {"bandwidth": {"size": 1, "refill_time": 1}}})[0] == 204
    assert api.started_vms[0].drive_limits[0] == 0 and api.started_vms[0].drive_limits[1].bandwidth.size == 1
    other = tmp_path / "other.img"
    other.write_bytes(bytes(8192))
    assert call(api, "PATCH", "/drives/d", {"drive_id": "d", "path_on_host": str(other)})[0] == 204
    assert api.started_vms[0].replaced == (0, str(other))
    assert call(api, "GET", "/vm/config")[1]["drives"][0]["path_on_host"] == str(other)
    status, body = call(api, "PATCH", "/drives/d", {"drive_id": "d", "is_read_only": True})
    assert status == 400 and "cannot be changed by PATCH" in body["fault_message"]
    status, body = call(api, "PATCH", "/drives/nope", {"drive_id": "nope"})
    assert status == 400 and "does not exist" in body["fault_message"]


def test_requests_from_many_threads_are_served_one_at_a_time(api):
    errors = []

    def client(i):
        for _ in range(50):
            status, _ = call(api, "PUT", "/machine-config", {"vcpu_count": 1 + i % 4, "mem_size_mib": 64})
            if status != 204:
                errors.append(status)
            call(api, "GET", "/machine-config")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and call(api, "GET", "/machine-config")[1]["vcpu_count"] in (1, 2, 3, 4)


def test_firecrackers_config_file_format():
    config = FirecrackerConfig.from_json({
        "boot-source": {"kernel_image_path": KERNEL, "boot_args": "console=ttyS0"},
        "drives": [], "machine-config": {"vcpu_count": 1, "mem_size_mib": 32},
        "network-interfaces": [], "logger": None, "metrics": None,
    })  # fmt: skip
    vm_config = config.to_vm_config(["interp"])
    assert vm_config.machine.memory_mib == 32 and vm_config.machine.accel == ["interp"]
    with pytest.raises(Exception, match="unknown configuration key 'machine_config'"):
        FirecrackerConfig.from_json({"machine_config": {}})
