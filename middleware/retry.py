"""Retries for transient backend failures: full-jitter exponential backoff inside a deadline.

A policy is a plain immutable value; the caller decides *what* may be retried
(``retryable``) and *until when* (``deadline``, on the policy's clock). A retry is
started only when its backoff and a whole further attempt (``attempt_s``, the
caller's worst case for one attempt, e.g. the socket timeout) still fit before
the deadline, so an operation never overruns its deadline because of a retry.
"""
from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional, TypeVar

T = TypeVar("T")

#: Called before each retry with (retry number starting at 1, the error, the backoff in seconds).
RetryListener = Callable[[int, BaseException, float], None]


@dataclass(frozen=True)
class RetryPolicy:
    """At most ``max_retries`` retries, each after ``uniform(0, min(cap, base * 2**(n-1)))``."""

    max_retries: int = 2
    base_ms: float = 5.0
    cap_ms: float = 50.0
    rand: Callable[[], float] = field(default=random.random, repr=False)
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.max_retries <= 2:
            raise ValueError(f"max_retries must be between 0 and 2, got {self.max_retries}")
        if self.base_ms < 0 or self.cap_ms < 0:
            raise ValueError("backoff base and cap must not be negative")

    def backoff_s(self, retry: int) -> float:
        """Full jitter: a uniformly random delay up to the exponential ceiling for retry ``retry``."""
        ceiling_ms = min(self.cap_ms, self.base_ms * 2 ** (retry - 1))
        return self.rand() * ceiling_ms / 1000.0

    def call(
        self,
        func: Callable[[], T],
        *,
        retryable: Callable[[BaseException], bool],
        deadline: float,
        attempt_s: float = 0.0,
        on_retry: Optional[RetryListener] = None,
    ) -> T:
        """Run ``func``, retrying errors that ``retryable`` accepts while the deadline allows."""
        retries = 0
        while True:
            try:
                return func()
            except Exception as exc:
                if retries >= self.max_retries or not retryable(exc):
                    raise
                delay = self.backoff_s(retries + 1)
                if self.clock() + delay + attempt_s > deadline:
                    raise
                retries += 1
                if on_retry is not None:
                    on_retry(retries, exc, delay)
                if delay > 0:
                    self.sleep(delay)
