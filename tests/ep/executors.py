"""Shared by the EP tests: generate with an LLM whose executor is swapped for a test-built one."""


def generate_with(llm, ex, prompts, params) -> list[list[int]]:
    """``llm``'s greedy token ids for ``prompts`` with ``ex`` as its executor (restored afterwards)."""
    old, llm.engine.executor = llm.engine.executor, ex
    try:
        return [o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=params)]
    finally:
        llm.engine.executor = old
