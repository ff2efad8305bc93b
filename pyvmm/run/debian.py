"""Debian's cloud kernel and a static busybox, fetched once into a cache folder.

``fetch(dest)`` finds the ``linux-image-6.1.0-*-cloud-amd64`` the
``linux-image-cloud-amd64`` metapackage depends on and ``busybox-static``,
downloads them with ``apt-get download`` (Debian only) and writes into ``dest``:

  bzImage          /boot/vmlinuz-* as shipped
  vmlinux          the ELF kernel inside the bzImage (LZ4 payload), with a PVH entry note
  modules/         lib/modules/<version>/ with the virtio, vsock and virtio-fs drivers and their dependencies
  busybox          the static busybox (for initramfs images: mount, insmod, switch_root)
  kernel-version   the kernel release (uname -r)

Idempotent: nothing is redone while the stamp file says the outputs come from the same
package versions and format. ``pyvmm fetch-kernel`` runs it into the user's cache
(``default_cache()``), the test suite's ``scripts/fetch-test-kernel`` into tests/assets/.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

from pyvmm.errors import PyvmmError

KERNEL_META = "linux-image-cloud-amd64"
KERNEL_NAME_RE = re.compile(r"^linux-image-6\.1\.0-(\d+)-cloud-amd64$")
BUSYBOX = "busybox-static"

# Bump when the outputs change for the same packages (forces a rebuild).
FORMAT = 4
OUTPUTS = ("bzImage", "vmlinux", "busybox", "kernel-version")
STAMP = "fetch.stamp"

# Modules wanted in the guest (paths below lib/modules/<version>/); their
# dependencies are added from modules.dep.
WANTED_MODULES = [
    "kernel/drivers/virtio/",
    "kernel/drivers/block/virtio_blk.ko",
    "kernel/drivers/net/virtio_net.ko",
    "kernel/drivers/net/net_failover.ko",
    "kernel/net/core/failover.ko",
    "kernel/drivers/char/hw_random/virtio-rng.ko",
    "kernel/drivers/char/virtio_console.ko",
    # virtio-vsock, virtio-fs (fuse + virtiofs); virtio_balloon comes with drivers/virtio/
    "kernel/net/vmw_vsock/vsock.ko",
    "kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko",
    "kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko",
    "kernel/fs/fuse/fuse.ko",
    "kernel/fs/fuse/virtiofs.ko",
    "kernel/fs/overlayfs/overlay.ko",  # pyvmm run: the host's /tmp under a tmpfs upper layer
]

# Linux's bzImage compresses with the LZ4 legacy format (lz4 -l, magic
# 0x184C2102); the frame format (0x184D2204) is accepted too.
LZ4_MAGICS = (b"\x02\x21\x4c\x18", b"\x04\x22\x4d\x18")


def default_cache() -> Path:
    """Where ``pyvmm fetch-kernel`` puts the kernel: $PYVMM_KERNEL_DIR, else ~/.cache/pyvmm/kernel."""
    if os.environ.get("PYVMM_KERNEL_DIR"):
        return Path(os.environ["PYVMM_KERNEL_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "pyvmm" / "kernel"


class FetchError(PyvmmError):
    """Fetching or unpacking the kernel failed; the message says which step and why."""


def say(msg: str) -> None:
    print(f"fetch-kernel: {msg}", flush=True)


def run(cmd: list[str], *, cwd: Path | None = None, what: str) -> str:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError as err:
        raise FetchError(f"{what}: {cmd[0]} not found") from err
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise FetchError(f"{what}: {' '.join(cmd)} failed: {detail[-1] if detail else 'exit ' + str(proc.returncode)}")
    return proc.stdout


# ---------------------------------------------------------------------------
# apt


def apt_update() -> None:
    say("apt-get update")
    run(["apt-get", "update", "-qq"], what="apt-get update")


def candidate_version(package: str) -> str | None:
    try:
        out = run(["apt-cache", "policy", package], what="apt-cache policy")
    except FetchError:
        return None
    m = re.search(r"^\s*Candidate:\s*(\S+)", out, re.M)
    return m.group(1) if m and m.group(1) != "(none)" else None


def newest_kernel_package() -> str | None:
    """The linux-image-6.1.0-N-cloud-amd64 the metapackage depends on, else the highest N known."""
    try:
        out = run(["apt-cache", "depends", KERNEL_META], what="apt-cache depends")
        for line in out.splitlines():
            m = re.match(r"\s*Depends:\s*(\S+)", line)
            if m and KERNEL_NAME_RE.match(m.group(1)):
                return m.group(1)
    except FetchError:
        pass
    try:
        out = run(["apt-cache", "search", "--names-only", r"^linux-image-6\.1\.0-[0-9]+-cloud-amd64$"], what="apt-cache search")
    except FetchError:
        return None
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    names = [n for n in names if KERNEL_NAME_RE.match(n)]
    return max(names, key=lambda n: int(KERNEL_NAME_RE.match(n).group(1)), default=None)


def resolve_packages() -> tuple[str, str, str]:
    """(kernel package, its version, busybox version), running apt-get update once if needed."""
    for attempt in range(2):
        kernel = newest_kernel_package()
        kernel_version = candidate_version(kernel) if kernel else None
        busybox_version = candidate_version(BUSYBOX)
        if kernel and kernel_version and busybox_version:
            return kernel, kernel_version, busybox_version
        if attempt == 0:
            apt_update()
    missing = "linux-image-6.1.0-*-cloud-amd64" if not (kernel and kernel_version) else BUSYBOX
    raise FetchError(f"apt knows no package {missing} (is this Debian 12 with bookworm sources?)")


def deb_fields(path: Path) -> tuple[str, str]:
    out = run(["dpkg-deb", "-f", str(path), "Package", "Version"], what="dpkg-deb -f")
    fields = dict(line.split(": ", 1) for line in out.strip().splitlines() if ": " in line)
    return fields.get("Package", ""), fields.get("Version", "")


def download(package: str, version: str, debs: Path) -> Path:
    """The .deb of package=version in debs/, downloading it when absent."""
    for deb in sorted(debs.glob(f"{package}_*.deb")):
        if deb_fields(deb) == (package, version):
            say(f"have {deb.name}")
            return deb
    for attempt in range(2):
        try:
            say(f"apt-get download {package}={version}")
            run(["apt-get", "download", "-q", f"{package}={version}"], cwd=debs, what="apt-get download")
            break
        except FetchError:
            if attempt:
                raise
            apt_update()  # stale lists point at versions the mirror dropped
    for deb in sorted(debs.glob(f"{package}_*.deb")):
        if deb_fields(deb) == (package, version):
            return deb
    raise FetchError(f"apt-get download {package}={version} left no matching .deb in {debs}")


def ensure_tool(tool: str, package: str) -> None:
    if shutil.which(tool):
        return
    say(f"installing {package} (for {tool})")
    try:
        run(["apt-get", "install", "-y", "-qq", package], what=f"apt-get install {package}")
    except FetchError:
        apt_update()
        run(["apt-get", "install", "-y", "-qq", package], what=f"apt-get install {package}")
    if not shutil.which(tool):
        raise FetchError(f"{tool} still missing after apt-get install {package}")


# ---------------------------------------------------------------------------
# kernel


def extract_vmlinux(bzimage: bytes, work: Path) -> bytes:
    """Decompress the LZ4 payload of a bzImage into the ELF vmlinux."""
    setup_sects = bzimage[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    payload = bzimage[start : start + payload_length]
    if not payload.startswith(LZ4_MAGICS):
        # the header does not point at LZ4 data: fall back to searching for the magic
        hits = [i for i in (bzimage.find(m) for m in LZ4_MAGICS) if i >= 0]
        if not hits:
            raise FetchError("bzImage payload is not LZ4 (no LZ4 magic found): is this a CONFIG_KERNEL_LZ4 kernel?")
        payload = bzimage[min(hits) :]
    # The kernel build appends the decompressed size (u32) after the stream.
    expected_size = struct.unpack_from("<I", payload, len(payload) - 4)[0] if len(payload) >= 4 else None
    compressed = work / "payload.lz4"
    compressed.write_bytes(payload)
    proc = subprocess.run(["lz4", "-dc", str(compressed)], capture_output=True)
    data = proc.stdout
    # lz4 reports that appended size as a corrupt block and exits 1 even for a
    # good payload: the output is judged by its content and length instead.
    err = proc.stderr.decode(errors="replace").strip().splitlines()
    if not data.startswith(b"\x7fELF"):
        raise FetchError(f"lz4 -dc of the bzImage payload gave no ELF: {err[-1] if err else 'no output'}")
    if expected_size not in (None, len(data)):
        raise FetchError(
            f"lz4 -dc of the bzImage payload gave {len(data)} bytes, the kernel build recorded {expected_size} "
            f"({err[-1] if err else 'no lz4 message'})"
        )
    return data


def pvh_entry(elf: bytes) -> int | None:
    """XEN_ELFNOTE_PHYS32_ENTRY from the PT_NOTE segments of an ELF64 (enough to verify the extraction)."""
    if elf[4] != 2 or elf[5] != 1:
        raise FetchError("vmlinux is not a little-endian ELF64")
    e_phoff, = struct.unpack_from("<Q", elf, 0x20)
    e_phentsize, e_phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(e_phnum):
        p_type, _flags, p_offset, _vaddr, _paddr, p_filesz = struct.unpack_from("<IIQQQQ", elf, e_phoff + i * e_phentsize)
        if p_type != 4:  # PT_NOTE
            continue
        if p_offset + p_filesz > len(elf):
            raise FetchError("vmlinux is truncated (a PT_NOTE segment lies past its end)")
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
            desc_at = pos + 12 + ((namesz + 3) & ~3)
            if name == b"Xen" and ntype == 18 and descsz in (4, 8):
                return int.from_bytes(elf[desc_at : desc_at + descsz], "little")
            pos = desc_at + ((descsz + 3) & ~3)
    return None


# ---------------------------------------------------------------------------
# modules


def collect_modules(moddir: Path) -> list[str]:
    """The wanted module paths (relative to moddir) plus their dependencies from modules.dep."""
    deps: dict[str, list[str]] = {}
    dep_file = moddir / "modules.dep"
    if dep_file.exists():
        for line in dep_file.read_text().splitlines():
            if ":" in line:
                mod, rest = line.split(":", 1)
                deps[mod.strip()] = rest.split()
    wanted: list[str] = []
    for item in WANTED_MODULES:
        path = moddir / item
        if item.endswith("/"):
            if path.is_dir():
                wanted += sorted(str(p.relative_to(moddir)) for p in path.rglob("*.ko*"))
        else:
            # the tree may ship compressed modules (.ko.xz, .ko.zst): use whichever exists
            wanted += sorted(str(p.relative_to(moddir)) for p in path.parent.glob(path.name + "*")) if path.parent.is_dir() else []
    result: list[str] = []
    todo = list(wanted)
    while todo:
        mod = todo.pop(0)
        if mod in result or not (moddir / mod).exists():
            continue
        result.append(mod)
        todo += deps.get(mod, [])
    return sorted(result)


def depmod(busybox: Path, root: Path, version: str) -> None:
    """Write modules.dep & co. for root/lib/modules/<version> (the .deb ships none: its postinst runs depmod)."""
    run([str(busybox), "depmod", "-b", str(root), version], what="busybox depmod")


def copy_modules(busybox: Path, src_root: Path, dst_root: Path, version: str) -> list[str]:
    """Copy the wanted modules and their dependencies from src_root to dst_root (both holding lib/modules/<version>)."""
    src_moddir = src_root / "lib" / "modules" / version
    dst_moddir = dst_root / "lib" / "modules" / version
    depmod(busybox, src_root, version)
    mods = collect_modules(src_moddir)
    if dst_root.exists():
        shutil.rmtree(dst_root)
    dst_moddir.mkdir(parents=True)
    for mod in mods:
        (dst_moddir / mod).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src_moddir / mod, dst_moddir / mod)
    kept = set(mods)
    if (src_moddir / "modules.builtin").exists():
        shutil.copy2(src_moddir / "modules.builtin", dst_moddir / "modules.builtin")
    if (src_moddir / "modules.order").exists():
        order = [line for line in (src_moddir / "modules.order").read_text().splitlines() if line in kept]
        (dst_moddir / "modules.order").write_text("".join(line + "\n" for line in order))
    depmod(busybox, dst_root, version)  # modules.dep for what is shipped, for busybox modprobe in the guest
    return mods



def fetch(dest: Path, *, force: bool = False, extra=None, extra_digest: str = "") -> Path:
    """Fetch into ``dest`` (see the module docstring); returns ``dest``. ``extra(busybox, module_root,
    version) -> {name: bytes}`` adds outputs built from the same packages (the test initramfs);
    ``extra_digest`` names what it builds, so a change to it rebuilds."""
    dest = dest.resolve()
    stamp_path = dest / STAMP
    for tool in ("apt-get", "apt-cache", "dpkg-deb"):
        if not shutil.which(tool):
            raise FetchError(f"{tool} not found: fetching Debian's kernel needs a Debian system (or give a kernel)")
    kernel_pkg, kernel_ver, busybox_ver = resolve_packages()
    wanted_stamp = {"kernel": f"{kernel_pkg}={kernel_ver}", "busybox": f"{BUSYBOX}={busybox_ver}", "format": FORMAT,
                    "extra": extra_digest}  # fmt: skip
    outputs = [dest / name for name in OUTPUTS]
    if not force and stamp_path.exists() and all(p.exists() for p in outputs):
        try:
            if json.loads(stamp_path.read_text()) == wanted_stamp:
                say(f"up to date in {dest} ({kernel_pkg} {kernel_ver}, {BUSYBOX} {busybox_ver})")
                return dest
        except ValueError:
            pass
    ensure_tool("lz4", "lz4")
    debs = dest / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    kernel_deb = download(kernel_pkg, kernel_ver, debs)
    busybox_deb = download(BUSYBOX, busybox_ver, debs)
    for old in debs.glob("*.deb"):
        if old not in (kernel_deb, busybox_deb):
            old.unlink()
            say(f"removed old {old.name}")
    with tempfile.TemporaryDirectory(prefix="pyvmm-fetch-kernel-") as tmp:
        work = Path(tmp)
        kroot, broot = work / "kernel", work / "busybox"
        say(f"dpkg-deb -x {kernel_deb.name}")
        run(["dpkg-deb", "-x", str(kernel_deb), str(kroot)], what="dpkg-deb -x")
        run(["dpkg-deb", "-x", str(busybox_deb), str(broot)], what="dpkg-deb -x")
        vmlinuz = sorted((kroot / "boot").glob("vmlinuz-*"))
        if len(vmlinuz) != 1:
            raise FetchError(f"{kernel_deb.name} has {len(vmlinuz)} /boot/vmlinuz-* files, expected 1")
        version = vmlinuz[0].name[len("vmlinuz-") :]
        busybox = broot / "bin" / "busybox"
        if not busybox.exists():
            raise FetchError(f"{busybox_deb.name} has no /bin/busybox")
        bzimage = vmlinuz[0].read_bytes()
        vmlinux = extract_vmlinux(bzimage, work)
        entry = pvh_entry(vmlinux)
        if entry is None:
            raise FetchError("the extracted vmlinux has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)")
        say(f"vmlinux: {len(vmlinux)} bytes, PVH entry {entry:#x}")
        modules_dir = dest / "modules"
        mods = copy_modules(busybox, kroot, modules_dir, version)
        say(f"modules: {len(mods)} copied to {modules_dir}/lib/modules/{version}")
        files = {"bzImage": bzimage, "vmlinux": vmlinux, "busybox": busybox.read_bytes(),
                 "kernel-version": (version + "\n").encode()}  # fmt: skip
        if extra is not None:
            files.update(extra(busybox, modules_dir, version))
        dest.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            tmp_out = dest / (name + ".tmp")
            tmp_out.write_bytes(data)
            if name == "busybox":
                tmp_out.chmod(0o755)
            tmp_out.replace(dest / name)
        stamp_path.write_text(json.dumps(wanted_stamp, indent=1) + "\n")
    say(f"wrote {', '.join(files)}, modules/ for {version} to {dest}")
    return dest
