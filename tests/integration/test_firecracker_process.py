"""``pyvmm-firecracker`` as tools that spawn Firecracker use it: an API socket, a config file, stdout.

The child runs with the accelerator of the `backend` fixture (``--accel``), so the
API's lifecycle is checked on every backend; requests go over the Unix socket with
http.client, as an SDK would send them.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import ASSETS, CHILDREN, GUESTS


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str):
        super().__init__("localhost", timeout=30)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(self.path)


def request(conn, method, path, body=None):
    conn.request(method, path, body=None if body is None else json.dumps(body),
                 headers={"Content-Type": "application/json", "Accept": "application/json"})  # fmt: skip
    response = conn.getresponse()
    data = response.read()
    return response.status, json.loads(data) if data else None


def spawn(tmp_path, *args, accel="interp", cpu="host", stdin=subprocess.DEVNULL, name="fc.sock"):
    sock = tmp_path / name
    child = subprocess.Popen([sys.executable, "-m", "pyvmm.firecracker_cli", "--api-sock", str(sock), "--accel", accel,
                              "--cpu", cpu, "--level", "Info", *args], stdin=stdin, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)  # fmt: skip
    CHILDREN.append(child)
    deadline = time.monotonic() + 30
    while not sock.exists():
        assert child.poll() is None, child.stderr.read().decode()
        assert time.monotonic() < deadline, "the API socket did not appear"
        time.sleep(0.02)
    return child, sock


def finish(child, timeout: float = 120) -> tuple[bytes, bytes]:
    """Wait for the child to end by itself (killed after ``timeout``); its remaining output."""
    try:
        return child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        return child.communicate()


def read_until(stream, text: str, timeout: float = 60) -> bytes:
    os.set_blocking(stream.fileno(), False)
    seen, deadline = b"", time.monotonic() + timeout
    while text.encode() not in seen:
        assert time.monotonic() < deadline, f"{text!r} not seen; got {seen[-500:]!r}"
        chunk = stream.read(65536)
        if chunk:
            seen += chunk
        else:
            time.sleep(0.02)
    return seen


def test_configure_start_pause_resume_and_metrics_over_the_socket(backend, tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    child, sock = spawn(tmp_path, accel=backend)
    conn = UnixConnection(str(sock))
    try:
        assert request(conn, "GET", "/")[1]["state"] == "Not started"
        assert request(conn, "PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 64})[0] == 204
        assert request(conn, "PUT", "/boot-source", {"kernel_image_path": str(GUESTS / "counter.elf"),
                                                     "boot_args": "console=ttyS0"})[0] == 204  # fmt: skip
        assert request(conn, "PUT", "/metrics", {"metrics_path": str(metrics)})[0] == 204
        status, body = request(conn, "PUT", "/machine-config", {"vcpu_count": 0, "mem_size_mib": 64})
        assert status == 400 and "vcpu_count" in body["fault_message"]
        assert request(conn, "PUT", "/actions", {"action_type": "InstanceStart"})[0] == 204
        read_until(child.stdout, "counter: start")
        assert request(conn, "GET", "/")[1]["state"] == "Running"
        assert request(conn, "PATCH", "/vm", {"state": "Paused"})[0] == 204
        assert request(conn, "GET", "/")[1]["state"] == "Paused"
        assert request(conn, "PATCH", "/vm", {"state": "Resumed"})[0] == 204
        assert request(conn, "GET", "/")[1]["state"] == "Running"
        assert request(conn, "PUT", "/actions", {"action_type": "FlushMetrics"})[0] == 204
        status, body = request(conn, "PUT", "/boot-source", {"kernel_image_path": str(GUESTS / "hello.elf")})
        assert status == 400 and "after starting" in body["fault_message"]
    finally:
        conn.close()
        child.send_signal(signal.SIGTERM)
        _, stderr = child.communicate(timeout=30)
    assert child.returncode == 128 + signal.SIGTERM, stderr.decode()[-2000:]
    assert not sock.exists(), "the API socket is removed on exit"
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert records and set(records[0]["vcpus"]) == {"vcpu0", "vcpu1"}
    assert records[0]["process"]["rss_bytes"] > 0
    vcpu0 = records[0]["vcpus"]["vcpu0"]
    assert vcpu0["exits"].get("IoOut", 0) > 0 or backend != "kvm"
    if vcpu0["exits"].get("IoOut"):  # every served exit is in its latency histogram
        out = vcpu0["latency"]["IoOut"]
        assert vcpu0["exits"]["IoOut"] - 1 <= out["count"] <= vcpu0["exits"]["IoOut"]  # one may be in flight
        assert 0 < out["p50_us"] <= out["p90_us"] <= out["p99_us"] <= out["max_us"]


def test_a_config_file_without_the_api_boots_at_once_and_exits_with_the_guests_status(tmp_path):
    config = tmp_path / "vm.json"
    config.write_text(json.dumps({
        "boot-source": {"kernel_image_path": str(GUESTS / "exitcode.elf"), "boot_args": "console=ttyS0 exit=7"},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 32}, "drives": [], "network-interfaces": [],
    }))  # fmt: skip
    result = subprocess.run([sys.executable, "-m", "pyvmm.firecracker_cli", "--no-api", "--config-file", str(config),
                             "--accel", "interp"], stdin=subprocess.DEVNULL, capture_output=True, timeout=60)  # fmt: skip
    assert result.returncode == 7, result.stderr.decode()
    assert b"exit: 7" in result.stdout


@pytest.mark.parametrize("body, words", [
    ({"machine-config": {"vcpu_count": 1}}, "missing required field 'mem_size_mib'"),
    ({"boot-source": {"kernel_image_path": "/nonexistent"}, "machine-config": {"vcpu_count": 1, "mem_size_mib": 32}},
     "boot-source.kernel_image_path: file not found"),
    ({"vsock": {"guest_cid": 1, "uds_path": "/tmp/v"}}, "vsock: field 'guest_cid' must be between 3 and 4294967294"),
])  # fmt: skip
def test_a_bad_config_file_is_a_one_line_error(tmp_path, body, words):
    config = tmp_path / "vm.json"
    config.write_text(json.dumps(body))
    result = subprocess.run([sys.executable, "-m", "pyvmm.firecracker_cli", "--no-api", "--config-file", str(config),
                             "--accel", "interp"], stdin=subprocess.DEVNULL, capture_output=True, timeout=60)  # fmt: skip
    err = result.stderr.decode().strip()
    assert result.returncode != 0 and words in err and "Traceback" not in err
    assert len(err.splitlines()) == 1, err


def test_no_api_needs_a_config_file(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pyvmm.firecracker_cli", "--no-api"], capture_output=True, timeout=30)
    assert result.returncode == 1 and b"--no-api needs --config-file" in result.stderr


def test_a_live_socket_is_not_taken_over(tmp_path):
    child, sock = spawn(tmp_path)
    try:
        second = subprocess.run([sys.executable, "-m", "pyvmm.firecracker_cli", "--api-sock", str(sock)],
                                capture_output=True, timeout=30)  # fmt: skip
        assert second.returncode != 0 and b"another process is serving on it" in second.stderr
    finally:
        child.send_signal(signal.SIGTERM)
        child.communicate(timeout=30)


@pytest.mark.slow
def test_debian_kernel_through_the_api_pauses_resumes_and_ends_with_the_guests_reboot(tmp_path):
    """Linux on the interpreter, configured and started over the socket; paused and resumed while it
    boots; init's `reboot -f` ends the process with status 0, as Firecracker's does."""
    for name in ("vmlinux", "initramfs.cpio.gz"):
        if not (ASSETS / name).exists():
            pytest.skip(f"{ASSETS / name} missing: run scripts/fetch-test-kernel")
    child, sock = spawn(tmp_path)
    conn = UnixConnection(str(sock))
    try:
        assert request(conn, "PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 256})[0] == 204
        assert request(conn, "PUT", "/boot-source", {
            "kernel_image_path": str(ASSETS / "vmlinux"), "initrd_path": str(ASSETS / "initramfs.cpio.gz"),
            "boot_args": "console=ttyS0 reboot=k panic=-1 pyvmm.cmd=hello"})[0] == 204  # fmt: skip
        assert request(conn, "PUT", "/actions", {"action_type": "InstanceStart"})[0] == 204
        early = read_until(child.stdout, "Linux version", timeout=120)
        assert request(conn, "PATCH", "/vm", {"state": "Paused"})[0] == 204
        time.sleep(0.5)
        assert request(conn, "GET", "/")[1]["state"] == "Paused"
        assert request(conn, "PATCH", "/vm", {"state": "Resumed"})[0] == 204
        rest = read_until(child.stdout, "pyvmm-init: done", timeout=240)
    finally:
        conn.close()
    out, stderr = finish(child, 60)
    text = (early + rest + out).decode(errors="replace")
    assert "pyvmm-init: hello ok" in text
    assert child.returncode == 0, stderr.decode()[-2000:]


def test_pyvmm_boot_serves_the_same_api_and_writes_the_journal(tmp_path):
    """`pyvmm boot CONFIG --api-sock S --journal J`: a TOML-configured VM driven through Firecracker's
    endpoints; GET /vm/config gives the TOML's VM in Firecracker's shapes; the journal has each transition."""
    config = tmp_path / "vm.toml"
    config.write_text(f'[machine]\nvcpus = 1\nmemory_mib = 32\naccel = "interp"\n'
                      f'[boot]\nkernel = "{GUESTS / "counter.elf"}"\ncmdline = "console=ttyS0"\n')  # fmt: skip
    sock, journal = tmp_path / "api.sock", tmp_path / "events.jsonl"
    child = subprocess.Popen([sys.executable, "-m", "pyvmm", "boot", str(config), "--api-sock", str(sock), "--journal",
                              str(journal)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        read_until(child.stdout, "counter: start")
        conn = UnixConnection(str(sock))
        assert request(conn, "PATCH", "/vm", {"state": "Paused"})[0] == 204
        assert request(conn, "GET", "/")[1]["state"] == "Paused"
        assert request(conn, "PATCH", "/vm", {"state": "Resumed"})[0] == 204
        status, vm_config = request(conn, "GET", "/vm/config")
        assert status == 200 and vm_config["machine-config"]["mem_size_mib"] == 32
        assert vm_config["boot-source"]["kernel_image_path"].endswith("counter.elf")
        status, body = request(conn, "PUT", "/actions", {"action_type": "InstanceStart"})
        assert status == 400 and "after starting" in body["fault_message"]
        conn.close()
    finally:
        child.send_signal(signal.SIGTERM)
        _, stderr = child.communicate(timeout=30)
    assert child.returncode == 128 + signal.SIGTERM, stderr.decode()[-2000:]
    events = [json.loads(line)["event"] for line in journal.read_text().splitlines()]
    assert events == ["configured", "started", "paused", "resumed", "stopped"]
