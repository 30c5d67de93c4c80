"""Offload mode: lossless vs local mode, counters, eviction policies, predictors, budget errors, read faults."""

import os
import shutil

import numpy as np
import pytest
import torch

from moeyard.moe.checkpoint import CheckpointReader
from moeyard.moe.config import MoEConfig
from moeyard.moe.experts import read_expert
from moeyard.moe.predictors import PREDICTORS, TokenTablePredictor, TransitionPredictor, build_predictor
from moeyard.offload.cache import ExpertCache
from moeyard.offload.mode import OffloadConfigError
from moeyard.offload.tiers import DiskTier, ExpertReadError
from moeyard.runtime.llm import LLM
from moeyard.runtime.sampling import SamplingParams

PROMPTS = [[1, 5, 9, 30, 77, 12], [3, 4, 100, 2], [200, 201, 7, 8, 9, 10, 11], [42]]
GREEDY = SamplingParams(max_tokens=10, temperature=0)


def _gen(llm, prompts=PROMPTS, sp=GREEDY):
    return [o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=sp)]


@pytest.fixture(scope="module")
def refs(tiny_ckpt):
    out = {}
    for arch, fused in (("mixtral", False), ("qwen2_moe", True)):
        path, _ = tiny_ckpt(arch, fused=fused)
        llm = LLM(path, max_num_seqs=4)
        out[arch] = (path, _gen(llm))
        llm.close()
    return out


def _check_counters(st):
    assert st["expert_hits"] + st["expert_misses"] == st["expert_requests"] > 0
    assert 0 <= st["prefetch_used"] <= st["prefetch_issued"]
    assert st["bytes_loaded"] > 0 and st["stall_seconds"] >= 0


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("predictor", PREDICTORS)
def test_lossless_every_predictor(refs, arch, predictor):
    path, ref = refs[arch]
    for frac in (0.25, 0.6):
        llm = LLM(path, mode="offload", max_num_seqs=4, expert_cache_fraction=frac, predictor=predictor)
        assert _gen(llm) == ref, (predictor, frac)
        st = llm.stats()
        _check_counters(st)
        assert st["tokens_generated"] == sum(len(r) for r in ref)
        llm.close()


@pytest.mark.parametrize("opts", [dict(prefetch=False, eviction="lru"), dict(eviction="lfu", lookahead=2),
                                  dict(expert_cache_fraction=0.1, io_threads=1, io_mode="thread"),
                                  dict(io_mode="thread"), dict(io_mode="process", expert_cache_fraction=0.1),
                                  dict(expert_cache_fraction=1.0, predictor="combined", lookahead=3),
                                  dict(max_decode_batch=2, token_scheduling=True),
                                  dict(max_decode_batch=2, token_scheduling=False),
                                  dict(gate=False), dict(predictor="combined", min_p=0.9, budget_layers=0.5),
                                  dict(predictor="combined", min_p=1.0)])
def test_lossless_options(refs, opts):
    path, ref = refs["mixtral"]
    llm = LLM(path, mode="offload", max_num_seqs=4, **opts)
    assert _gen(llm) == ref
    _check_counters(llm.stats())
    if not opts.get("prefetch", True) or opts.get("min_p") == 1.0:   # min_p 1: no rank is ever that precise
        assert llm.stats()["prefetch_issued"] == 0
    if "io_mode" in opts:
        assert llm.stats()["io_mode"] == opts["io_mode"]
    llm.close()


def test_reader_process_killed_fails_requests_then_recovers(refs):
    """The reader process dies under a running engine. Between steps nothing is lost (a new reader is started
    before the next load); with loads in flight, the requests that needed them fail with a clear error naming it,
    and the engine serves again with identical tokens."""
    import signal
    import threading
    import time
    path, ref = refs["mixtral"]
    llm = LLM(path, mode="offload", max_num_seqs=4, expert_cache_fraction=0.25, io_mode="process")
    assert _gen(llm) == ref
    cache = llm.engine.executor.cache
    cache.proc.proc.kill()
    cache.proc.proc.wait()
    assert _gen(llm) == ref
    assert llm.stats()["reader_restarts"] == 1 and llm.stats()["read_errors"] == 0
    # mid-generation: the reader is stopped (loads queue up), then killed
    child = cache.proc.proc
    os.kill(child.pid, signal.SIGSTOP)
    box = {}
    t = threading.Thread(target=lambda: box.update(outs=llm.generate(prompt_token_ids=PROMPTS,
                                                                       sampling_params=GREEDY)))
    t.start()
    time.sleep(1.0)
    assert t.is_alive()                      # waiting for the stopped reader
    child.kill()
    t.join(30)
    assert not t.is_alive()
    failed = [o for o in box["outs"] if o.finish_reason == "error"]
    assert failed and all("reader process exited" in o.error and "killed by signal" in o.error for o in failed)
    st = llm.stats()
    assert st["reader_restarts"] == 2 and st["read_errors"] > 0
    assert _gen(llm) == ref
    llm.close()
    assert cache.proc is None or cache.proc.proc is None          # closed: no reader left behind


def test_reader_process_hung_is_restarted(refs):
    """A reader process that stops answering (here: SIGSTOP) is not waited on forever: after ``read_timeout``
    seconds without a word from it, the step's waiting requests fail with a clear error, it is killed, a new one
    serves the next requests with identical tokens."""
    import signal
    import time
    path, ref = refs["mixtral"]
    llm = LLM(path, mode="offload", max_num_seqs=4, expert_cache_fraction=0.25, io_mode="process",
              read_timeout=1.0)
    assert _gen(llm) == ref
    child = llm.engine.executor.cache.proc.proc
    os.kill(child.pid, signal.SIGSTOP)
    t0 = time.monotonic()
    outs = llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)
    assert time.monotonic() - t0 < 30
    failed = [o for o in outs if o.finish_reason == "error"]
    assert failed and all("did not answer for 1 s" in o.error for o in failed)
    assert child.wait(10) == -signal.SIGKILL                      # the hung one is gone
    assert llm.stats()["reader_restarts"] == 1
    assert _gen(llm) == ref
    llm.close()
    with pytest.raises(OffloadConfigError, match="read_timeout"):
        LLM(path, mode="offload", read_timeout=0)


def test_full_budget_all_hits_after_warmup(refs):
    path, ref = refs["mixtral"]
    llm = LLM(path, mode="offload", max_num_seqs=4, expert_cache_fraction=1.0)
    _gen(llm)
    before = llm.stats()
    assert _gen(llm) == ref
    after = llm.stats()
    assert after["expert_misses"] == before["expert_misses"]      # everything stayed resident
    assert after["bytes_loaded"] == before["bytes_loaded"]
    llm.close()


def test_budget_below_working_set_is_a_clear_error(refs):
    path, _ = refs["mixtral"]
    cfg = MoEConfig.from_dir(path)
    eb = cfg.expert_bytes(4)
    with pytest.raises(OffloadConfigError, match=r"minimum is 2 slots"):
        LLM(path, mode="offload", expert_cache_bytes=eb)           # one slot < top_k
    with pytest.raises(OffloadConfigError, match=r"minimum is 8 slots"):
        LLM(path, mode="offload", expert_cache_bytes=4 * eb, max_decode_batch=4)
    with pytest.raises(OffloadConfigError, match="fraction"):
        LLM(path, mode="offload", expert_cache_fraction=0)
    with pytest.raises(OffloadConfigError, match="predictor"):
        LLM(path, mode="offload", predictor="oracle")
    with pytest.raises(Exception, match="valid"):
        LLM(path, mode="offload", warp=3)


def test_disk_tier_matches_checkpoint(refs):
    for arch in ("mixtral", "qwen2_moe"):
        path, _ = refs[arch]
        cfg = MoEConfig.from_dir(path)
        reader = CheckpointReader(path)
        tier = DiskTier(cfg, reader)
        for l in cfg.moe_layers:
            for e in (0, cfg.num_experts - 1):
                got = tier.read_raw(l, e)
                want = read_expert(cfg, reader, l, e)
                for g, w in zip(got, (want.gate, want.up, want.down)):
                    assert torch.equal(g, w)
        assert tier.bytes_read > 0 and tier.gbps() > 0


def _cache(path, slots, eviction, io_mode="auto"):
    cfg = MoEConfig.from_dir(path)
    return cfg, ExpertCache(cfg, DiskTier(cfg, CheckpointReader(path)), slots, torch.float32, torch.device("cpu"),
                            eviction=eviction, io_threads=1, io_mode=io_mode)


def _wait_resident(cache, key, timeout=10.0):
    import time
    t0 = time.monotonic()
    while key not in set(cache.resident()):
        assert time.monotonic() - t0 < timeout, f"{key} never became resident"
        time.sleep(0.002)


def _use(cache, layer, experts):
    cache.begin_layer(layer, experts)
    for e in experts:
        cache.get(layer, e)
    cache.end_step()


@pytest.mark.parametrize("io_mode", ["process", "thread"])
def test_eviction_policies(refs, io_mode):
    path, _ = refs["mixtral"]
    # lru: 3 slots, use A A B C then D → A (least recent... used before B, C) is evicted
    for policy, evicted in (("lru", (0, 0)), ("lfu", (0, 1))):
        cfg, c = _cache(path, 3, policy, io_mode)
        assert c.stats()["io_mode"] == io_mode
        _use(c, 0, [0]); _use(c, 0, [1]); _use(c, 0, [1]); _use(c, 0, [2]); _use(c, 0, [0])
        # freq: e0=2, e1=2, e2=1 ; recency: e1 < e2 < e0
        _use(c, 0, [3])
        res = set(c.resident())
        gone = {(0, 0), (0, 1), (0, 2)} - res
        assert len(gone) == 1
        if policy == "lru":
            assert gone == {(0, 1)}
        else:
            assert gone == {(0, 2)}
        st = c.stats()
        assert st["expert_hits"] + st["expert_misses"] == st["expert_requests"] == 6
        c.close()
    # predicted: whatever an upcoming layer is predicted to need survives, even if least recent
    cfg, c = _cache(path, 3, "predicted", io_mode)
    _use(c, 0, [0]); _use(c, 0, [1]); _use(c, 0, [2])
    c.set_predictions({(0, 0): 1})
    _use(c, 1, [5])
    res = set(c.resident())
    assert (0, 0) in res and (1, 5) in res and len(res) == 3
    # a prefetch never evicts a predicted expert; wrong prefetches are dropped first at their layer
    c.set_predictions({(0, 0): 1, (1, 5): 2, (2, 3): 1})
    assert c.prefetch(2, [3]) == 1
    assert c.prefetch(2, [4]) == 0           # only predicted experts are left
    _wait_resident(c, (2, 3))
    _use(c, 2, [6])                          # (2,3) was a wrong prediction → it goes first
    assert (2, 3) not in set(c.resident())
    st = c.stats()
    assert st["prefetch_used"] <= st["prefetch_issued"] == 1
    c.close()


@pytest.mark.parametrize("io_mode", ["process", "thread"])
def test_layer_needing_more_experts_than_slots_never_deadlocks(refs, io_mode):
    """Prefetched experts of a layer fill every slot; the layer then needs those and more (a prefill): the first
    expert it runs has no slot and every slot is pinned by experts still to run. The cache gives it the slot of the
    one needed last (read again on its turn) instead of waiting forever."""
    import threading
    path, _ = refs["mixtral"]
    cfg, c = _cache(path, 4, "predicted", io_mode)
    c.set_predictions({(0, e): 1 for e in (1, 2, 3, 4)})
    assert c.prefetch(0, [1, 2, 3, 4]) == 4
    for e in (1, 2, 3, 4):
        _wait_resident(c, (0, e))
    done = []

    def run():
        _use(c, 0, [0, 1, 2, 3, 4])           # 0 first, no slot for it
        done.append(True)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(20)
    assert done, "the layer deadlocked waiting for a slot"
    st = c.stats()
    assert st["slots_stolen"] >= 1 and st["expert_requests"] == 5
    c.close()


def test_predictors_find_planted_structure():
    E, K, L, T = 8, 2, 4, 4000
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50, T)
    ex = np.zeros((T, L, K), dtype=np.int16)
    ex[:, 0, 0] = tokens % E
    ex[:, 0, 1] = (tokens % E + 1) % E
    for l in range(1, L):
        ex[:, l] = (ex[:, l - 1] * 3 + 1) % E          # deterministic path
    layers = list(range(L))
    tr = TransitionPredictor(ex[:3000], layers, E, K, learn=False)
    tt = TokenTablePredictor(50, layers, E, K, trace={"experts": ex[:3000], "tokens": tokens[:3000]}, learn=False)
    held = torch.as_tensor(ex[3000:].astype(np.int64))
    toks = torch.as_tensor(tokens[3000:])
    for p in (tr, tt):
        p.begin(toks)
        p.observe(0, torch.zeros(len(toks), 4), held[:, 0])
        for ahead in (1, 2, 3):
            ids, sc = p.predict(0, ahead)
            assert ids.shape == (len(toks), K)
            prec = np.mean([set(ids[i].tolist()) == set(held[i, ahead].tolist()) for i in range(len(toks))])
            assert prec > 0.95, (type(p).__name__, ahead, prec)
    # combined on a config; an unknown name names the valid ones
    cfg = MoEConfig.from_dict({"model_type": "mixtral", "vocab_size": 50, "hidden_size": 4, "num_hidden_layers": L,
                               "num_attention_heads": 1, "num_local_experts": E, "num_experts_per_tok": K,
                               "intermediate_size": 4})
    comb = build_predictor("combined", cfg, trace={"experts": ex, "tokens": tokens})
    comb.begin(toks)
    comb.observe(0, torch.zeros(len(toks), 4), held[:, 0])
    ids, _ = comb.predict(0, 1)
    assert np.mean([set(ids[i].tolist()) == set(held[i, 1].tolist()) for i in range(len(toks))]) > 0.95
    with pytest.raises(ValueError, match="router"):
        build_predictor("psychic", cfg)


def test_token_scheduling_groups_and_does_not_starve(refs):
    path, _ = refs["mixtral"]
    prompts = [[i * 7 % 256, (i * 13 + 1) % 256, 5] for i in range(8)]
    sp = SamplingParams(max_tokens=6, temperature=0)
    base = LLM(path, max_num_seqs=8)
    ref = _gen(base, prompts, sp)
    res = {}
    for ts in (True, False):
        llm = LLM(path, mode="offload", max_num_seqs=8, max_decode_batch=3, token_scheduling=ts,
                  expert_cache_fraction=0.5)
        assert llm.engine.scheduler.max_decode_batch == 3
        assert (llm.engine.scheduler.batch_policy is not None) == ts
        assert _gen(llm, prompts, sp) == ref             # everyone finished, same tokens
        res[ts] = llm.stats()["distinct_experts_per_decode_step"]
        llm.close()
    assert res[True] <= res[False] + 1e-9


def test_read_fault_fails_requests_then_recovers(refs, tmp_path):
    src, ref = refs["mixtral"]
    dst = str(tmp_path / "ckpt")
    shutil.copytree(src, dst)
    fn = os.path.join(dst, "model.safetensors")
    with open(fn, "rb") as f:
        original = f.read()
    llm = LLM(dst, mode="offload", max_num_seqs=4, expert_cache_fraction=0.25)
    assert _gen(llm) == ref
    # truncate the file underneath the running engine: experts not resident cannot be read
    with open(fn, "r+b") as f:
        f.truncate(4096)
    outs = llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)
    failed = [o for o in outs if o.finish_reason == "error"]
    assert failed, "some request must need an expert that is not resident"
    assert all("truncated" in o.error and "expert" in o.error for o in failed)
    assert llm.stats()["read_errors"] > 0
    # remove it: same clear failure, no hang
    os.remove(fn)
    outs = llm.generate(prompt_token_ids=PROMPTS[:1], sampling_params=GREEDY)
    assert outs[0].finish_reason in ("error", "length")
    # restore: the engine serves again, tokens identical to local mode
    with open(fn, "wb") as f:
        f.write(original)
    assert _gen(llm) == ref
    llm.close()


def test_prefetch_never_evicts_what_is_needed_sooner(refs):
    path, _ = refs["mixtral"]
    cfg, c = _cache(path, 3, "predicted")
    for e in (0, 1, 2):
        _use(c, 0, [e])
    # (0,0) needed in 1 layer, (0,1) in 3; (0,2) predicted by nobody
    c.set_predictions({(0, 0): 1, (0, 1): 3, (1, 5): 2, (1, 6): 2, (1, 7): 2})
    assert c.prefetch_predicted() == 2       # (1,5) takes (0,2), (1,6) takes (0,1) (needed later); (1,7) cannot
    res = set(c.resident()) | {k for k, e in c.entries.items()}
    assert (0, 0) in res and (0, 1) not in res and (0, 2) not in res
    assert c.prefetch_predicted() == 0
    c.close()


def test_queued_prefetch_is_a_miss_and_is_read_inline(refs):
    """A prefetch whose read has not started when the layer needs it counts as a miss; the asking thread reads it
    itself instead of waiting for the I/O thread (here blocked on another read)."""
    import threading
    path, _ = refs["mixtral"]
    cfg, c = _cache(path, 4, "predicted", "thread")
    gate, started = threading.Event(), threading.Event()
    orig = c._load

    def slow_load(e, tls, stream, release):
        if threading.current_thread() is not threading.main_thread() and e.key == (0, 0):
            started.set()
            gate.wait(10)
        return orig(e, tls, stream, release)
    c._load = slow_load
    c.set_predictions({(0, 0): 1, (0, 1): 1})
    assert c.prefetch(0, [0, 1]) == 2
    assert started.wait(5)                   # the only I/O thread is busy with (0,0); (0,1) is queued
    c.begin_layer(0, [0, 1])
    w = c.get(0, 1)                          # read inline by this thread
    st = c.stats()
    assert st["loads_inline"] == 1 and st["prefetch_not_started"] == 1
    gate.set()
    c.get(0, 0)
    c.end_step()
    st = c.stats()
    assert st["expert_hits"] == 1 and st["expert_misses"] == 1      # (0,0) was being read: a hit; (0,1) a miss
    want = read_expert(cfg, CheckpointReader(path), 0, 1)
    assert torch.equal(w.gate, want.gate.float()) and torch.equal(w.down, want.down.float())
    c.close()


def test_flat_reads_match_checkpoint(refs):
    path, _ = refs["mixtral"]
    cfg = MoEConfig.from_dir(path)
    reader = CheckpointReader(path)
    tier = DiskTier(cfg, reader)
    if tier.flat is None:
        pytest.skip("this checkpoint's experts are not one contiguous range each")
    c = ExpertCache(cfg, tier, 2, torch.float32, torch.device("cpu"), io_threads=1)
    for l in cfg.moe_layers:
        for e in range(cfg.num_experts):
            c.begin_layer(l, [e])
            w = c.get(l, e)
            want = read_expert(cfg, reader, l, e)
            for g, r in zip((w.gate, w.up, w.down), (want.gate, want.up, want.down)):
                assert torch.equal(g, r.float())
            c.end_step()
    c.close()


def test_step_start_prediction():
    """The token table predicts every layer before any runs; the router only from a layer already seen."""
    E, K, L = 8, 2, 4
    cfg = MoEConfig.from_dict({"model_type": "mixtral", "vocab_size": 50, "hidden_size": 4, "num_hidden_layers": L,
                               "num_attention_heads": 1, "num_local_experts": E, "num_experts_per_tok": K,
                               "intermediate_size": 4})
    tokens = np.arange(200) % 50
    ex = np.stack([np.stack([(tokens + l) % E, (tokens + l + 1) % E], -1) for l in range(L)], 1)
    tt = build_predictor("token", cfg, trace={"experts": ex, "tokens": tokens})
    tt.begin(torch.tensor([7]))
    for l in range(L):
        assert set(torch.topk(tt.scores_for(l, None)[0], K).indices.tolist()) == {(7 + l) % E, (8 + l) % E}
    tr = build_predictor("transition", cfg, trace={"experts": ex})
    tr.begin(torch.tensor([7]))
    assert tr.scores_for(2, None) is None
    tr.observe(0, None, torch.tensor([[7 % E, 8 % E]]))
    assert tr.scores_for(2, 0) is not None and tr.scores_for(0, 0) is None


def test_gate_options_are_checked(refs):
    path, _ = refs["mixtral"]
    with pytest.raises(OffloadConfigError, match=r"min_p must be a number in \[0, 1\], got 2"):
        LLM(path, mode="offload", min_p=2)
    with pytest.raises(OffloadConfigError, match="budget_layers must be a number"):
        LLM(path, mode="offload", budget_layers="lots")
