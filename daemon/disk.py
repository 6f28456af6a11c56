"""The spool's free-space watermark: below it the receiver answers 0xA700 instead of filling
the disk, /readyz reports it, and accepting resumes by itself when space returns."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import structlog

log = structlog.get_logger("opacityd.disk")


class DiskGuard:
    def __init__(self, folder: Path, min_free_mb: int, cache_s: float = 0.5) -> None:
        self.folder = folder
        self.min_free_bytes = min_free_mb * 1024 * 1024
        self.cache_s = cache_s
        self._lock = threading.Lock()
        self._checked = 0.0
        self._free = -1
        self._low = False

    def free_bytes(self) -> int:
        """Free bytes for unprivileged writers; measured at most every ``cache_s`` seconds."""
        with self._lock:
            now = time.monotonic()
            if now - self._checked >= self.cache_s:
                stats = os.statvfs(self.folder)
                self._free = stats.f_bavail * stats.f_frsize
                self._checked = now
                low = self._free < self.min_free_bytes
                if low != self._low:
                    self._low = low
                    if low:
                        log.error("disk_below_watermark", free_mb=self._free // 2**20,
                                  watermark_mb=self.min_free_bytes // 2**20,
                                  action="C-STORE answers 0xA700 until space returns")
                    else:
                        log.warning("disk_above_watermark", free_mb=self._free // 2**20,
                                    action="accepting again")
            return self._free

    def low(self) -> bool:
        return self.free_bytes() < self.min_free_bytes
