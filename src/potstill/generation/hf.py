"""A local Hugging Face causal LM as a text-writing teacher: batched, KV-cached, seeded sampling.

backend = HFBackend("bundled:smollm2-135m-instruct", batch_size=16)
[[completion]] = backend.generate([[{"role": "user", "content": "2+2?"}]], SamplingParams(temperature=0))

The decoding loop is written out here instead of calling ``model.generate`` so each sample owns
its random stream (reproducible whatever else shares its batch) and so logprobs come out of the
same forward pass that chose the token.

One batch, top to bottom:
  1) left-pad the prompts, positions count real tokens only (pads get position 0, as transformers'
     ``generate`` does), prefill each distinct prompt once and copy its KV cache to its n samples;
  2) pick the next token of every live row (greedy, or temperature + top-p with the row's own
     ``torch.Generator``), record logprobs from the untempered distribution;
  3) finish rows on EOS, a stop string or ``max_new_tokens``, drop finished rows from the cache;
  4) feed the live rows' new tokens back with the attention mask grown by one column.
With ``compile=True`` the steps run a ``torch.compile``d forward on fixed shapes instead: a static
cache, finished rows kept in the batch and ignored (``potstill.generation.static_decode``).

Reproducibility (what ``SamplingParams.seed`` does and does not promise):
  * each sample's generator is seeded from (seed, the prompt's token ids, the sample's index in
    0..n-1) and draws exactly one uniform number per generated token; its random stream therefore
    does not depend on batch_size, on the other prompts of the call or on their order;
  * so identical prompts in one call get identical samples, like a per-request seed in vLLM or the
    OpenAI API; ask for ``n`` > 1 to get different samples of one prompt;
  * the logits themselves can differ in the last bits between batch compositions (padding changes
    matmul shapes and blocking), devices and dtypes; a greedy near-tie or a uniform draw lying
    right on a cumulative-probability boundary can then pick another token and the sample
    diverges from there. Same inputs, device, dtype and batch_size on the CPU give bit-identical
    outputs; CUDA kernels are not always deterministic.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from potstill.errors import GenerationError
from potstill.generation.base import Completion, Prompt, SamplingParams
from potstill.generation.static_decode import StaticDecoder, StaticRows, prefill
from potstill.lm import cache_kwarg
from potstill.utils import default_device_type

MAX_LOGPROBS = 20  # top tokens per position; the OpenAI API's own limit


# ---------------------------------------------------------------------------------------------
# Pure helpers: parameters, seeds, sampling


def check_params(params: SamplingParams, vocab_size: int) -> None:
    """Raise GenerationError naming the bad field when ``params`` cannot be honoured."""
    if isinstance(params.n, bool) or not isinstance(params.n, int) or params.n < 1:
        raise GenerationError(
            f"n must be an integer >= 1 (completions per prompt); got {params.n!r}"
        )
    if not params.temperature >= 0:  # also catches NaN
        raise GenerationError(f"temperature must be >= 0 (0 = greedy); got {params.temperature!r}")
    if not 0 < params.top_p <= 1:
        raise GenerationError(f"top_p must be in (0, 1]; got {params.top_p!r}")
    if not isinstance(params.max_new_tokens, int) or params.max_new_tokens < 1:
        raise GenerationError(
            f"max_new_tokens must be an integer >= 1; got {params.max_new_tokens!r}"
        )
    if isinstance(params.stop, str):
        raise GenerationError(
            f"stop must be a tuple of strings, not one string; write stop=({params.stop!r},)"
        )
    if any(not isinstance(s, str) or not s for s in params.stop):
        raise GenerationError(f"stop strings must be non-empty strings; got {params.stop!r}")
    if params.logprobs is not None and not 0 <= params.logprobs <= min(MAX_LOGPROBS, vocab_size):
        raise GenerationError(
            f"logprobs must be between 0 and {min(MAX_LOGPROBS, vocab_size)} (top tokens per "
            f"position) or None; got {params.logprobs!r}"
        )


def sample_seed(seed: int, prompt_ids: Sequence[int], sample_index: int) -> int:
    """The seed of one sample's generator: a hash of (seed, prompt tokens, sample index).

    Hashing the prompt's tokens rather than its position in the call keeps a sample's random
    stream the same whatever other prompts are generated alongside it.
    """
    key = f"{seed}|{sample_index}|{','.join(map(str, prompt_ids))}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1  # < 2**63


def next_tokens(
    logits: Tensor, temperature: float, top_p: float, generators: Sequence[torch.Generator]
) -> Tensor:
    """The next token of each row: argmax when temperature is 0, else a (top-p) sample.

    logits: (B, V) float32; generators: one per row, each consumes exactly one uniform number.
    Sampling is by inverse CDF, so the choice is a deterministic function of the row's
    probabilities and its one draw. Without top-p the CDF runs in vocabulary order. With top-p
    it runs over the tokens sorted by probability, keeping the smallest prefix whose mass reaches
    top_p (Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration"); the most likely
    token is always kept. Sorting a whole [B, V] row costs more than a decode step of a small
    model, so the sort covers the top 256 tokens, and the whole row only where those hold less
    than top_p of the mass.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)  # (B,)
    probs = torch.softmax(logits / temperature if temperature != 1 else logits, dim=-1)  # (B, V)
    draws = torch.stack([torch.rand((), generator=g) for g in generators]).to(probs.device)  # (B,)
    if top_p >= 1:
        return _inverse_cdf(probs, draws)
    top_probs, order = probs.topk(min(_TOP_P_CANDIDATES, probs.shape[-1]), dim=-1)  # (B, K)
    short = top_probs.sum(-1) < top_p  # (B,) rows whose nucleus reaches past the top K
    if short.any():
        full_probs, full_order = probs[short].sort(dim=-1, descending=True, stable=True)
        chosen = torch.empty_like(draws, dtype=torch.long)
        chosen[short] = full_order.gather(-1, _nucleus_index(full_probs, top_p, draws[short]))[:, 0]
        keep = ~short
        if keep.any():
            chosen[keep] = order[keep].gather(
                -1, _nucleus_index(top_probs[keep], top_p, draws[keep])
            )[:, 0]
        return chosen
    return order.gather(-1, _nucleus_index(top_probs, top_p, draws)).squeeze(-1)  # (B,)


_TOP_P_CANDIDATES = 256


def _inverse_cdf(probs: Tensor, draws: Tensor) -> Tensor:
    """(B, V) weights (not necessarily normalised), (B,) uniforms -> (B,) column of each draw."""
    cdf = probs.cumsum(dim=-1)  # (B, V)
    targets = draws * cdf[:, -1]  # (B,) a point in [0, total mass)
    index = torch.searchsorted(cdf, targets[:, None], right=True)  # (B, 1) first cdf > target
    return index.clamp_max(cdf.shape[-1] - 1).squeeze(-1)  # float round-off at the very top


def _nucleus_index(sorted_probs: Tensor, top_p: float, draws: Tensor) -> Tensor:
    """(B, K) probabilities in descending order -> (B, 1) position of each row's top-p sample."""
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # (B, K)
    kept = sorted_probs.masked_fill(mass_before >= top_p, 0.0)  # the first one always stays
    return _inverse_cdf(kept, draws)[:, None]


def first_stop(text: str, stop: Sequence[str]) -> int:
    """The index in ``text`` where the earliest stop string begins, or -1."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(hits) if hits else -1


# ---------------------------------------------------------------------------------------------
# Decoding a few rows on a CPU


FEW_ROWS = 16  # at most this many rows take the weight-first product (measured: faster up to 16)


def _weight_first_linear(layer: nn.Linear, x: Tensor) -> Tensor:
    """``layer(x)`` of an fp32 CPU layer, computed as ``weight @ x.T`` when ``x`` holds at most
    FEW_ROWS fp32 rows.

    A decode step multiplies a few rows by every weight matrix. MKL's fp32 GEMM is slow for that
    shape as ``x @ weight.T`` and ~3x faster as ``weight @ x.T`` (the same product, transposed;
    still compute-bound at ~30 GFLOP/s on two AVX2 cores, not bandwidth-bound). Measured on a
    2-core AVX2 CPU at 4 rows: SmolLM2's head (49,152 x 576) 21.3 -> 7.5 ms, its 576 -> 1536 and
    1536 -> 576 projections 1.4-1.7x faster; at 32 rows the two are even. Results agree with ``F.linear`` up to fp32 round-off.
    """
    rows = x.reshape(-1, x.shape[-1])  # (M, H)
    if rows.shape[0] > FEW_ROWS or rows.dtype != torch.float32:
        return nn.functional.linear(x, layer.weight, layer.bias)
    out = (layer.weight @ rows.T).T  # (V, H) @ (H, M) -> (M, V)
    if layer.bias is not None:
        out = out + layer.bias
    return out.reshape(*x.shape[:-1], out.shape[-1])


@contextlib.contextmanager
def weight_first_linears(model: nn.Module):
    """Within the block, the model's fp32 CPU ``nn.Linear`` layers multiply few-row inputs
    weight-first (see :func:`_weight_first_linear`); their own ``forward`` is back afterwards.
    Layers in other dtypes or on other devices are left alone (no per-call detour)."""
    layers = [
        m
        for m in model.modules()
        if type(m) is nn.Linear
        and m.weight.dtype == torch.float32
        and m.weight.device.type == "cpu"
    ]
    saved = [m.__dict__.get("forward") for m in layers]  # e.g. an accelerate hook's forward
    for m in layers:
        # One wrapper per layer for its lifetime: a compiled decode step (static_decode) guards
        # on the identity of each layer's forward, and a new object per call would recompile.
        if "_weight_first_forward" not in m.__dict__:
            m._weight_first_forward = functools.partial(_weight_first_linear, m)
        m.forward = m._weight_first_forward
    try:
        yield model
    finally:
        for m, forward in zip(layers, saved, strict=True):
            if forward is None:
                del m.forward
            else:
                m.forward = forward


# ---------------------------------------------------------------------------------------------
# The KV cache of one batch of rows, grown token by token


class _GrowingRows:
    """One batch's rows over a ``DynamicCache`` that grows a column per step and drops finished
    rows (``static_decode.StaticRows`` is the fixed-shape counterpart, same calls).

    Each distinct prompt is prefilled once (``static_decode.prefill``) and its cache copied to
    its rows.
    """

    def __init__(
        self,
        model: nn.Module,
        prompts: list[list[int]],  # one per row (rows of one prompt repeat it)
        pad_id: int,
        logits_to_keep: bool,
    ) -> None:
        self.model = model
        distinct: dict[tuple[int, ...], int] = {}
        for ids in prompts:
            distinct.setdefault(tuple(ids), len(distinct))
        self.cache = DynamicCache(config=model.config)
        self.cache_kwarg = cache_kwarg(model)  # the keyword forward takes it under
        self.logits, self.attention, self.next_position = prefill(
            model, [list(p) for p in distinct], pad_id, self.cache, logits_to_keep=logits_to_keep
        )  # (P, V), (P, L), (P, 1)
        if len(distinct) < len(prompts):  # give every row its prompt's cache
            which = torch.tensor([distinct[tuple(p)] for p in prompts], device=self.logits.device)
            self.keep(which)  # (P, ...) -> (B, ...)
            self.logits = self.logits[which]

    def keep(self, index: Tensor) -> None:
        """Keep the rows at ``index`` (positions in the current batch order), in that order."""
        self.cache.batch_select_indices(index)
        self.attention, self.next_position = self.attention[index], self.next_position[index]

    def step(self, chosen: Tensor) -> Tensor:
        """Feed each row its token (B,); -> the rows' next logits (B, V) float32."""
        rows = len(chosen)
        self.attention = torch.cat([self.attention, self.attention.new_ones((rows, 1))], dim=-1)
        out = self.model(
            input_ids=chosen[:, None],  # (B, 1)
            attention_mask=self.attention,  # (B, L + step + 1)
            position_ids=self.next_position,  # (B, 1)
            use_cache=True,
            **{self.cache_kwarg: self.cache},
        )
        self.next_position = self.next_position + 1
        return out.logits[:, -1].float()  # (B, V)


# ---------------------------------------------------------------------------------------------
# The backend


@dataclass
class _Row:
    """One sample being generated: which prompt, and what it has produced so far."""

    prompt: int  # index into the prompts of the call
    sample: int  # 0..n-1
    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[tuple[float, list[int], list[float]]] = field(default_factory=list)


def _keeps_last_logits(model: nn.Module) -> bool:
    """Whether the model's forward can compute the last position's logits alone."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


class HFBackend:
    """A local Hugging Face causal LM behind the ``Backend`` protocol.

    ``model`` is a model name for ``potstill.models.load_model`` (``bundled:...``, a directory, a
    .gguf file, a Hub id), loaded in ``dtype``; or an already built ``nn.Module`` (used as is:
    ``dtype`` is ignored, it is moved only when ``device`` is given). ``device`` defaults to CUDA
    when available, else the CPU. ``batch_size`` rows (prompt x sample) are decoded together.

    String prompts are tokenised as they are, with the tokenizer's special tokens (a BOS where the
    tokenizer adds one); chat prompts are rendered with the tokenizer's chat template and
    ``add_generation_prompt=True`` (the template writes any BOS itself). This matches what vLLM's
    completions and chat endpoints do.

    Logprobs are taken under the model's own, untempered distribution: ``log_softmax(logits)`` in
    float32, before temperature and top-p (vLLM's default "raw" logprobs). ``tokens`` and the
    logprob lists cover every sampled token, the final EOS included; ``text`` leaves out special
    tokens and is cut before a stop string; ``num_tokens`` counts the sampled tokens.

    ``compile=True`` runs each decode step through ``torch.compile`` on a static KV cache
    (``potstill.generation.static_decode``): 30 -> 14-16 ms a step for SmolLM2 pruned to 6
    layers, 4 rows, on a 2-core CPU, after a compilation of ~25-35 s (5-7 s with inductor's
    cache warm). The same distribution as the default path; tokens differ only where float
    round-off in the logits moves a choice (see Reproducibility).

    One call at a time: the backend holds no lock (``potstill.serve`` puts one around it).
    """

    def __init__(
        self,
        model: str | nn.Module,
        tokenizer=None,
        *,
        dtype: str = "float32",
        batch_size: int = 16,  # rows per forward pass; memory grows with it and the longest prompt
        teacher_id: str | None = None,
        trust_remote_code: bool = False,
        allow_pickle: bool = False,  # a pickle-only checkpoint (it can run code as it loads)
        device: str | None = None,
        stop_token_ids: Sequence[int] = (),  # extra ids that end a completion, besides EOS
        compile: bool = False,  # torch.compile the decode step (static cache; see static_decode)
        guide: nn.Module | None = None,  # a second model of the same vocabulary mixed in …
        guide_weight: float = 0.0,  # … with this weight α: sample from (1 − α)·q + α·p_guide
    ) -> None:
        from potstill.models import load_model, load_tokenizer

        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise GenerationError(f"batch_size must be an integer >= 1; got {batch_size!r}")
        if isinstance(model, str):
            name = model
            model = load_model(
                name, dtype=dtype, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle
            )
            device = device or default_device_type()
        elif isinstance(model, nn.Module):
            name = getattr(getattr(model, "config", None), "name_or_path", "") or ""
        else:
            raise GenerationError(
                f"model must be a model name or a torch nn.Module; got {type(model).__name__}"
            )
        if tokenizer is None:
            if not name:
                raise GenerationError(
                    "cannot find the tokenizer of a model built in memory (its config has no "
                    "name_or_path); pass tokenizer=..."
                )
            tokenizer = load_tokenizer(name, trust_remote_code=trust_remote_code)
        if device is not None:
            model = model.to(device)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.teacher_id = teacher_id or name or type(model).__name__
        self.device = next(model.parameters()).device
        self.eos_ids = eos_token_ids(model, tokenizer) | frozenset(map(int, stop_token_ids))
        self.pad_id = _first_not_none(tokenizer.pad_token_id, *sorted(self.eos_ids), 0)
        head = model.get_output_embeddings()
        self.vocab_size = head.weight.shape[0] if head is not None else model.config.vocab_size
        self._keeps_last_logits = _keeps_last_logits(model)
        self._token_text: dict[int, str] = {}  # id -> decoded text, for logprobs
        self.compile = bool(compile)
        self._static: StaticDecoder | None = None  # built on the first compiled batch
        if not 0.0 <= guide_weight <= 1.0 or (guide_weight > 0) != (guide is not None):
            raise GenerationError(
                f"guide_weight must be in [0, 1] and above 0 exactly when a guide model is given; "
                f"got {guide_weight} with {'a' if guide is not None else 'no'} guide"
            )
        self.guide = guide.eval() if guide is not None else None
        self._guide_keeps_last = guide is not None and _keeps_last_logits(guide)
        self.guide_weight = float(guide_weight)

    # --- the Backend protocol -----------------------------------------------------------------

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[list[Completion]]:
        """``params.n`` completions for each prompt, in prompt order (see the class doc)."""
        if self.model is None:
            raise GenerationError("this HFBackend was closed; create a new one to generate")
        if isinstance(prompts, str | dict):
            raise GenerationError(
                "prompts must be a list of prompts (strings or chat message lists); wrap a "
                "single prompt in a list: generate([prompt], params)"
            )
        check_params(params, self.vocab_size)
        encoded = [self.prompt_token_ids(p) for p in prompts]
        out: list[list[Completion]] = [[] for _ in prompts]
        for row in self._decode(encoded, params):  # rows are in (prompt, sample) order
            out[row.prompt].append(self._completion(row, params))
        return out

    def generate_ids(
        self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams
    ) -> list[list[list[int]]]:
        """``params.n`` sampled token-id lists for each prompt given as token ids (no template, no
        tokenization: on-policy distillation trains on exactly the tokens the model chose).

        A list ends with the EOS (or extra stop id) that finished it, or at ``max_new_tokens``;
        stop strings and logprobs are not used here. Seeding is as in :meth:`generate`.
        """
        if self.model is None:
            raise GenerationError("this HFBackend was closed; create a new one to generate")
        check_params(params, self.vocab_size)
        if params.stop or params.logprobs is not None:
            raise GenerationError("generate_ids takes neither stop strings nor logprobs")
        encoded = [list(map(int, ids)) for ids in prompt_ids]
        if any(not ids for ids in encoded):
            raise GenerationError("a prompt has no tokens; give at least one token of prompt")
        out: list[list[list[int]]] = [[] for _ in encoded]
        for row in self._decode(encoded, params):
            out[row.prompt].append(row.ids)
        return out

    def _decode(self, encoded: list[list[int]], params: SamplingParams) -> list[_Row]:
        """Decode every (prompt, sample) row; the rows come back in (prompt, sample) order."""
        limit = getattr(self.model.config, "max_position_embeddings", None)
        for i, ids in enumerate(encoded):
            if limit and len(ids) + params.max_new_tokens > limit:
                raise GenerationError(
                    f"prompt {i} has {len(ids)} tokens; with max_new_tokens="
                    f"{params.max_new_tokens} it exceeds the model's context of {limit} tokens: "
                    "shorten the prompt or lower max_new_tokens"
                )
        rows = [
            _Row(prompt=i, sample=s, prompt_ids=ids)
            for i, ids in enumerate(encoded)
            for s in range(params.n)
        ]
        # Longest prompts first, samples of one prompt side by side: little padding per batch.
        ordered = sorted(rows, key=lambda r: -len(r.prompt_ids))
        with weight_first_linears(self.model):
            for start in range(0, len(ordered), self.batch_size):
                self._generate_batch(ordered[start : start + self.batch_size], params)
        return rows

    def close(self) -> None:
        """Release the model (idempotent); later ``generate`` calls raise GenerationError."""
        self.model = self._static = None

    # --- prompts ----------------------------------------------------------------------------

    def prompt_token_ids(self, prompt: Prompt) -> list[int]:
        """The token ids the model is conditioned on for ``prompt`` (also the usage count)."""
        tok = self.tokenizer
        if isinstance(prompt, str):
            ids = tok(prompt, add_special_tokens=True)["input_ids"]
        elif isinstance(prompt, list) and all(
            isinstance(m, dict) and "role" in m and "content" in m for m in prompt
        ):
            if not prompt:
                raise GenerationError("a chat prompt has no messages; give at least one message")
            if not getattr(tok, "chat_template", None):
                raise GenerationError(
                    f"the tokenizer of {self.teacher_id} has no chat template, so chat prompts "
                    "cannot be rendered; pass plain string prompts or a tokenizer with a template"
                )
            text = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
            ids = tok(text, add_special_tokens=False)["input_ids"]
        else:
            raise GenerationError(
                "a prompt is a string or a list of chat messages "
                f"[{{'role': ..., 'content': ...}}, ...]; got {_describe(prompt)}"
            )
        if not ids:
            raise GenerationError(
                "a prompt is empty after tokenization (and the tokenizer adds no BOS); "
                "give at least one token of prompt"
            )
        return list(ids)

    # --- decoding ---------------------------------------------------------------------------

    @torch.inference_mode()
    def _generate_batch(self, rows: list[_Row], params: SamplingParams) -> None:
        """Decode ``rows`` together, filling in their ids, logprobs and finish reasons."""
        if self.compile:  # 1) prefill
            if self._static is None:
                self._static = StaticDecoder(self.model)
            kv = StaticRows(
                self._static,
                [r.prompt_ids for r in rows],
                params.max_new_tokens,
                self.pad_id,
                self._keeps_last_logits,
            )
        else:
            kv = _GrowingRows(
                self.model, [r.prompt_ids for r in rows], self.pad_id, self._keeps_last_logits
            )
        guide = None
        if self.guide is not None:  # the mixed-in model keeps a cache of its own, row for row
            guide = _GrowingRows(
                self.guide, [r.prompt_ids for r in rows], self.pad_id, self._guide_keeps_last
            )
        logits = kv.logits  # (B, V) float32
        if guide is not None:
            logits = self._mixed(logits, guide.logits, params.temperature)
        live = list(rows)  # the rows still decoding, in batch order
        generators = [
            torch.Generator().manual_seed(sample_seed(params.seed, r.prompt_ids, r.sample))
            for r in rows
        ]
        for step in range(params.max_new_tokens):
            # 2) choose, and score under the untempered distribution
            chosen = next_tokens(logits, params.temperature, params.top_p, generators)  # (B,)
            if params.logprobs is not None:
                logp = torch.log_softmax(logits, dim=-1)  # (B, V) float32
                chosen_logp = logp.gather(-1, chosen[:, None]).squeeze(-1)  # (B,)
                top_logp, top_ids = logp.topk(params.logprobs, dim=-1)  # (B, k), (B, k)
                lp_rows = zip(
                    chosen_logp.tolist(), top_ids.tolist(), top_logp.tolist(), strict=True
                )  # host sync, once per step
                for row, (lp, ids, lps) in zip(live, lp_rows, strict=True):
                    row.logprobs.append((lp, ids, lps))
            # 3) finish rows
            for row, token in zip(live, chosen.tolist(), strict=True):  # host sync per step
                row.ids.append(token)
                if token in self.eos_ids:
                    row.finish_reason = "stop"
                elif params.stop and self._find_stop(row, params.stop) >= 0:
                    row.finish_reason = "stop"  # the text is cut in _completion
                elif step + 1 == params.max_new_tokens:
                    row.finish_reason = "length"
            keep = [j for j, row in enumerate(live) if row.finish_reason is None]
            if not keep:
                break
            if len(keep) < len(live):
                index = torch.tensor(keep, device=chosen.device)
                kv.keep(index)
                if guide is not None:
                    guide.keep(index)
                chosen = chosen[index]
                live = [live[j] for j in keep]
                generators = [generators[j] for j in keep]
            # 4) one more token for the live rows
            logits = kv.step(chosen)  # (B, V)
            if guide is not None:
                logits = self._mixed(logits, guide.step(chosen), params.temperature)

    def _mixed(self, logits: Tensor, guide_logits: Tensor, temperature: float) -> Tensor:
        """The log of the mixture (1 − α)·softmax(logits / T) + α·softmax(guide_logits / T) over
        the vocabulary both score (MiniLLM's teacher-mixed sampling, Gu et al. 2024), scaled so
        that :func:`next_tokens` at ``temperature`` samples the mixture itself. Greedy (T=0)
        takes the mixture of the untempered distributions. (B, V) -> (B, v), float32."""
        v = min(logits.shape[-1], guide_logits.shape[-1])
        t = temperature or 1.0
        a = self.guide_weight
        own = math.log1p(-a) if a < 1 else -math.inf
        mixed = torch.logaddexp(
            torch.log_softmax(logits[:, :v] / t, dim=-1) + own,
            torch.log_softmax(guide_logits[:, :v] / t, dim=-1) + math.log(a),
        )  # (B, v)
        return mixed * t

    def _find_stop(self, row: _Row, stop: Sequence[str]) -> int:
        # The whole completion is decoded again each step: a stop string can span tokens, and
        # a token can complete a character begun by the one before (byte-level BPE).
        return first_stop(self._text(row.ids), stop)  # O(T) per step: fine for T in the 1000s

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _token(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.tokenizer.decode([token_id])
        return text

    def _completion(self, row: _Row, params: SamplingParams) -> Completion:
        ended_by_eos = bool(row.ids) and row.ids[-1] in self.eos_ids
        text = self._text(row.ids[:-1] if ended_by_eos else row.ids)  # the EOS is not text
        if row.finish_reason == "stop" and params.stop:
            cut = first_stop(text, params.stop)
            text = text[:cut] if cut >= 0 else text
        completion = Completion(text=text, finish_reason=row.finish_reason, num_tokens=len(row.ids))
        if params.logprobs is not None:
            completion.tokens = [self._token(t) for t in row.ids]
            completion.token_logprobs = [lp for lp, _, _ in row.logprobs]
            # Two ids can decode to the same text (e.g. halves of one UTF-8 character): the
            # first, more likely one is kept.
            completion.top_logprobs = [
                _first_wins((self._token(t), lp) for t, lp in zip(ids, lps, strict=True))
                for _, ids, lps in row.logprobs
            ]
        return completion


def _first_wins(pairs) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in pairs:
        out.setdefault(key, value)
    return out


def eos_token_ids(model: nn.Module, tokenizer) -> frozenset[int]:
    """Every id that ends a completion: the tokenizer's EOS and the generation config's."""
    ids = {tokenizer.eos_token_id}
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(config_eos if isinstance(config_eos, list | tuple) else [config_eos])
    return frozenset(i for i in ids if i is not None)


def _first_not_none(*values):
    return next(v for v in values if v is not None)


def _describe(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"
