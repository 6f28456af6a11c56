"""One retry policy for jobs, deliveries and the worker supervisor.

A small validated value object (as rq's ``Retry``): exponential backoff from
``base_s``, capped at ``cap_s``, with multiplicative jitter, for at most
``max_attempts`` attempts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import timedelta


@dataclass(frozen=True)
class RetryPolicy:
    base_s: float
    """Delay after the first failed attempt (before jitter)."""
    cap_s: float
    """No delay is longer than this (before jitter)."""
    max_attempts: int
    """Attempts in all; the one that fails at this count is final."""
    jitter: float = 0.5
    """The delay is multiplied by a uniform factor in [1 - jitter, 1 + jitter]."""

    def __post_init__(self) -> None:
        if not self.base_s > 0:
            raise ValueError(f"retry base_s must be > 0, not {self.base_s!r}")
        if not self.cap_s >= self.base_s:
            raise ValueError(f"retry cap_s ({self.cap_s!r}) must be >= base_s ({self.base_s!r})")
        if not self.max_attempts >= 1:
            raise ValueError(f"retry max_attempts must be >= 1, not {self.max_attempts!r}")
        if not 0.0 <= self.jitter < 1.0:
            raise ValueError(f"retry jitter must be in [0, 1), not {self.jitter!r}")

    def exhausted(self, attempts: int) -> bool:
        """True when ``attempts`` attempts (all failed) leave no retry."""
        return attempts >= self.max_attempts

    def delay_s(self, attempts: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after the ``attempts``-th failed attempt (1-based)."""
        raw = min(self.cap_s, self.base_s * 2 ** max(0, attempts - 1))
        factor = (rng or random).uniform(1.0 - self.jitter, 1.0 + self.jitter)
        return raw * factor

    def delay(self, attempts: int, rng: random.Random | None = None) -> timedelta:
        return timedelta(seconds=self.delay_s(attempts, rng))
