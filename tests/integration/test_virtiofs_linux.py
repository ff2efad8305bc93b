"""virtio-fs end to end: Debian's kernel mounts two host directories served by virtiofsd.

One boot on the interpreter (KVM here is PVM and cannot boot Linux). The guest script is
appended to the test initramfs as a second cpio archive (the kernel unpacks every archive
of the initrd in turn): it loads virtiofs, mounts a writable and a read-only share by tag,
reads a 16 MiB host file (timed) and hashes it, lists a directory, writes a file the host then reads,
copies the 16 MiB file from one share to the other (timed), unloads and reloads the driver
(a device reset, then DRIVER_OK again) and reads through the share once more,
and tries to write to the read-only share without telling its mount so (the host refuses).
After the VM, no virtiofsd is left running.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import stat

import psutil
import pytest

from conftest import ASSETS, pyvmm_boot

pytestmark = pytest.mark.slow

GUEST_SCRIPT = r"""
say() { echo "pyvmm-fs: $*"; }
for m in virtio_mmio virtiofs; do modprobe "$m" || say "modprobe $m failed"; done
mkdir -p /mnt/rw /mnt/ro
mount -t virtiofs rwshare /mnt/rw && say "mounted rwshare"
mount -t virtiofs roshare /mnt/ro && say "mounted roshare"
start=$(cut -d' ' -f1 /proc/uptime)
dd if=/mnt/ro/big.bin of=/dev/null bs=1048576 2>/dev/null
end=$(cut -d' ' -f1 /proc/uptime)
say "big $(sha256sum /mnt/ro/big.bin | cut -d' ' -f1) $start $end"
say "listing $(ls /mnt/ro/dir | tr '\n' ',')"
say "small $(cat /mnt/rw/hello.txt)"
echo "written by the guest" > /mnt/rw/from-guest.txt && sync && say "rw write ok"
sync; echo 3 > /proc/sys/vm/drop_caches
start=$(cut -d' ' -f1 /proc/uptime)
dd if=/mnt/ro/big.bin of=/mnt/rw/copy.bin bs=1048576 2>/dev/null && sync
end=$(cut -d' ' -f1 /proc/uptime)
say "copied $start $end"
if (echo nope > /mnt/ro/nope.txt) 2>/tmp/err; then say "ro write ALLOWED"; else say "ro write refused: $(cat /tmp/err)"; fi
if mkdir /mnt/ro/newdir 2>/dev/null; then say "ro mkdir ALLOWED"; else say "ro mkdir refused"; fi
# a program whose pages virtiofsd writes into guest RAM (not the guest's page cache) runs
cp /bin/busybox /mnt/rw/busybox && sync && echo 3 > /proc/sys/vm/drop_caches && say "$(/mnt/rw/busybox echo ran from the share)"
umount /mnt/rw && umount /mnt/ro && say "unmounted"
# the driver resets both devices (GET_VRING_BASE stops virtiofsd's rings) and probes them again
rmmod virtiofs && modprobe virtiofs && mount -t virtiofs rwshare /mnt/rw && say "again $(cat /mnt/rw/from-guest.txt)"
umount /mnt/rw
"""


def newc_cpio(files: dict[str, tuple[bytes, int]]) -> bytes:
    """A gzip'd newc cpio archive of ``{path: (data, mode)}`` (directories get no entry of their own:
    the base initramfs has /etc/pyvmm)."""
    out = bytearray()
    entries = [(name, data, mode) for name, (data, mode) in files.items()] + [("TRAILER!!!", b"", 0)]
    for ino, (name, data, mode) in enumerate(entries, start=1000):
        encoded = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
        out += ("070701" + "".join(f"{v:08X}" for v in fields)).encode() + encoded
        out += b"\0" * (-len(out) % 4) + data
        out += b"\0" * (-len(out) % 4)
    out += b"\0" * (-len(out) % 512)
    return gzip.compress(bytes(out), mtime=0)


def _virtiofsd_for(directory) -> list[str]:
    """Live virtiofsd processes serving a directory under ``directory`` (other tests may run theirs)."""
    found = []
    for proc in psutil.process_iter(["name", "status", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if proc.info["name"] == "virtiofsd" and proc.info["status"] != psutil.STATUS_ZOMBIE and str(directory) in cmdline:
            found.append(f"{proc.pid} {proc.info['status']} {cmdline}")
    return found


def test_virtiofs_shares(tmp_path):
    for name in ("vmlinux", "initramfs.cpio.gz"):
        if not (ASSETS / name).exists():
            pytest.skip(f"{ASSETS / name} missing: run scripts/fetch-test-kernel")
    if not os.path.exists("/usr/lib/qemu/virtiofsd"):
        pytest.skip("/usr/lib/qemu/virtiofsd missing (Debian package qemu-system-common)")
    if os.geteuid() != 0:
        pytest.skip("virtiofsd's sandbox (namespaces) needs root")
    from pyvmm import accel

    probe = accel.probe("interp")
    if not probe.usable:
        pytest.skip(f"interpreter not usable: {probe.reason}")

    rw, ro = tmp_path / "rw", tmp_path / "ro"
    (ro / "dir").mkdir(parents=True)
    rw.mkdir()
    big = os.urandom(16 << 20)
    (ro / "big.bin").write_bytes(big)
    for name in ("alpha", "beta", "gamma"):
        (ro / "dir" / name).write_text(name)
    (rw / "hello.txt").write_text("hello from the host")
    initrd = tmp_path / "initrd.gz"
    initrd.write_bytes((ASSETS / "initramfs.cpio.gz").read_bytes()
                       + newc_cpio({"etc/pyvmm/virtiofs.sh": (GUEST_SCRIPT.encode(), stat.S_IFREG | 0o755)}))  # fmt: skip
    config = tmp_path / "vm.toml"
    config.write_text(
        f'[machine]\nmemory_mib = 256\naccel = "interp"\n'
        f'[boot]\nkernel = "{ASSETS / "vmlinux"}"\ninitrd = "{initrd}"\n'
        f'cmdline = "console=ttyS0 reboot=k panic=-1 pyvmm.cmd=virtiofs"\n'
        f'[[share]]\npath = "{rw}"\ntag = "rwshare"\n'
        f'[[share]]\npath = "{ro}"\ntag = "roshare"\nread_only = true\n'
    )
    result = pyvmm_boot(config, "-v", timeout=600)
    out = result.stdout
    assert result.returncode == 0, f"{result.stderr[-3000:]}\n{out[-4000:]}"
    assert "pyvmm-fs: mounted rwshare" in out and "pyvmm-fs: mounted roshare" in out, out[-4000:]
    found = re.search(r"pyvmm-fs: big ([0-9a-f]{64}) ([\d.]+) ([\d.]+)", out)
    assert found, out[-4000:]
    assert found.group(1) == hashlib.sha256(big).hexdigest()
    seconds = float(found.group(3)) - float(found.group(2))
    print(f"16 MiB read (dd, cold) through virtio-fs on the interpreter: {seconds:.2f} s ({16 / seconds:.1f} MiB/s)")
    copied = re.search(r"pyvmm-fs: copied ([\d.]+) ([\d.]+)", out)
    assert copied and (rw / "copy.bin").read_bytes() == big
    seconds = float(copied.group(2)) - float(copied.group(1))
    print(f"16 MiB copied share to share (read + write + sync) on the interpreter: {seconds:.2f} s")
    assert "pyvmm-fs: listing alpha,beta,gamma," in out
    assert "pyvmm-fs: small hello from the host" in out
    assert "pyvmm-fs: rw write ok" in out
    assert (rw / "from-guest.txt").read_text() == "written by the guest\n"
    assert "pyvmm-fs: ro write refused" in out and "Read-only file system" in out, out[-3000:]
    assert "pyvmm-fs: ro mkdir refused" in out
    assert sorted(p.name for p in ro.iterdir()) == ["big.bin", "dir"]  # nothing appeared on the host
    assert "pyvmm-fs: ran from the share" in out
    assert "pyvmm-fs: unmounted" in out
    assert "pyvmm-fs: again written by the guest" in out  # after a driver reset and a new probe
    assert "virtio-fs0: requests" in result.stderr and "needs_reset 0" in result.stderr.split("virtio-fs1:")[-1]
    for name in ("virtio-fs0", "virtio-fs1"):  # the backends never failed the devices
        assert re.search(rf"{name}: .*errors 0,.*needs_reset 0", result.stderr), result.stderr[-3000:]
    assert not _virtiofsd_for(tmp_path), "a virtiofsd outlived the VM"
