"""On-policy distillation: the student writes, the teacher grades every token.

Trained on prefixes the data or the teacher wrote, a student meets its own, messier prefixes only
at inference (exposure bias). GKD (Agarwal et al. 2024, "On-Policy Distillation of Language
Models: Learning from Self-Generated Mistakes") and MiniLLM (Gu et al. 2024) instead let the
student sample continuations and train it to match the teacher's full next-token distribution
on those very prefixes.

Sequences: a share λ (``on_policy.lmbda``) of micro-batches gets completions the student samples
for the batch's prompts (KV-cached, eval mode, ``on_policy.sampling_temperature``); the others
keep the data's completions, or, with ``on_policy.seq_kd``, get the teacher's own samples (written
only for those batches). A row's prompt is every token before its first supervised one. With
``on_policy.teacher_mix`` α > 0 the student's batches are drawn from (1 − α)·student + α·teacher,
token by token (MiniLLM's teacher-mixed sampling); the objective needs no importance weight, as
the mixture only picks the prefixes the full divergence is taken on. ``on_policy.credit=sequence``
also charges each sampled token the (length-normalised) reverse KL of the later tokens of its
sample, MiniLLM's long-term term (:func:`potstill.losses.later_mean`).
Teacher signal: the live teacher's distributions on those sequences, as in ``token_level``.
Objective: ``token_level``'s (this method holds one :class:`TokenLevel` and asks it for the loss),
fused and chunked, at ``loss.kd_temperature``; the default is
reverse KL at T=1 (GKD's and MiniLLM's choice), every divergence is selectable. Only completion
tokens are scored, up to and including each sample's first stop id (the tokenizer's and
generation config's EOS ids plus ``on_policy.stop_token_ids``); prompt tokens are masked.

With ``on_policy.verify`` (a :func:`potstill.verify.verify` mode) each student sample's final
answer is checked against its record's ``answer``; a rejected sample gives way to the data's own
completion for that row (the row is then off-policy), so the teacher grades only the student's
prefixes that reach a right answer. Measured why: reading a wrong sample in context, the teacher
mostly endorses its error (``benchmarks/teacher_on_errors.py``: at a repeated wrong result its top
token was the right one 0 times in 28), so unverified on-policy training teaches the student its
own mistakes. Rejection sampling of one's own outputs is STaR's and RAFT's filter (Zelikman et al.
2022; Dong et al. 2023); here it gates the student's samples before the teacher grades them.
Records without an answer keep their samples unchecked.

λ=0 without seq_kd is exactly ``token_level``: no sampling, the same batches, the same loss.

Which micro-batches are on-policy, and what is sampled, depends only on (train.seed, step, index),
so a resumed run draws what an uninterrupted one would. Under bf16 autocast (``train.precision``
bf16, or auto on bf16-capable hardware) the student samples from a bf16 twin of its weights,
refreshed before every sampling (measured 2.3× faster decoding than the fp32 weights on the 2-core
reference CPU with bf16 matrix units, 2.5× faster than fp32 weights under autocast). In fp32 it samples from itself, its linear layers
multiplying weight-first (``potstill.generation.hf.weight_first_linears``).
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from potstill.data import batch_prompts, completion_batch, cut_at_stop, tokenize_record, uncollate
from potstill.errors import DataError
from potstill.evaluate import distinct_n, own_sample_metrics, repetition
from potstill.generation.base import SamplingParams
from potstill.generation.hf import HFBackend
from potstill.lm import final_hidden, token_logprobs
from potstill.losses import LossSums, later_mean, reinforce, sampled_reverse_kl
from potstill.losses.objective import weighted_sums
from potstill.methods.base import Method
from potstill.methods.token_level import TokenLevel
from potstill.utils import autocast_dtype, pad_token_id
from potstill.verify import reference_of, verify

if TYPE_CHECKING:
    from potstill.recipe import Recipe

_EVAL_SEED = 0x5EED  # held-out samples are drawn alike at every evaluation


class Sampler:
    """Token-id sampling with a KV-cached :class:`HFBackend` over the model itself, or over a
    ``dtype`` twin of it; with ``sync`` (a model that keeps training) the twin's weights are
    copied from the model before each call, without it (a frozen teacher) only once."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        dtype: torch.dtype | None,
        sync: bool = True,
        guide: nn.Module | None = None,
        guide_weight: float = 0.0,
        **kw,
    ):
        self.source, self.sync = model, sync
        was_training = model.training
        self.twin = None
        if dtype is not None and any(p.dtype != dtype for p in model.parameters()):
            self.twin = copy.deepcopy(model).to(dtype).eval().requires_grad_(False)
        self.backend = HFBackend(  # puts its model in eval
            self.twin or model, tokenizer, guide=guide, guide_weight=guide_weight, **kw
        )
        model.train(was_training)
        self.stop_ids = self.backend.eos_ids

    @torch.no_grad()
    def sample(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        """One completion per prompt (token ids, cut after the first stop id). A student's
        parametrized weights (the QAT grid) are computed once per call, not once per decoded
        token: the weights do not change while it samples."""
        if self.twin is not None and self.sync:
            for dst, src in zip(self.twin.parameters(), self.source.parameters(), strict=True):
                dst.copy_(src)
        model = self.source if self.twin is None else self.twin
        was_training = model.training
        model.eval()  # no dropout while sampling (the twin always is)
        try:
            with parametrize.cached():
                out = self.backend.generate_ids(prompts, params)
        finally:
            model.train(was_training)
        return [cut_at_stop(samples[0], self.stop_ids) for samples in out]


@dataclass
class OnPolicy(Method, name="on_policy"):
    kd: TokenLevel = field(default_factory=lambda: TokenLevel(kind="reverse_kl"))  # the objective
    lmbda: float = 1.0
    seq_kd: bool = False
    sampling_temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    stop_token_ids: tuple[int, ...] = ()
    engine: str = "hf"
    compile_decode: bool = False  # on_policy.compile (``compile`` is loss.compile's)
    eval_samples: bool = True
    seed: int = 0
    sample_dtype: torch.dtype | None = None  # bf16 twin under bf16 training; None: the model
    estimator: str = "full"  # full | sampled (on_policy.estimator)
    credit: str = "token"  # token | sequence (on_policy.credit: MiniLLM's long-term term)
    length_norm: bool = True  # credit sequence: mean, not sum, of the later tokens' costs
    teacher_mix: float = 0.0  # α of MiniLLM's sampling mixture (1 − α)·student + α·teacher
    collapse_distinct2: float = 0.1  # the collapse guard (on_policy.collapse_*)
    collapse_repetition: float = 0.8
    collapse_patience: int = 3
    verify: str = "none"  # on_policy.verify: the verifier mode gating the student's samples
    cold_start: bool = False  # the student starts untrained (pruned or from a config)
    collapsed: int = 0  # student-sampled batches in a row that looked collapsed
    last_diversity: tuple[float, float] = (float("nan"), float("nan"))  # (distinct-2, seq-rep-4)
    samplers: dict[str, Any] = field(default_factory=dict, repr=False)  # built on first use
    # verify: what :func:`potstill.verify.verify` reads of every record read (answer, task,
    # question, metadata), found by the ``record_id`` each example carries (batch["record_id"]
    # (B, 1))
    references: list[dict[str, Any]] = field(default_factory=list, repr=False)
    tokenizer: Any = field(default=None, repr=False)  # bound: the student's, to read records
    stats: dict[str, Any] = field(default_factory=dict, repr=False)  # since the last pop_stats

    @property
    def needs_teacher(self) -> bool:
        return self.kd.needs_teacher

    def describe(self) -> str:
        mix = f"λ={self.lmbda}" + (", seq_kd" if self.seq_kd else "")
        warn = ""
        if self.cold_start and self.lmbda > 0:
            warn = (
                f"\nwarning: the student samples its own completions (λ={self.lmbda}) from an "
                "untrained start; such runs have collapsed into repeating a few tokens within "
                "steps. Warm-start it from a distilled student: student.model=RUN/model "
                "student.init=pretrained (e.g. the demo's runs/demo/kd/model)"
            )
        credit = ""
        if self.credit == "sequence":
            norm = "length-normalised" if self.length_norm else "summed"
            credit = f", later tokens' reverse KL as credit ({norm})"
        return (
            f"on_policy ({mix}, sampling T={self.sampling_temperature}, top_p={self.top_p}, "
            f"≤{self.max_new_tokens} new tokens, engine {self.engine}"
            + (", sampled reverse-KL estimator" if self.estimator == "sampled" else "")
            + credit
            + (f", teacher-mixed α={self.teacher_mix}" if self.teacher_mix else "")
            + (f", samples verified ({self.verify})" if self.verify != "none" else "")
            + (", compiled decoding" if self.compile_decode and self.engine == "hf" else "")
            + "); "
            + self.kd.describe().removeprefix("token_level: ")
            + warn
        )

    @classmethod
    def from_recipe(cls, r: Recipe, *, vocab_size: int | None) -> OnPolicy:
        o = r.on_policy
        return cls(
            kd=TokenLevel.from_recipe(r, vocab_size=vocab_size),
            lmbda=o.lmbda,
            seq_kd=o.seq_kd,
            sampling_temperature=o.sampling_temperature,
            top_p=o.top_p,
            max_new_tokens=o.max_new_tokens,
            stop_token_ids=tuple(o.stop_token_ids),
            engine=o.engine,
            compile_decode=o.compile,
            eval_samples=o.eval_samples,
            seed=r.train.seed,
            sample_dtype=autocast_dtype(r.train.precision),
            estimator=o.estimator,
            credit=o.credit,
            length_norm=o.length_norm,
            teacher_mix=o.teacher_mix,
            collapse_distinct2=o.collapse_distinct2,
            collapse_repetition=o.collapse_repetition,
            collapse_patience=o.collapse_patience,
            verify=o.verify,
            cold_start=r.student.init != "pretrained",
        )

    # --- records (verify) -----------------------------------------------------------------------

    @property
    def encodes_records(self) -> bool:  # type: ignore[override]
        """With verify, records are read here, to keep each one's reference answer."""
        return self.verify != "none"

    def bind(self, student_tokenizer: Any, teacher_tokenizer: Any) -> None:
        self.tokenizer = student_tokenizer

    def example(self, record: dict, *, max_length: int) -> tuple[Any, bool]:
        """The default reading of ``record``, carrying the index of its reference answer."""
        example, truncated = tokenize_record(record, self.tokenizer, max_length=max_length)
        self.references.append(reference_of(record))
        example.extra = {**(example.extra or {}), "record_id": [len(self.references) - 1]}
        return example, truncated

    def attach(self, student: nn.Module | None, teacher: nn.Module | None) -> None:
        """Refuse verify, before the first step, where no record read has an answer."""
        if self.verify != "none" and not any(ref["answer"] is not None for ref in self.references):
            raise DataError(
                "on_policy.verify checks each sample against its record's `answer`, but no "
                "record has one; train on records with an `answer` field (e.g. potstill "
                "generate's output on a reasoning-gym task) or set on_policy.verify=none"
            )

    def check(self, batch: dict[str, Tensor], completions: list[list[int]]) -> list[bool | None]:
        """The verifier's verdict on each row's sample (None: its record has no answer)."""
        if "record_id" not in batch:
            raise RuntimeError(
                "on_policy.verify: batches carry no record_id (records not read here)"
            )
        texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
        ids = batch["record_id"][:, 0].tolist()
        return [
            verify(text, mode=self.verify, **self.references[i]).correct
            for text, i in zip(texts, ids, strict=True)
        ]

    # --- sequences ------------------------------------------------------------------------------

    def sampler(
        self, who: str, model: nn.Module, tokenizer: Any, guide: nn.Module | None = None
    ) -> Sampler:
        """The sampler of ``who`` (student | teacher), mixing in ``guide`` (the teacher, at
        ``teacher_mix``) when one is given: a sampler of its own, so held-out samples stay the
        student's alone."""
        key = who if guide is None else f"{who}+guide"
        if key not in self.samplers:
            if self.engine == "vllm":
                from potstill.generation.vllm_engine import VLLMSampler

                self.samplers[key] = VLLMSampler(
                    model, tokenizer, stop_token_ids=self.stop_token_ids, sync=who == "student"
                )
            else:
                self.samplers[key] = Sampler(
                    model,
                    tokenizer,
                    dtype=self.sample_dtype,
                    sync=who == "student",
                    guide=guide,
                    guide_weight=self.teacher_mix if guide is not None else 0.0,
                    batch_size=64,
                    stop_token_ids=self.stop_token_ids,
                    compile=self.compile_decode,
                )
        return self.samplers[key]

    def params(self, *key: Any) -> SamplingParams:
        seed = random.Random(":".join(map(str, (self.seed, *key)))).getrandbits(62)
        return SamplingParams(
            temperature=self.sampling_temperature,
            top_p=self.top_p,
            max_new_tokens=self.max_new_tokens,
            seed=seed,
        )

    def sequences(
        self,
        batch: dict[str, Tensor],
        *,
        student: nn.Module,
        teacher: nn.Module | None,
        tokenizer: Any,
        step: int,
        index: int,
    ) -> dict[str, Tensor]:
        """The micro-batch ``index`` of optimizer step ``step``, its completions re-written by the
        student (a share λ of micro-batches), by the teacher (seq_kd) or kept from the data."""
        s = self.stats
        s["batches"] = s.get("batches", 0) + 1
        draw = random.Random(f"{self.seed}:{step}:{index}:lambda").random()
        if draw < self.lmbda:
            writer, model = "student", student
        elif self.seq_kd:
            writer, model = "teacher", teacher
        else:
            return batch  # off-policy: the data's own completions
        prompts = batch_prompts(batch, self.kd.ignore_index)
        t0 = time.perf_counter()
        guide = teacher if writer == "student" and self.teacher_mix else None
        completions = self.sampler(writer, model, tokenizer, guide).sample(
            prompts, self.params(step, index, writer)
        )
        s[f"{writer}_seconds"] = s.get(f"{writer}_seconds", 0.0) + time.perf_counter() - t0
        s[f"{writer}_batches"] = s.get(f"{writer}_batches", 0) + 1
        s.setdefault(f"{writer}_lengths", []).extend(len(c) for c in completions)
        kept: list[list[int] | None] = list(completions)
        if writer == "student":
            self.watch_diversity(completions)
            if self.verify != "none":
                verdicts = self.check(batch, completions)
                s["verified"] = s.get("verified", 0) + sum(v is not None for v in verdicts)
                s["verified_correct"] = s.get("verified_correct", 0) + sum(
                    v is True for v in verdicts
                )
                kept = [
                    None if v is False else c for v, c in zip(verdicts, completions, strict=True)
                ]
        out = completion_batch(
            prompts,
            kept,
            pad_token_id=pad_token_id(tokenizer),
            device=batch["input_ids"].device,
            rows=uncollate(batch, self.kd.ignore_index) if None in kept else None,
        )
        own = [writer == "student" and c is not None for c in kept]
        out["sampled_by_student"] = torch.tensor(own)  # (B,) on the host: read without a sync
        return out

    def watch_diversity(self, completions: list[list[int]]) -> None:
        """The collapse guard: distinct-2 and seq-rep-4 of one batch of the student's samples,
        logged, and counted as collapsed past ``on_policy.collapse_*`` (NaN, samples too short
        to hold an n-gram, never counts)."""
        d, r = distinct_n(completions, 2), repetition(completions, 4)
        self.stats.setdefault("student_distinct_2", []).append(d)
        self.stats.setdefault("student_repetition", []).append(r)
        collapsed = d < self.collapse_distinct2 or r > self.collapse_repetition  # NaN: False
        self.collapsed = self.collapsed + 1 if collapsed else 0
        self.last_diversity = (d, r)

    def stop_reason(self) -> str | None:
        if not self.collapse_patience or self.collapsed < self.collapse_patience:
            return None
        d, r = self.last_diversity
        return (
            f"the student's own samples collapsed: {self.collapsed} sampled batches in a row "
            f"below on_policy.collapse_distinct2={self.collapse_distinct2} distinct-2 or above "
            f"on_policy.collapse_repetition={self.collapse_repetition} repetition (last: "
            f"distinct-2 {d:.3f}, repetition {r:.3f}). Warm-start the student "
            "(student.model=RUN/model student.init=pretrained), lower train.lr or "
            "on_policy.lmbda, or set on_policy.collapse_patience=0 to only log it"
        )

    # --- objective ------------------------------------------------------------------------------

    def loss(
        self, student: nn.Module, teacher: nn.Module | None, batch: dict[str, Tensor]
    ) -> LossSums:
        labels = batch["labels"]  # (B, T)
        mask = labels != self.kd.ignore_index  # (B, T)
        student_h = final_hidden(student, batch)[mask]  # (N, H_s)
        rows = (
            batch.get("sampled_by_student", torch.tensor(False)).cpu().expand(len(labels))
        )  # (B,)
        own = bool(rows.any())
        teacher_h = None  # (N, H_t) a live teacher's, computed once for every term that needs it
        if not self.kd.sparse:
            with torch.no_grad():
                teacher_h = final_hidden(teacher, batch)[mask]
        lq = lp = None  # (N,) log q(y), log p(y) of the student's sampled tokens, where needed
        if own and (self.estimator == "sampled" or self.credit == "sequence"):
            lq, lp = self.own_logprobs(student, teacher, student_h, teacher_h, labels[mask])
        if self.estimator == "sampled" and own:
            sums = self.sampled_loss(lq, lp, mask, student_h)
        else:
            sums = self.full_loss(student, teacher, batch, mask, student_h, teacher_h, rows)
        if self.credit == "sequence":
            sums = self.later_credit(sums, lq, lp, mask, student_h)
        return sums

    def full_loss(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        batch: dict[str, Tensor],
        mask: Tensor,
        student_h: Tensor,
        teacher_h: Tensor | None,
        rows: Tensor,
    ) -> LossSums:
        """The divergence over the whole vocabulary at every scored position (``token_level``'s
        objective), and the reverse KL at T=1 on the student's own samples (the rows where the
        (B,) bool ``rows`` is True) for the log."""
        kd = self.kd
        labels = batch["labels"]  # (B, T)
        if kd.sparse:  # a served teacher scores the sampled tokens: its top-k per position
            ids, logprobs = kd.teacher_rows(batch, mask, "train")  # (N, k)

            def objective(h: Tensor, at: Any = slice(None), **override: float | str) -> LossSums:
                y = labels[mask][at]
                return kd.sparse_objective(student, h, y, ids[at], logprobs[at], **override)

        else:

            def objective(h: Tensor, at: Any = slice(None), **override: float | str) -> LossSums:
                return kd.objective(
                    student, teacher, h, teacher_h[at], labels[mask][at], **override
                )

        sums = objective(student_h)
        # The reverse KL at T=1 on the student's own samples, for the log: the soft term itself
        # when that is the objective on nothing but own samples, else one forward-only pass (no
        # gradient work) on those. A served teacher's log-probabilities are at
        # loss.kd_temperature: no T=1 figure unless T=1.
        watch = not (kd.sparse and kd.temperature != 1.0)
        if watch and bool(rows.any()):
            every = bool(rows.all())
            own_pos = rows.to(mask.device)[:, None].expand_as(mask)  # (B, T)
            if every and kd.kind == "reverse_kl" and kd.temperature == 1.0 and kd.soft_weight:
                watched = sums.terms["soft"]
            else:
                at = slice(None) if every else own_pos[mask]  # (N,) the own rows' positions
                with torch.no_grad():
                    watched = objective(
                        student_h.detach()[at],
                        at,
                        kind="reverse_kl",
                        temperature=1.0,
                        soft_weight=1.0,
                        hard_weight=0.0,
                    ).terms["soft"]
            self.watch_own_kl(watched, mask & own_pos)
        return sums

    def watch_own_kl(self, kl_sum: Tensor, mask: Tensor) -> None:
        s = self.stats  # tensors, read once per log row (no host sync per micro-batch)
        s["own_kl_sum"] = s.get("own_kl_sum", 0.0) + kl_sum.detach()
        s["own_kl_tokens"] = s.get("own_kl_tokens", 0) + mask.sum()

    def own_logprobs(
        self,
        student: nn.Module,
        teacher: nn.Module,
        student_h: Tensor,
        teacher_h: Tensor,
        y: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """(N,) log q(y) (differentiable) and (N,) log p(y) of the scored tokens (N,) y, from
        chunks of positions recomputed in the backward pass: no ``[tokens, vocab]`` logits kept."""
        lq = token_logprobs(student, student_h, y, self.kd.vocab_size)  # (N,)
        with torch.no_grad():
            lp = token_logprobs(teacher, teacher_h, y, self.kd.vocab_size)  # (N,)
        return lq, lp

    def sampled_loss(self, lq: Tensor, lp: Tensor, mask: Tensor, like: Tensor) -> LossSums:
        """``on_policy.estimator=sampled``: reverse KL estimated from the student's own sampled
        tokens alone (:func:`potstill.losses.sampled_reverse_kl`): both models' log-probabilities
        of those tokens, no divergence over the vocabulary. The soft term's value is the
        single-sample estimate of the reverse KL."""
        soft = sampled_reverse_kl(lq, lp).sum()
        self.watch_own_kl(soft, mask)
        return weighted_sums({"soft": soft}, {"soft": self.kd.soft_weight}, like=like)

    def later_credit(
        self, sums: LossSums, lq: Tensor | None, lp: Tensor | None, mask: Tensor, like: Tensor
    ) -> LossSums:
        """``on_policy.credit=sequence``: each sampled token's log-probability also carries, as
        a REINFORCE cost, the mean (``length_norm``) or sum of the sampled reverse KL of the
        tokens after it in its sample (:func:`potstill.losses.later_mean`), weighted like the
        soft term and logged as ``long``: MiniLLM's long-term term. Batches the student did not
        sample add a zero ``long``, so every micro-batch logs the same terms."""
        if lq is None:
            long = like.sum().float() * 0.0
        else:
            kl = torch.zeros(mask.shape, dtype=lq.dtype, device=lq.device)  # (B, T)
            kl = kl.masked_scatter(mask, (lq - lp).detach())  # (B, T) row-major, as [mask]
            later = later_mean(kl, mask, normalise=self.length_norm)[mask]  # (N,)
            long = reinforce(lq, later).sum()
        extra = weighted_sums({"long": long}, {"long": self.kd.soft_weight}, like=like)
        return LossSums(sums.loss + extra.loss, {**sums.terms, **extra.terms})

    def pop_stats(self) -> dict[str, float]:
        """Sequence statistics since the last call, for the training log."""
        s, self.stats = self.stats, {}
        out = {"on_policy_fraction": s.get("student_batches", 0) / max(s.get("batches", 0), 1)}
        for writer in ("student", "teacher"):
            lengths = s.get(f"{writer}_lengths")
            if lengths:
                out[f"{writer}_sample_len_mean"] = sum(lengths) / len(lengths)
                out[f"{writer}_sample_len_max"] = max(lengths)
                out[f"{writer}_sample_tokens_per_s"] = sum(lengths) / s[f"{writer}_seconds"]
        for key in ("student_distinct_2", "student_repetition"):
            finite = [v for v in s.get(key, []) if v == v]  # NaN: no n-gram in that batch
            if finite:
                out[key] = sum(finite) / len(finite)
        if "own_kl_tokens" in s and int(s["own_kl_tokens"]):
            out["own_reverse_kl"] = float(s["own_kl_sum"]) / int(s["own_kl_tokens"])
        if s.get("verified"):
            out["student_correct_share"] = s["verified_correct"] / s["verified"]
        return out

    # --- held-out -------------------------------------------------------------------------------

    def evaluate(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        batches: list[dict[str, Tensor]],
        tokenizer: Any,
    ) -> dict[str, float]:
        """Reverse KL to the teacher on the student's own samples of the held-out prompts, with a
        live teacher; with a served one, the held-out metrics on its top-k instead."""
        if self.kd.sparse:
            return self.kd.evaluate(student, teacher, batches, tokenizer)
        if not self.eval_samples or teacher is None:
            return {}
        sampler = self.sampler("student", student, tokenizer)
        return own_sample_metrics(
            student,
            teacher,
            batches,
            lambda prompts, i: sampler.sample(prompts, self.params("eval", i, _EVAL_SEED)),
            pad_token_id=pad_token_id(tokenizer),
            vocab_size=self.kd.vocab_size,
            autocast_dtype=self.sample_dtype,
        )
