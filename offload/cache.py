"""The fast tier: a fixed pool of expert slots filled from the storage tier by an I/O thread pool.

``ExpertCache`` is an expert provider (``get(layer, expert)``). The executor tells it, at each MoE layer, which
experts the layer needs (``begin_layer``: classifies hits/misses, pins them, starts demand loads in parallel) and
which experts upcoming layers are predicted to need (``set_predictions`` with the MoE layers until each is needed,
then ``prefetch_predicted``). ``get`` blocks only when the expert is not loaded yet (time counted as stall); a load
still queued (no I/O thread took it yet) is done by the asking thread itself instead of waiting for a hand-off.

Hit: when a layer's routing is known (``begin_layer``), the expert is resident or its read has started (an I/O
thread is reading it). A queued-but-not-started prefetch is a miss.

Prefetch never evicts what is needed sooner: a prefetch for an expert needed in ``d`` MoE layers may only take a
free slot, a wrong prefetch, an expert no prediction names, or a predicted expert needed later than ``d``
(Belady's rule on predicted distances). So a prefetch for layer l+1 cannot push out the experts of layer l+1 or of
layers about to run, and experts of layers already done this step are the first to go.

Slots hold tensors on the compute device (GPU when present, else RAM). On CUDA, reads land in a pinned host
buffer and are copied on a side stream; ``get`` makes the compute stream wait on the copy's event, and a slot is
overwritten only after the compute stream passed the event recorded when its last user was unpinned.

Eviction policies (``EVICTION``): "predicted" (first wrong prefetches, then experts no upcoming layer is predicted to
need, least recently used first, predicted ones last, farthest-needed first), "lru", "lfu".
"""

from __future__ import annotations

import heapq
import itertools
import os
import threading
import time
import warnings

import torch

from ..moe.compute import Packed
from ..moe.experts import ExpertWeights, PackedExpert
from . import reader as _reader
from .tiers import DiskTier, ExpertReadError

QUEUED, LOADING, READY, FAILED = "queued", "loading", "ready", "failed"
_FAR = 1 << 30          # distance of an expert no prediction names
_DT = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16", torch.uint8: "u8"}
IO_MODES = ("auto", "process", "thread")


class _Entry:
    __slots__ = ("key", "slot", "state", "prefetched", "counted_use", "wrong", "freq", "last_use", "error",
                 "cuda_event", "last_step", "job", "urgent")

    def __init__(self, key, slot, prefetched):
        self.key, self.slot, self.state = key, slot, QUEUED
        self.prefetched, self.counted_use, self.wrong = prefetched, False, False
        self.freq, self.last_use, self.error, self.cuda_event, self.last_step = 0, 0, None, None, -1
        self.job, self.urgent = None, False


def _lru_key(cache, e):
    return (e.last_use,)


def _lfu_key(cache, e):
    return (e.freq, e.last_use)


def _predicted_key(cache, e):
    # wrong prefetches first; then experts no upcoming layer is predicted to need, least recently used first;
    # predicted ones last, farthest-needed first
    pred = cache.predicted.get(e.key)
    return (0 if e.wrong else 1, 0 if pred is None else 1, -(pred or 0), e.last_use)


EVICTION = {"predicted": _predicted_key, "lru": _lru_key, "lfu": _lfu_key}


def packed_slot(kind: str, buf: torch.Tensor, layout, dims: tuple[int, int], extra: dict) -> PackedExpert:
    """A ``PackedExpert`` whose matrices (and scales) are views of the slot's bytes ``buf`` laid out as one expert's
    run on disk (``layout``: a ``tiers.RawLayout``, ranges = gate, up, down, then the scales of packed ones). Gate and
    up adjacent on disk (``moeyard quantize`` writes them so) are one [2F, D] matrix, as in local mode."""
    D, F = dims
    views = [buf[off:off + nb].view(dt).view(shape) for off, nb, dt, shape in layout.parts]
    mats, scales = views[:3], views[3:] if kind in ("int8", "int4") else [None] * 3
    shapes = ((F, D), (F, D), (D, F))
    (g_off, g_nb, *_), (u_off, u_nb, *_) = layout.parts[:2]
    fused = g_off + g_nb == u_off and (scales[0] is None or layout.parts[3][0] + layout.parts[3][1]
                                       == layout.parts[4][0])
    down = Packed(kind, mats[2], scales[2], shapes[2])
    if fused:
        def span(i, j):
            lo, hi = layout.parts[i][0], layout.parts[j][0] + layout.parts[j][1]
            return buf[lo:hi].view(layout.parts[i][2])
        data = span(0, 1).view(2 * F, -1)
        scale = None if scales[0] is None else span(3, 4).view((2 * F,) + tuple(scales[0].shape[1:]))
        return PackedExpert(Packed(kind, data, scale, (2 * F, D)), down, **extra)
    return PackedExpert(Packed(kind, mats[0], scales[0], shapes[0]), down, **extra,
                        up=Packed(kind, mats[1], scales[1], shapes[1]))


class ExpertCache:
    def __init__(self, cfg, tier: DiskTier, num_slots: int, dtype: torch.dtype, device: torch.device,
                 eviction: str = "predicted", io_threads: int = 2, io_mode: str = "auto",
                 read_timeout: float = 60.0, host=None, pack: str | None = None):
        if eviction not in EVICTION:
            raise ValueError(f"unknown eviction policy {eviction!r}; valid: {', '.join(EVICTION)}")
        if io_mode not in IO_MODES:
            raise ValueError(f"unknown io_mode {io_mode!r}; valid: {', '.join(IO_MODES)}")
        self.cfg, self.tier, self.dtype, self.device = cfg, tier, dtype, torch.device(device)
        self.policy = EVICTION[eviction]
        self.belady = eviction == "predicted"    # prefetch may evict predicted-later experts (else: only unpredicted)
        self.num_slots = num_slots
        self.read_timeout = read_timeout    # reader process: a wait this long with no word from it → hung, restarted
        self._heard = time.perf_counter()   # when the reader process last answered
        self.layer_pos = {l: i for i, l in enumerate(cfg.moe_layers)}
        D, F = cfg.hidden_size, cfg.expert_intermediate_size
        shapes = [x.shape for x in next(iter(tier.extents.values()))]   # 3 matrices, then 3 biases (gpt-oss)
        extra = dict(act=cfg.expert_act, alpha=cfg.swiglu_alpha, limit=cfg.swiglu_limit)
        self.host = host      # HostTier between disk and slots (GPU), or None: slots are filled from disk
        # ``pack``: slots hold the expert's bytes as stored (a bf16 checkpoint, or packed int8/int4) and are
        # multiplied by the compute plan's kernels (``compute``); else float32/dtype matrices (``get``)
        self.pack = pack
        if pack is not None and (self.device.type != "cpu" or host is not None or tier.raw is None):
            raise ValueError(f"{pack} expert slots need a CPU, no host tier and every expert stored as one "
                             "contiguous byte range laid out alike (moeyard quantize writes them so)")
        self.flat = ((None, torch.uint8) if pack is not None else tier.flat) \
            if self.device.type == "cpu" and host is None else None
        self.proc = None
        self._io_threads = max(1, io_threads)
        if pack is not None:
            self._stage_numel, self._src_dtype = tier.raw.nbytes, torch.uint8
            self.proc = self._start_reader(io_mode, tier.raw.nbytes, torch.uint8, torch.uint8)
            self._flat_bufs = [self._slot_buffer(i, torch.uint8, tier.raw.nbytes) for i in range(num_slots)]
            self.slots = [packed_slot(pack, buf, tier.raw, (D, F), extra) for buf in self._flat_bufs]
        elif self.flat is not None:
            # each slot is one flat buffer, its matrices views in file order: a load is one read + one conversion
            order, src_dtype = self.flat
            sizes = [int(torch.Size(shapes[i]).numel()) for i in order]
            self.proc = self._start_reader(io_mode, sum(sizes), src_dtype, dtype)
            self._flat_bufs = [self._slot_buffer(i, dtype, sum(sizes)) for i in range(num_slots)]
            self._stage_numel = sum(sizes)
            self._src_dtype = src_dtype
            self.slots = []
            for buf in self._flat_bufs:
                views, at = [None] * len(shapes), 0
                for i, n in zip(order, sizes):
                    views[i] = buf[at:at + n].view(shapes[i])
                    at += n
                self.slots.append(ExpertWeights(*views, **extra))
        else:
            self.slots = [ExpertWeights(*(torch.empty(sh, dtype=dtype, device=self.device) for sh in shapes),
                                        **extra) for _ in range(num_slots)]
        self.slot_bytes = (tier.raw.nbytes if pack is not None else self.slots[0].nbytes) if num_slots else 0
        self.free = list(range(num_slots - 1, -1, -1))
        self.entries: dict[tuple[int, int], _Entry] = {}
        self._by_layer: dict[int, dict[int, _Entry]] = {l: {} for l in cfg.moe_layers}   # the same, per layer
        self.pinned: set[tuple[int, int]] = set()
        self.predicted: dict[tuple[int, int], int] = {}
        self.cur_layer = cfg.moe_layers[0]
        self._class: dict[tuple[int, int], bool] = {}
        self._last_get = None
        self._tick = itertools.count(1)
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)     # waiters for a load to finish (get)
        self._work = threading.Condition(self._lock)     # I/O threads waiting for a job
        self._jobs: list = []
        self._closed = False
        self.step = 0
        self.cuda = self.device.type == "cuda"
        self._release_event = [None] * num_slots
        self.counters = {"expert_hits": 0, "expert_misses": 0, "prefetch_issued": 0, "prefetch_used": 0,
                         "prefetch_cancelled": 0, "prefetch_wasted": 0, "prefetch_late": 0, "bytes_loaded": 0,
                         "stall_seconds": 0.0, "expert_requests": 0, "read_errors": 0, "evictions": 0,
                         "prefetch_not_started": 0, "loads_inline": 0, "slots_stolen": 0, "budget_cut": 0}
        self._tls_main: dict = {}
        self._job_ids = itertools.count(1)
        self._by_job: dict[int, _Entry] = {}      # reader process: jobs without a D/X/E yet
        self._limbo: dict[int, int] = {}          # cancelled job → its slot, free once the reader confirms
        self._outbox: list[bytes] = []
        self._ring = False                        # the outbox holds a load needed now: wake the reader at once
        self.io_mode = "process" if self.proc is not None else "thread"
        self._threads = [] if self.proc is not None else [
            threading.Thread(target=self._worker, name=f"moeyard-io-{i}", daemon=True)
            for i in range(max(1, io_threads))]
        for t in self._threads:
            t.start()

    def _slot_buffer(self, i: int, dtype: torch.dtype, numel: int) -> torch.Tensor:
        """Slot ``i``'s flat buffer: in the memory shared with the reader process, else private."""
        if self.proc is not None:
            return torch.frombuffer(self.proc.pool, dtype=dtype, count=numel, offset=self.proc.slot_offset(i))
        return torch.empty(numel, dtype=dtype)

    def _start_reader(self, io_mode: str, numel: int, src_dtype: torch.dtype, slot_dtype: torch.dtype):
        """The reader process for this slot pool, or None (reader threads): ``auto`` uses a process when the
        platform has ``memfd_create`` and the reader converts this dtype pair, and falls back to threads (with a
        warning) if it cannot start."""
        if io_mode == "thread" or self.num_slots == 0:
            return None
        src, dst = _DT.get(src_dtype), _DT.get(slot_dtype)
        if not hasattr(os, "memfd_create") or (src, dst) not in _reader.SUPPORTED:
            if io_mode == "process":
                raise ValueError(f"io_mode='process' needs Linux (memfd_create) and experts stored as one of "
                                 f"{sorted(_reader.SUPPORTED)} (source, slot) dtypes; got ({src_dtype}, "
                                 f"{slot_dtype}); use io_mode='thread'")
            return None
        files = sorted({r[0] for r in self.tier.flat_runs.values()})
        self._file_index = {f: i for i, f in enumerate(files)}
        try:
            return _reader.ReaderProcess(files, self.num_slots, numel, src, dst, direct_io=self.tier.direct_io,
                                         drop_cache=self.tier.drop_cache, chunk=self.tier.CHUNK,
                                         align=self.tier.ALIGN, threads=self._io_threads)
        except (OSError, _reader.ReaderGone) as e:
            if io_mode == "process":
                raise
            warnings.warn(f"offload: expert reader process unavailable ({e}); using reader threads")
            return None

    # ---- reader process (lock held) -----------------------------------------------------------------------------
    def _drain(self):
        """Apply the reader's completions that have arrived (no waiting)."""
        if self.proc is None:
            return
        try:
            msgs = self.proc.poll(0.0)
        except _reader.ReaderGone as x:
            self._reader_died(str(x))
            return
        self._on_messages(msgs)

    def _flush(self):
        """Send the requests gathered under the lock (one write)."""
        if self.proc is None or not self._outbox:
            return
        data = b"".join(self._outbox)
        self._outbox.clear()
        ring, self._ring = self._ring, False
        try:
            self.proc.send(data, self._on_messages, ring)
        except _reader.ReaderGone as x:
            self._reader_died(str(x))

    def _wait_io(self, since: float):
        """Wait (lock released, at most 50 ms) for the reader's next completions and apply them. A compute step
        that has waited ``read_timeout`` seconds (since ``since``) without a word from the reader finds it hung:
        it is killed, its loads fail with that reason, and a new reader is started."""
        self._flush()
        if self.proc is None:
            return
        self._lock.release()             # the pipe is read under the lock only (by _drain)
        try:
            self.proc.wait_readable(0.05)
        finally:
            self._lock.acquire()
        self._drain()
        if self._by_job and time.perf_counter() - max(since, self._heard) > self.read_timeout:
            if self.proc.proc is not None:
                self.proc.proc.kill()
            self._reader_died(f"the expert reader process did not answer for {self.read_timeout:g} s (hung); "
                              "it was stopped and a new one started")

    def _on_messages(self, msgs):
        if msgs:
            self._heard = time.perf_counter()
        for op, job, a, b, msg in msgs:
            if op == "S":
                e = self._by_job.get(job)
                if e is not None and e.state == QUEUED:
                    e.state = LOADING
                continue
            if op not in "DXE":
                continue
            e = self._by_job.pop(job, None)
            slot = self._limbo.pop(job, None)
            if slot is not None:                  # cancelled here; the reader did it or skipped it
                self.free.append(slot)
                if op == "D":
                    self._count_read(a, b)
                continue
            if e is None:
                continue
            if op == "D":
                self._count_read(a, b)
                e.state = READY
                self.counters["bytes_loaded"] += self.slot_bytes
            elif op == "E":
                self._failed(e, f"cannot read expert {e.key[1]} of layer {e.key[0]}: {msg}")
        if msgs:
            self._cond.notify_all()

    def _count_read(self, nbytes: int, ns: int):
        t = self.tier
        with t._lock:
            t.bytes_read += nbytes
            t.read_seconds += ns / 1e9
            t.reads += 1

    def _failed(self, e: _Entry, err: str):
        e.state, e.error = FAILED, err
        self.counters["read_errors"] += 1
        if self.entries.get(e.key) is e:     # give the slot back; a waiting get() sees FAILED
            del self.entries[e.key]
            del self._by_layer[e.key[0]][e.key[1]]
            self.pinned.discard(e.key)
            self.free.append(e.slot)

    def _reader_died(self, why: str):
        """Every load in flight fails with ``why``; the slots come back and a new reader is started."""
        for e in list(self._by_job.values()):
            if e.state in (QUEUED, LOADING):
                self._failed(e, f"cannot load expert {e.key[1]} of layer {e.key[0]}: {why}")
        self._by_job.clear()
        self.free.extend(self._limbo.values())
        self._limbo.clear()
        self._outbox.clear()
        self._cond.notify_all()
        try:
            self.proc.restart()
        except (OSError, _reader.ReaderGone) as x:    # left dead: every later load fails with this reason
            warnings.warn(f"offload: cannot restart the expert reader process: {x}")

    # ---- helpers (lock held) -----------------------------------------------------------------------------------
    def distance(self, layer: int) -> int:
        """MoE layers until ``layer`` is computed again (the current layer counts as a full cycle away)."""
        L = len(self.layer_pos)
        d = (self.layer_pos[layer] - self.layer_pos[self.cur_layer]) % L
        return d or L

    def _victim(self, for_prefetch: bool, dist: int | None = None):
        """The entry to evict (None: nothing may be). Demand loads may take any unpinned entry that is not being
        read; a prefetch needed in ``dist`` layers only what is needed later than that (or not at all)."""
        best, best_key = None, None
        pred = self.predicted
        for e in self.entries.values():
            if e.key in self.pinned or e.state == LOADING or (self.proc is not None and e.state == QUEUED):
                continue
            if for_prefetch:
                if e.state != READY and not (e.prefetched and e.state == QUEUED):
                    continue
                p = pred.get(e.key)
                if not e.wrong and p is not None and p <= dist:
                    continue
                if not self.belady and p is None and not e.wrong and e.last_step >= self.step - 1:
                    continue
            k = self.policy(self, e)
            if best_key is None or k < best_key:
                best, best_key = e, k
        return best

    def _claim(self, for_prefetch: bool, dist: int | None = None):
        if self.free:
            return self.free.pop()
        v = self._victim(for_prefetch, dist)
        if v is None:
            return None
        if v.state == QUEUED:
            self.counters["prefetch_cancelled"] += 1
        self._drop(v)
        self.counters["evictions"] += 1
        return v.slot

    def _steal(self, key):
        """Every slot is held by an expert this layer still has to run (a layer needing more experts than the pool
        holds, e.g. a prefill whose predicted experts filled the pool before the layer routed): take the slot of
        the one needed last (experts run in ascending id order) if it is loaded; it is read again when its turn
        comes. Without this the layer would wait forever for a slot. None: none loaded yet (wait for one)."""
        cands = [e for k in self.pinned if k != key and (e := self.entries.get(k)) is not None and e.state == READY]
        if not cands:
            return None
        v = max(cands, key=lambda e: (e.key[0] == key[0], e.key[1]))
        self.pinned.discard(v.key)
        self._class[v.key] = False            # it will be a miss when its turn comes
        self._drop(v)
        self.counters["evictions"] += 1
        self.counters["slots_stolen"] += 1
        return v.slot

    def _drop(self, e: _Entry) -> bool:
        """Forget ``e``; True when its slot may be reused now (a job sent to the reader process frees its slot only
        once the reader confirms it was skipped or done)."""
        del self.entries[e.key]
        del self._by_layer[e.key[0]][e.key[1]]
        if e.prefetched and not e.counted_use and e.state != QUEUED:
            self.counters["prefetch_wasted"] += 1
        if e.state == QUEUED:
            e.state = FAILED   # the worker skips it
            e.error = "cancelled"
            if self.proc is not None:
                self._by_job.pop(e.job, None)
                self._limbo[e.job] = e.slot
                self._outbox.append(_reader.ReaderProcess.cancel(e.job))
                return False
        return True

    def _submit(self, key, slot, prefetched, priority, queue: bool = True):
        e = _Entry(key, slot, prefetched)
        self.entries[key] = e
        self._by_layer[key[0]][key[1]] = e
        if self.proc is not None:
            e.job = next(self._job_ids)
            self._by_job[e.job] = e
            f, off, nb = self.tier.flat_runs[key]
            self._outbox.append(_reader.ReaderProcess.job(slot, e.job, priority, self._file_index[f], off, nb))
            self._ring |= priority < 0             # demand load
            return e
        if queue:
            heapq.heappush(self._jobs, (priority, next(self._seq), e))
            self._work.notify()
        return e

    def _touch(self, e: _Entry):
        e.freq += 1
        e.last_use = next(self._tick)
        e.last_step = self.step
        e.wrong = False
        if e.prefetched and not e.counted_use:
            self.counters["prefetch_used"] += 1
        e.counted_use = True

    def _unpin_all(self):
        if self.cuda and self.pinned:
            ev = torch.cuda.Event()
            ev.record()
            for k in self.pinned:
                if k in self.entries:
                    self._release_event[self.entries[k].slot] = ev
        self.pinned.clear()

    # ---- executor interface ------------------------------------------------------------------------------------
    def begin_layer(self, layer: int, experts: list[int]):
        """Layer ``layer`` is about to run ``experts`` (sorted as the dispatcher will ask for them)."""
        with self._lock:
            self._drain()
            self.cur_layer = layer
            self._unpin_all()
            self._last_get = None
            need = set(experts)
            # real-time correction: prefetches for this layer that turned out wrong are cancelled or evicted first
            for e in [x for k, x in self._by_layer[layer].items() if k not in need]:
                if e.prefetched and not e.counted_use:
                    if e.state == QUEUED:
                        if self._drop(e):
                            self.free.append(e.slot)
                        self.counters["prefetch_cancelled"] += 1
                    else:
                        e.wrong = True
            for x in experts:
                key = (layer, x)
                ent = self.entries.get(key)
                if ent is None or ent.state == FAILED:
                    continue
                self.pinned.add(key)
                if ent.state == QUEUED:          # issued but no read started: a miss; now urgent
                    self._class[key] = False
                    if ent.prefetched:
                        ent.prefetched = False
                        self.counters["prefetch_not_started"] += 1
                    if self.proc is not None:
                        ent.urgent = True
                        self._outbox.append(_reader.ReaderProcess.urgent(ent.job))
                        self._ring = True
                    else:
                        heapq.heappush(self._jobs, (-1, next(self._seq), ent))
                        self._work.notify()
                else:
                    self._class[key] = True
                self._touch(ent)
            for x in experts:
                key = (layer, x)
                if key in self._class:
                    continue
                self._class[key] = False
                slot = self._claim(for_prefetch=False)
                if slot is None:
                    continue          # every slot pinned: loaded on demand by get() once earlier experts are done
                ent = self._submit(key, slot, False, -1)
                self.pinned.add(key)
                self._touch(ent)
            self._flush()

    def prefetch(self, layer: int, experts, priority: int = 1) -> int:
        """Start loading ``experts`` of ``layer`` if absent and a slot can be had without evicting anything needed
        sooner (distances from ``set_predictions``; an expert not predicted only takes what nothing predicts);
        returns how many loads were issued."""
        n = 0
        with self._lock:
            self._drain()
            for x in experts:
                key = (layer, int(x))
                if key in self.entries:
                    continue
                d = self.predicted.get(key, _FAR)
                slot = self._claim(for_prefetch=True, dist=d)
                if slot is None:
                    break
                self._submit(key, slot, True, min(d, priority) if d < _FAR else priority)
                n += 1
            self.counters["prefetch_issued"] += n
            self._flush()
        return n

    def prefetch_predicted(self, max_dist: int | None = None, soon: int = 0, allowed: set | None = None,
                           max_new: int | None = None) -> int:
        """Issue loads for every predicted expert not resident (only those in ``allowed`` when given: the gate's
        choice), nearest-needed first, as far as slots can be had under the rule above (stops at the first that
        cannot: a farther one could not either) and while fewer than ``max_new`` prefetches are in flight (the byte
        budget). Loads needed within ``soon`` MoE layers wake the reader process at once (no nap: at the start of a
        step the first layer's experts are needed in the time of one attention)."""
        n = 0
        with self._lock:          # no pipe poll here: begin_layer / step start just did it
            want = sorted(((d, k) for k, d in self.predicted.items()
                           if k not in self.entries and (max_dist is None or d <= max_dist)
                           and (allowed is None or k in allowed)))
            if not want:
                return 0
            if max_new is not None:
                busy = sum(1 for e in self.entries.values() if e.prefetched and e.state in (QUEUED, LOADING))
                if busy + len(want) > max_new:
                    self.counters["budget_cut"] += len(want) - max(0, max_new - busy)
                    want = want[:max(0, max_new - busy)]
                    if not want:
                        return 0
            cands = None        # evictable entries, a heap by eviction key (built once, when free slots run out)
            for d, key in want:
                if self.free:
                    slot = self.free.pop()
                elif not self.belady:
                    slot = self._claim(for_prefetch=True, dist=d)
                else:
                    if cands is None:
                        cands = self._prefetch_victims()
                    slot = None
                    while cands:
                        _, _, p, _, _, v = cands[0]
                        if self.entries.get(v.key) is not v:
                            heapq.heappop(cands)
                            continue
                        if v.wrong or p is None or p > d:
                            heapq.heappop(cands)
                            if v.state == QUEUED:
                                self.counters["prefetch_cancelled"] += 1
                            self._drop(v)
                            self.counters["evictions"] += 1
                            slot = v.slot
                        break
                if slot is None:
                    break
                self._submit(key, slot, True, d)
                self._ring |= d <= soon
                n += 1
            self.counters["prefetch_issued"] += n
            self._flush()
        return n

    def _prefetch_victims(self) -> list:
        """Entries a prefetch may evict, as a heap ordered like ``_predicted_key`` (best victim first):
        (not wrong, -distance (not predicted: farthest of all), distance, last use, slot, entry)."""
        pred, pinned, proc = self.predicted, self.pinned, self.proc is not None
        out = []
        for k, e in self.entries.items():
            if k in pinned:
                continue
            st = e.state
            if st != READY and not (st == QUEUED and e.prefetched and not proc):
                continue
            p = pred.get(k)
            out.append((0 if e.wrong else 1, -_FAR - 1 if p is None else -p, p, e.last_use, e.slot, e))
        heapq.heapify(out)
        return out

    def set_predictions(self, predicted: dict[tuple[int, int], int]):
        """Experts upcoming layers are predicted to need → MoE layers until needed (used by eviction)."""
        with self._lock:
            self.predicted = predicted

    def get(self, layer: int, expert: int) -> ExpertWeights:
        """The expert's weights (blocks until loaded); packed slots give their dequantized float32 matrices."""
        w = self._acquire(layer, expert)
        return w.weights() if self.pack is not None else w

    def compute(self, layer: int, x_MD: torch.Tensor, expert_ids: list[int], counts: list[int]) -> torch.Tensor:
        """Packed slots: each expert's rows multiplied by the compute plan's kernels on the slot's bytes."""
        outs, start = [], 0
        for e, c in zip(expert_ids, counts):
            if c:
                outs.append(self._acquire(layer, e)(x_MD[start:start + c]))
                start += c
        if not outs:
            return x_MD.new_zeros((0, x_MD.shape[-1]))
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def _acquire(self, layer: int, expert: int):
        """The slot object of a loaded expert (``ExpertWeights``, or ``PackedExpert`` for packed slots), waiting
        for its load; pins it until the layer's next expert is asked for."""
        key = (layer, expert)
        t0 = None
        with self._lock:
            if self._last_get is not None and self._last_get[0] == layer:
                self.pinned.discard(self._last_get)       # its matmuls are done (CPU) / enqueued (GPU)
                if self.cuda and self._last_get in self.entries:
                    ev = torch.cuda.Event()
                    ev.record()
                    self._release_event[self.entries[self._last_get].slot] = ev
            self._last_get = key
            hit = self._class.pop(key, None)
            ent = self.entries.get(key)
            if hit is None:
                hit = ent is not None and ent.state in (READY, LOADING)
            self.counters["expert_requests"] += 1
            self.counters["expert_hits" if hit else "expert_misses"] += 1
            while True:
                if ent is None or (ent.state == FAILED and ent.error == "cancelled"):
                    ent = self.entries.get(key)
                    if ent is None:
                        slot = self._claim(for_prefetch=False)
                        if slot is None:
                            slot = self._steal(key)
                        if slot is None:
                            if t0 is None:
                                t0 = time.perf_counter()
                            if self.proc is not None:
                                self._wait_io(t0)
                            else:
                                self._cond.wait(0.05)
                            continue
                        ent = self._submit(key, slot, False, -2, queue=self.cuda)
                        self._touch(ent)
                    continue
                self.pinned.add(key)
                if ent.state == READY:
                    break
                if ent.state == FAILED:
                    raise ExpertReadError(layer, expert, ent.error)
                if t0 is None:
                    t0 = time.perf_counter()
                    if hit and ent.prefetched:
                        self.counters["prefetch_late"] += 1
                if self.proc is not None:
                    if ent.state == QUEUED and not ent.urgent:
                        ent.urgent = True
                        self._outbox.append(_reader.ReaderProcess.urgent(ent.job))
                        self._ring = True
                    self._wait_io(t0)
                    continue
                if ent.state == QUEUED and not self.cuda:
                    # no I/O thread took it yet: read it here rather than wait for a thread hand-off
                    ent.state = LOADING
                    self.counters["loads_inline"] += 1
                    self._run_load(ent, self._tls_main, None)
                    continue
                self._cond.wait()
            if t0 is not None:
                self.counters["stall_seconds"] += time.perf_counter() - t0
            if not ent.counted_use:
                self._touch(ent)
            w = self.slots[ent.slot]
            ev = ent.cuda_event
        if ev is not None:
            torch.cuda.current_stream().wait_event(ev)
        return w

    def end_step(self):
        with self._lock:
            self.step += 1
            self._unpin_all()
            self._last_get = None
            self._class.clear()

    def present(self, layer: int) -> list[int]:
        """Experts of ``layer`` resident or being loaded."""
        with self._lock:
            return [k for k, e in self._by_layer[layer].items() if e.state != FAILED]

    def present_all(self) -> list[tuple[int, int]]:
        """Every (layer, expert) resident or being loaded."""
        with self._lock:
            return [k for k, e in self.entries.items() if e.state != FAILED]

    def resident(self) -> list[tuple[int, int]]:
        with self._lock:
            self._drain()
            return [k for k, e in self.entries.items() if e.state == READY]

    def stats(self) -> dict:
        with self._lock:
            d = dict(self.counters)
        d["bytes_loaded"] = self.tier.bytes_read
        d["read_gbps"] = round(self.tier.gbps(), 4)
        d["expert_slots"] = self.num_slots
        d["expert_cache_bytes"] = self.num_slots * self.slot_bytes
        d["expert_slot_kind"] = self.pack or str(self.dtype).replace("torch.", "")
        d["io_mode"] = self.io_mode
        if self.host is not None:
            d.update(self.host.stats())
        if self.proc is not None:
            d["reader_rss_mb"] = self.proc.rss_anon_mb()
            d["reader_restarts"] = self.proc.restarts
        return d

    def close(self):
        with self._lock:
            self._closed = True
            self._cond.notify_all()
            self._work.notify_all()
        for t in self._threads:
            t.join(timeout=5)
        if self.proc is not None:
            self.proc.close()
        self.tier.close()

    # ---- I/O worker --------------------------------------------------------------------------------------------
    def _worker(self):
        tls = {}
        stream = torch.cuda.Stream() if self.cuda else None
        with self._lock:
            while True:
                while not self._jobs and not self._closed:
                    self._work.wait()
                if self._closed:
                    return
                _, _, e = heapq.heappop(self._jobs)
                if e.state != QUEUED or self.entries.get(e.key) is not e:
                    continue
                e.state = LOADING
                self._run_load(e, tls, stream)

    def _run_load(self, e: _Entry, tls: dict, stream):
        """Load ``e`` (state LOADING, lock held on entry and on return; released during the read)."""
        release = self._release_event[e.slot]
        self._lock.release()
        try:
            ev = self._load(e, tls, stream, release)
            err = None
        except ExpertReadError as x:
            err = str(x)
        except Exception as x:  # noqa: BLE001 — reported to the waiting request, never kills the pool
            err = f"cannot load expert {e.key[1]} of layer {e.key[0]}: {type(x).__name__}: {x}"
        finally:
            self._lock.acquire()
        if err is None:
            e.state, e.cuda_event = READY, ev
            self.counters["bytes_loaded"] += self.slot_bytes
        else:
            self._failed(e, err)
        self._cond.notify_all()

    def _load(self, e: _Entry, tls: dict, stream, release):
        layer, x = e.key
        dst = self.slots[e.slot]
        if self.flat is not None:
            st = tls.get("flat")
            if st is None:                      # this thread's staging buffer, page-aligned for O_DIRECT
                n = self.tier.stage_nbytes()
                raw = torch.empty(n + self.tier.ALIGN, dtype=torch.uint8)
                pad = -raw.data_ptr() % self.tier.ALIGN
                t = raw[pad:pad + n]
                st = tls["flat"] = (t, memoryview(t.numpy()).cast("B"))
            dst, isz = self._flat_bufs[e.slot], self._src_dtype.itemsize
            step = self.tier.CHUNK // isz
            for i in range(0, self._stage_numel, step):        # one chunk for experts up to CHUNK bytes
                n = min(step, self._stage_numel - i)
                at = self.tier.read_flat_into(layer, x, st[1], i * isz, n * isz)
                # one conversion into the slot (bf16 → fp32; releases the GIL)
                dst[i:i + n].copy_(st[0][at:at + n * isz].view(self._src_dtype))
            return None
        ext = self.tier.ranges[e.key]           # the bytes as stored: matrices, then scales of quantized ones
        if self.host is None and not self.cuda and all(d.dtype == self.dtype and d.direct for d in ext):
            self.tier.read_raw(layer, x, list(dst.tensors))
            return None
        if self.host is not None:
            raw = self.host.fetch(layer, x)       # host tier: a hit is a copy, a miss a disk read into it
        else:
            k = tuple((d.dtype, d.slab_shape or d.shape) for d in ext)
            if k not in tls:
                tls[k] = [torch.empty(d.slab_shape or d.shape, dtype=d.dtype, pin_memory=self.cuda) for d in ext]
            raw = self.tier.read_raw(layer, x, tls[k])
        try:
            if not self.cuda:      # slices / dequantization here, in this I/O thread (torch releases the GIL)
                for d, s in zip(dst.tensors, self.tier.finish(e.key, raw)):
                    d.copy_(s)
                return None
            with torch.cuda.stream(stream):   # the bytes as read (quantized: small) cross to the GPU, finished there
                if release is not None:
                    stream.wait_event(release)
                dev = [r.to(self.device, non_blocking=True) for r in raw]
                for d, s in zip(dst.tensors, self.tier.finish(e.key, dev)):
                    d.copy_(s, non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(stream)
            ev.synchronize()   # the staging / host buffer may be reused once the copy is done
            return ev
        finally:
            if self.host is not None:
                self.host.release(layer, x)
