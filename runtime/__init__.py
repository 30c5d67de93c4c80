"""moeyard.runtime: requests, sampling, continuous batching, KV cache, the engine step, the LLM API, the CLI."""

from .llm import LLM, RequestOutput
from .async_llm import AsyncLLM, StreamOutput
from .sampling import RequestError, SamplingParams

__all__ = ["LLM", "AsyncLLM", "StreamOutput", "SamplingParams", "RequestOutput", "RequestError"]
