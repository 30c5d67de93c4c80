"""Two Ray nodes on one machine (ray.cluster_utils.Cluster): 4 workers, 2 per node, coherent scheme; same output
as local mode. (Also the 4-worker Ray lossless check: one cluster start serves both, to keep the suite short.)"""

import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from moeyard.runtime import LLM, SamplingParams  # noqa: E402

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
PROMPTS = [[5, 6, 7], list(range(30, 50)), [100]]


def test_two_nodes(tiny_ckpt):
    path, _ = tiny_ckpt("qwen2_moe")
    want = [o.token_ids for o in LLM(path, max_num_seqs=4).generate(prompt_token_ids=PROMPTS,
                                                                    sampling_params=GREEDY)]
    assert not ray.is_initialized()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"ep_slot": 2},
                                                      "include_dashboard": False})
    try:
        c.add_node(num_cpus=2, resources={"ep_slot": 2})
        c.wait_for_nodes()
        # join the running cluster by address (the driver is not part of it until then)
        llm = LLM(path, mode="ray", num_workers=4, placement="contiguous", ep_scheme="coherent", max_num_seqs=4,
                  ray_address=c.address, resources_per_worker={"ep_slot": 1})
        try:
            nodes = llm.engine.executor.group.node_ids
            assert len(set(nodes)) == 2 and all(nodes.count(n) == 2 for n in nodes), nodes
            got = [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)]
            assert got == want
            st = llm.stats()
            assert st["a2a_bytes"] > 0 and st["kv_bytes"] > 0 and 0 < st["local_fraction"] < 1
        finally:
            llm.close()
    finally:
        ray.shutdown()
        c.shutdown()
