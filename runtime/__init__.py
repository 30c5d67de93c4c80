"""moeyard.runtime: requests, sampling, continuous batching, KV cache, the engine step, the LLM API, the CLI."""

from .llm import LLM, RequestOutput
from .sampling import RequestError, SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "RequestError"]
