"""lm-evaluation-harness against ``moeyard serve`` (a real uvicorn server on loopback) through its
``local-completions`` model, on local task files written here: one ``generate_until`` task and one
``multiple_choice`` (loglikelihood) task. Its loglikelihoods must equal the engine's own prompt logprobs and its
generations the engine's greedy output."""

from __future__ import annotations

import json
import os

import pytest

lm_eval = pytest.importorskip("lm_eval")

from moeyard.runtime import LLM, AsyncLLM, SamplingParams  # noqa: E402
from serving import start_server  # noqa: E402

GEN = [{"question": "Hello, world! How are", "answer": "you"},
       {"question": "The quick brown fox", "answer": "jumps"},
       {"question": "Numbers: 0 1 2 3", "answer": "4"}]
MC = [{"question": "The quick brown fox jumps over the", "choices": [" lazy dog", " red car", " blue sky"], "label": 0},
      {"question": "Hello, world! How are", "choices": [" you today", " they", " we"], "label": 0},
      {"question": "A mixture of experts routes every", "choices": [" token", " car", " fish"], "label": 0}]


def _tasks(d) -> str:
    for name, rows in (("gen", GEN), ("mc", MC)):
        with open(os.path.join(d, f"{name}.jsonl"), "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    with open(os.path.join(d, "moeyard_gen.yaml"), "w") as f:
        f.write(f"""task: moeyard_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {os.path.join(d, 'gen.jsonl')}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
""")
    with open(os.path.join(d, "moeyard_mc.yaml"), "w") as f:
        f.write(f"""task: moeyard_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {os.path.join(d, 'mc.jsonl')}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
""")
    return d


def test_lm_eval_local_completions(serve_ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    llm = LLM(serve_ckpt, max_num_seqs=4, max_model_len=1024)
    allm = AsyncLLM(llm)
    srv, th, base = start_server(allm)
    try:
        tm = TaskManager(include_path=_tasks(str(tmp_path)), include_defaults=False)
        out = simple_evaluate(
            model="local-completions",
            model_args=(f"model=tiny,base_url={base}/v1/completions,tokenizer={serve_ckpt},"
                        "tokenizer_backend=huggingface,tokenized_requests=True,num_concurrent=1,max_retries=1,"
                        "max_length=1024"),
            tasks=["moeyard_gen", "moeyard_mc"], task_manager=tm, log_samples=True, limit=None,
            bootstrap_iters=0)
    finally:
        srv.should_exit = True
        th.join(20)
    res = out["results"]
    assert "exact_match,none" in res["moeyard_gen"] and "acc,none" in res["moeyard_mc"]
    tok = llm.tokenizer
    # multiple choice: lm-eval's loglikelihood of each choice == the engine's prompt logprobs of its tokens
    checked = 0
    for smp in out["samples"]["moeyard_mc"]:
        doc = smp["doc"]
        for choice, resp in zip(doc["choices"], smp["resps"]):
            ll = resp[0][0]
            ctx = tok.encode(doc["question"])
            full = tok.encode(doc["question"] + choice)
            o = llm.generate(prompt_token_ids=[full], sampling_params=SamplingParams(
                max_tokens=1, temperature=0, prompt_logprobs=0))[0]
            n_cont = len(full) - len(ctx)
            want = sum(r.logprob for r in o.prompt_logprobs[-n_cont:])
            assert abs(ll - want) < 1e-3, (doc, choice, ll, want)
            checked += 1
    assert checked == 9
    # generate_until: lm-eval's generations == the engine's greedy continuation, cut at the stop string
    for smp in out["samples"]["moeyard_gen"]:
        q = smp["doc"]["question"]
        o = llm.generate([q], SamplingParams(max_tokens=8, temperature=0, stop=["\n"]))[0]
        assert smp["resps"][0][0] == o.text
    llm.close()
