"""Portable placements: SGLang expert-location export/import, SGLang recorder dumps and vLLM routed experts
imported as traces, and the round trip through both (engine files written by tests/placement/engine_files.py,
reimplemented from the engines' source because neither engine installs without a GPU here)."""
import json

import numpy as np
import pytest

from engine_files import (sglang_map, sglang_parse_location, sglang_per_pass_dump, sglang_per_token_dump,
                          sglang_stat_dump, vllm_routed_experts)
from moeyard.placement import Placement, PlacementError, load_trace
from moeyard.placement.affinity import load_problem_file
from moeyard.placement.cli import main as place_main, model_layout
from moeyard.placement.layout import ModelLayout
from moeyard.placement.sglang_format import (ImportedCounts, import_sglang_dump, read_sglang_location,
                                             sglang_location)
from moeyard.placement.synthetic import synthetic_trace
from moeyard.placement.vllm_format import import_vllm_routed
from moeyard.runtime.cli import main as moeyard_main

E, K, DEPTH, MOE = 8, 2, 4, (0, 2, 3)      # 4 decoder layers, layer 1 dense (qwen2_moe mlp_only_layers)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tiny_models import hf_config
    path = tmp_path_factory.mktemp("qwen2moe_cfg")
    d = hf_config("qwen2_moe").to_dict()       # only config.json: the layout needs no weights
    d["num_hidden_layers"] = DEPTH
    d.pop("layer_types", None)
    (path / "config.json").write_text(json.dumps(d))
    return str(path)


@pytest.fixture(scope="module")
def trace():
    return synthetic_trace(600, len(MOE), E, K, seed=4)


def test_model_layout(model_dir):
    lay = model_layout(model_dir)
    assert (lay.num_layers, lay.moe_layers, lay.num_experts, lay.top_k) == (DEPTH, MOE, E, K)


def test_sglang_location_parses_like_sglang():
    """Replicated placement -> one map row per decoder layer; SGLang's reading gives back the same copies."""
    lay = ModelLayout(DEPTH, MOE, E, K)
    rng = np.random.default_rng(0)
    m = np.zeros((3, E, 4), dtype=bool)
    for l in range(3):   # 12 slots = 8 experts + 4 replicas, 3 per worker
        w = rng.permutation(np.repeat(np.arange(4), 2))
        m[l, np.arange(E), w] = True
        for g in range(4):
            m[l, rng.choice(np.flatnonzero(~m[l, :, g])), g] = True
    p = Placement.from_membership(m)
    d = sglang_location(p, lay)
    l2p, redundant = sglang_parse_location(json.loads(json.dumps(d)), DEPTH, E, ep_size=4)
    assert redundant == 4
    for i, layer in enumerate(MOE):
        for e in range(E):
            assert sorted(s // 3 for s in l2p[layer][e]) == list(p.workers_of(i, e))
    assert d["physical_to_logical_map"][1] == [s % E for s in range(12)]      # dense layer: trivial row
    assert read_sglang_location(d, 4, lay) == p


def test_import_sglang_per_token(tmp_path, trace):
    map_DP = sglang_map(DEPTH, E, redundant=4, seed=1)
    sglang_per_token_dump(tmp_path / "d.pt", trace.experts_TLk, trace.token_ids_T, MOE, DEPTH, map_DP)
    got = import_sglang_dump(tmp_path / "d.pt", ModelLayout(DEPTH, MOE, E, K))
    np.testing.assert_array_equal(got.experts_TLk, trace.experts_TLk)
    np.testing.assert_array_equal(got.token_ids_T, trace.token_ids_T)


def test_import_vllm(tmp_path, trace):
    arrs = vllm_routed_experts(trace.experts_TLk, MOE, DEPTH, [100, 250, 250])
    np.savez(tmp_path / "routes.npz", *arrs)
    got = import_vllm_routed(tmp_path / "routes.npz", ModelLayout(DEPTH, MOE, E, K))
    np.testing.assert_array_equal(got.experts_TLk, trace.experts_TLk)


def test_count_only_dumps_give_loads(tmp_path, trace):
    lay = ModelLayout(DEPTH, MOE, E, K)
    map_DP = sglang_map(DEPTH, E, redundant=4, seed=2)
    sglang_per_token_dump(tmp_path / "tok.pt", trace.experts_TLk, trace.token_ids_T, MOE, DEPTH, map_DP)
    import torch
    phys = [r["global_physical_count"].numpy() for r in torch.load(tmp_path / "tok.pt")["records"]]
    sglang_per_pass_dump(tmp_path / "pass.pt", phys, map_DP)
    want_LE = np.stack([np.bincount(trace.experts_TLk[:, l].ravel(), minlength=E) for l in range(3)])
    per_pass = import_sglang_dump(tmp_path / "pass.pt", lay)
    assert isinstance(per_pass, ImportedCounts) and per_pass.mode == "per_pass"
    np.testing.assert_array_equal(per_pass.counts_LE, want_LE)
    full = np.zeros((2, DEPTH, E))
    full[0, list(MOE)], full[1, list(MOE)] = want_LE // 2, want_LE - want_LE // 2
    sglang_stat_dump(tmp_path / "stat.pt", full)
    np.testing.assert_array_equal(import_sglang_dump(tmp_path / "stat.pt", lay).counts_LE, want_LE)


def _cli_round_trip(tmp_path, capsys, model_dir, import_args):
    out = tmp_path / "trace.npz"
    assert moeyard_main(["profile", "--model", model_dir, "--out", str(out), *import_args]) == 0
    assert "wrote" in capsys.readouterr().out
    loc, pj, back = tmp_path / "loc.json", tmp_path / "p.json", tmp_path / "back.json"
    assert place_main(["place", "--trace", str(out), "--workers", "4", "--replicas", "1", "--time-limit", "2",
                       "--holdout", "0", "--out", str(pj), "--model", model_dir, "--export", "sglang",
                       "--export-out", str(loc)]) == 0
    assert "--ep-num-redundant-experts 4" in capsys.readouterr().out
    assert place_main(["place", "--placement", str(loc), "--workers", "4", "--model", model_dir,
                       "--out", str(back)]) == 0
    first, again = Placement.from_json(pj), Placement.from_json(back)
    assert first.replicated and (again.assignment, again.num_workers) == (first.assignment, first.num_workers)
    return load_trace(out)


def test_round_trip_sglang(tmp_path, capsys, model_dir, trace):
    map_DP = sglang_map(DEPTH, E, redundant=4, seed=3)
    sglang_per_token_dump(tmp_path / "d.pt", trace.experts_TLk, trace.token_ids_T, MOE, DEPTH, map_DP)
    t = _cli_round_trip(tmp_path, capsys, model_dir, ["--import", str(tmp_path / "d.pt"), "--format", "sglang"])
    np.testing.assert_array_equal(t.experts_TLk, trace.experts_TLk)


def test_round_trip_vllm(tmp_path, capsys, model_dir, trace):
    for i, a in enumerate(vllm_routed_experts(trace.experts_TLk, MOE, DEPTH, [300, 300])):
        np.save(tmp_path / f"req{i}.npy", a)
    t = _cli_round_trip(tmp_path, capsys, model_dir, ["--import", str(tmp_path / "req0.npy"),
                                                      str(tmp_path / "req1.npy"), "--format", "vllm"])
    np.testing.assert_array_equal(t.experts_TLk, trace.experts_TLk)


def test_count_only_import_cli(tmp_path, capsys, model_dir, trace):
    full = np.zeros((1, DEPTH, E))
    full[0, list(MOE)] = np.stack([np.bincount(trace.experts_TLk[:, l].ravel(), minlength=E) for l in range(3)])
    sglang_stat_dump(tmp_path / "stat.pt", full)
    out = tmp_path / "loads.npz"
    assert moeyard_main(["profile", "--model", model_dir, "--import", str(tmp_path / "stat.pt"),
                         "--out", str(out)]) == 0
    assert "count-only" in capsys.readouterr().out
    problem, tr = load_problem_file(out)
    assert tr is None and problem.meta["load_only"] and problem.aff_PEE.sum() == 0
    np.testing.assert_allclose(problem.load_LE * problem.meta["tokens"], full[0, list(MOE)])
    assert place_main(["place", "--trace", str(out), "--workers", "4", "--replicas", "1", "--balance", "0.3", "--time-limit", "2",
                       "--out", str(tmp_path / "p.json")]) == 0
    assert "expert loads only" in capsys.readouterr().out
    assert json.loads((tmp_path / "p.json").read_text())["solver"]["balance_met"]
    with pytest.raises(PlacementError, match="expert loads only"):
        load_trace(out)


# -- bad input ---------------------------------------------------------------------------------------------

def _one_line_error(capsys, rc, *needles):
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), err
    for n in needles:
        assert n in err[0], err[0]
    return err[0]


def test_vllm_layer_mismatch_names_both(tmp_path, capsys, model_dir, trace):
    np.save(tmp_path / "r.npy", np.zeros((5, 6, K), np.int32))
    rc = moeyard_main(["profile", "--model", model_dir, "--import", str(tmp_path / "r.npy"), "--format", "vllm",
                       "--out", str(tmp_path / "t.npz")])
    _one_line_error(capsys, rc, "6 layers x top-2", f"has {DEPTH} layers (3 MoE) x {E} experts")


def test_sglang_dump_mismatch_names_both(tmp_path, capsys, model_dir, trace):
    map_DP = sglang_map(DEPTH, 16, redundant=0, seed=5)     # recorded on a 16-expert model
    sglang_per_token_dump(tmp_path / "d.pt", trace.experts_TLk, trace.token_ids_T, MOE, DEPTH, map_DP)
    rc = moeyard_main(["profile", "--model", model_dir, "--import", str(tmp_path / "d.pt"),
                       "--out", str(tmp_path / "t.npz")])
    _one_line_error(capsys, rc, "16 experts per layer", f"{E} experts")


def test_trace_layout_mismatch_on_place(tmp_path, capsys, model_dir):
    from moeyard.placement import save_trace
    save_trace(synthetic_trace(50, 5, E, K), tmp_path / "t.npz")
    rc = place_main(["place", "--trace", str(tmp_path / "t.npz"), "--workers", "4", "--out",
                     str(tmp_path / "p.json"), "--model", model_dir])
    _one_line_error(capsys, rc, "has 5 MoE layers x 8 experts", "3 MoE")


def test_export_workers_not_dividing_names_numbers(tmp_path, capsys, model_dir):
    # 3 workers holding 8 experts each layer: 8 physical experts that 3 GPUs cannot share evenly
    Placement.from_array(np.tile(np.arange(E) % 3, (3, 1)), 3).to_json(tmp_path / "p.json")
    rc = place_main(["place", "--placement", str(tmp_path / "p.json"), "--model", model_dir,
                     "--export", "sglang", "--export-out", str(tmp_path / "x.json")])
    _one_line_error(capsys, rc, "3 workers do not divide the 8 physical experts")
    assert not (tmp_path / "x.json").exists()


def test_bad_sglang_location(tmp_path):
    lay = ModelLayout(DEPTH, MOE, E, K)
    good = sglang_location(Placement.from_array(np.tile(np.arange(E) % 4, (3, 1)), 4), lay)
    with pytest.raises(PlacementError, match="3 layers, but model has 4 layers"):
        read_sglang_location({"physical_to_logical_map": good["physical_to_logical_map"][:3]}, 4, lay)
    with pytest.raises(PlacementError, match="3 workers do not divide the 8 physical experts"):
        read_sglang_location(good, 3, lay)
    dup = [row[:] for row in good["physical_to_logical_map"]]
    dup[0][1] = dup[0][0]
    with pytest.raises(PlacementError, match="sits twice on GPU 0"):
        read_sglang_location({"physical_to_logical_map": dup}, 4, lay)
    with pytest.raises(PlacementError, match="logical_count file"):
        read_sglang_location({"logical_count": [[1]]}, 4, lay)


def test_sglang_own_loader(tmp_path, monkeypatch):
    """SGLang's own start-up code reads the exported file (skipped unless sglang imports; it does not install
    without a GPU, so the suite relies on test_sglang_location_parses_like_sglang)."""
    from types import SimpleNamespace
    el = pytest.importorskip("sglang.srt.eplb.expert_location")
    lay = ModelLayout(DEPTH, MOE, E, K)
    m = np.zeros((3, E, 4), dtype=bool)
    m[:, np.arange(E), np.arange(E) % 4] = True
    m[:, [0, 1, 2, 3], [1, 2, 3, 0]] = True          # one replica slot per worker: P = 12
    p = Placement.from_membership(m)
    path = tmp_path / "loc.json"
    from moeyard.placement.sglang_format import write_sglang_location
    redundant = write_sglang_location(p, lay, path)
    moe = SimpleNamespace(init_expert_location=str(path), ep_num_redundant_experts=redundant,
                          ep_dispatch_algorithm=None, moe_a2a_backend="none", ep_join_mode="none")
    monkeypatch.setattr(el, "get_exec", lambda: SimpleNamespace(moe=moe))
    monkeypatch.setattr(el, "get_parallel", lambda: SimpleNamespace(ep_size=4, elastic_ep_initial_size=None,
                                                                     nnodes=1, tp_size=4))
    monkeypatch.setattr(el, "get_device", lambda: SimpleNamespace(device="cpu"))
    monkeypatch.setattr(el.ModelConfigForExpertLocation, "from_model_config", staticmethod(
        lambda _: el.ModelConfigForExpertLocation(num_layers=DEPTH, num_logical_experts=E)))
    meta = el.compute_initial_expert_location_metadata(None, moe_ep_rank=0)
    assert meta.num_physical_experts == 12 and meta.num_layers == DEPTH
    for i, layer in enumerate(MOE):
        for e in range(E):
            assert sorted(s // 3 for s in meta.logical_to_all_physical(layer, e)) == list(p.workers_of(i, e))


def test_sglang_own_recorder(tmp_path, monkeypatch, trace):
    """A per_token dump written by SGLang's own gatherer and accumulator imports to the routed trace (skipped
    unless sglang imports)."""
    import torch
    from types import SimpleNamespace
    ed = pytest.importorskip("sglang.srt.eplb.expert_distribution")
    map_DP = sglang_map(DEPTH, E, redundant=4, seed=6)
    meta = SimpleNamespace(num_layers=DEPTH, num_physical_experts=map_DP.shape[1],
                           physical_to_logical_map=torch.from_numpy(map_DP))
    monkeypatch.setenv("SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR", str(tmp_path))
    monkeypatch.setattr(ed, "get_exec", lambda: SimpleNamespace(
        moe=SimpleNamespace(expert_distribution_recorder_mode="per_token"),
        overlap=SimpleNamespace(enable_two_batch_overlap=False)))
    monkeypatch.setattr(ed, "get_schedule", lambda: SimpleNamespace(chunked_prefill_size=128))
    monkeypatch.setattr(ed, "get_device_namespace", lambda: SimpleNamespace(device="cpu"))
    monkeypatch.setattr(ed, "reports_expert_balancedness", lambda: False)
    gatherer, acc = ed._DetailSinglePassGatherer(meta, 0), ed._DetailAccumulator(meta, 0)
    rng = np.random.default_rng(0)
    for p, idx in enumerate(np.array_split(np.arange(trace.num_tokens), 5)):
        gatherer.reset()
        gatherer.on_forward_pass_start(SimpleNamespace(
            input_ids=torch.tensor(trace.token_ids_T[idx]), positions=torch.arange(len(idx)),
            extend_seq_lens_cpu=[len(idx)], forward_mode=SimpleNamespace(value=1)))
        for i, layer in enumerate(MOE):   # the router's logical choice, dispatched to one of its replicas
            phys = [[rng.choice(np.flatnonzero(map_DP[layer] == e)) for e in row] for row in trace.experts_TLk[idx, i]]
            gatherer.on_select_experts(layer, torch.tensor(phys, dtype=torch.int32))
        acc.append(p, "primary", gatherer.collect(), {})
    acc.dump("file")
    (dump,) = tmp_path.glob("expert_distribution_recorder_*.pt")
    got = import_sglang_dump(dump, ModelLayout(DEPTH, MOE, E, K))
    np.testing.assert_array_equal(got.experts_TLk, trace.experts_TLk)
    np.testing.assert_array_equal(got.token_ids_T, trace.token_ids_T)
