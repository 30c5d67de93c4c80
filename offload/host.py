"""The host tier between the disk and GPU slots: experts kept in (pinned) host memory, least recently used out.

ExpertFlow's middle tier. With a GPU, the slot cache (``cache.py``) holds a budget of experts in GPU memory and
copies each load host → device on a side stream, recording an event that compute waits on; this tier, when given
a budget (``host_cache_fraction`` / ``host_cache_bytes``), keeps the raw bytes of recently read experts in pinned
host buffers, so a GPU miss or prefetch of an expert seen before is one DMA copy (tens of GB/s) instead of a disk
read. A buffer is never reused while a copy from it may be in flight: ``fetch`` hands it out pinned and the caller
``release``s it once its copy has finished (the slot cache synchronises on the copy's event first).

Thread-safe: the slot cache's I/O threads fetch concurrently; two asking for the same expert share one read.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from .tiers import DiskTier


class HostTier:
    def __init__(self, disk: DiskTier, num_slots: int, pin: bool):
        self.disk, self.num_slots, self.pin = disk, num_slots, pin
        self._lock = threading.Condition()
        self._lru: OrderedDict = OrderedDict()      # key -> list of host tensors (raw, checkpoint dtype)
        self._users: dict = {}                      # key -> fetches not yet released
        self._loading: set = set()
        self._spare: list[list[torch.Tensor]] = []  # buffers of evicted experts, reused for the next read
        self.counters = {"host_hits": 0, "host_misses": 0, "host_evictions": 0}

    def _buffers(self, key) -> list[torch.Tensor]:
        if self._spare:
            return self._spare.pop()
        return [torch.empty(x.slab_shape or x.shape, dtype=x.dtype, pin_memory=self.pin)
                for x in self.disk.ranges[key]]

    def _evict_one(self) -> bool:
        for k in self._lru:
            if not self._users.get(k):
                self._spare.append(self._lru.pop(k))
                self.counters["host_evictions"] += 1
                return True
        return False

    def fetch(self, layer: int, expert: int) -> list[torch.Tensor]:
        """The expert's raw tensors in host memory (read from disk on a miss), pinned until ``release``."""
        key = (layer, expert)
        with self._lock:
            while key in self._loading:
                self._lock.wait()
            if key in self._lru:
                self._lru.move_to_end(key)
                self._users[key] = self._users.get(key, 0) + 1
                self.counters["host_hits"] += 1
                return self._lru[key]
            self.counters["host_misses"] += 1
            while len(self._lru) + len(self._loading) >= self.num_slots and not self._evict_one():
                self._lock.wait()           # every buffer is being copied from: the next release frees one
            bufs = self._buffers(key)
            self._loading.add(key)
        try:
            self.disk.read_raw(layer, expert, bufs)
        except BaseException:
            with self._lock:
                self._loading.discard(key)
                self._spare.append(bufs)
                self._lock.notify_all()
            raise
        with self._lock:
            self._loading.discard(key)
            self._lru[key] = bufs
            self._users[key] = self._users.get(key, 0) + 1
            self._lock.notify_all()
        return bufs

    def release(self, layer: int, expert: int):
        key = (layer, expert)
        with self._lock:
            n = self._users.get(key, 0) - 1
            if n > 0:
                self._users[key] = n
            else:
                self._users.pop(key, None)
            self._lock.notify_all()

    def __contains__(self, key) -> bool:
        with self._lock:
            return key in self._lru

    def stats(self) -> dict:
        with self._lock:
            d = dict(self.counters)
            d["host_slots"] = self.num_slots
            d["host_resident"] = len(self._lru)
        return d
