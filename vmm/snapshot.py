"""Snapshots of a paused VM: a versioned state file and a memory file, restorable in a fresh process.

The state file (docs/snapshot-format.md has the field-by-field description)::

    offset 0   8 bytes   magic b"PYVMMSNP"
           8   u32 LE    format version (FORMAT_VERSION)
          12   u32 LE    CRC-32 of the JSON body
          16   u64 LE    length of the JSON body
          24   ...       the JSON body (UTF-8)

The JSON body holds the VM's configuration (to rebuild its devices), the memory
layout (guest address, size and offset of each region in the memory file), each
vCPU's saved state and CPUID table, the interrupt controllers' state (pyvmm's
userspace ones, or KVM's in-kernel ones as KVM gives them) and every device's
registers. The memory file is guest RAM, region after region, page-aligned; a
restore maps it copy-on-write (pages are read on first touch, not at load).

A file that is not a snapshot, from another format version, truncated or
corrupted (CRC) is refused with a one-line ``SnapshotError`` before anything is
built. Nothing is half-restored: the machine is built completely, or the error
is raised and what was made is closed.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import struct
import time
import zlib
from pathlib import Path

from pyvmm import __version__, plainstate
from pyvmm.accel.core import Capability
from pyvmm.accel.x86 import CpuidEntry, state_from_data, state_to_data
from pyvmm.errors import PyvmmError

log = logging.getLogger("pyvmm.snapshot")

MAGIC = b"PYVMMSNP"
FORMAT_VERSION = 1
HEADER = struct.Struct("<8sIIQ")
MAX_STATE = 256 << 20
#: legacy devices' attributes holding clock() times
DEVICE_TIMES = {"cmos": frozenset({"_last_uip_clock"})}
LEGACY_DEVICES = ("serial", "i8042", "cmos", "post")


class SnapshotError(PyvmmError):
    """A snapshot cannot be written or loaded; the message names the file and what is wrong."""


# --------------------------------------------------------------------------------- the files
def write_state_file(path, body: dict) -> int:
    data = json.dumps(body, separators=(",", ":")).encode()
    tmp = Path(f"{path}.tmp")
    try:
        with open(tmp, "wb") as out:
            out.write(HEADER.pack(MAGIC, FORMAT_VERSION, zlib.crc32(data), len(data)))
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise SnapshotError(f"cannot write the snapshot file {path}: {err.strerror}") from err
    return HEADER.size + len(data)


def read_state_file(path) -> dict:
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER.size)
            if len(head) < HEADER.size:
                raise SnapshotError(f"{path}: not a pyvmm snapshot (only {len(head)} bytes)")
            magic, version, crc, length = HEADER.unpack(head)
            if magic != MAGIC:
                raise SnapshotError(f"{path}: not a pyvmm snapshot (magic {magic!r})")
            if version != FORMAT_VERSION:
                raise SnapshotError(f"{path}: snapshot format version {version}; this pyvmm reads version {FORMAT_VERSION}")
            if length > MAX_STATE:
                raise SnapshotError(f"{path}: a state of {length} bytes is not plausible (corrupt header)")
            data = f.read(length)
    except OSError as err:
        raise SnapshotError(f"cannot read the snapshot file {path}: {err.strerror}") from err
    if len(data) != length:
        raise SnapshotError(f"{path}: truncated ({len(data)} of {length} bytes of state)")
    if zlib.crc32(data) != crc:
        raise SnapshotError(f"{path}: corrupt (CRC mismatch)")
    try:
        body = json.loads(data)
    except ValueError as err:
        raise SnapshotError(f"{path}: the state is not valid JSON: {err}") from err
    for key in ("config", "memory", "vcpus", "cpuid", "platform", "devices", "virtio"):
        if key not in body:
            raise SnapshotError(f"{path}: the state has no '{key}'")
    return body


CHUNK = 1 << 20  # memory is written in chunks; an all-zero chunk becomes a hole of the (sparse) file


def _write_memory(memory, path) -> list[list[int]]:
    """Guest RAM, region after region (page-aligned offsets): [[guest_addr, size, offset], ...].

    Chunks of zeros are skipped (a hole reads back as zeros), so a guest that touched little
    memory makes a small file, written fast."""
    layout = _file_layout(memory)
    zero = bytes(CHUNK)
    try:
        with open(path, "wb") as out:
            for region, (_, size, offset) in zip(memory.regions, layout):
                view = region.view
                for start in range(0, size, CHUNK):
                    chunk = view[start : start + CHUNK]
                    if chunk.tobytes() != zero[: len(chunk)]:  # memcmp; a memoryview compares per element
                        out.seek(offset + start)
                        out.write(chunk)
            out.truncate(layout[-1][2] + layout[-1][1] if layout else 0)
            out.flush()
            os.fsync(out.fileno())
    except OSError as err:
        raise SnapshotError(f"cannot write the memory file {path}: {err.strerror}") from err
    return layout


PAGE = mmap.PAGESIZE


def _file_layout(memory) -> list[list[int]]:
    layout, offset = [], 0
    for region in memory.regions:
        layout.append([region.guest_addr, region.size, offset])
        offset += -(-region.size // PAGE) * PAGE
    return layout


def _changed_pages(memory, base) -> list[bytearray]:
    """Per region, a byte per page set where guest RAM differs from ``base`` (the previous
    snapshot's memory, a GuestMemory): chunks compared first, pages only in chunks that differ."""
    flags = []
    for region, old in zip(memory.regions, base.regions):
        new_view, old_view, size = region.view, old.view, region.size
        pages = bytearray(-(-size // PAGE))
        for chunk in range(0, size, CHUNK):
            end = min(chunk + CHUNK, size)
            if new_view[chunk:end].tobytes() == old_view[chunk:end].tobytes():  # memcmp, not per element
                continue
            for page in range(chunk, end, PAGE):
                if new_view[page : page + PAGE].tobytes() != old_view[page : page + PAGE].tobytes():
                    pages[page // PAGE] = 1
        flags.append(pages)
    return flags


def _take_dirty_pages(machine) -> list[bytearray]:
    """Per region, a byte per page set when the page changed since the last snapshot: the
    hypervisor's log of the guest's writes, the VMM's own writes recorded by guest memory, and
    every live used ring (devices update them on the event loop without marking each write)."""
    memory = machine.memory
    for transport in machine.virtio:
        for queue in transport.queues:
            if queue.ready:
                memory.mark_written(queue.used_addr, 6 + 8 * queue.size)
    pages = memory.take_written()
    for slot, flags in enumerate(pages):
        bitmap = machine.vm.dirty_bitmap(slot)
        for index, byte in enumerate(bitmap):
            if byte:
                for bit in range(8):
                    if byte >> bit & 1 and index * 8 + bit < len(flags):
                        flags[index * 8 + bit] = 1
    return pages


def _write_memory_pages(memory, path, pages: list[bytearray]) -> tuple[list[list[int]], list[list[int]]]:
    """The flagged pages only (runs of them written at once): a sparse file of the full size, and
    the ``[file offset, length]`` ranges written."""
    layout, ranges = _file_layout(memory), []
    try:
        with open(path, "wb") as out:
            for region, (_, size, offset), flags in zip(memory.regions, layout, pages):
                view, page = region.view, 0
                while (page := flags.find(1, page)) != -1:
                    end = flags.find(0, page)
                    end = len(flags) if end == -1 else end
                    start_byte, end_byte = page * PAGE, min(end * PAGE, size)
                    out.seek(offset + start_byte)
                    out.write(view[start_byte:end_byte])
                    ranges.append([offset + start_byte, end_byte - start_byte])
                    page = end
            out.truncate(layout[-1][2] + layout[-1][1] if layout else 0)
            out.flush()
            os.fsync(out.fileno())
    except OSError as err:
        raise SnapshotError(f"cannot write the memory file {path}: {err.strerror}") from err
    return layout, ranges


def _write_memory_compared(memory, path, base_chain: list[dict]) -> tuple[list[list[int]], list[list[int]]]:
    """A Diff without a dirty log: the pages that differ from the previous snapshot's memory."""
    base = map_memory_chain(base_chain, [tuple(r) for r in _file_layout(memory)])
    try:
        pages = _changed_pages(memory, base)
    finally:
        base.close()
    return _write_memory_pages(memory, path, pages)


def map_memory_chain(chain: list[dict], layout: list[tuple[int, int, int]]):
    """Guest RAM of a snapshot: the Full snapshot's memory file mapped copy-on-write, then the pages
    each later Diff wrote copied over it, oldest first. ``chain``: ``{"file", "ranges"}`` entries."""
    from pyvmm.vmm.memory import GuestMemory

    memory = GuestMemory.from_file(chain[0]["file"], layout)
    spans = [(at, at + size, region) for (_, size, at), region in zip(layout, memory.regions)]
    try:
        for diff in chain[1:]:
            with open(diff["file"], "rb") as f:
                for offset, length in diff["ranges"]:
                    span = next(((start, end, r) for start, end, r in spans if start <= offset and offset + length <= end), None)
                    if span is None:
                        raise SnapshotError(f"{diff['file']}: range {offset:#x}+{length:#x} lies outside guest RAM")
                    f.seek(offset)
                    data = f.read(length)
                    if len(data) != length:
                        raise SnapshotError(f"{diff['file']}: truncated (range {offset:#x}+{length:#x})")
                    span[2].view[offset - span[0] : offset - span[0] + length] = data
    except OSError as err:
        memory.close()
        raise SnapshotError(f"cannot read the Diff memory file: {err}") from err
    except SnapshotError:
        memory.close()
        raise
    return memory


# --------------------------------------------------------------------------------- taking one
def config_to_data(config) -> dict:
    """A ``VmConfig`` as plain data (what a restore needs to rebuild the devices)."""
    return {
        "machine": {"vcpus": config.machine.vcpus, "memory_mib": config.machine.memory_mib,
                    "fallback": config.machine.fallback, "cpu": config.machine.cpu,
                    "track_dirty_pages": config.machine.track_dirty_pages},  # fmt: skip
        "boot": {"kernel": str(config.boot.kernel), "initrd": str(config.boot.initrd) if config.boot.initrd else None,
                 "cmdline": config.boot.cmdline},  # fmt: skip
        "drives": [{"path": str(d.path), "read_only": d.read_only, "serial": d.serial, "lock": d.lock,
                    "rate_limiter": _limiter_data(d.rate_limiter)} for d in config.drives],  # fmt: skip
        "nets": [{"tap": n.tap, "mac": n.mac, "rx_rate_limiter": _limiter_data(n.rx_rate_limiter),
                  "tx_rate_limiter": _limiter_data(n.tx_rate_limiter)} for n in config.nets],  # fmt: skip
        "rng": config.rng,
        "rng_rate_limiter": _limiter_data(config.rng_rate_limiter),
        "balloon": vars(config.balloon) if config.balloon is not None else None,
        "vsock": {"guest_cid": config.vsock.guest_cid, "uds_path": str(config.vsock.uds_path)} if config.vsock else None,
    }


def _limiter_data(limiter) -> dict | None:
    return limiter.as_dict() if limiter is not None else None


def _limiter(data):
    from pyvmm.devices.ratelimit import RateLimiterConfig, RateLimiterError

    try:
        return RateLimiterConfig.from_dict(data) if data is not None else None
    except RateLimiterError as err:
        raise ValueError(str(err)) from err


def config_from_data(data: dict, accel: list[str], source: str):
    from pyvmm.config import BalloonConfig, BootConfig, DriveConfig, MachineConfig, NetConfig, VmConfig, VsockConfig

    try:
        machine = MachineConfig(vcpus=int(data["machine"]["vcpus"]), memory_mib=int(data["machine"]["memory_mib"]),
                                accel=list(accel), fallback=bool(data["machine"]["fallback"]),
                                cpu=str(data["machine"]["cpu"]),
                                track_dirty_pages=bool(data["machine"].get("track_dirty_pages", False)))  # fmt: skip
        boot = data["boot"]
        config = VmConfig(machine=machine, boot=BootConfig(Path(boot["kernel"]), Path(boot["initrd"]) if boot["initrd"] else None,
                                                           boot["cmdline"]), source=source)  # fmt: skip
        config.drives = [DriveConfig(Path(d["path"]), d["read_only"], d["serial"], d["lock"], _limiter(d.get("rate_limiter")))
                         for d in data["drives"]]  # fmt: skip
        config.nets = [NetConfig(n["tap"], n["mac"], _limiter(n.get("rx_rate_limiter")), _limiter(n.get("tx_rate_limiter")))
                       for n in data["nets"]]  # fmt: skip
        config.rng = bool(data["rng"])
        config.rng_rate_limiter = _limiter(data.get("rng_rate_limiter"))
        if data.get("balloon") is not None:
            config.balloon = BalloonConfig(**data["balloon"])
        if data.get("vsock") is not None:
            config.vsock = VsockConfig(int(data["vsock"]["guest_cid"]), Path(data["vsock"]["uds_path"]))
    except (KeyError, TypeError, ValueError) as err:
        raise SnapshotError(f"{source}: bad configuration in the state ({err})") from err
    for i, drive in enumerate(config.drives):
        if not drive.path.is_file():
            raise SnapshotError(f"{source}: drive {i}'s image {drive.path} is missing (the snapshot reopens it)")
    return config


def create(machine, config, snapshot_path, mem_path, *, base_chain: list[dict] | None = None) -> dict:
    """Write a snapshot of ``machine`` (paused: every vCPU parked, the devices held). Returns figures
    and the memory chain a later Diff builds on. With ``base_chain`` (the chain of the previous
    snapshot), a Diff: only the pages changed since that snapshot are written, as the dirty log
    says when the machine keeps one (``machine.track_dirty_pages``), else found by comparing
    every page with that snapshot's memory."""
    if not machine.paused:
        raise SnapshotError("a snapshot is taken only while the VM is paused")
    for transport in machine.virtio:
        if getattr(transport.device, "external_queues", False):  # vhost-user: the queues live in another process
            raise SnapshotError(f"{transport.name} is a vhost-user device: its backend's state (queues, open files) "
                                f"is not pyvmm's to save, so this VM cannot be snapshotted")  # fmt: skip
    started = time.monotonic()
    vm = machine.vm
    vcpus = [loop.vcpu for loop in machine.loops]
    body = {
        "pyvmm": __version__,
        "created": time.time(),
        "backend": vm.name,
        "config": config_to_data(config),
        "vcpus": [state_to_data(vcpu.save_state()) for vcpu in vcpus],
        "cpuid": [[list(_cpuid_row(e)) for e in loop.cpuid] for loop in machine.loops],
        "platform": _save_platform(vm),
        "devices": _save_devices(machine),
        "virtio": [{**transport.save_state(), "device": transport.device.save_state()} for transport in machine.virtio],
    }
    mem_file = str(Path(mem_path).resolve())
    # With a dirty log, every snapshot starts a new epoch: a later Diff holds what changed after it.
    dirty = _take_dirty_pages(machine) if machine.dirty_log else None
    try:
        if base_chain is None:
            body["memory"] = {"regions": _write_memory(machine.memory, mem_path), "size": machine.memory.size}
            chain = [{"file": mem_file, "ranges": None}]
        else:
            for entry in base_chain:
                if not Path(entry["file"]).is_file():
                    raise SnapshotError(f"a Diff snapshot builds on {entry['file']}, which is gone; take a Full one")
            if dirty is not None:
                regions, ranges = _write_memory_pages(machine.memory, mem_path, dirty)
            else:
                regions, ranges = _write_memory_compared(machine.memory, mem_path, base_chain)
            body["memory"] = {"regions": regions, "size": machine.memory.size, "base_chain": base_chain,
                              "ranges": ranges, "found_by": "dirty log" if dirty is not None else "comparison"}  # fmt: skip
            chain = [*base_chain, {"file": mem_file, "ranges": ranges}]
        state_bytes = write_state_file(snapshot_path, body)
    except BaseException:
        if dirty is not None:
            machine.memory.give_back_written(dirty)  # the next snapshot still owes these pages
        raise
    seconds = time.monotonic() - started
    log.info("snapshot written in %.3f s: %s (%d bytes of state), %s (%d MiB)", seconds, snapshot_path, state_bytes,
             mem_path, machine.memory.size >> 20)  # fmt: skip
    written = machine.memory.size if base_chain is None else sum(length for _, length in chain[-1]["ranges"])
    figures = {"seconds": seconds, "state_bytes": state_bytes, "memory_bytes": written, "chain": chain}
    if base_chain is not None:
        figures["found_by"] = body["memory"]["found_by"]
    return figures


def _cpuid_row(entry: CpuidEntry) -> tuple:
    return (entry.function, entry.index, entry.eax, entry.ebx, entry.ecx, entry.edx, entry.indexed)


def _save_platform(vm) -> dict:
    if Capability.USERSPACE_IRQCHIP in vm.capabilities:
        from pyvmm.accel.irqchip import persist

        return {"kind": "userspace", "irqchip": persist.save(vm.irqchip)}
    return vm.save_platform_state()


def _save_devices(machine) -> dict:
    devices = machine.devices
    out = {}
    for name in LEGACY_DEVICES:
        device = devices[name]
        with device._lock:  # every legacy device guards its registers with one
            out[name] = plainstate.capture(device, now=_clock_of(device), times=DEVICE_TIMES.get(name, frozenset()))
    return out


def _clock_of(device) -> float:
    clock = getattr(device, "_clock", None)
    return clock() if callable(clock) else 0.0


# --------------------------------------------------------------------------------- loading one
def restore_devices(machine, state: dict, source: str) -> None:
    devices = machine.devices
    try:
        for name in LEGACY_DEVICES:
            device = devices[name]
            with device._lock:
                plainstate.apply(device, state["devices"][name], now=_clock_of(device),
                                 times=DEVICE_TIMES.get(name, frozenset()), where=name)  # fmt: skip
            if hasattr(device, "resync_irq"):
                device.resync_irq()  # its IRQ line object is new; the restored controller has the saved level
        if len(state["virtio"]) != len(machine.virtio):
            raise ValueError(f"{len(state['virtio'])} virtio devices saved, the configuration makes {len(machine.virtio)}")
        for transport, saved in zip(machine.virtio, state["virtio"]):
            if saved.get("device"):  # a device's own state (the balloon's target, its held stats buffer)
                transport.device.restore_state(saved["device"])
            transport.restore_state(saved)
    except (KeyError, TypeError, ValueError) as err:
        raise SnapshotError(f"{source}: bad device state ({err})") from err


def restore_processors(machine, state: dict, source: str) -> None:
    """The interrupt controllers, then each vCPU, converting between KVM's in-kernel devices and
    pyvmm's userspace ones when the snapshot came from the other kind (accel/irqchip/kvmstate.py)."""
    vm = machine.vm
    try:
        saved = [state_from_data(data) for data in state["vcpus"]]
    except (ValueError, TypeError) as err:
        raise SnapshotError(f"{source}: bad vCPU state ({err})") from err
    if len(saved) != len(machine.loops):
        raise SnapshotError(f"{source}: {len(saved)} vCPU states for {len(machine.loops)} vCPUs")
    platform = state["platform"]
    kind = platform.get("kind") if isinstance(platform, dict) else None
    if kind == "kvm" and Capability.USERSPACE_IRQCHIP not in vm.capabilities:
        vm.restore_platform_state(platform)  # KVM to KVM: no userspace irqchip involved (nor imported)
        kind = "done"
    pages = _restore_irqchip(vm, platform, kind, saved, source) if kind != "done" else None
    for loop, vcpu_state in zip(machine.loops, saved):
        loop.vcpu.restore_state(vcpu_state)
    for loop, page in zip(machine.loops, pages or ()):
        loop.vcpu.set_lapic(page)  # converted from the userspace LAPICs: after the vCPU's own state


def _restore_irqchip(vm, platform: dict, kind, saved: list, source: str):
    """Load the interrupt controllers; for KVM from userspace state, returns each vCPU's LAPIC page."""
    from pyvmm.accel.irqchip import Irqchip, kvmstate, persist
    from pyvmm.accel.irqchip.chip import IrqchipError

    try:
        if Capability.USERSPACE_IRQCHIP in vm.capabilities:
            if kind == "userspace":
                persist.restore(vm.irqchip, platform["irqchip"])
            elif kind == "kvm":
                kvmstate.load_from_kvm(vm.irqchip, platform, [s.cpu.lapic for s in saved])
                vm.irqchip._wait_for_sipi = [s.cpu.mp_state == "wait-for-sipi" for s in saved]
            else:
                raise SnapshotError(f"{source}: unknown interrupt-controller state {kind!r}")
        elif kind == "userspace":
            chip = Irqchip(len(saved))
            persist.restore(chip, platform["irqchip"])
            converted, pages = kvmstate.to_kvm(chip)
            vm.restore_platform_state(converted)
            return pages
        else:
            raise SnapshotError(f"{source}: unknown interrupt-controller state {kind!r}")
    except IrqchipError as err:
        raise SnapshotError(f"{source}: {err}") from err
    return None


def saved_cpuid(state: dict, index: int) -> list[CpuidEntry]:
    return [CpuidEntry(*row[:6], indexed=bool(row[6])) for row in state["cpuid"][index]]


def cpuid_problem(saved: list[CpuidEntry], supported: list[CpuidEntry]) -> str | None:
    """Why a backend offering ``supported`` cannot run a guest that was shown ``saved`` (feature leaves)."""
    offered = {(e.function, e.index if e.indexed else 0): e for e in supported}
    for entry in saved:
        if entry.function not in (1, 7, 0x80000001):
            continue
        target = offered.get((entry.function, entry.index if entry.indexed else 0)) or CpuidEntry(entry.function, 0, 0, 0, 0, 0)
        for reg in ("ecx", "edx") if entry.function != 7 else ("ebx", "ecx", "edx"):
            mask = 0xFFFFFFFF
            if entry.function == 1 and reg == "ecx":
                mask &= ~((1 << 27) | (1 << 31))  # OSXSAVE follows CR4; the hypervisor bit is ours to set
            missing = getattr(entry, reg) & ~getattr(target, reg) & mask
            if missing:
                return f"CPUID leaf {entry.function:#x} {reg} bits {missing:#x} were offered to the guest and are not here"
    return None
