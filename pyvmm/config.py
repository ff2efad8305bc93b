"""The VM configuration: TOML (or a dict) -> typed, validated ``VmConfig``.

Every problem is a ``ConfigError`` naming the file, the key and what is
wrong, in one line. Paths are relative to the config file's folder (or to
``base_dir`` for a dict).
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from pyvmm.accel.registry import AUTO_ORDER, NAMES as ACCEL_NAMES
from pyvmm.devices.ratelimit import RateLimiterConfig, RateLimiterError
from pyvmm.errors import BootError, ConfigError
from pyvmm.vmm.boot import multiboot

MIN_MEMORY_MIB = 16
DEFAULT_CMDLINE = "console=ttyS0 reboot=k panic=-1"


@dataclass
class MachineConfig:
    vcpus: int = 1
    memory_mib: int = 128
    #: accelerators to try, in order ("auto" expanded)
    accel: list[str] = field(default_factory=lambda: list(AUTO_ORDER))
    #: hand a vCPU to the interpreter when the hypervisor cannot execute an instruction
    fallback: bool = True
    #: "host": what the backend offers; "portable": what every backend of this host can run
    #: (a snapshot then restores on any of them)
    cpu: str = "host"
    #: keep the hypervisor's dirty-page log (KVM) so Diff snapshots write only what the guest and
    #: the VMM wrote; without it (or on backends without a log) a Diff compares pages instead
    track_dirty_pages: bool = False


@dataclass
class BootModule:
    """A multiboot module after the initrd (``[[boot.module]]``): a file and its command line."""

    path: Path
    cmdline: str = ""


@dataclass
class BootConfig:
    kernel: Path
    initrd: Path | None = None
    cmdline: str = DEFAULT_CMDLINE
    #: multiboot modules 1.. (module 0 is the initrd)
    modules: list[BootModule] = field(default_factory=list)


@dataclass
class DriveConfig:
    path: Path
    read_only: bool = False
    serial: str | None = None
    #: lock the image while the VM runs (exclusive when writable, shared when read-only)
    lock: bool = True
    rate_limiter: RateLimiterConfig | None = None


@dataclass
class NetConfig:
    tap: str
    mac: str | None = None
    rx_rate_limiter: RateLimiterConfig | None = None
    tx_rate_limiter: RateLimiterConfig | None = None


@dataclass
class BalloonConfig:
    """virtio-balloon (Firecracker's Balloon object): the target, in MiB, the guest should give back."""

    amount_mib: int = 0
    deflate_on_oom: bool = False
    #: 0: no statistics; else the driver is asked for fresh ones every this many seconds
    stats_polling_interval_s: int = 0


@dataclass
class ShareConfig:
    """A host directory the guest mounts over virtio-fs (``mount -t virtiofs TAG DIR``), served by
    one virtiofsd; ``read_only`` is enforced on the host (host/virtiofsd.py)."""

    path: Path
    tag: str
    read_only: bool = False


@dataclass
class DebugConfig:
    """Debugging a guest: a gdb stub, and the interpreter's coverage and execution traces."""

    #: serve gdb's remote protocol on "HOST:PORT" or a Unix socket path
    gdb: str | None = None
    #: hold the vCPUs before the guest's first instruction until gdb lets them go
    gdb_wait: bool = False
    #: write basic-block coverage (drcov) here when the VM ends (interpreter)
    coverage: Path | None = None
    #: write an execution trace here (interpreter), at most trace_limit_mib
    trace: Path | None = None
    trace_limit_mib: int = 64
    #: QEMU's pc-testdev (devices/legacy/testdev.py), for kvm-unit-tests
    test_device: bool = False


@dataclass
class VsockConfig:
    """virtio-vsock with Firecracker's host side: host processes connect to ``uds_path`` (``CONNECT
    <port>``), and guest connections to CID 2 port P reach ``<uds_path>_<P>``."""

    guest_cid: int
    uds_path: Path


@dataclass
class VmConfig:
    machine: MachineConfig
    boot: BootConfig
    drives: list[DriveConfig] = field(default_factory=list)
    nets: list[NetConfig] = field(default_factory=list)
    rng: bool = False
    rng_rate_limiter: RateLimiterConfig | None = None
    balloon: BalloonConfig | None = None
    shares: list[ShareConfig] = field(default_factory=list)
    vsock: VsockConfig | None = None
    debug: DebugConfig = field(default_factory=DebugConfig)
    #: where the config came from, for error messages
    source: str = "<config>"

    @property
    def virtio_device_count(self) -> int:
        return len(self.drives) + len(self.nets) + int(self.rng) + len(self.shares) + int(self.balloon is not None) + int(self.vsock is not None)


_RATE_LIMITER = "a table like { bandwidth = { size = 1048576, refill_time = 1000 }, ops = { ... } }"
# key -> (expected python types, description for errors)
_SCHEMA = {
    "machine": {
        "vcpus": ((int,), "an integer"),
        "memory_mib": ((int,), "an integer"),
        "accel": ((str, list), 'a string or a list of strings'),
        "fallback": ((bool,), "true or false"),
        "cpu": ((str,), '"host" or "portable"'),
        "track_dirty_pages": ((bool,), "true or false"),
    },
    "boot": {
        "kernel": ((str,), "a path string"),
        "initrd": ((str,), "a path string"),
        "cmdline": ((str,), "a string"),
        "module": ((list,), "an array of tables ([[boot.module]]) with path and cmdline"),
    },
    "drive": {
        "path": ((str,), "a path string"),
        "read_only": ((bool,), "true or false"),
        "serial": ((str,), "a string"),
        "lock": ((bool,), "true or false"),
        "rate_limiter": ((dict,), _RATE_LIMITER),
    },
    "net": {
        "tap": ((str,), "a string"),
        "mac": ((str,), 'a string like "52:54:00:12:34:56"'),
        "rx_rate_limiter": ((dict,), _RATE_LIMITER),
        "tx_rate_limiter": ((dict,), _RATE_LIMITER),
    },
    "rng": {
        "enabled": ((bool,), "true or false"),
        "rate_limiter": ((dict,), _RATE_LIMITER),
    },
    "balloon": {
        "amount_mib": ((int,), "an integer (MiB)"),
        "deflate_on_oom": ((bool,), "true or false"),
        "stats_polling_interval_s": ((int,), "an integer (seconds)"),
    },
    "debug": {
        "gdb": ((str,), 'a string: "HOST:PORT" or a Unix socket path'),
        "gdb_wait": ((bool,), "true or false"),
        "coverage": ((str,), "a path string"),
        "trace": ((str,), "a path string"),
        "trace_limit_mib": ((int,), "an integer"),
        "test_device": ((bool,), "true or false"),
    },
    "vsock": {
        "guest_cid": ((int,), "an integer (3 to 4294967294)"),
        "uds_path": ((str,), "a path string"),
    },
    "share": {
        "path": ((str,), "a directory path string"),
        "tag": ((str,), "a string of 1-36 bytes"),
        "read_only": ((bool,), "true or false"),
    },
}
#: sections written as arrays of tables ([[drive]])
_ARRAY_SECTIONS = ("drive", "net", "share")
MAX_VIRTIO_DEVICES = 8  # one interrupt line each: IOAPIC GSIs 16-23 (vmm/layout.py)
VIRTIO_BLK_SERIAL_MAX = 20  # bytes in the GET_ID answer
MAX_STATS_INTERVAL_S = 65535  # Firecracker's stats_polling_interval_s is 16-bit
IFNAMSIZ = 16
VSOCK_MIN_CID, VSOCK_MAX_CID = 3, 0xFFFFFFFE  # 0-2 are reserved, 2^32-1 is VMADDR_CID_ANY
UNIX_PATH_MAX = 107  # bytes of a Unix socket path (sockaddr_un.sun_path without its NUL)
VIRTIO_FS_TAG_MAX = 36  # bytes of the tag in virtio-fs config space
_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")


def load_config(path: str | os.PathLike) -> VmConfig:
    """Read and validate a TOML config file."""
    path = Path(path)
    source = str(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError as err:
        raise ConfigError("config file not found", file=source) from err
    except PermissionError as err:
        raise ConfigError("config file not readable (permission denied)", file=source) from err
    except IsADirectoryError as err:
        raise ConfigError("is a directory, not a config file", file=source) from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"invalid TOML: {err}", file=source) from err
    except UnicodeDecodeError as err:
        raise ConfigError("not a UTF-8 text file", file=source) from err
    return config_from_dict(data, base_dir=path.parent, source=source)


def config_from_dict(data: dict, *, base_dir: str | os.PathLike = ".", source: str = "<dict>") -> VmConfig:
    """Validate a config given as nested dicts (the TOML structure)."""
    base_dir = Path(base_dir)

    def fail(key, problem):
        raise ConfigError(problem, file=source, key=key)

    if not isinstance(data, dict):
        fail(None, "the configuration must be a table (dict)")
    for table in data:
        if table not in _SCHEMA:
            fail(table, f"unknown section; expected one of: {', '.join(_SCHEMA)}")
        if table in _ARRAY_SECTIONS:
            if not isinstance(data[table], list) or not all(isinstance(t, dict) for t in data[table]):
                fail(table, f"must be an array of tables ([[{table}]])")
            for i, entry in enumerate(data[table]):
                _check_keys(entry, table, f"{table}[{i}]", fail)
        elif not isinstance(data[table], dict):
            fail(table, "must be a table")
        else:
            _check_keys(data[table], table, table, fail)

    machine_data = data.get("machine", {})
    machine = MachineConfig()
    if "vcpus" in machine_data:
        machine.vcpus = machine_data["vcpus"]
        if machine.vcpus < 1:
            fail("machine.vcpus", f"must be at least 1, not {machine.vcpus}")
        if machine.vcpus > 254:
            fail("machine.vcpus", f"{machine.vcpus} is more than the 254 CPUs an xAPIC machine can address")
    if "memory_mib" in machine_data:
        machine.memory_mib = machine_data["memory_mib"]
    if machine.memory_mib < MIN_MEMORY_MIB:
        fail("machine.memory_mib", f"{machine.memory_mib} MiB is below the minimum of {MIN_MEMORY_MIB} MiB")
    host_mib = _host_memory_mib()
    if host_mib is not None and machine.memory_mib > host_mib:
        fail("machine.memory_mib", f"{machine.memory_mib} MiB is more than this host's {host_mib} MiB of RAM")
    if "accel" in machine_data:
        machine.accel = parse_accel(machine_data["accel"], source=source, key="machine.accel")
    if "fallback" in machine_data:
        machine.fallback = machine_data["fallback"]
    if "cpu" in machine_data:
        if machine_data["cpu"] not in ("host", "portable"):
            fail("machine.cpu", f'must be "host" or "portable", not {machine_data["cpu"]!r}')
        machine.cpu = machine_data["cpu"]
    if "track_dirty_pages" in machine_data:
        machine.track_dirty_pages = machine_data["track_dirty_pages"]

    boot_data = data.get("boot")
    if not boot_data or "kernel" not in boot_data:
        fail("boot.kernel", "missing: name the guest kernel (an ELF vmlinux with a PVH note, or a bzImage)")
    kernel = _existing_file(base_dir, boot_data["kernel"], source, "boot.kernel")
    _check_kernel_format(kernel, source)
    initrd = None
    if "initrd" in boot_data:
        initrd = _existing_file(base_dir, boot_data["initrd"], source, "boot.initrd")
    cmdline = boot_data.get("cmdline", DEFAULT_CMDLINE)
    bad = [c for c in cmdline if not (0x20 <= ord(c) < 0x7F)]
    if bad:
        fail("boot.cmdline", f"contains a non-printable or non-ASCII character {bad[0]!r}")
    modules = _boot_modules(boot_data.get("module", []), base_dir, source, fail)
    config = VmConfig(machine=machine, boot=BootConfig(kernel=kernel, initrd=initrd, cmdline=cmdline, modules=modules),
                      source=source)  # fmt: skip

    for i, entry in enumerate(data.get("drive", [])):
        key = f"drive[{i}]"
        if "path" not in entry:
            fail(f"{key}.path", "missing: name the disk image file")
        drive = DriveConfig(path=_existing_file(base_dir, entry["path"], source, f"{key}.path"))
        drive.read_only = entry.get("read_only", False)
        drive.lock = entry.get("lock", True)
        if not drive.read_only and not os.access(drive.path, os.W_OK):
            fail(f"{key}.path", f"image not writable (permission denied): {_shown(drive.path)}; set read_only = true")
        if "serial" in entry:
            drive.serial = entry["serial"]
            if len(drive.serial.encode()) > VIRTIO_BLK_SERIAL_MAX or not drive.serial.isascii():
                fail(f"{key}.serial", f"must be at most {VIRTIO_BLK_SERIAL_MAX} ASCII characters")
        if "rate_limiter" in entry:
            drive.rate_limiter = _rate_limiter(entry["rate_limiter"], f"{key}.rate_limiter", fail)
        if any(d.path == drive.path for d in config.drives):
            fail(f"{key}.path", f"{_shown(drive.path)} is already used by another drive")
        config.drives.append(drive)

    for i, entry in enumerate(data.get("net", [])):
        key = f"net[{i}]"
        if "tap" not in entry:
            fail(f"{key}.tap", "missing: name the TAP device (existing, or created when running as root)")
        net = NetConfig(tap=entry["tap"], mac=entry.get("mac"))
        if not net.tap or len(net.tap.encode()) >= IFNAMSIZ or "/" in net.tap or any(c.isspace() for c in net.tap):
            fail(f"{key}.tap", f"{net.tap!r} is not a valid interface name (1-{IFNAMSIZ - 1} characters, no '/' or spaces)")
        if net.mac is not None:
            if not _MAC.match(net.mac):
                fail(f"{key}.mac", f"{net.mac!r} is not a MAC address like 52:54:00:12:34:56")
            if int(net.mac[:2], 16) & 1:
                fail(f"{key}.mac", f"{net.mac} is a multicast address; a NIC needs a unicast one")
        for direction in ("rx_rate_limiter", "tx_rate_limiter"):
            if direction in entry:
                setattr(net, direction, _rate_limiter(entry[direction], f"{key}.{direction}", fail))
        if any(n.tap == net.tap for n in config.nets):
            fail(f"{key}.tap", f"{net.tap} is already used by another net device")
        config.nets.append(net)

    config.rng = data.get("rng", {}).get("enabled", "rng" in data)
    if "rate_limiter" in data.get("rng", {}):
        config.rng_rate_limiter = _rate_limiter(data["rng"]["rate_limiter"], "rng.rate_limiter", fail)
    if "balloon" in data:
        config.balloon = _balloon(data["balloon"], machine.memory_mib, fail)
    if "vsock" in data:
        config.vsock = _vsock(data["vsock"], base_dir, fail)
    if "debug" in data:
        config.debug = _debug(data["debug"], base_dir, fail)

    for i, entry in enumerate(data.get("share", [])):
        key = f"share[{i}]"
        for required in ("path", "tag"):
            if required not in entry:
                fail(f"{key}.{required}", "missing: a share needs a host directory (path) and the tag the guest mounts")
        tag = entry["tag"]
        if not 1 <= len(tag.encode()) <= VIRTIO_FS_TAG_MAX or not tag.isprintable():
            fail(f"{key}.tag", f"{tag!r} must be 1-{VIRTIO_FS_TAG_MAX} bytes of printable UTF-8")
        if any(s.tag == tag for s in config.shares):
            fail(f"{key}.tag", f"{tag!r} is already the tag of another share")
        share = ShareConfig(path=_existing_dir(base_dir, entry["path"], source, f"{key}.path"), tag=tag,
                            read_only=entry.get("read_only", False))  # fmt: skip
        config.shares.append(share)
    if config.virtio_device_count > MAX_VIRTIO_DEVICES:
        fail("share" if config.shares else "drive",
             f"{config.virtio_device_count} virtio devices; at most {MAX_VIRTIO_DEVICES} fit the interrupt lines")
    return config


def _rate_limiter(data: dict, key: str, fail) -> RateLimiterConfig:
    try:
        return RateLimiterConfig.from_dict(data)
    except RateLimiterError as err:
        fail(f"{key}.{err.key}" if err.key else key, err.problem)


def _debug(data: dict, base_dir: Path, fail) -> DebugConfig:
    debug = DebugConfig(gdb=data.get("gdb"), gdb_wait=data.get("gdb_wait", False),
                        trace_limit_mib=data.get("trace_limit_mib", 64),
                        test_device=data.get("test_device", False))  # fmt: skip
    if debug.gdb is not None:
        from pyvmm.gdb.server import parse_address

        from pyvmm.gdb.errors import GdbError

        try:
            parse_address(debug.gdb)
        except GdbError as err:
            fail("debug.gdb", str(err))
    elif debug.gdb_wait:
        fail("debug.gdb_wait", "needs debug.gdb: nothing would let the vCPUs go")
    for key in ("coverage", "trace"):
        if key in data:
            path = Path(os.path.abspath(base_dir / os.path.expanduser(data[key])))
            if not path.parent.is_dir():
                fail(f"debug.{key}", f"the folder {_shown(path.parent)} does not exist")
            setattr(debug, key, path)
    if not 1 <= debug.trace_limit_mib <= 1 << 20:
        fail("debug.trace_limit_mib", f"{debug.trace_limit_mib} must be between 1 and 1048576")
    return debug


def _vsock(data: dict, base_dir: Path, fail) -> VsockConfig:
    for required in ("guest_cid", "uds_path"):
        if required not in data:
            fail(f"vsock.{required}", "missing: vsock needs the guest's CID and the host Unix socket path (uds_path)")
    cid = data["guest_cid"]
    if not VSOCK_MIN_CID <= cid <= VSOCK_MAX_CID:
        fail("vsock.guest_cid", f"{cid} must be between {VSOCK_MIN_CID} and {VSOCK_MAX_CID} (0-2 and 2^32-1 are reserved)")
    value = data["uds_path"]
    if not value or "\0" in value:
        fail("vsock.uds_path", "must be a non-empty path without NUL characters")
    path = Path(os.path.abspath(base_dir / os.path.expanduser(value)))
    # sun_path holds 108 bytes with the NUL; guest connections use "<uds_path>_<port>" (up to 11 more)
    if len(os.fsencode(path)) > UNIX_PATH_MAX:
        fail("vsock.uds_path", f"{_shown(path)} is longer than the {UNIX_PATH_MAX} bytes of a Unix socket path")
    if not path.parent.is_dir():
        fail("vsock.uds_path", f"the folder {_shown(path.parent)} does not exist")
    if path.exists() and not path.is_socket():
        fail("vsock.uds_path", f"{_shown(path)} exists and is not a socket")
    return VsockConfig(guest_cid=cid, uds_path=path)


def _balloon(data: dict, memory_mib: int, fail) -> BalloonConfig:
    balloon = BalloonConfig(**data)
    if not 0 <= balloon.amount_mib <= memory_mib:
        fail("balloon.amount_mib", f"{balloon.amount_mib} MiB must be between 0 and the guest's {memory_mib} MiB")
    if not 0 <= balloon.stats_polling_interval_s <= MAX_STATS_INTERVAL_S:
        fail("balloon.stats_polling_interval_s",
             f"{balloon.stats_polling_interval_s} must be 0 (off) to {MAX_STATS_INTERVAL_S} seconds")
    return balloon


def _check_keys(table: dict, schema: str, where: str, fail) -> None:
    for key, value in table.items():
        if key not in _SCHEMA[schema]:
            fail(f"{where}.{key}", f"unknown key; expected one of: {', '.join(_SCHEMA[schema])}")
        types, description = _SCHEMA[schema][key]
        # bool is an int subclass: `vcpus = true` must not pass as 1
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            fail(f"{where}.{key}", f"must be {description}, not {_toml_type(value)}")


def parse_accel(value, *, source: str = "<command line>", key: str = "machine.accel") -> list[str]:
    """``"auto"``, one name, or a preference list -> the ordered list of names to try."""
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ConfigError('must be "auto", an accelerator name, or a non-empty list of names', file=source, key=key)
    result: list[str] = []
    for name in names:
        if name == "auto":
            expanded = AUTO_ORDER
        elif name in ACCEL_NAMES:
            expanded = (name,)
        else:
            raise ConfigError(
                f"unknown accelerator {name!r}; expected \"auto\" or one of: {', '.join(ACCEL_NAMES)}",
                file=source,
                key=key,
            )
        result.extend(n for n in expanded if n not in result)
    return result


def _existing_file(base_dir: Path, value: str, source: str, key: str) -> Path:
    if not value:
        raise ConfigError("is empty; expected a file path", file=source, key=key)
    if "\0" in value:
        raise ConfigError(f"{value!r} contains a NUL character; file names cannot", file=source, key=key)
    try:
        path = (base_dir / os.path.expanduser(value)).resolve()
        exists, regular, readable = path.exists(), path.is_file(), os.access(path, os.R_OK)
    except (OSError, RuntimeError) as err:  # a name too long, a symlink loop, ...
        why = getattr(err, "strerror", None) or str(err)
        raise ConfigError(f"cannot use {value!r} as a file path: {why}", file=source, key=key) from err
    if not exists:
        raise ConfigError(f"file not found: {_shown(path)}", file=source, key=key)
    if not regular:
        raise ConfigError(f"not a regular file: {_shown(path)}", file=source, key=key)
    if not readable:
        raise ConfigError(f"file not readable (permission denied): {_shown(path)}", file=source, key=key)
    return path


def _existing_dir(base_dir: Path, value: str, source: str, key: str) -> Path:
    if not value or "\0" in value:
        raise ConfigError(f"{value!r} is not a directory path (empty or with a NUL)", file=source, key=key)
    try:
        path = (base_dir / os.path.expanduser(value)).resolve()
        exists, is_dir = path.exists(), path.is_dir()
    except (OSError, RuntimeError) as err:
        why = getattr(err, "strerror", None) or str(err)
        raise ConfigError(f"cannot use {value!r} as a directory path: {why}", file=source, key=key) from err
    if not exists:
        raise ConfigError(f"directory not found: {_shown(path)}", file=source, key=key)
    if not is_dir:
        raise ConfigError(f"not a directory: {_shown(path)}", file=source, key=key)
    return path


def _shown(path) -> str:
    """A path as an error message shows it: as is, or quoted with escapes when it holds control characters."""
    text = str(path)
    return text if text.isprintable() else repr(text)


def _boot_modules(entries: list, base_dir: Path, source: str, fail) -> list[BootModule]:
    modules = []
    for i, entry in enumerate(entries):
        key = f"boot.module[{i}]"
        if not isinstance(entry, dict):
            fail(key, f"must be a table with path and cmdline, not {_toml_type(entry)}")
        for name, value in entry.items():
            if name not in ("path", "cmdline"):
                fail(f"{key}.{name}", "unknown key; expected one of: path, cmdline")
            if not isinstance(value, str):
                fail(f"{key}.{name}", f"must be a string, not {_toml_type(value)}")
        if "path" not in entry:
            fail(f"{key}.path", "missing: name the module's file")
        cmdline = entry.get("cmdline", "")
        bad = [c for c in cmdline if not (0x20 <= ord(c) < 0x7F)]
        if bad:
            fail(f"{key}.cmdline", f"contains a non-printable or non-ASCII character {bad[0]!r}")
        modules.append(BootModule(_existing_file(base_dir, entry["path"], source, f"{key}.path"), cmdline))
    return modules


def _check_kernel_format(path: Path, source: str) -> None:
    """A cheap sniff so a wrong file is named at config time; the loader checks the rest."""
    try:
        with open(path, "rb") as f:
            head = f.read(multiboot.SEARCH_LIMIT)  # covers the bzImage header (0x1FE-0x206) too
    except OSError as err:
        raise ConfigError(f"cannot read {_shown(path)}: {err.strerror}", file=source, key="boot.kernel") from err
    if head[:4] == b"\x7fELF":
        return
    if len(head) >= 0x206 and head[0x1FE:0x200] == b"\x55\xaa" and head[0x202:0x206] == b"HdrS":
        return
    try:
        if multiboot.find_header(head, str(path)) is not None:
            return
    except BootError:
        return  # a header pyvmm cannot honour: the loader names what is wrong with it
    raise ConfigError(f"{_shown(path)} is neither an ELF vmlinux, a bzImage nor a multiboot image", file=source,
                      key="boot.kernel")  # fmt: skip


def _host_memory_mib() -> int | None:
    try:
        import psutil
    except ImportError:  # psutil is a dependency; a broken install just skips this check
        return None
    return psutil.virtual_memory().total >> 20


def _toml_type(value) -> str:
    return {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "an array", dict: "a table"}.get(
        type(value), type(value).__name__
    )
