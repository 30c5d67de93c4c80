"""Serving benchmark: N concurrent streaming clients for D seconds against ``moeyard serve``.

    .venv/bin/python benchmarks/bench_serve.py                         # default model, 64 clients, 60 s
    .venv/bin/python benchmarks/bench_serve.py --model PATH --clients 16 --duration 30
    .venv/bin/python benchmarks/bench_serve.py --url http://127.0.0.1:8000   # an already running server

Starts the server as a subprocess (unless ``--url``), runs closed-loop clients (each sends a streaming
``/v1/completions`` request, waits for ``data: [DONE]``, sends the next) until the duration is up, lets
in-flight requests finish, then reports: requests done and failed (any non-200, error event, missing [DONE] or
exception counts as failed), generated tokens per second, p50/p99 time to first token and time per output
token. ``--disconnect-fraction`` of the clients (default a third) drop every stream after a few chunks (counted
as disconnects, not failures). Before and after the load: greedy completions of fixed prompts (must be identical),
the server's RSS and, after the load, its running sequences and active requests from /metrics (must be 0: no
leaked KV slots). Prints a markdown table and appends it, with the command, date and machine, to the ``## Serving``
section of docs/BENCHMARKS.md (``--no-record`` to skip). Exit status 1 if any request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_MD = os.path.join(ROOT, "docs", "BENCHMARKS.md")
DEFAULT_MODEL_DIR = os.path.join(ROOT, "moe", "default_model")

PROMPTS = [
    "The history of the printing press",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "The main difference between a list and a tuple in Python is",
    "Photosynthesis converts",
    "Question: what is 17 times 3?\nAnswer:",
    "In a mixture-of-experts model, each token",
    "Dear team, thank you for",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine() -> str:
    try:
        nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    except OSError:
        nproc = str(os.cpu_count())
    model = "unknown CPU"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"nproc {nproc}, {model}"


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def one_request(client, url, model, prompt, max_tokens, temperature, seed, disconnect_after=None):
    """Stream one completion; return (ok, ttft, tpot, tokens, error). With ``disconnect_after`` chunks the client
    closes the stream there and ok is "disconnected"."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature, "seed": seed,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = last = None
    tokens, done, finish = 0, False, []
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return False, None, None, 0, f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                ev = json.loads(data)
                if disconnect_after is not None:
                    disconnect_after -= 1
                    if disconnect_after <= 0:
                        return "disconnected", None, None, 0, None
                if "error" in ev:
                    return False, None, None, 0, ev["error"].get("message")
                now = time.perf_counter()
                for c in ev.get("choices", []):
                    if c.get("text"):
                        if first is None:
                            first = now
                        last = now
                    if c.get("finish_reason"):
                        finish.append(c["finish_reason"])
                if ev.get("usage"):
                    tokens = ev["usage"]["completion_tokens"]
    except Exception as e:  # noqa: BLE001 — any transport error is a failed request
        return False, None, None, 0, f"{type(e).__name__}: {e}"
    if not done or len(finish) != 1:
        return False, None, None, tokens, f"stream ended without [DONE] or one finish_reason ({finish})"
    ttft = (first - t0) if first is not None else None
    tpot = (last - first) / (tokens - 1) if first is not None and tokens > 1 else None
    return True, ttft, tpot, tokens, None


async def run_clients(url, model, clients, duration, max_tokens, temperature, timeout, disconnect_fraction=0.0):
    import httpx
    res = {"ok": 0, "failed": 0, "disconnected": 0, "tokens": 0, "ttft": [], "tpot": [], "errors": []}
    leavers = set(range(clients)[::max(1, round(1 / disconnect_fraction))]) if disconnect_fraction > 0 else set()
    stop_at = time.perf_counter() + duration
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        async def worker(i):
            rng = random.Random(i)
            while time.perf_counter() < stop_at:
                cut = rng.randint(1, 8) if i in leavers else None
                ok, ttft, tpot, n, err = await one_request(client, url, model, rng.choice(PROMPTS), max_tokens,
                                                           temperature, rng.randrange(1 << 30), cut)
                if ok == "disconnected":
                    res["disconnected"] += 1
                elif ok:
                    res["ok"] += 1
                    res["tokens"] += n
                    if ttft is not None:
                        res["ttft"].append(ttft)
                    if tpot is not None:
                        res["tpot"].append(tpot)
                else:
                    res["failed"] += 1
                    res["tokens"] += n
                    if len(res["errors"]) < 5:
                        res["errors"].append(err)
        t0 = time.perf_counter()
        await asyncio.gather(*[worker(i) for i in range(clients)])
        res["elapsed"] = time.perf_counter() - t0
        try:
            res["metrics"] = (await client.get(url + "/metrics")).text
        except Exception:  # noqa: BLE001
            res["metrics"] = ""
    return res


async def greedy_texts(url, model, max_tokens=32) -> list[str]:
    import httpx
    async with httpx.AsyncClient(timeout=300) as c:
        outs = []
        for p in PROMPTS:
            r = await c.post(url + "/v1/completions", json={"model": model, "prompt": p, "max_tokens": max_tokens,
                                                            "temperature": 0, "ignore_eos": True})
            outs.append(r.json()["choices"][0]["text"] if r.status_code == 200 else f"HTTP {r.status_code}")
        return outs


def server_state(url) -> dict:
    """running / active requests from /metrics (prometheus text)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families
    out = {}
    for f in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        if f.name in ("moeyard_running", "moeyard_active_requests", "moeyard_queue_length"):
            out[f.name[len("moeyard_"):]] = f.samples[0].value
    return out


def rss_mb(proc) -> float | None:
    if proc is None:
        return None
    try:
        import psutil
        return psutil.Process(proc.pid).memory_info().rss / 2 ** 20
    except Exception:  # noqa: BLE001
        return None


def start_server(args, port):
    cmd = [sys.executable, "-m", "moeyard.runtime.cli", "serve", "--model", args.model, "--mode", args.mode,
           "--port", str(port), "--max-num-seqs", str(args.max_num_seqs), "--log-level", "warning",
           "--served-model-name", "bench"]
    for o in args.option:
        cmd += ["-o", o]
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    p = subprocess.Popen(cmd, env=env)
    import httpx
    url = f"http://127.0.0.1:{port}"
    t0 = time.time()
    while True:
        if p.poll() is not None:
            raise SystemExit(f"the server exited with status {p.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return p, url
        except httpx.HTTPError:
            pass
        if time.time() - t0 > args.startup_timeout:
            p.kill()
            raise SystemExit("the server did not come up")
        time.sleep(0.5)


def record(command: str, table: str, note: str):
    """Append one run under ``## Serving`` (created if missing); other sections are left untouched."""
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    entry = f"Command: `{command}`  \nDate: {stamp}  \nMachine: {machine()}\n" + (f"\n{note}\n" if note else "") \
        + f"\n{table.strip()}\n"
    text = open(BENCH_MD).read() if os.path.exists(BENCH_MD) else "# Benchmarks\n"
    head = "## Serving\n"
    if head in text:
        start = text.index(head)
        nxt = text.find("\n## ", start + len(head))
        end = nxt + 1 if nxt >= 0 else len(text)
        section = text[start:end].rstrip() + "\n\n" + entry
        text = text[:start] + section + ("\n" + text[end:] if nxt >= 0 else "")
    else:
        text = text.rstrip() + "\n\n" + head + "\n" + entry
    os.makedirs(os.path.dirname(BENCH_MD), exist_ok=True)
    with open(BENCH_MD, "w") as f:
        f.write(text)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default", help="'default' (the embedded model) or a checkpoint directory")
    ap.add_argument("--mode", default="local")
    ap.add_argument("-o", "--option", action="append", default=[])
    ap.add_argument("--url", default=None, help="benchmark a running server instead of starting one")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, seconds")
    ap.add_argument("--startup-timeout", type=float, default=300.0)
    ap.add_argument("--disconnect-fraction", type=float, default=1 / 3,
                    help="share of clients that drop each stream after 1-8 chunks (default a third)")
    ap.add_argument("--warmup", type=float, default=10.0, help="seconds of the same load before measuring "
                    "(default 10; RSS 'before' is taken after it)")
    ap.add_argument("--note", default="", help="a line recorded with the result")
    ap.add_argument("--no-record", action="store_true")
    a = ap.parse_args(argv)
    if a.model == "default" and not a.url and not os.path.isfile(os.path.join(DEFAULT_MODEL_DIR, "config.json")):
        raise SystemExit(f"the default model is missing ({DEFAULT_MODEL_DIR}); pass --model PATH")
    proc = None
    if a.url:
        url = a.url.rstrip("/")
    else:
        proc, url = start_server(a, free_port())
    try:
        import httpx
        model = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
        if a.warmup > 0:     # the same load, not counted: the KV cache and allocator reach their working size
            asyncio.run(run_clients(url, model, a.clients, a.warmup, a.max_tokens, a.temperature, a.timeout,
                                    a.disconnect_fraction))
        before = asyncio.run(greedy_texts(url, model))
        rss0 = rss_mb(proc)
        res = asyncio.run(run_clients(url, model, a.clients, a.duration, a.max_tokens, a.temperature, a.timeout,
                                      a.disconnect_fraction))
        t0 = time.time()
        while True:                                   # aborts of the last disconnects land within a step or two
            st = server_state(url)
            if (st.get("running", 0) == 0 and st.get("active_requests", 0) == 0) or time.time() - t0 > 30:
                break
            time.sleep(0.5)
        rss1 = rss_mb(proc)
        after = asyncio.run(greedy_texts(url, model))
        res["identical"] = before == after
        res["state_after"] = st
        res["rss"] = (rss0, rss1)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    n = res["ok"] + res["failed"]
    tps = res["tokens"] / res["elapsed"]
    ms = 1000.0
    headers = ["model", "mode", "clients", "duration s", "max_tokens", "requests", "failed", "disconnected",
               "gen tokens", "tokens/s", "req/s", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms", "TPOT p99 ms",
               "running/active after", "RSS MB before -> after", "greedy identical"]
    n += res["disconnected"]
    st, (r0, r1) = res["state_after"], res["rss"]
    rss = f"{r0:.0f} -> {r1:.0f}" if r0 is not None and r1 is not None else "n/a"
    row = [os.path.basename(os.path.normpath(a.model)) if not a.url else model, a.mode, a.clients,
           f"{res['elapsed']:.1f}", a.max_tokens, n, res["failed"], res["disconnected"], res["tokens"], f"{tps:.1f}",
           f"{res['ok'] / res['elapsed']:.2f}", f"{pct(res['ttft'], 50) * ms:.0f}", f"{pct(res['ttft'], 99) * ms:.0f}",
           f"{pct(res['tpot'], 50) * ms:.1f}", f"{pct(res['tpot'], 99) * ms:.1f}",
           f"{st.get('running', float('nan')):.0f}/{st.get('active_requests', float('nan')):.0f}", rss,
           "yes" if res["identical"] else "NO"]
    table = "| " + " | ".join(headers) + " |\n|" + "---|" * len(headers) + "\n| " + " | ".join(map(str, row)) + " |"
    print(table)
    if res["errors"]:
        print("errors:", *res["errors"], sep="\n  ", file=sys.stderr)
    if not a.no_record:
        args, shown = list(argv if argv is not None else sys.argv[1:]), []
        while args:   # the note is recorded as its own line, not inside the command
            x = args.pop(0)
            if x == "--note":
                args = args[1:]
            elif not x.startswith("--note="):
                shown.append(x)
        cmd = " ".join(["python benchmarks/bench_serve.py"] + [shlex.quote(x) for x in shown])
        record(cmd, table, a.note)
        print(f"recorded in {BENCH_MD}")
    return 1 if res["failed"] or not res["identical"] else 0


if __name__ == "__main__":
    sys.exit(main())
