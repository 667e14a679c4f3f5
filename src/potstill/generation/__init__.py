"""Teachers that write text: one :class:`Backend` interface, three implementations.

``hf`` (:mod:`potstill.generation.hf`, local transformers model, batched with a KV cache),
``openai`` (:mod:`potstill.generation.openai_http`, any OpenAI-compatible server) and ``vllm``
(:mod:`potstill.generation.vllm_engine`, optional). Implementations are imported where chosen, so
a missing optional package only matters to the run that asks for it.
"""

from potstill.errors import GenerationError
from potstill.generation.base import Backend, Completion, Prompt, SamplingParams

__all__ = ["Backend", "Completion", "GenerationError", "Prompt", "SamplingParams"]
