"""Token-bucket rate limiters in Firecracker's shape, sans-IO (the clock is injected).

A ``TokenBucket`` holds up to ``size`` tokens and refills the whole of ``size``
in ``refill_time`` milliseconds, at a constant rate; it starts full. On top of
that, ``one_time_burst`` tokens are spent first and never refill. A bucket of
size 0 or refill time 0 limits nothing (Firecracker's rule), so it is not built.

A ``RateLimiter`` has an optional bandwidth bucket (bytes) and an optional ops
bucket (requests). A request is admitted only when both buckets can pay for it,
and then both pay. A request larger than a whole bucket is admitted once the
bucket is full and leaves it in debt (negative), so the long-run rate still
holds and such a request is never refused forever.

Time is integer nanoseconds from ``clock()`` and tokens are integers; the
fraction of a token earned between two calls is carried over, so the refill is
exact: after ``refill_time`` ms an empty bucket holds exactly ``size`` tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from pyvmm.errors import DeviceError

NS_PER_MS = 1_000_000
MAX_VALUE = (1 << 63) - 1  # Firecracker's fields are int64


class RateLimiterError(DeviceError):
    """A rate limiter configuration that cannot be used; ``key`` is the field within it (e.g. "ops.size")."""

    def __init__(self, key: str, problem: str):
        self.key, self.problem = key, problem
        super().__init__(f"rate limiter {key}: {problem}")


@dataclass(frozen=True)
class BucketConfig:
    """Firecracker's TokenBucket object: ``size`` tokens refilled in ``refill_time`` ms, plus a
    ``one_time_burst`` spent first."""

    size: int
    refill_time: int
    one_time_burst: int = 0

    @property
    def limits(self) -> bool:
        return self.size > 0 and self.refill_time > 0

    def as_dict(self) -> dict:
        return {"size": self.size, "one_time_burst": self.one_time_burst, "refill_time": self.refill_time}

    @classmethod
    def from_dict(cls, data, where: str) -> BucketConfig:
        if not isinstance(data, dict):
            raise RateLimiterError(where, "must be an object with size, refill_time and optionally one_time_burst")
        for key in data:
            if key not in ("size", "one_time_burst", "refill_time"):
                raise RateLimiterError(f"{where}.{key}", "unknown field; expected size, one_time_burst or refill_time")
        for key in ("size", "refill_time"):
            if key not in data:
                raise RateLimiterError(f"{where}.{key}", "missing")
        values = {}
        for key, value in data.items():
            if not isinstance(value, int) or isinstance(value, bool):
                raise RateLimiterError(f"{where}.{key}", f"must be an integer, not {type(value).__name__}")
            if not 0 <= value <= MAX_VALUE:
                raise RateLimiterError(f"{where}.{key}", f"must be between 0 and {MAX_VALUE}, not {value}")
            values[key] = value
        return cls(values["size"], values["refill_time"], values.get("one_time_burst", 0))


@dataclass(frozen=True)
class RateLimiterConfig:
    """Firecracker's RateLimiter object: an optional bandwidth (bytes) and ops (requests) bucket."""

    bandwidth: BucketConfig | None = None
    ops: BucketConfig | None = None

    def as_dict(self) -> dict:
        return {name: bucket.as_dict() for name, bucket in (("bandwidth", self.bandwidth), ("ops", self.ops)) if bucket}

    @classmethod
    def from_dict(cls, data) -> RateLimiterConfig:
        if not isinstance(data, dict):
            raise RateLimiterError("", "must be an object with optional 'bandwidth' and 'ops' token buckets")
        for key in data:
            if key not in ("bandwidth", "ops"):
                raise RateLimiterError(key, "unknown field; expected bandwidth or ops")
        return cls(*(None if data.get(name) is None else BucketConfig.from_dict(data[name], name)
                     for name in ("bandwidth", "ops")))  # fmt: skip

    def updated(self, data) -> RateLimiterConfig:
        """This config with the buckets ``data`` names replaced (Firecracker's PATCH: a bucket left
        out stays as it was; one with size or refill_time 0 turns that limit off)."""
        new = RateLimiterConfig.from_dict(data)
        return RateLimiterConfig(new.bandwidth if "bandwidth" in data else self.bandwidth,
                                 new.ops if "ops" in data else self.ops)  # fmt: skip

    @property
    def limits(self) -> bool:
        return any(bucket is not None and bucket.limits for bucket in (self.bandwidth, self.ops))


class TokenBucket:
    def __init__(self, size: int, refill_time_ms: int, one_time_burst: int = 0, *,
                 clock: Callable[[], int] = time.monotonic_ns):  # fmt: skip
        if size <= 0 or refill_time_ms <= 0:
            raise RateLimiterError("bucket", f"size {size} and refill_time {refill_time_ms} must both be positive")
        self.size = size
        self.refill_ns = refill_time_ms * NS_PER_MS
        self.one_time_burst = one_time_burst
        self.clock = clock
        self.budget = size  # may go negative after a request larger than the bucket
        self._earned = 0  # a token's fraction earned but not yet added, in units of 1/refill_ns token
        self._last = clock()

    def _refill(self) -> None:
        now = self.clock()
        elapsed, self._last = max(0, now - self._last), now
        if self.budget >= self.size:
            self._earned = 0  # a full bucket earns nothing
            return
        earned = elapsed * self.size + self._earned
        tokens, self._earned = divmod(earned, self.refill_ns)
        self.budget += tokens
        if self.budget >= self.size:
            self.budget, self._earned = self.size, 0

    def available(self) -> int:
        """Tokens that can be spent now (the one-time burst included)."""
        self._refill()
        return self.one_time_burst + self.budget

    def can_take(self, tokens: int) -> bool:
        self._refill()
        if tokens <= self.one_time_burst:
            return True
        return self.budget >= min(tokens - self.one_time_burst, self.size)

    def take(self, tokens: int) -> None:
        """Spend ``tokens`` (after ``can_take`` said yes): the burst first, then the budget."""
        self._refill()
        from_burst = min(tokens, self.one_time_burst)
        self.one_time_burst -= from_burst
        self.budget -= tokens - from_burst

    def wait_ns(self, tokens: int) -> int:
        """Nanoseconds until ``can_take(tokens)`` becomes true (0 when it is already)."""
        if self.can_take(tokens):
            return 0
        needed = min(tokens - self.one_time_burst, self.size) - self.budget  # whole tokens still missing
        # the bucket earns ``size`` tokens per ``refill_ns``; ``_earned`` of the next one is already in
        return -(-(needed * self.refill_ns - self._earned) // self.size)


class RateLimiter:
    """Optional bandwidth and ops buckets; ``try_consume(bytes, ops)`` admits a request or not."""

    def __init__(self, config: RateLimiterConfig | None = None, *, clock: Callable[[], int] = time.monotonic_ns):
        self.clock = clock
        self.config = RateLimiterConfig()
        self.bandwidth: TokenBucket | None = None
        self.ops: TokenBucket | None = None
        self.configure(config or RateLimiterConfig())

    def configure(self, config: RateLimiterConfig) -> None:
        """Take a new configuration at once; each limited bucket starts full (as Firecracker's update)."""
        self.config = config
        self.bandwidth, self.ops = (TokenBucket(b.size, b.refill_time, b.one_time_burst, clock=self.clock)
                                    if b is not None and b.limits else None
                                    for b in (config.bandwidth, config.ops))  # fmt: skip

    @property
    def limits(self) -> bool:
        return self.bandwidth is not None or self.ops is not None

    def _pairs(self, nbytes: int, ops: int):
        return [(bucket, n) for bucket, n in ((self.bandwidth, nbytes), (self.ops, ops)) if bucket is not None and n > 0]

    def try_consume(self, nbytes: int, ops: int = 1) -> bool:
        """Spend ``nbytes`` bandwidth and ``ops`` ops tokens if both buckets have them; else spend nothing."""
        pairs = self._pairs(nbytes, ops)
        if not all(bucket.can_take(n) for bucket, n in pairs):
            return False
        for bucket, n in pairs:
            bucket.take(n)
        return True

    def wait_ns(self, nbytes: int, ops: int = 1) -> int:
        """Nanoseconds until a request of ``nbytes`` and ``ops`` would be admitted."""
        return max((bucket.wait_ns(n) for bucket, n in self._pairs(nbytes, ops)), default=0)
