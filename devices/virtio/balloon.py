"""virtio-balloon (virtio 1.2, section 5.5): the host asks the guest for memory back.

The host sets a target (``num_pages`` in config space, 4 KiB pages); the driver
inflates towards it by sending the page frame numbers (PFNs, 4 KiB units) of
pages it gave up on the inflate queue, and deflates by sending the ones it
takes back on the deflate queue; it writes how many pages it holds in
``actual``. Each inflated page is given back to the host at once:

* private anonymous guest RAM (an mmap): ``madvise(MADV_DONTNEED)``: the host
  frees the page, the next guest access finds a zero page;
* shared memory backed by a file descriptor (memfd for vhost-user back-ends):
  ``MADV_REMOVE``, which frees the file's pages too (DONTNEED would only unmap
  them from this process);
* a plain ``bytearray`` (tests): the page is zero-filled;
* where the host has no such call (no ``madvise``): the page stays allocated.

Deflated pages need nothing: the guest touching them again brings them back.

With VIRTIO_BALLOON_F_STATS_VQ (offered when a polling interval is set), the
driver puts one buffer of statistics on the stats queue at start; the device
keeps it, and each ``stats_polling_interval_s`` gives it back, which asks the
driver to fill it again with fresh numbers and return it. The last numbers are
kept decoded by name (``stats``).

A PFN outside guest RAM, or a request with an absurd number of them, is the
guest's mistake: it is logged (rate-limited) and skipped, and the device goes on.
"""

from __future__ import annotations

import logging
import mmap
import struct

from pyvmm.devices.guestlog import GuestLog
from pyvmm.devices.virtio.device import DeviceContext, VirtioDevice
from pyvmm.errors import DeviceError

log = logging.getLogger("pyvmm.virtio.balloon")

DEVICE_ID_BALLOON = 5

VIRTIO_BALLOON_F_MUST_TELL_HOST = 0
VIRTIO_BALLOON_F_STATS_VQ = 1
VIRTIO_BALLOON_F_DEFLATE_ON_OOM = 2

INFLATE_QUEUE = 0
DEFLATE_QUEUE = 1
STATS_QUEUE = 2
QUEUE_SIZE = 256

PFN_SHIFT = 12
BALLOON_PAGE = 1 << PFN_SHIFT
PAGES_PER_MIB = (1 << 20) >> PFN_SHIFT
#: Linux sends at most 256 PFNs per request; a request of more than this is refused as absurd
MAX_PFNS_PER_REQUEST = 1 << 16

#: virtio_balloon_stat tags (virtio 1.2, 5.5.6.3; 10-15 from later Linux), by the names Firecracker's
#: BalloonStats uses
STAT_TAGS = {
    0: "swap_in",
    1: "swap_out",
    2: "major_faults",
    3: "minor_faults",
    4: "free_memory",
    5: "total_memory",
    6: "available_memory",
    7: "disk_caches",
    8: "hugetlb_allocations",
    9: "hugetlb_failures",
    10: "oom_kill",
    11: "alloc_stall",
    12: "async_scan",
    13: "direct_scan",
    14: "async_reclaim",
    15: "direct_reclaim",
}
_STAT = struct.Struct("<HQ")  # packed: le16 tag, le64 value
_CONFIG = struct.Struct("<II")  # num_pages, actual


class VirtioBalloon(VirtioDevice):
    device_id = DEVICE_ID_BALLOON
    name = "virtio-balloon"

    def __init__(self, *, target_pages: int = 0, deflate_on_oom: bool = False, stats_polling_interval_s: int = 0):
        super().__init__()
        self.target_pages = target_pages
        self.actual_pages = 0
        self.deflate_on_oom = deflate_on_oom
        #: statistics are offered (the stats queue exists) only when an interval is set at creation
        self.stats_enabled = stats_polling_interval_s > 0
        self.stats_polling_interval_s = stats_polling_interval_s
        self.queue_sizes = (QUEUE_SIZE,) * (3 if self.stats_enabled else 2)
        #: the last statistics the driver sent, by name (bytes, or counts)
        self.stats: dict[str, int] = {}
        self._stats_head: int | None = None  # the driver's stats buffer, held until the next poll
        self._stats_timer = None
        self.guest_log = GuestLog(log, self.name)
        self.metrics.extra.update(inflated_pages=0, deflated_pages=0, bad_pfns=0, stats_updates=0)

    # --- negotiation and config -------------------------------------------------
    def device_features(self) -> int:
        features = super().device_features()
        if self.stats_enabled:
            features |= 1 << VIRTIO_BALLOON_F_STATS_VQ
        if self.deflate_on_oom:
            features |= 1 << VIRTIO_BALLOON_F_DEFLATE_ON_OOM
        return features

    def config_space(self) -> bytes:
        return _CONFIG.pack(self.target_pages, self.actual_pages)

    def write_config(self, offset: int, data: bytes) -> None:
        # Only ``actual`` (bytes 4-7) is the driver's to write; it may write it in pieces.
        config = bytearray(self.config_space())
        end = min(offset + len(data), _CONFIG.size)
        if offset < 4 or end <= offset:
            return
        config[offset:end] = data[: end - offset]
        self.actual_pages = _CONFIG.unpack(config)[1]

    def set_target(self, pages: int) -> None:
        """A new target (call through the transport's ``update_device``, which tells the driver)."""
        if not 0 <= pages <= 0xFFFFFFFF:
            raise DeviceError(f"{self.name}: target of {pages} pages does not fit the 32-bit num_pages field")
        self.target_pages = pages

    # --- lifecycle ----------------------------------------------------------------
    def activate(self, context: DeviceContext) -> None:
        super().activate(context)
        self._arm_stats_timer()

    def reset(self) -> None:
        super().reset()
        self._cancel_stats_timer()
        self._stats_head = None
        self.actual_pages = 0

    def close(self) -> None:
        self._cancel_stats_timer()

    def process_queue(self, index: int) -> None:
        if index == INFLATE_QUEUE:
            self.drain(index, self._inflate)
        elif index == DEFLATE_QUEUE:
            self.drain(index, self._deflate)
        elif index == STATS_QUEUE:
            self._take_stats()

    # --- inflate and deflate ------------------------------------------------------
    def _pfns(self, chain, what: str) -> list[int]:
        data = b"".join(bytes(view) for view in chain.readable) if chain.readable_len <= 4 * MAX_PFNS_PER_REQUEST else b""
        count = chain.readable_len // 4
        if count > MAX_PFNS_PER_REQUEST:
            self.guest_log.warning("absurd request", "%s: %s request of %d PFNs ignored (at most %d)", self.name, what,
                                   count, MAX_PFNS_PER_REQUEST)  # fmt: skip
            self.metrics.errors += 1
            return []
        if chain.readable_len % 4:
            self.guest_log.warning("ragged request", "%s: %s request of %d bytes is not whole 32-bit PFNs", self.name, what,
                                   chain.readable_len)  # fmt: skip
        return list(struct.unpack_from(f"<{count}I", data))

    def _inflate(self, chain) -> int:
        self.metrics.requests += 1
        pfns = self._pfns(chain, "inflate")
        memory = self.context.memory
        mark_written = getattr(memory, "mark_written", None)  # a Diff snapshot must see the page changed
        for start, length in _runs(sorted(set(pfns))):
            for region, offset, size in _in_regions(memory, start << PFN_SHIFT, length << PFN_SHIFT):
                if region is None:
                    self.metrics.extra["bad_pfns"] += size >> PFN_SHIFT
                    self.metrics.errors += 1
                    self.guest_log.warning("bad pfn", "%s: inflated PFNs %#x+%d are outside guest RAM; ignored", self.name,
                                           offset >> PFN_SHIFT, size >> PFN_SHIFT)  # fmt: skip
                    continue
                _discard(region, offset, size)
                if mark_written is not None:
                    mark_written(offset, size)
                self.metrics.extra["inflated_pages"] += size >> PFN_SHIFT
        return 0

    def _deflate(self, chain) -> int:
        self.metrics.requests += 1
        self.metrics.extra["deflated_pages"] += len(self._pfns(chain, "deflate"))  # nothing to do: a touch brings a page back
        return 0

    # --- statistics ----------------------------------------------------------------
    def _take_stats(self) -> None:
        context = self.context
        queue, memory = context.queues[STATS_QUEUE], context.memory
        if not queue.ready:
            return
        returned = False
        while True:
            while (chain := queue.pop(memory)) is not None:
                if self._stats_head is not None:  # a second buffer while one is held: give the older one back
                    queue.add_used(memory, self._stats_head, 0)
                    returned = True
                    self.guest_log.info("stats buffer", "%s: the driver sent a stats buffer while one was held", self.name)
                self._stats_head = chain.head
                self._decode_stats(chain)
            if not queue.enable_notification(memory):  # with EVENT_IDX: ask for the kick of the next buffer
                break
        if returned:
            context.signal_used(STATS_QUEUE)

    def _decode_stats(self, chain) -> None:
        data = b"".join(bytes(view) for view in chain.readable)
        for offset in range(0, len(data) - _STAT.size + 1, _STAT.size):
            tag, value = _STAT.unpack_from(data, offset)
            name = STAT_TAGS.get(tag)
            if name is not None:  # a tag from a newer driver is skipped, as the spec allows
                self.stats[name] = value
        self.metrics.extra["stats_updates"] += 1

    def request_stats(self) -> bool:
        """Give the held stats buffer back, asking the driver for fresh numbers; False if none is held."""
        context = self.context
        if context is None or self._stats_head is None:
            return False
        queue = context.queues[STATS_QUEUE]
        queue.add_used(context.memory, self._stats_head, 0)
        self._stats_head = None
        context.signal_used(STATS_QUEUE)
        return True

    def set_stats_interval(self, seconds: int) -> None:
        """A new polling interval, with a first poll at once (Firecracker's PATCH /balloon/statistics).
        Statistics cannot be switched on or off after the device was created."""
        if (seconds > 0) != self.stats_enabled:
            raise DeviceError(f"{self.name}: statistics cannot be turned {'on' if seconds else 'off'} after the device "
                              "was created")  # fmt: skip
        self.stats_polling_interval_s = seconds
        self._cancel_stats_timer()
        if self.context is not None and self.host is not None:
            self._stats_timer = self.host.call_later(0, self._poll_stats)  # on the event loop, like every poll

    def _arm_stats_timer(self) -> None:
        self._cancel_stats_timer()
        if self.stats_enabled and self.host is not None and self.context is not None:
            if self.context.has(VIRTIO_BALLOON_F_STATS_VQ):
                self._stats_timer = self.host.call_later(self.stats_polling_interval_s, self._poll_stats)

    def _poll_stats(self) -> None:
        self._stats_timer = None
        if self.context is None:
            return
        self.request_stats()
        self._arm_stats_timer()

    def _cancel_stats_timer(self) -> None:
        if self._stats_timer is not None:
            self._stats_timer.cancel()
            self._stats_timer = None

    # --- snapshots --------------------------------------------------------------------
    def save_state(self) -> dict:
        return {"target_pages": self.target_pages, "actual_pages": self.actual_pages, "stats_head": self._stats_head,
                "stats": dict(self.stats), "stats_polling_interval_s": self.stats_polling_interval_s}  # fmt: skip

    def restore_state(self, state: dict) -> None:
        self.target_pages = int(state["target_pages"])
        self.actual_pages = int(state["actual_pages"])
        head = state["stats_head"]
        self._stats_head = None if head is None else int(head)
        self.stats = {str(name): int(value) for name, value in state["stats"].items()}
        if self.stats_enabled:
            self.stats_polling_interval_s = int(state["stats_polling_interval_s"]) or self.stats_polling_interval_s


def _runs(pfns: list[int]):
    """Sorted PFNs -> (first, count) runs of consecutive ones."""
    start = prev = None
    for pfn in pfns:
        if start is not None and pfn == prev + 1:
            prev = pfn
            continue
        if start is not None:
            yield start, prev - start + 1
        start = prev = pfn
    if start is not None:
        yield start, prev - start + 1


def _in_regions(memory, addr: int, size: int):
    """Split ``[addr, addr+size)`` by RAM region: (region, guest addr, length), region None for a gap."""
    end = addr + size
    while addr < end:
        region = next((r for r in memory.regions if r.guest_addr <= addr < r.end), None)
        if region is not None:
            length = min(end, region.end) - addr
        else:
            following = [r.guest_addr for r in memory.regions if r.guest_addr > addr]
            length = min([end, *following]) - addr
        yield region, addr, length
        addr += length


def _discard(region, addr: int, size: int) -> None:
    """Give guest RAM ``[addr, addr+size)`` (inside ``region``) back to the host."""
    offset = addr - region.guest_addr
    buffer = region.buffer
    if not isinstance(buffer, mmap.mmap):
        region.view[offset : offset + size] = bytes(size)  # a bytearray (tests): what a freed page reads back
        return
    shared = getattr(region, "fd", None) is not None
    advice = getattr(mmap, "MADV_REMOVE" if shared else "MADV_DONTNEED", None)
    if advice is None or not hasattr(buffer, "madvise") or offset % mmap.PAGESIZE or size % mmap.PAGESIZE:
        return  # no way to free it here (or pages larger than the balloon's): the page stays, the guest does not care
    try:
        buffer.madvise(advice, offset, size)
    except OSError as err:
        log.debug("madvise(%d) of guest RAM %#x+%#x failed: %s", advice, addr, size, err)
