"""Firecracker's balloon endpoints and rate limiters as pyvmm serves them (sans-IO): good and bad bodies,
the pre-boot and post-boot rules, what reaches the VM, GET /vm/config and the --config-file JSON."""

from __future__ import annotations

import json

import pytest

from conftest import GUESTS
from pyvmm.errors import PyvmmError
from pyvmm.server.firecracker import FirecrackerConfig
from pyvmm.server.routes import NOT_AFTER_BOOT, FirecrackerApi
from pyvmm.vmm.states import VmState

KERNEL = str(GUESTS / "hello.elf")


class FakeVm:
    """What FirecrackerApi needs of a started VM with a balloon and limited devices."""

    def __init__(self, config):
        self.config = config
        self.state = VmState.RUNNING
        self.calls = []
        self.stats = {"target_pages": 0, "actual_pages": 0, "target_mib": 0, "actual_mib": 0, "total_memory": 1 << 27}

    def set_balloon(self, amount_mib):
        if amount_mib == 13:
            raise PyvmmError("the VM refused")
        self.calls.append(("balloon", amount_mib))

    def set_balloon_statistics_interval(self, seconds):
        self.calls.append(("interval", seconds))

    def balloon_statistics(self):
        return dict(self.stats)

    def set_drive_rate_limiter(self, index, config):
        self.calls.append(("drive", index, config.as_dict()))

    def set_net_rate_limiters(self, index, rx, tx):
        self.calls.append(("net", index, rx and rx.as_dict(), tx and tx.as_dict()))


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


def start(api, **machine):
    assert call(api, "PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128, **machine})[0] == 204
    assert call(api, "PUT", "/boot-source", {"kernel_image_path": KERNEL})[0] == 204
    assert call(api, "PUT", "/actions", {"action_type": "InstanceStart"})[0] == 204
    return api.started_vms[0]


BUCKET = {"size": 1 << 20, "refill_time": 1000}


def test_balloon_put_get_patch_before_boot_and_what_the_vm_is_built_with(api):
    assert call(api, "GET", "/balloon") == (400, {"fault_message": "balloon: no balloon device is configured"})
    assert call(api, "PUT", "/balloon", {"amount_mib": 16, "deflate_on_oom": True})[0] == 204
    assert call(api, "GET", "/balloon") == (200, {"amount_mib": 16, "deflate_on_oom": True, "stats_polling_interval_s": 0})
    assert call(api, "PATCH", "/balloon", {"amount_mib": 32})[0] == 204
    assert call(api, "PATCH", "/balloon/statistics", {"stats_polling_interval_s": 5})[0] == 204
    assert call(api, "GET", "/balloon")[1]["amount_mib"] == 32
    status, body = call(api, "GET", "/balloon/statistics")
    assert status == 400 and "not supported before starting" in body["fault_message"]
    vm = start(api)
    balloon = vm.config.balloon
    assert (balloon.amount_mib, balloon.deflate_on_oom, balloon.stats_polling_interval_s) == (32, True, 5)
    assert call(api, "GET", "/vm/config")[1]["balloon"] == {"amount_mib": 32, "deflate_on_oom": True,
                                                            "stats_polling_interval_s": 5}  # fmt: skip


def test_balloon_after_boot(api):
    assert call(api, "PUT", "/balloon", {"amount_mib": 0, "deflate_on_oom": False, "stats_polling_interval_s": 1})[0] == 204
    vm = start(api)
    assert call(api, "PUT", "/balloon", {"amount_mib": 1, "deflate_on_oom": False}) == (400, {"fault_message": NOT_AFTER_BOOT})
    assert call(api, "PATCH", "/balloon", {"amount_mib": 64})[0] == 204
    assert call(api, "GET", "/balloon")[1]["amount_mib"] == 64
    assert call(api, "PATCH", "/balloon/statistics", {"stats_polling_interval_s": 3})[0] == 204
    assert vm.calls == [("balloon", 64), ("interval", 3)]
    assert call(api, "GET", "/balloon/statistics") == (200, vm.stats)
    status, body = call(api, "PATCH", "/balloon/statistics", {"stats_polling_interval_s": 0})
    assert status == 400 and "cannot be turned off after the microVM started" in body["fault_message"]
    status, body = call(api, "PATCH", "/balloon", {"amount_mib": 13})  # the VM refuses: nothing recorded
    assert status == 400 and "the VM refused" in body["fault_message"]
    assert call(api, "GET", "/balloon")[1]["amount_mib"] == 64


def test_statistics_off_is_400_as_firecracker(api):
    assert call(api, "PUT", "/balloon", {"amount_mib": 0, "deflate_on_oom": False})[0] == 204
    start(api)
    status, body = call(api, "GET", "/balloon/statistics")
    assert status == 400 and "statistics are not enabled" in body["fault_message"]
    status, body = call(api, "PATCH", "/balloon/statistics", {"stats_polling_interval_s": 1})
    assert status == 400 and "cannot be turned on" in body["fault_message"]


@pytest.mark.parametrize("method, path, body, words", [
    ("PUT", "/balloon", {"amount_mib": 1}, "missing required field 'deflate_on_oom'"),
    ("PUT", "/balloon", {"amount_mib": "1", "deflate_on_oom": False}, "field 'amount_mib' must be an integer"),
    ("PUT", "/balloon", {"amount_mib": 129, "deflate_on_oom": False}, "between 0 and the guest's 128 MiB"),
    ("PUT", "/balloon", {"amount_mib": 1, "deflate_on_oom": False, "stats_polling_interval_s": -1}, "between 0 and 65535"),
    ("PUT", "/balloon", {"amount_mib": 1, "deflate_on_oom": False, "free_page_hinting": True}, "hinting is not supported"),
    ("PUT", "/balloon", {"amount_mib": 1, "deflate_on_oom": False, "size": 1}, "unknown field 'size'"),
    ("PATCH", "/balloon", {"amount_mib": 1}, "no balloon device is configured"),
    ("PATCH", "/balloon/statistics", {"stats_polling_interval_s": 1}, "no balloon device is configured"),
    ("GET", "/balloon/statistics", None, "no balloon device is configured"),
    ("PATCH", "/balloon/hinting/start", {}, "not supported by pyvmm yet"),
    ("PUT", "/drives/d", {"drive_id": "d", "path_on_host": "/x", "is_root_device": False,
                          "rate_limiter": {"bandwidth": {"size": 1}}}, "field 'rate_limiter.bandwidth.refill_time' missing"),
    ("PUT", "/network-interfaces/n", {"iface_id": "n", "host_dev_name": "t",
                                      "tx_rate_limiter": {"ops": {"size": -1, "refill_time": 1}}},
     "field 'tx_rate_limiter.ops.size' must be between 0"),
    ("PUT", "/entropy", {"rate_limiter": {"iops": BUCKET}}, "field 'rate_limiter.iops' unknown field"),
])  # fmt: skip
def test_bad_bodies(api, method, path, body, words):
    status, answer = call(api, method, path, body)
    assert status == 400 and words in answer["fault_message"], answer


def test_rate_limiters_reach_the_config_and_patch_after_boot_updates_the_devices(api, tmp_path):
    image = tmp_path / "d.img"
    image.write_bytes(bytes(4096))
    limiter = {"bandwidth": BUCKET, "ops": {"size": 100, "one_time_burst": 10, "refill_time": 1000}}
    assert call(api, "PUT", "/drives/d", {"drive_id": "d", "path_on_host": str(image), "is_root_device": False,
                                          "rate_limiter": limiter})[0] == 204  # fmt: skip
    assert call(api, "PUT", "/network-interfaces/n", {"iface_id": "n", "host_dev_name": "tap7",
                                                      "rx_rate_limiter": {"ops": BUCKET}})[0] == 204  # fmt: skip
    assert call(api, "PUT", "/entropy", {"rate_limiter": {"bandwidth": BUCKET}})[0] == 204
    vm = start(api)
    drive = vm.config.drives[0].rate_limiter
    assert drive.bandwidth.size == 1 << 20 and drive.ops.one_time_burst == 10
    assert vm.config.nets[0].rx_rate_limiter.ops.refill_time == 1000 and vm.config.nets[0].tx_rate_limiter is None
    assert vm.config.rng_rate_limiter.bandwidth.size == 1 << 20
    # PATCH: a bucket given replaces the old one; one left out stays
    assert call(api, "PATCH", "/drives/d", {"drive_id": "d", "rate_limiter": {"ops": {"size": 0, "refill_time": 0}}})[0] == 204
    assert vm.calls[-1] == ("drive", 0, {"bandwidth": {**BUCKET, "one_time_burst": 0},
                                         "ops": {"size": 0, "one_time_burst": 0, "refill_time": 0}})  # fmt: skip
    assert call(api, "PATCH", "/network-interfaces/n", {"iface_id": "n", "tx_rate_limiter": {"bandwidth": BUCKET}})[0] == 204
    assert vm.calls[-1] == ("net", 0, None, {"bandwidth": {**BUCKET, "one_time_burst": 0}})
    shown = call(api, "GET", "/vm/config")[1]
    assert shown["drives"][0]["rate_limiter"]["ops"]["size"] == 0
    assert shown["network-interfaces"][0]["tx_rate_limiter"] == {"bandwidth": {**BUCKET, "one_time_burst": 0}}
    assert shown["entropy"] == {"rate_limiter": {"bandwidth": BUCKET}}


def test_config_file_json_with_a_balloon_and_limiters():
    config = FirecrackerConfig.from_json({
        "boot-source": {"kernel_image_path": KERNEL},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
        "balloon": {"amount_mib": 8, "deflate_on_oom": True, "stats_polling_interval_s": 1},
        "entropy": {"rate_limiter": {"ops": {"size": 10, "refill_time": 100}}},
    })  # fmt: skip
    data = config.to_pyvmm()
    assert data["balloon"] == {"amount_mib": 8, "deflate_on_oom": True, "stats_polling_interval_s": 1}
    assert data["rng"] == {"enabled": True, "rate_limiter": {"ops": {"size": 10, "refill_time": 100}}}
    vm_config = config.to_vm_config()
    assert vm_config.balloon.amount_mib == 8 and vm_config.rng_rate_limiter.ops.size == 10
    # and back: GET /vm/config of a VM configured by pyvmm itself (or restored from a snapshot)
    shown = FirecrackerConfig.from_vm_config(vm_config).as_json()
    assert shown["balloon"] == {"amount_mib": 8, "deflate_on_oom": True, "stats_polling_interval_s": 1}
    assert shown["entropy"] == {"rate_limiter": {"ops": {"size": 10, "one_time_burst": 0, "refill_time": 100}}}
    with pytest.raises(Exception, match="amount_mib"):
        FirecrackerConfig.from_json({"machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
                                     "balloon": {"amount_mib": 65, "deflate_on_oom": True}})  # fmt: skip
