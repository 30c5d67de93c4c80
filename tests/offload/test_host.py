"""The host tier between disk and (GPU) slots: LRU of raw expert bytes, shared reads, buffers never reused while
a copy from them may run; offload mode with it is lossless (on CPU the tier is put under the slots on request)."""

import threading
import time

import pytest
import torch

from moeyard.offload.host import HostTier
from moeyard.offload.mode import OffloadConfigError
from moeyard.runtime.llm import LLM
from moeyard.runtime.sampling import SamplingParams


class _Ext:
    def __init__(self):
        self.slab_shape, self.shape, self.dtype = None, (2, 3), torch.float32


class _Disk:
    """Fake storage: expert (l, e) is filled with l * 100 + e; counts reads; a read takes ``delay`` s."""

    def __init__(self, delay=0.0):
        self.ranges = {(l, e): [_Ext()] for l in range(2) for e in range(8)}
        self.reads, self.delay = [], delay

    def read_raw(self, layer, expert, bufs):
        self.reads.append((layer, expert))
        time.sleep(self.delay)
        for b in bufs:
            b.fill_(layer * 100 + expert)
        return bufs


def test_lru_hits_and_eviction():
    disk = _Disk()
    h = HostTier(disk, 2, pin=False)
    for key in [(0, 1), (0, 2), (0, 1), (1, 5), (0, 2)]:      # (0, 2) was evicted by (1, 5): read again
        t = h.fetch(*key)
        assert float(t[0][0, 0]) == key[0] * 100 + key[1]
        h.release(*key)
    assert disk.reads == [(0, 1), (0, 2), (1, 5), (0, 2)]
    st = h.stats()
    assert (st["host_hits"], st["host_misses"], st["host_evictions"]) == (1, 4, 2)
    assert (0, 2) in h and (0, 1) not in h


def test_buffers_in_use_are_never_reused():
    disk = _Disk()
    h = HostTier(disk, 1, pin=False)
    a = h.fetch(0, 1)                                          # held (a copy from it may be in flight)
    got = []
    t = threading.Thread(target=lambda: got.append(h.fetch(0, 2)))
    t.start()
    time.sleep(0.1)
    assert not got and float(a[0][0, 0]) == 1                  # the second fetch waits for the buffer
    h.release(0, 1)
    t.join(5)
    assert got and float(got[0][0][0, 0]) == 2


def test_concurrent_fetches_of_one_expert_share_a_read():
    disk = _Disk(delay=0.1)
    h = HostTier(disk, 4, pin=False)
    out = []
    ts = [threading.Thread(target=lambda: out.append(h.fetch(1, 3))) for _ in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(5)
    assert disk.reads == [(1, 3)] and len(out) == 3


def test_offload_with_host_tier_is_lossless(tiny_ckpt):
    path, _ = tiny_ckpt("mixtral")
    prompts = [[1, 5, 9, 30, 77, 12], [3, 4, 100, 2], [42]]
    sp = SamplingParams(max_tokens=10, temperature=0)
    ref = [o.token_ids for o in LLM(path, max_num_seqs=4).generate(prompt_token_ids=prompts, sampling_params=sp)]
    llm = LLM(path, mode="offload", max_num_seqs=4, expert_cache_fraction=0.25, host_cache_fraction=0.5)
    try:
        assert [o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=sp)] == ref
        st = llm.stats()
        assert st["host_slots"] == int(0.5 * 3 * 8) and st["host_hits"] > 0 and st["host_misses"] > 0
        assert st["io_mode"] == "thread"
    finally:
        llm.close()
    with pytest.raises(OffloadConfigError, match=r"host_cache_fraction must be in \[0, 1\], got 3"):
        LLM(path, mode="offload", host_cache_fraction=3)
    with pytest.raises(OffloadConfigError, match="host_cache_bytes must be a whole number"):
        LLM(path, mode="offload", host_cache_bytes=-1)
