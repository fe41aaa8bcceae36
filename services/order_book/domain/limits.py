"""Per-participant rate limits: a token bucket per participant, where each order (or other call) costs one token."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.domain.errors import ResourceExhausted


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated_s: float


@dataclass(slots=True)
class RateLimiter:
    """Refills `rate_per_s` tokens a second up to `burst`; time comes in as a monotonic reading."""

    rate_per_s: float
    burst: int
    _buckets: dict[str, _Bucket] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.rate_per_s <= 0 or self.burst <= 0:
            raise ValueError("a rate limit needs a positive rate and burst")

    def take(self, participant_id: str, cost: int, now_s: float) -> None:
        """Spend `cost` tokens, or raise ResourceExhausted with the seconds until they are there."""
        bucket = self._buckets.get(participant_id)
        if bucket is None:
            bucket = self._buckets[participant_id] = _Bucket(float(self.burst), now_s)
        else:
            elapsed_s = now_s - bucket.updated_s
            if elapsed_s > 0:
                bucket.tokens = min(float(self.burst), bucket.tokens + elapsed_s * self.rate_per_s)
                bucket.updated_s = now_s
        if cost > self.burst:
            raise ResourceExhausted(
                f"{cost} orders exceed the burst limit of {self.burst} per participant", retry_after_s=0.0
            )
        if bucket.tokens < cost:
            retry_after_s = (cost - bucket.tokens) / self.rate_per_s
            raise ResourceExhausted(
                f"rate limit of {self.rate_per_s:g} orders/s (burst {self.burst}) reached; "
                f"retry after {retry_after_s:.3f} s",
                retry_after_s=retry_after_s,
            )
        bucket.tokens -= cost
