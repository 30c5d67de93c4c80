import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from tiny_models import build_hf, save_hf  # noqa: E402

SHARED = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared"))


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """tiny_ckpt(arch, fused=False, sharded=False) -> (path, hf_model); built once per session."""
    cache = {}

    def make(arch: str, fused: bool = False, sharded: bool = False):
        key = (arch, fused, sharded)
        if key not in cache:
            model = build_hf(arch)
            path = str(tmp_path_factory.mktemp(f"{arch}{'_fused' if fused else ''}{'_sharded' if sharded else ''}"))
            save_hf(model, path, fused=fused, max_shard_size="200KB" if sharded else None)
            cache[key] = (path, model)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def shared_dir():
    if not os.path.isdir(SHARED):
        pytest.skip(f"../shared is absent ({SHARED}); this test needs the shared data")
    return SHARED
