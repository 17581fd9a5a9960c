"""The real relay with a memory backend whose writes can be made to fail, for live fault tests.

``gunicorn ... 'tests.faults.app_for_faults:create_app()'``. While the file named by
``FAULT_MEMORY_SWITCH`` exists, every write to the memory backend raises ``StoreUnavailable``
(reads still work): the inverse partial failure, where Redis takes a write and memory does not.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Optional

from flask import Flask

from config.settings import load_settings
from relay.app import create_app as create_relay
from relay.stores.base import StoreUnavailable
from relay.stores.factory import build_backends
from relay.stores.memory import MemoryStore


class SwitchableMemory(MemoryStore):
    """A ``MemoryStore`` whose writes fail while ``switch`` exists."""

    def __init__(self, switch: Path, max_value_bytes: int) -> None:
        super().__init__(max_value_bytes=max_value_bytes)
        self.switch = switch

    def _check(self) -> None:
        if self.switch.exists():
            raise StoreUnavailable("memory writes fail (injected by the test)")

    def set(self, key: str, value: str, ttl_ms: Optional[int] = None) -> None:
        self._check()
        super().set(key, value, ttl_ms)

    def mset(self, items: Mapping[str, str], ttl_ms: Optional[int] = None) -> None:
        self._check()
        super().mset(items, ttl_ms)

    def delete(self, *keys: str) -> int:
        self._check()
        return super().delete(*keys)

    def set_if_absent(self, key: str, value: str, ttl_ms: Optional[int] = None) -> bool:
        self._check()
        return super().set_if_absent(key, value, ttl_ms)

    def compare_and_set(self, key: str, expected: Optional[str], value: str, ttl_ms: Optional[int] = None) -> bool:
        self._check()
        return super().compare_and_set(key, expected, value, ttl_ms)

    def compare_and_delete(self, key: str, expected: str) -> bool:
        self._check()
        return super().compare_and_delete(key, expected)

    def incr(self, key: str, amount: int = 1, ttl_ms: Optional[int] = None) -> int:
        self._check()
        return super().incr(key, amount, ttl_ms)

    def index_add(self, key: str, members: Mapping[str, float]) -> None:
        self._check()
        super().index_add(key, members)

    def index_remove(self, key: str, members: Iterable[str]) -> int:
        self._check()
        return super().index_remove(key, members)

    def index_trim(self, key: str, max_size: int) -> list[str]:
        self._check()
        return super().index_trim(key, max_size)


def create_app() -> Flask:
    settings = load_settings(os.environ)
    backends = build_backends(settings)
    backends["memory"] = SwitchableMemory(Path(os.environ["FAULT_MEMORY_SWITCH"]), settings.store_max_value_bytes)
    return create_relay(settings, backends=backends)
