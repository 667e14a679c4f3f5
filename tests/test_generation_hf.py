"""HFBackend: batched KV-cached decoding against a cache-free reference, seeded sampling, stops,
logprobs against a direct forward pass. Tiny random Llama (conftest ``tiny_chat_lm``); one test
marked `slow` runs the real bundled SmolLM2."""

import copy

import pytest
import torch

from potstill.errors import GenerationError
from potstill.generation.base import SamplingParams
from potstill.generation.hf import HFBackend, check_params, next_tokens, sample_seed

PROMPTS = [
    "Once upon a time",
    [{"role": "user", "content": "What is 2+2?"}],
    "x",
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}],
    "The quick brown fox jumps over the lazy dog, and then",
]


@pytest.fixture(scope="module")
def backend(tiny_chat_lm):
    model, tokenizer = tiny_chat_lm
    return HFBackend(model, tokenizer, batch_size=16)


@torch.inference_mode()
def greedy_reference(model, prompt_ids: list[int], steps: int, eos: int) -> list[int]:
    """Greedy decoding the slow way: no cache, no padding, the whole sequence every step."""
    ids = list(prompt_ids)
    for _ in range(steps):
        token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(token)
        if token == eos:
            break
    return ids[len(prompt_ids) :]


def ids_of(backend, completion) -> list[int]:
    return backend.tokenizer.convert_tokens_to_ids(completion.tokens)


# --- greedy decoding ---------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_batched_greedy_matches_one_at_a_time_and_the_reference(tiny_chat_lm, attn):
    model, tokenizer = tiny_chat_lm
    if attn != model.config._attn_implementation:
        model = copy.deepcopy(model)
        model.set_attn_implementation(attn)
    params = SamplingParams(temperature=0, max_new_tokens=12, logprobs=0)
    batched = HFBackend(model, tokenizer, batch_size=16).generate(PROMPTS, params)
    single = HFBackend(model, tokenizer, batch_size=1).generate(PROMPTS, params)
    backend = HFBackend(model, tokenizer)
    for prompt, [b], [s] in zip(PROMPTS, batched, single, strict=True):
        assert b.tokens == s.tokens and b.text == s.text
        expected = greedy_reference(
            model, backend.prompt_token_ids(prompt), 12, tokenizer.eos_token_id
        )
        assert ids_of(backend, b) == expected


def test_decoding_passes_the_cache_under_the_name_the_model_takes(tiny_chat_lm):
    """Later transformers 5 releases rename ``past_key_values`` to ``cache`` (a FutureWarning
    now, its removal announced for 5.40): the dynamic and the compiled path pass it under the
    model's own name, also through a PEFT wrapper."""
    import inspect
    import warnings

    from peft import LoraConfig, get_peft_model

    from potstill.lm import cache_kwarg

    model, tokenizer = tiny_chat_lm
    own = inspect.signature(type(model).forward).parameters
    expected = "cache" if "cache" in own else "past_key_values"
    assert cache_kwarg(model) == expected
    wrapped = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["q_proj"]))
    assert "cache" not in inspect.signature(type(wrapped).forward).parameters
    assert cache_kwarg(wrapped) == expected
    params = SamplingParams(temperature=0, max_new_tokens=4, logprobs=0)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values")  # the deprecation
        for compile_ in (False, True):
            HFBackend(model, tokenizer, batch_size=2, compile=compile_).generate(
                PROMPTS[:2], params
            )


def test_prompts_are_rendered_with_the_chat_template_or_taken_as_is(backend):
    chat = backend.prompt_token_ids([{"role": "user", "content": "hi"}])
    rendered = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert backend.tokenizer.decode(chat) == rendered
    assert backend.tokenizer.decode(backend.prompt_token_ids("hi")) == "hi"


def test_max_new_tokens_gives_length(backend):
    [[c]] = backend.generate(["abc"], SamplingParams(temperature=0, max_new_tokens=7))
    assert (c.finish_reason, c.num_tokens) == ("length", 7)


def test_eos_gives_stop_and_is_counted_but_not_written(tiny_chat_lm, backend):
    model, tokenizer = tiny_chat_lm
    [[free]] = backend.generate(
        ["abc"], SamplingParams(temperature=0, max_new_tokens=10, logprobs=0)
    )
    eos_model = copy.deepcopy(model)  # make the 4th greedy token an EOS via generation_config
    eos_model.generation_config.eos_token_id = [tokenizer.eos_token_id, ids_of(backend, free)[3]]
    [[c]] = HFBackend(eos_model, tokenizer).generate(
        ["abc"], SamplingParams(temperature=0, max_new_tokens=10, logprobs=0)
    )
    assert c.finish_reason == "stop"
    assert c.num_tokens == 4 and c.tokens == free.tokens[:4]
    assert c.text == tokenizer.decode(ids_of(backend, free)[:3], skip_special_tokens=True)


def test_stop_string_cuts_before_it(backend):
    [[free]] = backend.generate(["Hello"], SamplingParams(temperature=0, max_new_tokens=20))
    stop = free.text[8:10]
    [[c]] = backend.generate(
        ["Hello"], SamplingParams(temperature=0, max_new_tokens=20, stop=("zzzz", stop))
    )
    cut = free.text.find(stop)
    assert c.finish_reason == "stop"
    assert c.text == free.text[:cut]
    assert c.num_tokens == cut + len(stop)  # one character per token: up to the stop's end


# --- sampling ----------------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible_whatever_the_batch(tiny_chat_lm, backend):
    model, tokenizer = tiny_chat_lm
    params = SamplingParams(n=3, temperature=1.0, top_p=0.9, max_new_tokens=10, seed=7)
    first = backend.generate(PROMPTS, params)
    assert backend.generate(PROMPTS, params) == first
    # another batch size, the prompts reversed, a prompt alone: the same samples
    reordered = HFBackend(model, tokenizer, batch_size=2).generate(PROMPTS[::-1], params)[::-1]
    assert reordered == first
    assert backend.generate(PROMPTS[1:2], params) == first[1:2]
    # n samples differ from each other, and another seed gives other samples
    assert len({c.text for c in first[0]}) == 3
    assert backend.generate(PROMPTS, SamplingParams(**{**vars(params), "seed": 8})) != first


def test_next_tokens_samples_from_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(4000, 4)  # (4000, V)
    generators = [torch.Generator().manual_seed(i) for i in range(4000)]
    drawn = next_tokens(logits, 1.0, 1.0, generators)
    freq = torch.bincount(drawn, minlength=4) / 4000
    assert torch.allclose(freq, probs, atol=0.03)
    # top_p=0.75 keeps {0, 1} (0.5 < 0.75 <= 0.8), renormalised to 5/8 and 3/8
    generators = [torch.Generator().manual_seed(i) for i in range(4000)]
    drawn = next_tokens(logits, 1.0, 0.75, generators)
    freq = torch.bincount(drawn, minlength=4) / 4000
    assert torch.allclose(freq, torch.tensor([0.625, 0.375, 0, 0]), atol=0.03)
    # temperature 0 is argmax and draws nothing
    assert next_tokens(logits[:2], 0.0, 1.0, []).tolist() == [0, 0]


def test_sample_seed_depends_on_seed_prompt_and_index():
    base = sample_seed(0, [1, 2, 3], 0)
    assert base == sample_seed(0, [1, 2, 3], 0) and 0 <= base < 2**63
    assert len({base, sample_seed(1, [1, 2, 3], 0), sample_seed(0, [1, 2], 0)}) == 3
    assert base != sample_seed(0, [1, 2, 3], 1)
    assert sample_seed(0, [1, 23], 0) != sample_seed(0, [12, 3], 0)


# --- logprobs ----------------------------------------------------------------------------------


@torch.inference_mode()
def test_logprobs_match_a_direct_forward_pass(tiny_chat_lm, backend):
    model, tokenizer = tiny_chat_lm
    params = SamplingParams(n=2, temperature=0.7, max_new_tokens=8, seed=3, logprobs=3)
    results = backend.generate(PROMPTS[:2], params)
    for prompt, completions in zip(PROMPTS[:2], results, strict=True):
        prompt_ids = backend.prompt_token_ids(prompt)
        for c in completions:
            ids = ids_of(backend, c)
            assert len(ids) == len(c.token_logprobs) == len(c.top_logprobs) == c.num_tokens
            logits = model(torch.tensor([prompt_ids + ids])).logits[0, len(prompt_ids) - 1 : -1]
            logp = torch.log_softmax(logits.float(), dim=-1)  # (T, V) untempered
            expected = logp.gather(-1, torch.tensor(ids)[:, None]).squeeze(-1)
            assert torch.allclose(torch.tensor(c.token_logprobs), expected, atol=1e-5)
            for top, row in zip(c.top_logprobs, logp, strict=True):
                values, top_ids = row.topk(3)
                assert list(top) == tokenizer.convert_ids_to_tokens(top_ids.tolist())
                assert torch.allclose(torch.tensor(list(top.values())), values, atol=1e-5)


def test_no_logprobs_unless_asked(backend):
    [[c]] = backend.generate(["a"], SamplingParams(max_new_tokens=3))
    assert c.tokens is c.token_logprobs is c.top_logprobs is None


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"n": 0}, "n must be"),
        ({"temperature": -0.5}, "temperature must be >= 0"),
        ({"temperature": float("nan")}, "temperature must be >= 0"),
        ({"top_p": 0.0}, "top_p must be in"),
        ({"max_new_tokens": 0}, "max_new_tokens must be"),
        ({"stop": "\n"}, r"write stop=\('\\n',\)"),
        ({"stop": ("",)}, "non-empty"),
        ({"logprobs": 21}, "logprobs must be between 0 and 20"),
    ],
)
def test_bad_params_name_the_field(change, match):
    with pytest.raises(GenerationError, match=match):
        check_params(SamplingParams(**change), vocab_size=100)


def test_bad_prompts_say_what_a_prompt_is(tiny_chat_lm, backend):
    model, tokenizer = tiny_chat_lm
    with pytest.raises(GenerationError, match="wrap a single prompt in a list"):
        backend.generate("just a string", SamplingParams())
    with pytest.raises(GenerationError, match="a prompt is a string or a list of chat messages"):
        backend.generate([{"role": "user"}], SamplingParams())
    with pytest.raises(GenerationError, match="empty after tokenization"):
        backend.generate([""], SamplingParams())
    with pytest.raises(GenerationError, match="context of 512 tokens"):
        backend.generate(["a"], SamplingParams(max_new_tokens=600))
    no_template = copy.deepcopy(tokenizer)
    no_template.chat_template = None
    with pytest.raises(GenerationError, match="has no chat template"):
        HFBackend(model, no_template).generate(
            [[{"role": "user", "content": "hi"}]], SamplingParams()
        )


def test_closed_backend_refuses(tiny_chat_lm):
    backend = HFBackend(*tiny_chat_lm)
    backend.close()
    backend.close()
    with pytest.raises(GenerationError, match="closed"):
        backend.generate(["a"], SamplingParams())


# --- the real model ----------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_answers_and_batching_does_not_change_greedy_output():
    backend = HFBackend("bundled:smollm2-135m-instruct", batch_size=8)
    assert backend.teacher_id == "bundled:smollm2-135m-instruct"
    prompts = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "user", "content": "Write one short sentence about cats."}],
        "The capital of Italy is",
    ]
    params = SamplingParams(temperature=0, max_new_tokens=24)
    batched = backend.generate(prompts, params)
    single = HFBackend(backend.model, backend.tokenizer, batch_size=1).generate(prompts, params)
    assert batched == single
    assert "Paris" in batched[0][0].text
    assert batched[0][0].finish_reason == "stop"  # the instruct model ends its turn


def test_top_p_from_the_top_candidates_equals_the_full_sort(monkeypatch):
    # The sampler sorts only the top candidates unless they hold less than top_p of the mass;
    # with only 3 candidates some rows (flat ones) take the full-sort path and others (peaked
    # ones) do not: both must draw what a full stable sort of the row would.
    import potstill.generation.hf as hf

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 40, generator=g) * torch.tensor([0.1, 6.0, 0.1, 6.0, 1.0, 3.0])[:, None]
    seeds = range(6)

    def reference(row: torch.Tensor, draw: float) -> int:
        probs = torch.softmax(row / 0.9, -1)
        sorted_probs, order = probs.sort(descending=True, stable=True)
        kept = sorted_probs.masked_fill(sorted_probs.cumsum(-1) - sorted_probs >= 0.8, 0.0)
        cdf = kept.cumsum(-1)
        index = int(torch.searchsorted(cdf, torch.tensor([draw * float(cdf[-1])]), right=True))
        return int(order[min(index, len(cdf) - 1)])

    monkeypatch.setattr(hf, "_TOP_P_CANDIDATES", 3)
    for trial in range(20):
        gens = [torch.Generator().manual_seed(1000 * trial + s) for s in seeds]
        draws = [
            float(torch.rand((), generator=torch.Generator().manual_seed(1000 * trial + s)))
            for s in seeds
        ]
        got = next_tokens(logits, 0.9, 0.8, gens).tolist()
        assert got == [reference(logits[i], draws[i]) for i in range(6)]


# --- weight-first linears ----------------------------------------------------------------------


@pytest.mark.parametrize("rows", [1, 4, 16, 17])
@pytest.mark.parametrize("bias", [True, False])
def test_weight_first_linears_compute_the_same_product_and_restore_forward(rows, bias):
    from potstill.generation.hf import weight_first_linears

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 40, bias=bias), torch.nn.Linear(40, 7))
    x = torch.randn(rows, 1, 24)  # (B, T=1, H): a decode step
    expected = model(x)
    hooked = torch.nn.Linear(40, 7)
    hooked.forward = lambda t: torch.zeros(())  # an instance forward (as accelerate's hooks set)
    model.append(hooked)
    with weight_first_linears(model):
        assert all("forward" in m.__dict__ for m in model)
        got = model[:2](x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert "forward" not in model[0].__dict__ and model[2](x).shape == ()  # both restored
    with weight_first_linears(model.to(torch.bfloat16)):
        assert not any("forward" in m.__dict__ for m in model[:2])  # only fp32 layers are patched


# --- compiled decoding (static cache) -----------------------------------------------------------


@pytest.fixture(scope="module")
def compiled(tiny_chat_lm):
    """A compile=True backend over a private copy of the tiny model (its weights get changed)."""
    model, tokenizer = tiny_chat_lm
    return HFBackend(copy.deepcopy(model), tokenizer, batch_size=4, compile=True)


def test_compiled_decoding_matches_the_dynamic_path_and_the_reference(compiled):
    model, tokenizer = compiled.model, compiled.tokenizer
    eager = HFBackend(model, tokenizer, batch_size=4)
    greedy = SamplingParams(temperature=0, max_new_tokens=12, logprobs=0)
    got = compiled.generate(PROMPTS, greedy)  # batches of 4 and 1: two shapes
    for [c], [e] in zip(got, eager.generate(PROMPTS, greedy), strict=True):
        assert (c.tokens, c.text, c.finish_reason) == (e.tokens, e.text, e.finish_reason)
        assert c.token_logprobs == pytest.approx(e.token_logprobs, abs=1e-5)  # float round-off
    for prompt, [c] in zip(PROMPTS, got, strict=True):
        expected = greedy_reference(model, compiled.prompt_token_ids(prompt), 12, 2)
        assert ids_of(compiled, c) == expected
    sampled = SamplingParams(n=2, temperature=1.0, top_p=0.9, max_new_tokens=10, seed=3)
    assert compiled.generate(PROMPTS, sampled) == eager.generate(PROMPTS, sampled)
    assert compiled._static.compiled  # it did compile, and did not fall back


def test_compiled_decoding_keeps_finished_rows_aside(compiled):
    """Rows that stop early stay in the static batch, fed pads; the others are unaffected."""
    free = SamplingParams(temperature=0, max_new_tokens=10)
    ids = compiled.generate_ids([[5, 6, 7], [8, 9], [10, 11, 12, 13]], free)
    stop = ids[1][0][2]  # the second row's third token ends it (and any other row using it)
    model, tokenizer = compiled.model, compiled.tokenizer
    kw = {"batch_size": 4, "stop_token_ids": [stop]}
    stopping = HFBackend(model, tokenizer, compile=True, **kw)
    got = stopping.generate_ids([[5, 6, 7], [8, 9], [10, 11, 12, 13]], free)
    assert got == HFBackend(model, tokenizer, **kw).generate_ids(
        [[5, 6, 7], [8, 9], [10, 11, 12, 13]], free
    )
    assert len(got[1][0]) <= 3 and got[1][0][-1] == stop


def test_compiled_decoding_reads_the_current_weights(compiled):
    """The compiled graph takes the parameters as inputs: training the model in place between
    samplings (on-policy distillation) changes what is sampled, as it does eagerly."""
    greedy = SamplingParams(temperature=0, max_new_tokens=8)
    before = compiled.generate_ids([[5, 6, 7]], greedy)
    with torch.no_grad():
        compiled.model.lm_head.weight[:, :] = torch.randn_like(compiled.model.lm_head.weight)
    after = compiled.generate_ids([[5, 6, 7]], greedy)
    assert after != before
    assert after == HFBackend(compiled.model, compiled.tokenizer).generate_ids([[5, 6, 7]], greedy)


def test_compiled_decoding_falls_back_to_eager_with_a_warning(tiny_chat_lm, monkeypatch):
    from potstill.generation import static_decode

    model, tokenizer = tiny_chat_lm

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(static_decode.torch, "compile", lambda fn: broken)
    backend = HFBackend(model, tokenizer, compile=True)
    greedy = SamplingParams(temperature=0, max_new_tokens=6)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler.*compile=False"):
        got = backend.generate_ids([[5, 6, 7], [8, 9]], greedy)
    assert got == HFBackend(model, tokenizer).generate_ids([[5, 6, 7], [8, 9]], greedy)
    assert not backend._static.compiled


def test_compiled_decoding_of_a_sliding_window_model_matches_the_dynamic_path():
    """Gemma 3 mixes sliding-window and global layers, each with its own static cache layout;
    prompts and completions here run past its 8-token window."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=8,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        max_position_embeddings=256, eos_token_id=1, pad_token_id=0,
    )  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Gemma3ForCausalLM(config).eval()
        for p in model.parameters():  # peaked distributions: no greedy near-ties
            torch.nn.init.normal_(p, std=0.5)
    tokenizer = type("Tok", (), {"eos_token_id": 1, "pad_token_id": 0})()
    prompts = [list(range(5, 15)), [20, 21, 22], list(range(30, 36))]
    greedy = SamplingParams(temperature=0, max_new_tokens=20)
    got = HFBackend(model, tokenizer, compile=True)
    assert got.generate_ids(prompts, greedy) == HFBackend(model, tokenizer).generate_ids(
        prompts, greedy
    )
    assert got._static.compiled
