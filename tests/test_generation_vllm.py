"""The vLLM offline backend: the install hint when vLLM is missing, the mapping of parameters
and outputs against a stand-in ``vllm`` module (runs anywhere), and a real engine on the bundled
SmolLM2 (only with vLLM and a CUDA GPU)."""

import sys
import types
from dataclasses import dataclass, field

import pytest

from potstill.errors import GenerationError
from potstill.generation.base import SamplingParams
from potstill.generation.vllm_engine import VLLMBackend, vllm_sampling_kwargs

CHAT = [{"role": "user", "content": "hi"}]


def test_missing_vllm_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now fails as if not installed
    with pytest.raises(GenerationError) as caught:
        VLLMBackend("some/model")
    assert "pip install 'potstill[vllm]' (needs a CUDA GPU)" in str(caught.value)


# ---------------------------------------------------------------------------------------------
# A stand-in for the parts of vllm the backend touches (documented field names only)


@dataclass
class FakeLogprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class FakeCompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[dict[int, FakeLogprob]] | None = None


@dataclass
class FakeRequestOutput:
    outputs: list[FakeCompletionOutput]


@dataclass
class FakeLLM:
    kwargs: dict
    calls: list = field(default_factory=list)

    def _answer(self, kind, prompts, sampling_params, use_tqdm):
        self.calls.append((kind, prompts, sampling_params.kwargs, use_tqdm))
        results = []
        for prompt in prompts:
            label = prompt if isinstance(prompt, str) else prompt[-1]["content"]
            outputs = []
            for i in range(sampling_params.kwargs["n"]):
                # Two tokens, 7 and 8; at each position the sampled token ranks 3rd, below the
                # top 2 (ids 1 and 2), so vLLM reports 3 entries for logprobs=2.
                logprobs = [
                    {
                        1: FakeLogprob(-0.1, 1, "a"),
                        2: FakeLogprob(-0.2, 2, "b"),
                        tok: FakeLogprob(-3.0, 3, f"t{tok}"),
                    }
                    for tok in (7, 8)
                ]
                outputs.append(
                    FakeCompletionOutput(i, f"{kind}:{label}:{i}", [7, 8], "length", logprobs)
                )
            results.append(FakeRequestOutput(outputs[::-1]))  # out of order on purpose
        return results

    def generate(self, prompts, sampling_params=None, use_tqdm=True):
        return self._answer("generate", prompts, sampling_params, use_tqdm)

    def chat(self, messages, sampling_params=None, use_tqdm=True):
        return self._answer("chat", messages, sampling_params, use_tqdm)


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM = lambda **kwargs: FakeLLM(kwargs)
    module.SamplingParams = lambda **kwargs: types.SimpleNamespace(kwargs=kwargs)
    monkeypatch.setitem(sys.modules, "vllm", module)
    return module


def test_engine_kwargs_and_teacher_id(fake_vllm):
    backend = VLLMBackend("m", dtype="bfloat16", max_model_len=512)
    assert backend._llm.kwargs == {"model": "m", "dtype": "bfloat16", "max_model_len": 512}
    assert backend.teacher_id == "m"
    assert VLLMBackend("m", teacher_id="vllm:m").teacher_id == "vllm:m"


def test_mixed_batch_is_routed_and_kept_in_order(fake_vllm):
    backend = VLLMBackend("m")
    out = backend.generate(["a", CHAT, "b"], SamplingParams(n=2))
    assert [[c.text for c in cs] for cs in out] == [
        ["generate:a:0", "generate:a:1"],
        ["chat:hi:0", "chat:hi:1"],
        ["generate:b:0", "generate:b:1"],
    ]
    kinds = [(kind, prompts) for kind, prompts, _, _ in backend._llm.calls]
    assert kinds == [("generate", ["a", "b"]), ("chat", [CHAT])]
    assert all(use_tqdm is False for *_, use_tqdm in backend._llm.calls)
    assert out[0][0].finish_reason == "length"
    assert out[0][0].num_tokens == 2
    assert out[0][0].tokens is None  # no logprobs unless asked for


def test_sampling_params_mapping():
    params = SamplingParams(
        n=3, temperature=0.0, top_p=0.5, max_new_tokens=9, stop=("x",), seed=4, logprobs=2
    )
    assert vllm_sampling_kwargs(params) == {
        "n": 3,
        "temperature": 0.0,
        "top_p": 0.5,
        "max_tokens": 9,
        "stop": ["x"],
        "seed": 4,
        "logprobs": 2,
    }
    assert vllm_sampling_kwargs(SamplingParams())["stop"] is None


def test_logprobs_take_the_sampled_token_and_the_top_k(fake_vllm):
    ((completion,),) = VLLMBackend("m").generate(["a"], SamplingParams(logprobs=2))
    assert completion.tokens == ["t7", "t8"]
    assert completion.token_logprobs == [-3.0, -3.0]
    assert completion.top_logprobs == [{"a": -0.1, "b": -0.2}] * 2  # the sampled one ranks 3rd


def test_bad_prompt_and_closed_backend(fake_vllm):
    backend = VLLMBackend("m")
    with pytest.raises(GenerationError, match="prompt 0 must be a string"):
        backend.generate([42], SamplingParams())
    backend.close()
    backend.close()
    with pytest.raises(GenerationError, match="closed"):
        backend.generate(["a"], SamplingParams())


# ---------------------------------------------------------------------------------------------
# The real engine


@pytest.fixture(scope="session")  # session scope: runs before the session-scoped model fixture
def vllm_on_gpu():
    """Skips unless vLLM is installed and a CUDA GPU is visible (before any model is loaded)."""
    vllm = pytest.importorskip("vllm")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("vLLM needs a CUDA GPU")
    return vllm


@pytest.mark.slow
def test_real_engine_on_smollm2(vllm_on_gpu, smollm2_dir):
    backend = VLLMBackend(
        str(smollm2_dir),
        dtype="float16",
        gpu_memory_utilization=0.3,
        max_model_len=512,
        enforce_eager=True,  # no CUDA-graph capture: a faster start for a short test
    )
    try:
        params = SamplingParams(n=2, temperature=0.8, max_new_tokens=8, seed=1, logprobs=3)
        out = backend.generate(["The capital of France is", CHAT], params)
        assert [len(cs) for cs in out] == [2, 2]
        for completion in (c for cs in out for c in cs):
            assert completion.finish_reason in ("stop", "length")
            assert 0 < completion.num_tokens <= 8
            assert len(completion.tokens) == len(completion.token_logprobs) == completion.num_tokens
            assert all(len(top) <= 3 for top in completion.top_logprobs)
        again = backend.generate(["The capital of France is", CHAT], params)
        assert [c.text for cs in again for c in cs] == [c.text for cs in out for c in cs]
    finally:
        backend.close()
