"""A teacher run in-process by vLLM's offline engine (``vllm.LLM``): the fastest way to generate
a data set on a CUDA GPU without starting a server.

backend = VLLMBackend("Qwen/Qwen3-8B", dtype="bfloat16", gpu_memory_utilization=0.85)
completions = backend.generate(prompts, SamplingParams(n=4, temperature=0.8, logprobs=5))

Plain-string prompts go through ``LLM.generate`` (continued verbatim); chat prompts through
``LLM.chat``, which applies the model's own chat template. A batch may mix both. Any keyword
not named here goes to ``vllm.LLM`` unchanged (``tensor_parallel_size``, ``max_model_len``,
``enforce_eager``, ...). vLLM is an optional dependency: it is imported when the backend is
built, never at ``import potstill``.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Sequence
from typing import Any

from potstill.errors import GenerationError
from potstill.generation.base import Completion, Prompt, SamplingParams

INSTALL_HINT = "pip install 'potstill[vllm]' (needs a CUDA GPU)"


def vllm_sampling_kwargs(params: SamplingParams) -> dict[str, Any]:
    """Keyword arguments for ``vllm.SamplingParams``."""
    return {
        "n": params.n,
        "temperature": params.temperature,  # 0 = greedy in vLLM too
        "top_p": params.top_p,
        "max_tokens": params.max_new_tokens,
        "stop": list(params.stop) or None,
        "seed": params.seed,
        "logprobs": params.logprobs,  # None = off; k = the sampled token plus the top k
    }


def completion_from_vllm(output: Any, top_k: int | None) -> Completion:
    """One ``vllm.CompletionOutput`` as a ``Completion``.

    vLLM gives, per generated position, a dict ``token_id -> Logprob`` holding the top ``k``
    tokens *and* the sampled one (so ``k + 1`` entries when the sampled token ranks below
    ``k``). The sampled token's entry fills ``tokens``/``token_logprobs``; the ``k`` most
    likely entries fill ``top_logprobs``.
    """
    token_ids = list(output.token_ids)
    tokens = token_logprobs = top_logprobs = None
    if top_k is not None and output.logprobs is not None:
        tokens, token_logprobs, top_logprobs = [], [], []
        for token_id, position in zip(token_ids, output.logprobs, strict=True):
            sampled = position[token_id]
            tokens.append(sampled.decoded_token or "")
            token_logprobs.append(float(sampled.logprob))
            best = sorted(position.values(), key=lambda lp: lp.logprob, reverse=True)[:top_k]
            top_logprobs.append({lp.decoded_token or "": float(lp.logprob) for lp in best})
    return Completion(
        text=output.text,
        # "stop" covers EOS and stop strings; "length" is max_tokens; anything else ("abort")
        # only happens when the engine is shut down mid-request.
        finish_reason="length" if output.finish_reason == "length" else "stop",
        num_tokens=len(token_ids),
        tokens=tokens,
        token_logprobs=token_logprobs,
        top_logprobs=top_logprobs,
    )


def _import_vllm():
    try:
        import vllm
    except ModuleNotFoundError:
        raise GenerationError(f"the vLLM backend needs vLLM: {INSTALL_HINT}") from None
    except ImportError as err:  # installed, but its compiled parts do not load here
        raise GenerationError(
            f"vLLM is installed but does not import ({err}); it needs a CUDA GPU and a matching "
            f"torch build. Reinstall with {INSTALL_HINT}, or use the hf or openai backend"
        ) from None
    return vllm


class VLLMBackend:
    """vLLM's offline engine as a teacher. Loads the model on construction (GPU memory is held
    until ``close()``)."""

    def __init__(
        self,
        model: str,
        *,
        dtype: str = "auto",  # "auto" = what the checkpoint stores; "bfloat16", "float16", ...
        teacher_id: str | None = None,  # written into every record; defaults to `model`
        **engine_kwargs: Any,  # passed to vllm.LLM as is
    ):
        self._vllm = _import_vllm()
        self.model = model
        self.teacher_id = teacher_id or model
        self._llm = self._vllm.LLM(model=model, dtype=dtype, **engine_kwargs)

    def __repr__(self) -> str:
        return f"VLLMBackend(model={self.model!r})"

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[list[Completion]]:
        """``params.n`` completions per prompt, in prompt order (one engine call per kind)."""
        if self._llm is None:
            raise GenerationError("this VLLMBackend is closed; create a new one")
        text_at, chat_at = [], []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                text_at.append(i)
            elif isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
                chat_at.append(i)
            else:
                raise GenerationError(
                    f"prompt {i} must be a string or a list of {{'role', 'content'}} messages; "
                    f"got {type(prompt).__name__}"
                )
        sampling = self._vllm.SamplingParams(**vllm_sampling_kwargs(params))

        results: list[list[Completion] | None] = [None] * len(prompts)
        if text_at:
            outputs = self._llm.generate(
                [prompts[i] for i in text_at], sampling_params=sampling, use_tqdm=False
            )
            for i, request in zip(text_at, outputs, strict=True):
                results[i] = self._completions(request, params)
        if chat_at:
            outputs = self._llm.chat(
                [prompts[i] for i in chat_at], sampling_params=sampling, use_tqdm=False
            )
            for i, request in zip(chat_at, outputs, strict=True):
                results[i] = self._completions(request, params)
        return results  # type: ignore[return-value]  # every slot is filled above

    @staticmethod
    def _completions(request: Any, params: SamplingParams) -> list[Completion]:
        outputs = sorted(request.outputs, key=lambda o: o.index)
        if len(outputs) != params.n:
            raise GenerationError(f"vLLM returned {len(outputs)} completions, asked for {params.n}")
        return [completion_from_vllm(o, params.logprobs) for o in outputs]

    def close(self) -> None:
        """Drop the engine and give its GPU memory back; safe to call twice."""
        if getattr(self, "_llm", None) is None:
            return
        self._llm = None
        gc.collect()
        torch = sys.modules.get("torch")  # vLLM imported it; never import it just to clean up
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()


class VLLMSampler:
    """On-policy sampling with vLLM for a model that keeps training (``on_policy.engine=vllm``).

    The engine runs in this process beside the trainer (as TRL's "colocate" mode does): it loads
    a snapshot of ``model`` saved to a temporary directory, and with ``sync`` the current weights
    are pushed into it before every call (the student changes at every step; a teacher does not).
    Prompts go in as token ids and the sampled token ids come back, so training scores exactly the
    tokens the engine chose. Each prompt gets its own seed, derived as the hf sampler's is.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        stop_token_ids: Sequence[int] = (),
        sync: bool = True,
        gpu_memory_utilization: float = 0.3,  # the trainer shares the GPU
        **engine_kwargs: Any,
    ):
        import tempfile

        self._vllm = _import_vllm()
        self.model, self.sync = model, sync
        self._snapshot = tempfile.TemporaryDirectory(prefix="potstill-vllm-")
        model.save_pretrained(self._snapshot.name, safe_serialization=True)
        tokenizer.save_pretrained(self._snapshot.name)
        self._llm = self._vllm.LLM(
            model=self._snapshot.name,
            dtype="bfloat16",
            gpu_memory_utilization=gpu_memory_utilization,
            **engine_kwargs,
        )
        from potstill.generation.hf import eos_token_ids

        self.stop_ids = eos_token_ids(model, tokenizer) | frozenset(map(int, stop_token_ids))

    def push_weights(self) -> None:
        """Load the model's current weights into the engine."""
        weights = list(self.model.state_dict().items())
        if hasattr(self._llm, "apply_model"):  # vLLM >= 0.8: runs on the engine's own model
            self._llm.apply_model(lambda engine_model: engine_model.load_weights(weights))
        else:  # older engines: the model behind the driver worker
            engine = self._llm.llm_engine.model_executor.driver_worker.model_runner.model
            engine.load_weights(weights)

    def sample(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        from potstill.data import cut_at_stop
        from potstill.generation.hf import sample_seed

        if self.sync:
            self.push_weights()
        requests = [{"prompt_token_ids": list(p)} for p in prompts]
        sampling = [
            self._vllm.SamplingParams(
                **{
                    **vllm_sampling_kwargs(params),
                    "n": 1,
                    "seed": sample_seed(params.seed, p, 0),
                    "stop_token_ids": sorted(self.stop_ids),
                }
            )
            for p in prompts
        ]
        outputs = self._llm.generate(requests, sampling_params=sampling, use_tqdm=False)
        return [cut_at_stop(list(o.outputs[0].token_ids), self.stop_ids) for o in outputs]
