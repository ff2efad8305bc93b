"""Basic-block coverage in drcov format, and bounded execution traces, from the interpreter.

**drcov** (DynamoRIO's drcov v2, what Lighthouse, bncov and Cartographer read)::

    DRCOV VERSION: 2
    DRCOV FLAVOR: drcov
    Module Table: version 2, count N
    Columns: id, base, end, entry, checksum, timestamp, path
     0, 0xffffffff81000000, 0xffffffff83200000, 0x0000000000000000, 0x00000000, 0x00000000, /path/vmlinux
     1, 0x0, 0x8000000, 0x0000000000000000, 0x00000000, 0x00000000, [guest-physical]
    BB Table: M bbs
    M records of {u32 start (offset from its module's base), u16 size, u16 module id}, little-endian

A block inside a module given by address (the kernel image's virtual range, read from its ELF)
belongs to it; every other block is recorded by its guest-physical address in the last module,
``[guest-physical]``, which spans guest RAM.

**Trace** (pyvmm's own format, one file)::

    b"PYVMMTRC" + u32 version (1), then records:
    u8 kind = 1 (block), u8 vcpu, u16 size, u64 guest-virtual address

Once the file reaches its size limit the trace stops and a final record ``u8 kind = 2 (truncated),
u8 0, u16 0, u64 records dropped so far`` is written when it is closed. Both are turned on and off
at run time (the API and config); what was recorded stays.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass
from pathlib import Path

from pyvmm.errors import PyvmmError

DRCOV_HEADER = "DRCOV VERSION: 2\nDRCOV FLAVOR: drcov\n"
BB_RECORD = struct.Struct("<IHH")
TRACE_MAGIC = b"PYVMMTRC"
TRACE_VERSION = 1
TRACE_RECORD = struct.Struct("<BBHQ")
TRACE_BLOCK, TRACE_TRUNCATED = 1, 2
PHYSICAL = "[guest-physical]"


class CoverageError(PyvmmError):
    """A coverage or trace file cannot be written (the message names it)."""


@dataclass(frozen=True)
class Module:
    base: int
    end: int
    path: str


def kernel_module(path) -> Module | None:
    """The virtual range of an ELF kernel's executable segments (None for a file that is not an ELF).
    Only those: Linux's per-CPU data is a loaded segment at virtual address 0."""
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    try:
        with open(path, "rb") as f:
            elf = ELFFile(f)
            loads = [s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD" and s["p_memsz"] and s["p_flags"] & 1]
            if not loads:
                return None
            return Module(min(s["p_vaddr"] for s in loads), max(s["p_vaddr"] + s["p_memsz"] for s in loads),
                          str(Path(path).resolve()))  # fmt: skip
    except (OSError, ELFError):
        return None


class Coverage:
    """The set of blocks executed, as (module id, offset, size); thread-safe (vCPU threads add)."""

    def __init__(self, modules: list[Module], physical_size: int):
        self.modules = [*modules, Module(0, physical_size, PHYSICAL)]
        self._blocks: dict[tuple[int, int], int] = {}
        self._lock = threading.Lock()

    def add(self, address: int, size: int, physical: int | None) -> None:
        """A block at guest-virtual ``address`` (``physical``: its guest-physical address, if known)."""
        for index, module in enumerate(self.modules[:-1]):
            if module.base <= address < module.end:
                key = (index, address - module.base)
                break
        else:
            if physical is None or physical >= self.modules[-1].end:
                return
            key = (len(self.modules) - 1, physical)
        with self._lock:
            self._blocks[key] = max(size, self._blocks.get(key, 0))

    def __len__(self) -> int:
        return len(self._blocks)

    def blocks(self) -> list[tuple[int, int, int]]:
        """(module id, offset, size), sorted."""
        with self._lock:
            return sorted((module, offset, size) for (module, offset), size in self._blocks.items())

    def write(self, path) -> int:
        """Write the drcov file; returns the number of blocks."""
        blocks = self.blocks()
        lines = [DRCOV_HEADER, f"Module Table: version 2, count {len(self.modules)}\n",
                 "Columns: id, base, end, entry, checksum, timestamp, path\n"]  # fmt: skip
        for index, module in enumerate(self.modules):
            lines.append(f"{index:2d}, {module.base:#x}, {module.end:#x}, 0x0000000000000000, 0x00000000, 0x00000000, "
                         f"{module.path}\n")  # fmt: skip
        lines.append(f"BB Table: {len(blocks)} bbs\n")
        body = b"".join(BB_RECORD.pack(offset & 0xFFFFFFFF, min(size, 0xFFFF), module) for module, offset, size in blocks)
        try:
            with open(path, "wb") as out:
                out.write("".join(lines).encode())
                out.write(body)
        except OSError as err:
            raise CoverageError(f"cannot write the coverage file {path}: {err.strerror}") from err
        return len(blocks)


class Trace:
    """An append-only trace file with a size limit (the header counts)."""

    def __init__(self, path, limit_bytes: int):
        if limit_bytes < len(TRACE_MAGIC) + 4 + 2 * TRACE_RECORD.size:
            raise CoverageError(f"trace limit of {limit_bytes} bytes is too small for the trace file {path}")
        try:
            self._file = open(path, "wb")  # noqa: SIM115 - closed by close()
        except OSError as err:
            raise CoverageError(f"cannot write the trace file {path}: {err.strerror}") from err
        self.path = path
        self._file.write(TRACE_MAGIC + struct.pack("<I", TRACE_VERSION))
        self._room = (limit_bytes - len(TRACE_MAGIC) - 4) // TRACE_RECORD.size - 1  # one record kept for the end
        self.records = 0
        self.dropped = 0
        self._lock = threading.Lock()

    def block(self, vcpu: int, address: int, size: int) -> None:
        with self._lock:
            if self._file is None:
                return
            if self.records >= self._room:
                self.dropped += 1
                return
            self._file.write(TRACE_RECORD.pack(TRACE_BLOCK, vcpu & 0xFF, min(size, 0xFFFF), address & (2**64 - 1)))
            self.records += 1

    def close(self) -> None:
        with self._lock:
            if self._file is None:
                return
            if self.dropped:
                self._file.write(TRACE_RECORD.pack(TRACE_TRUNCATED, 0, 0, self.dropped))
            self._file.close()
            self._file = None


def read_trace(path) -> tuple[list[tuple[int, int, int]], int]:
    """(blocks as (vcpu, address, size), records dropped) of a trace file: for tests and tools."""
    data = Path(path).read_bytes()
    if not data.startswith(TRACE_MAGIC) or struct.unpack_from("<I", data, len(TRACE_MAGIC))[0] != TRACE_VERSION:
        raise CoverageError(f"{path} is not a pyvmm trace of version {TRACE_VERSION}")
    blocks, dropped = [], 0
    for kind, vcpu, size, value in TRACE_RECORD.iter_unpack(data[len(TRACE_MAGIC) + 4 :]):
        if kind == TRACE_BLOCK:
            blocks.append((vcpu, value, size))
        elif kind == TRACE_TRUNCATED:
            dropped = value
    return blocks, dropped


class BlockRecorder:
    """Coverage and a trace fed by every vCPU's block trace (``Capability.BLOCK_TRACE``), each turned
    on and off at run time; what is recorded goes to its file when it is turned off or at close."""

    def __init__(self, machine, *, kernel=None):
        from pyvmm.accel.core import Capability

        if Capability.BLOCK_TRACE not in machine.vm.capabilities:
            raise CoverageError(f"the {machine.vm.name} backend cannot trace the code it runs (the interpreter can)")
        self.machine = machine
        self.kernel = kernel
        self.coverage: Coverage | None = None
        self.coverage_path = None
        self.trace: Trace | None = None

    def _update(self) -> None:
        on = self.coverage is not None or self.trace is not None
        for loop in self.machine.loops:
            loop.vcpu.trace_blocks(self._feeder(loop.vcpu.index) if on else None)

    def _feeder(self, vcpu: int):
        coverage, trace = self.coverage, self.trace

        def on_block(address: int, size: int, physical: int | None) -> None:
            if coverage is not None:
                coverage.add(address, size, physical)
            if trace is not None:
                trace.block(vcpu, address, size)

        return on_block

    def start_coverage(self, path) -> None:
        if self.coverage is not None:
            raise CoverageError(f"coverage is already being recorded (to {self.coverage_path})")
        module = kernel_module(self.kernel) if self.kernel is not None else None
        self.coverage, self.coverage_path = Coverage([module] if module else [], self.machine.memory.end), path
        self._update()

    def stop_coverage(self) -> int:
        if self.coverage is None:
            raise CoverageError("coverage is not being recorded")
        coverage, self.coverage = self.coverage, None
        self._update()
        return coverage.write(self.coverage_path)

    def start_trace(self, path, limit_bytes: int) -> None:
        if self.trace is not None:
            raise CoverageError(f"a trace is already being recorded (to {self.trace.path})")
        self.trace = Trace(path, limit_bytes)
        self._update()

    def stop_trace(self) -> dict:
        if self.trace is None:
            raise CoverageError("no trace is being recorded")
        trace, self.trace = self.trace, None
        self._update()
        trace.close()
        return {"records": trace.records, "dropped": trace.dropped}

    def close(self) -> None:
        if self.coverage is not None:
            self.stop_coverage()
        if self.trace is not None:
            self.stop_trace()
