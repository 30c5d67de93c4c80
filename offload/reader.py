"""A reader *process* that fills expert slots in shared memory (offload mode on CPU).

Why a process: with reader threads, every read hands the GIL back and forth between the I/O thread and the compute
thread (each system call, lock and tensor op is a hand-off), and the compute thread's many tiny torch ops wait for
it; measured, that doubled the cost of a decode token at 25% of experts resident. A separate process shares only
the memory of the slot pool (``memfd``) with the engine; the compute thread only writes requests to a pipe and
reads completions from another (one system call each, batched).

Protocol (fixed-size records, little endian):
- engine → reader (``REQ``): ``J`` job (slot, job id, priority, file index, byte offset, byte count),
  ``C`` cancel a job not started, ``U`` make a queued job urgent, ``Q`` quit (EOF too).
- reader → engine (``RSP``): ``R`` ready; ``S`` job started; ``D`` job done (bytes read, nanoseconds);
  ``X`` job cancelled (never started: its slot was not touched); ``E`` job failed, followed by the message.
Every job gets exactly one of D, X, E: until then the engine does not reuse its slot. While busy, the reader
naps ``nap_us`` at a time and looks at the request pipe in between instead of sleeping in ``read`` (a write that
must wake a sleeping reader costs the engine's compute thread ~20 us in a VM; measured ~1 write per MoE layer); a
third pipe, the bell, is written only for a load needed now and ends a nap at once. Data written into the
pool before the ``D`` write is visible to the engine after its ``read`` of it (both are system calls).

The reader runs this file as a script (no package import, so no torch: numpy only) and exits when the engine's
end of the request pipe closes, so it never outlives the engine.
"""

from __future__ import annotations

import errno
import heapq
import json
import mmap
import os
import select
import struct
import subprocess
import sys
import time

REQ = struct.Struct("<B3xiqqqqq")      # op, slot, job, priority, file index, offset, nbytes
RSP = struct.Struct("<B7xqqq")         # op, job, a, b   (E: b = length of the message that follows)
URGENT = -(1 << 40)
DTYPES = ("f32", "bf16", "f16", "u8")
ITEMSIZE = {"f32": 4, "bf16": 2, "f16": 2, "u8": 1}
# (source dtype on disk, slot dtype) the reader converts; other pairs use reader threads. "u8": bytes as they are
# (bf16 or packed int8/int4 slots, whose matrices and scales are views of the expert's bytes)
SUPPORTED = {("f32", "f32"), ("bf16", "bf16"), ("f16", "f16"), ("bf16", "f32"), ("f16", "f32"), ("u8", "u8")}


# ---------------------------------------------------------------------------------------------------------------
# the engine's side
class ReaderGone(RuntimeError):
    pass


class ReaderProcess:
    """Owns the shared slot pool and the reader process. Not thread-safe: the expert cache calls it under its lock."""

    def __init__(self, files: list[str], num_slots: int, slot_numel: int, src: str, dst: str, direct_io: bool,
                 drop_cache: bool, chunk: int, align: int = 4096, threads: int = 2, start_timeout: float = 60.0,
                 nap_us: int = 50):
        if (src, dst) not in SUPPORTED:
            raise ValueError(f"reader process cannot convert {src} to {dst}")
        self.files, self.num_slots, self.slot_numel = list(files), num_slots, slot_numel
        self.src, self.dst = src, dst
        self.stride = -(-slot_numel * ITEMSIZE[dst] // align) * align
        self.direct_io, self.drop_cache, self.chunk, self.align = direct_io, drop_cache, chunk, align
        self.threads, self.nap_us = threads, nap_us
        self.start_timeout = start_timeout
        self.memfd = os.memfd_create("moeyard-expert-slots")
        os.ftruncate(self.memfd, self.stride * num_slots)
        self.pool = mmap.mmap(self.memfd, self.stride * num_slots)
        self.proc = None
        self.restarts = 0
        self._buf = b""
        self._start()

    def _start(self):
        req_r, req_w = os.pipe()
        rsp_r, rsp_w = os.pipe()
        bell_r, bell_w = os.pipe()
        spec = dict(files=self.files, memfd=self.memfd, req=req_r, rsp=rsp_w, bell=bell_r, stride=self.stride,
                    num_slots=self.num_slots, slot_numel=self.slot_numel, src=self.src, dst=self.dst,
                    direct=self.direct_io, drop=self.drop_cache, chunk=self.chunk, align=self.align,
                    threads=self.threads, nap_us=self.nap_us)
        try:
            self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), json.dumps(spec)],
                                         pass_fds=(self.memfd, req_r, rsp_w, bell_r), stdin=subprocess.DEVNULL,
                                         close_fds=True)
        finally:
            os.close(req_r)
            os.close(rsp_w)
            os.close(bell_r)
        self.req, self.rsp, self.bell = req_w, rsp_r, bell_w
        os.set_blocking(self.req, False)
        os.set_blocking(self.bell, False)
        os.set_blocking(self.rsp, False)
        self._buf = b""
        deadline = time.monotonic() + self.start_timeout
        while True:                                        # wait for "ready"
            left = deadline - time.monotonic()
            msgs = self.poll(max(0.0, left))
            if any(m[0] == "R" for m in msgs):
                return
            if left <= 0:
                self.close()
                raise ReaderGone("the expert reader process did not start in time")

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def restart(self):
        self._close_pipes()
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
        self.restarts += 1
        self._start()

    def slot_offset(self, slot: int) -> int:
        return slot * self.stride

    @staticmethod
    def job(slot, job, priority, file_index, offset, nbytes) -> bytes:
        return REQ.pack(ord("J"), slot, job, priority, file_index, offset, nbytes)

    @staticmethod
    def cancel(job) -> bytes:
        return REQ.pack(ord("C"), 0, job, 0, 0, 0, 0)

    @staticmethod
    def urgent(job) -> bytes:
        return REQ.pack(ord("U"), 0, job, URGENT, 0, 0, 0)

    def send(self, data: bytes, on_messages, ring: bool = False) -> None:
        """Write requests; while the pipe is full, completions are drained (``on_messages``) so neither side can
        block the other forever. ``ring``: a load is needed now, wake a napping reader at once (costs a wake-up)."""
        if self.req is None:
            raise ReaderGone(f"the expert reader process is not running ({self._status()})")
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.req, view)
                view = view[n:]
            except BlockingIOError:
                on_messages(self.poll(0.0))
                select.select([self.rsp], [self.req], [], 0.05)
            except (BrokenPipeError, OSError) as e:
                raise ReaderGone(f"the expert reader process exited ({self._status()})") from e
        if ring:
            try:
                os.write(self.bell, b"!")
            except BlockingIOError:          # full: it is ringing already
                pass
            except OSError as e:
                raise ReaderGone(f"the expert reader process exited ({self._status()})") from e

    def wait_readable(self, timeout: float) -> bool:
        """Wait until a completion can be read (or ``timeout`` seconds)."""
        if len(self._buf) >= RSP.size or self.rsp is None:
            return True
        return bool(select.select([self.rsp], [], [], timeout)[0])

    def poll(self, timeout: float = 0.0) -> list[tuple]:
        """Completions available now (waiting up to ``timeout`` seconds for the first): (op, job, a, b, message)."""
        if self.rsp is None:
            raise ReaderGone(f"the expert reader process is not running ({self._status()})")
        if timeout > 0 and len(self._buf) < RSP.size:
            r, _, _ = select.select([self.rsp], [], [], timeout)
            if not r:
                return []
        chunks = [self._buf]
        eof = False
        while True:
            try:
                d = os.read(self.rsp, 1 << 16)
            except BlockingIOError:
                break
            if not d:
                eof = True
                break
            chunks.append(d)
            if len(d) < 1 << 16:
                break
        buf = b"".join(chunks)
        out, i = [], 0
        while len(buf) - i >= RSP.size:
            op, job, a, b = RSP.unpack_from(buf, i)
            op = chr(op)
            if op == "E":
                if len(buf) - i - RSP.size < b:
                    break
                msg = buf[i + RSP.size:i + RSP.size + b].decode("utf-8", "replace")
                i += RSP.size + b
                out.append((op, job, a, 0, msg))
                continue
            i += RSP.size
            out.append((op, job, a, b, None))
        self._buf = buf[i:]
        if eof and not out:
            raise ReaderGone(f"the expert reader process exited ({self._status()})")
        return out

    def _status(self) -> str:
        if self.proc is None:
            return "not started"
        try:                          # its pipe closed: it is exiting, give the kernel a moment to say how
            code = self.proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            return "still running, pipe closed"
        return f"killed by signal {-code}" if code < 0 else f"exit status {code}"

    def rss_anon_mb(self) -> float | None:
        """The reader process's private resident memory (its share of the slot pool is the engine's)."""
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        return int(line.split()[1]) / 1024
        except (OSError, AttributeError):
            return None
        return None

    def _close_pipes(self):
        for fd in ("req", "rsp", "bell"):
            v = getattr(self, fd, None)
            if v is not None:
                try:
                    os.close(v)
                except OSError:
                    pass
                setattr(self, fd, None)

    def close(self):
        self._close_pipes()          # EOF: the reader exits
        if self.proc is not None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


# ---------------------------------------------------------------------------------------------------------------
# the reader's side (runs as a script: stdlib + numpy only)
class _ReadError(Exception):
    pass


def _reader_main(spec: dict) -> int:
    """The reader: ``threads`` reader threads (several reads in flight keep the device busy), each with its own
    aligned staging buffer, take requests from the pipe into a priority queue and the most urgent job from it."""
    import threading

    import numpy as np

    files, stride, num_slots = spec["files"], spec["stride"], spec["num_slots"]
    req, rsp, bell, align, chunk = spec["req"], spec["rsp"], spec["bell"], spec["align"], spec["chunk"]
    src, dst = spec["src"], spec["dst"]
    drop = bool(spec["drop"]) and hasattr(os, "posix_fadvise")
    pool = mmap.mmap(spec["memfd"], stride * num_slots)
    pool_u8 = np.frombuffer(pool, dtype=np.uint8)
    src_isz, dst_isz = ITEMSIZE[src], ITEMSIZE[dst]
    stage_bytes = min(chunk, spec["slot_numel"] * src_isz) + 2 * align
    lock = threading.Lock()                  # queue, descriptors, pipe writes
    work = threading.Condition(lock)         # idle threads other than the one sleeping on the pipe
    state = {"direct": bool(spec["direct"]) and hasattr(os, "O_DIRECT"), "quit": False, "leader": False}
    fds: dict[tuple[int, bool], int] = {}
    pending: dict[int, list] = {}            # job -> [priority, slot, file, offset, nbytes]
    heap: list = []
    seq = [0]

    def fd_of(fi: int, is_direct: bool, reopen: bool) -> int:
        k = (fi, is_direct)
        with lock:
            if reopen and k in fds:
                os.close(fds.pop(k))
            if k not in fds:
                fds[k] = os.open(files[fi], os.O_RDONLY | (os.O_DIRECT if is_direct else 0))
            return fds[k]

    def read_range(stage_mv, fi: int, off: int, nb: int) -> tuple[int, int]:
        """Bytes [off, off+nb) of file ``fi`` into the staging buffer: (where they start in it, bytes read)."""
        name = files[fi]
        for attempt in (0, 1):
            is_direct = state["direct"]
            try:
                fd = fd_of(fi, is_direct, reopen=bool(attempt))
                if is_direct:
                    a = off - off % align
                    end = -(-(off + nb) // align) * align
                    got = os.preadv(fd, [stage_mv[:end - a]], a)
                    if got >= off + nb - a:
                        return off - a, got
                else:
                    got = os.preadv(fd, [stage_mv[:nb]], off)
                    while 0 < got < nb:
                        n = os.preadv(fd, [stage_mv[got:nb]], off + got)
                        if n <= 0:
                            break
                        got += n
                    if got == nb:
                        if drop:
                            os.posix_fadvise(fd, off, nb, os.POSIX_FADV_DONTNEED)
                        return 0, got
                size = os.fstat(fd).st_size
            except OSError as e:
                if is_direct and e.errno == errno.EINVAL:     # no O_DIRECT on this file system: buffered reads
                    state["direct"] = False
                    return read_range(stage_mv, fi, off, nb)
                if attempt:
                    raise _ReadError(f"{name}: {e.strerror}") from None
                continue
            if attempt:
                raise _ReadError(f"{name} is truncated (needs bytes {off}..{off + nb}, file has {size})")
        raise AssertionError("unreachable")

    def convert(stage_u8, slot: int, at: int, first: int, n: int):
        """``n`` source bytes at ``stage[at:]`` into the slot, starting at source byte ``first`` of the expert."""
        base = slot * stride + first // src_isz * dst_isz
        s = stage_u8[at:at + n]
        if src == dst:
            pool_u8[base:base + n] = s
        elif src == "bf16":                     # bf16 -> f32: the 16 bits become the high half
            out = pool_u8[base:base + 2 * n].view(np.uint32)
            np.left_shift(s.view(np.uint16), 16, out=out, dtype=np.uint32)
        else:                                   # f16 -> f32
            np.copyto(pool_u8[base:base + 2 * n].view(np.float32), s.view(np.float16))

    def send(op: str, job: int, a: int = 0, b: int = 0, msg: bytes = b""):
        view = memoryview(RSP.pack(ord(op), job, a, b) + msg)
        while view:
            view = view[os.write(rsp, view):]

    def push(prio, job):
        heapq.heappush(heap, (prio, seq[0], job))
        seq[0] += 1

    inbox = [b""]

    def take_requests():
        """Move what the engine wrote into the queue (lock held, never blocks); end of input sets ``quit``."""
        try:
            while os.read(bell, 4096):        # the rings are only wake-ups
                pass
        except BlockingIOError:
            pass
        chunks = [inbox[0]]
        while True:
            try:
                d = os.read(req, 1 << 16)
            except BlockingIOError:
                break
            if not d:
                state["quit"] = True
                break
            chunks.append(d)
        buf = b"".join(chunks)
        i = 0
        while len(buf) - i >= REQ.size:
            op, slot, job, prio, fi, off, nb = REQ.unpack_from(buf, i)
            i += REQ.size
            op = chr(op)
            if op == "J":
                pending[job] = [prio, slot, fi, off, nb]
                push(prio, job)
            elif op == "C":
                if pending.pop(job, None) is not None:
                    send("X", job)
            elif op == "U":
                p = pending.get(job)
                if p is not None and p[0] != URGENT:
                    p[0] = URGENT
                    push(URGENT, job)
            elif op == "Q":
                state["quit"] = True
        inbox[0] = buf[i:]

    def next_job():
        """The most urgent live job, or None (lock held)."""
        while heap:
            prio, _, j = heapq.heappop(heap)
            p = pending.get(j)
            if p is not None and p[0] == prio:
                return j
        return None

    # Each reader thread takes requests from the pipe itself (no hand-off through another thread: waking a thread
    # costs as much as waking a process). While requests keep coming (within ``busy_window`` s of the last job) an
    # idle thread naps ``nap`` s at a time and looks at the request pipe in between instead of sleeping on it: a
    # write to a pipe whose reader sleeps in the kernel makes the *writer* wake that reader's CPU, ~20 us of the
    # engine's compute thread per write in a VM (measured: ~1 write per MoE layer). The nap is taken on the bell
    # pipe, which the engine rings only for a load it needs now. Idle longer, one thread sleeps on the pipes.
    nap, busy_window = max(0.0, float(spec.get("nap_us", 50)) / 1e6), 0.05
    last = [time.monotonic()]

    def reader():
        stage = mmap.mmap(-1, stage_bytes)           # page-aligned: O_DIRECT can read into it
        stage_mv, stage_u8 = memoryview(stage), np.frombuffer(stage, dtype=np.uint8)
        has_req = select.poll()
        has_req.register(req, select.POLLIN)
        while True:
            with lock:
                if state["quit"]:
                    return
                take_requests()
                job = next_job()
                if job is None and state["quit"]:
                    return
                if job is not None:
                    _, slot, fi, off, nb = pending.pop(job)
                    send("S", job)
                    last[0] = time.monotonic()
                idle = time.monotonic() - last[0]
            if job is None:
                if nap and idle < busy_window:      # no lock taken until there is something to do
                    while not heap and not state["quit"] and time.monotonic() - last[0] < busy_window:
                        if select.select([bell], [], [], nap)[0] or has_req.poll(0):
                            break
                    continue
                with lock:                       # idle: one thread sleeps on the pipe, the others on ``work``
                    if state["leader"]:
                        work.wait(1.0)
                        continue
                    state["leader"] = True
                select.select([req, bell], [], [], 1.0)
                with lock:
                    state["leader"] = False
                    work.notify_all()
                continue
            t0 = time.perf_counter_ns()
            total, err = 0, None
            try:
                for first in range(0, nb, chunk):
                    n = min(chunk, nb - first)
                    at, got = read_range(stage_mv, fi, off + first, n)
                    total += got
                    convert(stage_u8, slot, at, first, n)
            except _ReadError as e:
                err = str(e).encode()
            except Exception as e:  # noqa: BLE001 — reported to the engine, never kills the reader
                err = f"{type(e).__name__}: {e}".encode()
            with lock:
                if err is not None:
                    send("E", job, 0, len(err), err)
                else:
                    send("D", job, total, time.perf_counter_ns() - t0)
                last[0] = time.monotonic()

    _fine_timer_slack()
    os.set_blocking(req, False)
    os.set_blocking(bell, False)
    with lock:
        send("R", 0)

    def run():
        try:
            reader()
        except OSError:           # the engine closed its pipes (it exited or restarts us): stop quietly
            with lock:
                state["quit"] = True
                work.notify_all()

    threads = [threading.Thread(target=run, daemon=True) for _ in range(max(1, int(spec.get("threads", 1))))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return 0


def _fine_timer_slack():
    """Sleep ~``nap`` rather than ``nap`` + 50 us (Linux's default timer slack) in the reader's idle loop."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(29, 1000, 0, 0, 0)      # PR_SET_TIMERSLACK: 1 us
    except (OSError, AttributeError):
        pass


if __name__ == "__main__":
    try:
        sys.exit(_reader_main(json.loads(sys.argv[1])))
    except (BrokenPipeError, KeyboardInterrupt):
        sys.exit(0)
