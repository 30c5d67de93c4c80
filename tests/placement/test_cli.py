import json
import subprocess
import sys

import numpy as np

from moeyard.placement import save_trace
from moeyard.placement.cli import main
from moeyard.placement.synthetic import synthetic_trace


def _run(*args):
    return subprocess.run([sys.executable, "-m", "moeyard.placement.cli", *args], capture_output=True, text=True,
                          timeout=120)


def test_bad_trace_exit_code_2_one_line(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, experts=np.zeros((4, 3), np.int16), num_experts=8)
    r = _run("place", "--trace", str(bad), "--workers", "2", "--out", str(tmp_path / "p.json"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "'experts' must have shape" in lines[0]
    assert "Traceback" not in r.stderr


def test_workers_not_dividing_experts(tmp_path, capsys):
    t = tmp_path / "t.npz"
    save_trace(synthetic_trace(100, 3, 8, 2), t)
    assert main(["place", "--trace", str(t), "--workers", "3", "--out", str(tmp_path / "p.json")]) == 2
    assert "error: workers (3) must divide experts (8)" in capsys.readouterr().err


def test_place_and_simulate(tmp_path, capsys):
    t = tmp_path / "t.npz"
    save_trace(synthetic_trace(400, 3, 8, 2, seed=1), t)
    out = tmp_path / "placement.json"
    assert main(["place", "--trace", str(t), "--workers", "2", "--time-limit", "3", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for name in ("affinity (ours)", "round_robin", "contiguous", "eplb", "exflow", "gap"):
        assert name in text
    d = json.loads(out.read_text())
    assert d["num_workers"] == 2 and d["num_layers"] == 3 and d["num_experts"] == 8 and d["bound"] <= d["objective"]
    assert main(["simulate", "--trace", str(t), "--placement", str(out), "--workers", "2", "--nodes", "1",
                 "--intra-gbps", "100", "--inter-gbps", "10"]) == 0
    assert "per decode step" in capsys.readouterr().out
