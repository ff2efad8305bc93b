"""VirtIO end to end: Debian's kernel uses pyvmm's virtio-blk, virtio-rng and virtio-net.

Run on the interpreter (here KVM cannot boot Linux: PVM); the same test runs
on KVM where KVM can. The guest's side is /etc/pyvmm/virtio.sh and net.sh in
the test initramfs (scripts/fetch-test-kernel).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import uuid

import pytest

from conftest import ASSETS, pyvmm_boot
from pyvmm import accel

pytestmark = pytest.mark.slow


def _backend() -> str:
    """The accelerator that can boot Linux here: KVM unless it is PVM, else the interpreter."""
    from pyvmm.accel import kvm

    if accel.probe("kvm").usable and not kvm.is_pvm_host():
        return "kvm"
    probe = accel.probe("interp")
    if not probe.usable:
        pytest.skip(f"no backend here can boot Linux: interpreter {probe.reason}")
    return "interp"


@pytest.fixture(scope="module", autouse=True)
def need_assets():
    for name in ("vmlinux", "initramfs.cpio.gz"):
        if not (ASSETS / name).exists():
            pytest.skip(f"{ASSETS / name} missing: run scripts/fetch-test-kernel")


def boot(tmp_path, cmd: str, extra: str, *, prefix=(), timeout=600):
    config = tmp_path / "vm.toml"
    config.write_text(
        f'[machine]\nmemory_mib = 256\naccel = "{_backend()}"\n'
        f'[boot]\nkernel = "{ASSETS / "vmlinux"}"\ninitrd = "{ASSETS / "initramfs.cpio.gz"}"\n'
        f'cmdline = "console=ttyS0 reboot=k panic=-1 pyvmm.cmd={cmd}"\n{extra}'
    )
    return pyvmm_boot(config, "-v", timeout=timeout, prefix=prefix)


def make_ext4(tmp_path, size_mib=160):
    """An ext4 image made on the host from a folder with a sha256 manifest of its files."""
    if not shutil.which("mkfs.ext4") or not shutil.which("debugfs"):
        pytest.skip("needs mkfs.ext4 and debugfs (e2fsprogs)")
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    files = {"small.txt": b"hello virtio-blk\n", "sub/random.bin": os.urandom(3 << 20), "zeros.bin": bytes(1 << 20)}
    for name, data in files.items():
        (tree / name).write_bytes(data)
    manifest = "".join(f"{hashlib.sha256(data).hexdigest()}  {name}\n" for name, data in files.items())
    (tree / "MANIFEST").write_text(manifest)
    image = tmp_path / "data.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(image), f"{size_mib}M"], check=True)
    return image, len(files)


def debugfs_cat(image, path) -> bytes:
    return subprocess.run(["debugfs", "-R", f"cat {path}", str(image)], capture_output=True, check=True).stdout


def test_blk_and_rng(tmp_path):
    image, nfiles = make_ext4(tmp_path)
    ro_image = tmp_path / "ro.img"
    ro_image.write_bytes(b"\xab" * (1 << 20))
    result = boot(
        tmp_path,
        "virtio",
        f'[[drive]]\npath = "{image}"\nserial = "data"\n'
        f'[[drive]]\npath = "{ro_image}"\nread_only = true\nserial = "ro"\n'
        "[rng]\nenabled = true\n",
    )
    out = result.stdout
    assert result.returncode == 0, f"{result.stderr[-2000:]}\n{out[-4000:]}"
    assert f"pyvmm-virtio: manifest ok {nfiles} files" in out, out[-4000:]
    assert "pyvmm-virtio: unmounted" in out
    # nothing lost: what the guest wrote is in the image after the VM exits
    assert debugfs_cat(image, "/result.txt") == b"written by the guest\n"
    big = debugfs_cat(image, "/big.bin")
    assert len(big) == 64 << 20
    guest_sum = out.split("pyvmm-virtio: big ")[1].split()[0]
    assert hashlib.sha256(big).hexdigest() == guest_sum
    assert debugfs_cat(image, "/big.sha256").decode().strip() == guest_sum
    # the read-only drive refuses writes and keeps its bytes
    assert "pyvmm-virtio: ro write refused" in out
    assert "pyvmm-virtio: ro read 4096 bytes" in out
    assert ro_image.read_bytes() == b"\xab" * (1 << 20)
    # virtio-rng feeds /dev/hwrng
    assert "pyvmm-virtio: hwrng virtio_rng.0 64 bytes" in out
    # device metrics at -v
    assert "virtio-blk0: requests" in result.stderr and "virtio-rng: requests" in result.stderr


def _run(*args, check=True):
    return subprocess.run(list(args), capture_output=True, text=True, check=check)


@pytest.fixture
def netns():
    """A network namespace with a TAP device at 10.0.2.1/24 (our own test host)."""
    if os.geteuid() != 0:
        pytest.skip("virtio-net test needs root (network namespace and TAP device)")
    if not shutil.which("ip"):
        pytest.skip("needs iproute2's ip")
    name = f"pyvmm-{uuid.uuid4().hex[:8]}"
    if _run("ip", "netns", "add", name, check=False).returncode != 0:
        pytest.skip("cannot create a network namespace here")
    try:
        _run("ip", "-n", name, "link", "set", "lo", "up")
        _run("ip", "-n", name, "tuntap", "add", "dev", "tap0", "mode", "tap", "vnet_hdr")
        _run("ip", "-n", name, "addr", "add", "10.0.2.1/24", "dev", "tap0")
        _run("ip", "-n", name, "link", "set", "tap0", "up")
        yield name
    finally:
        _run("ip", "netns", "del", name, check=False)


def test_net_tcp_and_ping(tmp_path, netns):
    # a TCP server inside the namespace, on the TAP's address
    server_code = (
        "import socket\n"
        "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        "s.bind(('10.0.2.1', 5000)); s.listen(1); s.settimeout(600)\n"
        "c, _ = s.accept(); c.settimeout(60)\n"
        "data = b''\n"
        "while not data.endswith(b'\\n'):\n"
        "    chunk = c.recv(100)\n"
        "    if not chunk: break\n"
        "    data += chunk\n"
        "c.sendall(b'server got: ' + data); c.close()\n"
        "print(data.decode().strip(), flush=True)\n"
    )
    server = subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, "-c", server_code], stdout=subprocess.PIPE, text=True
    )
    try:
        result = boot(
            tmp_path,
            "net",
            '[[net]]\ntap = "tap0"\nmac = "52:54:00:12:34:56"\n',
            prefix=("ip", "netns", "exec", netns),
        )
        out = result.stdout
        assert result.returncode == 0, f"{result.stderr[-2000:]}\n{out[-4000:]}"
        assert "pyvmm-net: mac 52:54:00:12:34:56" in out
        assert "pyvmm-net: ping ok" in out, out[-3000:]
        assert "pyvmm-net: reply: server got: hello from the guest" in out
        assert server.wait(30) == 0
        assert server.stdout.read().strip() == "hello from the guest"
    finally:
        if server.poll() is None:
            server.kill()
