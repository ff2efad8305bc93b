"""The initramfs ``pyvmm run`` makes: driver load order, the init script, the image, kernel releases."""

from __future__ import annotations

import gzip
import shutil

import pytest

from conftest import ASSETS
from pyvmm.run import initramfs
from pyvmm.run.initramfs import GuestShare, InitramfsError, init_script, modules_in_load_order


def module_tree(tmp_path, dep_lines, builtin=""):
    moddir = tmp_path / "lib" / "modules" / "6.1.0-test"
    moddir.mkdir(parents=True)
    (moddir / "modules.dep").write_text("".join(line + "\n" for line in dep_lines))
    (moddir / "modules.builtin").write_text(builtin)
    return moddir


def test_drivers_load_after_what_they_depend_on_and_builtins_are_skipped(tmp_path):
    moddir = module_tree(tmp_path, [
        "kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko",
        "kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko",
        "kernel/drivers/virtio/virtio_ring.ko:",
        "kernel/fs/fuse/virtiofs.ko: kernel/fs/fuse/fuse.ko kernel/drivers/virtio/virtio.ko",
        "kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko: kernel/net/vmw_vsock/vsock.ko",
        "kernel/net/vmw_vsock/vsock.ko:",
        "kernel/fs/overlayfs/overlay.ko:",
    ], builtin="kernel/fs/fuse/fuse.ko\n")  # fmt: skip
    order = modules_in_load_order(moddir)
    assert order.index("kernel/drivers/virtio/virtio_ring.ko") < order.index("kernel/drivers/virtio/virtio.ko") \
        < order.index("kernel/drivers/virtio/virtio_mmio.ko")  # fmt: skip
    assert order.index("kernel/net/vmw_vsock/vsock.ko") < order.index("kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko")
    assert "kernel/fs/fuse/fuse.ko" not in order and len(order) == len(set(order)) == 7


def test_a_missing_driver_or_tree_is_named_in_one_line(tmp_path):
    moddir = module_tree(tmp_path, ["kernel/drivers/virtio/virtio_mmio.ko:"])
    with pytest.raises(InitramfsError, match="has no kernel/fs/fuse/virtiofs.ko"):
        modules_in_load_order(moddir)
    with pytest.raises(InitramfsError, match="modules.dep is missing"):
        modules_in_load_order(tmp_path)


def test_the_init_mounts_the_root_as_asked_and_starts_the_agent_last():
    script = init_script(modules=["kernel/a.ko"], python="/usr/bin/python3", agent="/opt/my dir/agent.py", port=1024,
                         ready_port=1025, writable_root=False, shares=[GuestShare("pyvmm-share0", "/srv/data x", False)])  # fmt: skip
    lines = script.splitlines()
    assert "insmod /lib/modules/kernel/a.ko || fail 'cannot load kernel/a.ko'" in lines
    assert any(line.startswith("mount -t virtiofs -o ro pyvmm-root /newroot") for line in lines)
    assert any(line.startswith("mount -t virtiofs -o rw pyvmm-share0 '/newroot/srv/data x'") for line in lines)
    assert "mount -t tmpfs -o mode=755 tmpfs /newroot/run" in script
    assert all(f"lowerdir=/newroot{d}," in script for d in initramfs.OVERLAY_DIRS)  # read-only root: overlays
    assert lines[-2] == "exec switch_root /newroot /usr/bin/python3 -I -S '/opt/my dir/agent.py' --port 1024 --ready-port 1025"
    assert not any(line.startswith("ip ") for line in lines)  # no NIC, no network set-up
    writable = init_script(modules=[], python="p", agent="a", port=1, ready_port=2, writable_root=True, shares=[],
                           address="10.0.2.15/24")  # fmt: skip
    assert "-o rw pyvmm-root" in writable and "overlay" not in writable  # the host's own /tmp
    assert "ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 || fail 'cannot configure eth0'" in writable


@pytest.mark.skipif(not (ASSETS / "busybox").exists(), reason="tests/assets/busybox missing: run scripts/fetch-test-kernel")
def test_the_image_holds_busybox_the_drivers_and_the_init(tmp_path):
    release = (ASSETS / "kernel-version").read_text().strip()
    image = initramfs.build(ASSETS / "busybox", module_root=ASSETS / "modules", kernel_release=release,
                            python="/usr/bin/python3", agent="/a.py", port=1024, ready_port=1025)  # fmt: skip
    archive = gzip.decompress(image)
    for name in (b"bin/busybox", b"bin/switch_root", b"init", b"virtiofs.ko", b"vmw_vsock_virtio_transport.ko", b"TRAILER!!!"):
        assert name in archive


def test_a_dynamic_busybox_is_refused(tmp_path):
    dynamic = shutil.which("ls")
    with pytest.raises(InitramfsError, match="not a static busybox"):
        initramfs.build(__import__("pathlib").Path(dynamic), module_root=None, kernel_release=None, python="p",
                        agent="a", port=1, ready_port=2)  # fmt: skip


@pytest.mark.skipif(not (ASSETS / "bzImage").exists(), reason="tests/assets missing: run scripts/fetch-test-kernel")
def test_the_kernel_release_is_read_from_a_bzimage_and_from_a_vmlinux():
    release = (ASSETS / "kernel-version").read_text().strip()
    assert initramfs.kernel_release(ASSETS / "bzImage") == release
    assert initramfs.kernel_release(ASSETS / "vmlinux") == release
