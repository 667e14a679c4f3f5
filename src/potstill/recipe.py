"""Typed recipes: YAML files plus ``key=value`` overrides, validated before anything loads.

A recipe picks a *method* (which sequences, which teacher signal, which objective) and may override
any part of it. Every field is documented once, here; ``potstill keys`` prints these docs.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from potstill.errors import RecipeError
from potstill.methods.registry import METHODS, method_info


def doc(text: str, default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    """A dataclass field that carries its one-line documentation."""
    if default is not dataclasses.MISSING:
        kw["default"] = default
    return field(metadata={"doc": text}, **kw)


@dataclass
class TeacherSpec:
    model: str | None = doc(
        "Hub id, local directory, .gguf file, or bundled:smollm2-135m-instruct", None
    )
    dtype: str = doc(
        "weights dtype: float32 | bfloat16 | float16 | auto; on CPU keep float32 (with bf16 autocast, faster than bf16 weights)",
        "float32",
    )
    trust_remote_code: bool = doc("run model code from the Hub repo (only if you trust it)", False)
    allow_pickle: bool = doc(
        "load a checkpoint saved only as a pickle (pytorch_model.bin), which can run code as it "
        "loads (only if you trust it); otherwise weights load from safetensors or GGUF only",
        False,
    )
    source: str = doc(
        "where the teacher's signal comes from: live (the model, in this process) | cache (its "
        "top-k log-probabilities from teacher.cache, written by `potstill cache`; method "
        "token_level) | server (an OpenAI-compatible server at teacher.server_url scores each "
        "batch: its top-k log-probabilities; token_level and on_policy). cache and server load "
        "no teacher model",
        "live",
    )
    cache: str | None = doc(
        "the teacher cache folder: `potstill cache` writes it, teacher.source=cache reads it",
        None,
    )
    server_url: str | None = doc(
        "teacher.source=server: the server's /v1 URL, e.g. http://127.0.0.1:8000/v1 (potstill "
        "serve); it must score given tokens (echo, max_tokens=0, token ids); teacher.model is "
        "the served model's name",
        None,
    )
    api_key_env: str | None = doc(
        "teacher.source=server: NAME of the environment variable holding the API key", None
    )
    server_concurrency: int = doc("teacher.source=server: requests in flight at once", 4)
    server_timeout: float = doc("teacher.source=server: seconds per request", 120.0)


@dataclass
class CacheSpec:
    """``potstill cache``: the teacher's top-k log-probabilities on the recipe's data."""

    top_k: int = doc(
        "log-probabilities kept per position (the rest of the distribution is one 'other' "
        "event), also what a served teacher is asked for; bytes per position: top_k × (2 for "
        "ids under 65,536 entries, else 4, + the dtype's)",
        16,
    )
    dtype: str = doc("stored log-probability dtype: float16 | bfloat16 | float32", "float16")
    coverage: float | None = doc(
        "keep per position only the fewest of the top_k entries whose probability mass reaches "
        "this (at least 1, e.g. 0.95): near-certain positions take one or two entries, uncertain "
        "ones up to top_k; null keeps top_k everywhere",
        None,
    )
    tail_samples: int = doc(
        "tokens drawn per position from the teacher's distribution beyond the kept entries (2 "
        "bytes each + 2 for the tail's entropy); forward-KL training then also learns the "
        "shape of the teacher's tail, and its loss is an unbiased estimate of the dense KL",
        0,
    )
    shard_positions: int = doc(
        "positions per shard (a shard closes at the first batch past it); a kill loses at most "
        "one shard's work",
        262_144,
    )
    batch_size: int = doc("sequences per teacher forward pass", 8)


@dataclass
class LoraSpec:
    """``student.lora``: train low-rank adapters (PEFT LoRA) instead of the student's weights."""

    r: int = doc("adapter rank; 0 = no LoRA (every weight trains)", 0)
    alpha: float = doc("scaling numerator: the update is (alpha / r)·BA", 16.0)
    dropout: float = doc("dropout on the adapters' input (keep 0 if lm_head is a target)", 0.0)
    target_modules: list[str] = doc(
        "module names (or [all-linear]) that get adapters; lm_head is allowed",
        default_factory=lambda: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
    )
    save: str = doc(
        "merged (a plain model: W + (alpha/r)·BA) | adapter (a PEFT adapter folder over "
        "student.model; needs student.init: pretrained)",
        "merged",
    )


@dataclass
class QatSpec:
    """``student.qat``: quantization-aware training on a GGUF block grid."""

    format: str | None = doc(
        "q8_0 | q4_0 | null (off): train on this GGUF grid (fake quantization, straight-through "
        "gradients); decoder projections take the format, the token embedding and LM head Q8_0, "
        "norms stay float; the saved model holds the rounded weights",
        None,
    )


@dataclass
class StudentSpec:
    model: str | None = doc(
        "Hub id, local dir, .gguf or bundled:…; unset = derive from the teacher", None
    )
    init: str = doc("pretrained | prune (keep teacher layers) | config (random init)", "pretrained")
    keep_layers: list[int] | None = doc(
        "init=prune: teacher layer indices to keep, e.g. [0, 6, 12, 18, 24, 29]", None
    )
    config_overrides: dict[str, Any] = doc(
        "init=config: changes to the source config, e.g. {num_hidden_layers: 4}",
        default_factory=dict,
    )
    dtype: str = doc(
        "master weights dtype; keep float32 (train.precision picks the compute dtype)", "float32"
    )
    trust_remote_code: bool = doc("run model code from the Hub repo (only if you trust it)", False)
    allow_pickle: bool = doc(
        "load a checkpoint saved only as a pickle (pytorch_model.bin), which can run code as it "
        "loads (only if you trust it); otherwise weights load from safetensors or GGUF only",
        False,
    )
    lora: LoraSpec = doc("low-rank adapters (PEFT LoRA)", default_factory=LoraSpec)
    qat: QatSpec = doc("quantization-aware training on a GGUF grid", default_factory=QatSpec)


@dataclass
class DataSpec:
    train: str = doc(
        "JSONL/CSV/Parquet file, datasets dir, Hub dataset id, or bundled:NAME",
        "bundled:rg/gsm_symbolic",
    )
    eval: str | None = doc(
        "held-out source; unset = a bundled source's eval split, else max_eval_records held out of train",
        None,
    )
    train_split: str = doc("split to read for training (Hub / datasets dirs)", "train")
    eval_split: str = doc("split to read for evaluation", "eval")
    max_train_records: int | None = doc("use at most this many training records", None)
    max_eval_records: int | None = doc("use at most this many held-out records", 200)
    max_length: int = doc("tokens per example; longer ones are truncated (and counted)", 256)
    packing: bool = doc(
        "concatenate examples into max_length blocks (documents stay separate)", False
    )


@dataclass
class LossSpec:
    kind: str | None = doc(
        "forward_kl | reverse_kl | jsd | skew_forward_kl | skew_reverse_kl | tvd; unset = the "
        "method's default (reverse_kl for on_policy, as in GKD and MiniLLM; else forward_kl)",
        None,
    )
    kd_temperature: float = doc(
        "the loss's temperature: softens teacher and student alike, the soft loss is scaled by T² "
        "(TRL's is not: its recipes carry over unchanged only at T=1; sampling has its own "
        "temperature: on_policy.sampling_temperature, generate.temperature)",
        1.0,
    )
    beta: float = doc(
        "jsd only: teacher weight of the mixture; 0 and 1 are defined as forward and reverse KL "
        "(TRL's convention), which the formula does not approach: the loss jumps at both ends",
        0.5,
    )
    skew_alpha: float = doc("skew_* only: DistiLLM skew coefficient α", 0.1)
    soft_weight: float = doc("weight of the divergence to the teacher", 1.0)
    hard_weight: float = doc("weight of cross-entropy on the data labels", 0.0)
    path: str = doc(
        "fused (chunked from hidden states, never [tokens, vocab] logits) | naive (full logits; debug)",
        "fused",
    )
    compile: bool = doc(
        "fused path: torch.compile the per-chunk softmax work (faster after a warm-up)", False
    )
    chunk_size: int | None = doc(
        "rows per chunk of the chunked losses; unset = from a 128 MiB budget (the fused path: at "
        "least 256 rows; cross_tokenizer: at least 16)",
        None,
    )


@dataclass
class TrainSpec:
    output_dir: str = doc("where checkpoints, metrics and the final student go", "runs/train")
    seed: int = doc("seeds data order, init and sampling", 0)
    max_steps: int | None = doc(
        "optimizer steps; wins over max_tokens and epochs (smoke runs: 2)", None
    )
    max_tokens: int | None = doc(
        "token budget (non-padding input tokens) instead of max_steps", None
    )
    epochs: float = doc("passes over the data when neither max_steps nor max_tokens is set", 1.0)
    batch_size: int = doc("sequences per micro-batch (per process)", 4)
    grad_accum: int = doc("micro-batches per optimizer step", 1)
    lr: float = doc("peak learning rate (AdamW)", 3e-4)
    min_lr_ratio: float = doc("final lr as a fraction of the peak (cosine / linear)", 0.1)
    schedule: str = doc("lr decay after warm-up: cosine | linear | constant", "cosine")
    warmup_steps: int = doc("linear warm-up steps", 10)
    weight_decay: float = doc("AdamW weight decay (not applied to norms and biases)", 0.0)
    betas: list[float] = doc("AdamW betas", default_factory=lambda: [0.9, 0.95])
    max_grad_norm: float | None = doc("clip the gradient norm; null disables", 1.0)
    precision: str = doc(
        "auto (bf16 where bf16 matmuls beat fp32 here, measured) | fp32 | bf16 (autocast; "
        "master weights stay fp32)",
        "auto",
    )
    padding_free: bool = doc(
        "forward passes drop padding: a batch's real tokens run as one row with attention per "
        "document (same result up to float rounding; ~25% off the demo teacher's forward); "
        "false runs padded batches",
        True,
    )
    keep_freed_memory: bool = doc(
        "CPU runs on Linux: glibc keeps freed memory for reuse instead of returning it to the "
        "kernel (fewer page faults: ~7% faster steps on a 2-core CPU, ~4% more peak memory; "
        "process-wide; not under FSDP2, whose gathered weights are handed back instead)",
        True,
    )
    log_every: int = doc("log metrics every N steps", 5)
    eval_every: int = doc("held-out evaluation every N steps (0 = only at the end)", 0)
    eval_batches: int | None = doc("limit held-out evaluation to N batches", None)
    save_every: int = doc("checkpoint every N steps (0 = only at the end)", 100)
    resume: bool = doc("resume from output_dir/checkpoint if one exists", True)
    save_model: bool = doc("save the final student as a Hugging Face model directory", True)


@dataclass
class GenerateSpec:
    """``potstill generate``: the teacher writes completions for training (sequence-level / CoT KD)."""

    prompts: str = doc(
        "prompt source (any data.train source); messages -> all but the final assistant turn, "
        "prompt+completion -> the prompt",
        "bundled:rg/basic_arithmetic",
    )
    prompts_split: str = doc("split of `prompts` to read", "train")
    max_prompts: int | None = doc("use at most this many prompts (unset = all)", None)
    output: str = doc(
        "JSONL the completions go to, read by `potstill train` as data.train; "
        "<output>.ledger.jsonl makes it resumable, <output>.report.json sums it up",
        "runs/generate/completions.jsonl",
    )
    backend: str = doc(
        "hf (local transformers) | openai (any OpenAI-compatible server, e.g. potstill serve, "
        "vLLM, SGLang) | vllm (offline engine, GPU)",
        "hf",
    )
    model: str | None = doc(
        "openai: the server's model name; hf / vllm: model to load (unset = teacher.model, "
        "loaded with teacher.dtype and teacher.trust_remote_code)",
        None,
    )
    base_url: str | None = doc(
        "openai: server URL, e.g. http://127.0.0.1:8000/v1 (potstill serve)", None
    )
    api_key_env: str | None = doc(
        "openai: NAME of the environment variable holding the API key (e.g. OPENAI_API_KEY), "
        "never the key itself; unset = no key",
        None,
    )
    chat: str = doc(
        "openai: auto (chat endpoint for message prompts, completions for strings) | chat | "
        "completions",
        "auto",
    )
    n: int = doc("samples per prompt (best-of-n with keep=first_correct)", 1)
    temperature: float = doc(
        "sampling temperature; 0 = greedy, the teacher's mode (Kim & Rush 2016)", 0.0
    )
    top_p: float = doc("nucleus sampling mass (1 = off)", 1.0)
    max_new_tokens: int = doc("completion length cap; cut samples get finish_reason length", 256)
    stop: list[str] = doc(
        "stop strings; the completion ends before the first", default_factory=list
    )
    seed: int = doc(
        "sampling seed; backends seed per prompt (hf: per sample from seed, prompt and index), so "
        "a resumed run writes what an uninterrupted one would",
        0,
    )
    batch_size: int = doc(
        "prompts per backend call, and the most a kill can lose (hf: batch_size × n sequences "
        "decode together)",
        16,
    )
    concurrency: int = doc("openai: requests in flight at once", 8)
    max_retries: int = doc("openai: retries of a failed request (with back-off)", 5)
    timeout: float = doc("openai: seconds per request", 60.0)
    verify: str = doc(
        "none | auto (reasoning_gym for records with a reasoning-gym task, else the first of "
        "answer_line, hash, boxed, number (numeric answers only) that finds one) | answer_line "
        "(last 'Answer: X') | number (last number) | hash (GSM8K '#### N') | boxed (\\boxed{…}) | "
        "reasoning_gym "
        "(the task's score_answer); checked against each record's `answer`",
        "auto",
    )
    keep: str = doc(
        "all (every sample) | correct (every verified-correct sample) | first_correct "
        "(best-of-n: the first correct sample per prompt; rejection sampling as in STaR)",
        "all",
    )
    reasoning: str = doc(
        "none: prompts go to the teacher as they are; think: the teacher is asked to reason in "
        "<think>…</think> and end with 'Answer: X', the answer is read after </think> (no closed "
        "block = no answer). Either way a record holds the original prompt and the teacher's whole "
        "reply, so the student learns to reason unprompted",
        "none",
    )
    instruction: str | None = doc(
        "text appended to the last user turn (or string prompt), for the teacher only; "
        "unset = reasoning's default (think: the <think> instruction; none: nothing)",
        None,
    )


@dataclass
class OnPolicySpec:
    """Method ``on_policy`` (GKD): the student writes completions, the teacher grades each token."""

    lmbda: float = doc(
        "λ: share of batches whose completions the student samples (1 = fully on-policy, "
        "0 = token-level KD on the data's completions)",
        1.0,
    )
    seq_kd: bool = doc(
        "batches the student does not sample get completions written by the teacher instead of "
        "the data's (GKD's supervised-KD mix); generated only for those batches",
        False,
    )
    sampling_temperature: float = doc(
        "temperature of the student's (and seq_kd teacher's) sampling; the loss has its own, "
        "loss.kd_temperature",
        1.0,
    )
    top_p: float = doc("nucleus mass of that sampling (1 = off)", 1.0)
    max_new_tokens: int = doc("longest completion sampled; the prompt is the data's", 128)
    stop_token_ids: list[int] = doc(
        "ids that end a completion besides the tokenizer's and generation config's EOS ids",
        default_factory=list,
    )
    engine: str = doc(
        "hf (batched, KV-cached, this process) | vllm (CUDA, pip install 'potstill[vllm]'; "
        "weights pushed to the engine before each sampling)",
        "hf",
    )
    compile: bool = doc(
        "engine hf: torch.compile the decode step on a static KV cache (1.3-1.5x the sampling "
        "tokens/s of SmolLM2's 6-layer student on a 2-core CPU; the first sampling compiles, "
        "5-35 s); falls back to eager decoding with a warning where compiling fails",
        False,
    )
    eval_samples: bool = doc(
        "held-out evaluation also samples the student on the eval prompts and reports the "
        "reverse KL to the teacher on those samples",
        True,
    )
    estimator: str = doc(
        "full: the divergence over the whole vocabulary at every sampled position (loss.kind) | "
        "sampled: reverse KL estimated from the sampled tokens alone, as a per-token "
        "policy-gradient advantage (needs loss.kind=reverse_kl, kd_temperature 1, hard_weight "
        "0, a live teacher)",
        "full",
    )
    credit: str = doc(
        "token: each sampled token is trained on its own divergence | sequence: it also takes "
        "the reverse KL of the tokens the student sampled after it, as a policy-gradient cost "
        "(MiniLLM's long-term term; needs loss.kind=reverse_kl, kd_temperature 1, a live "
        "teacher, teacher_mix 0)",
        "token",
    )
    length_norm: bool = doc(
        "credit sequence: average the later tokens' reverse KL over their number (MiniLLM's "
        "length normalisation) instead of summing it (a sum of positive costs rewards short "
        "samples)",
        True,
    )
    teacher_mix: float = doc(
        "MiniLLM's teacher-mixed sampling: the student's batches are sampled from "
        "(1 − α)·student + α·teacher at every token, α = this (0: the student alone); needs "
        "engine hf, a live teacher and estimator full",
        0.0,
    )
    verify: str = doc(
        "check the final answer of each student sample against its record's `answer` (a "
        "potstill.verify mode: auto | answer_line | number | hash | boxed | reasoning_gym; none: "
        "no check); a sample the verifier rejects is replaced by the data's own completion for "
        "that prompt, so the student is graded only on its prefixes that reach a right answer "
        "(needs records with `answer`, estimator full and credit token)",
        "none",
    )
    collapse_distinct2: float = doc(
        "collapse guard: a sampled batch whose distinct-2 (distinct token pairs / pairs, over its "
        "samples) is below this counts as collapsed",
        0.1,
    )
    collapse_repetition: float = doc(
        "collapse guard: a sampled batch whose samples repeat more than this share of their "
        "4-grams (seq-rep-4, averaged) counts as collapsed",
        0.8,
    )
    collapse_patience: int = doc(
        "collapse guard: this many collapsed student-sampled batches in a row stop the run "
        "(0: only log student_distinct_2 and student_repetition)",
        3,
    )


@dataclass
class CrossTokenizerSpec:
    """Method ``cross_tokenizer``: teacher and student with different tokenizers."""

    alignment: str = doc(
        "spans (exact: shared character boundaries, span likelihoods + KL over the entries both "
        "vocabularies spell alike) | uld (Universal Logit Distillation: nearest-end pairing, "
        "sorted top-K probabilities)",
        "spans",
    )
    top_k: int = doc(
        "uld: sorted probabilities compared per side; spans: the teacher's shared entries kept "
        "as events (the rest pooled into one)",
        64,
    )
    uld_distance: str = doc("uld: l1 (the paper's Wasserstein) | kl", "l1")
    span_weight: float = doc(
        "spans: weight of the span-likelihood term (loss.soft_weight weighs the boundary KL / ULD)",
        1.0,
    )


@dataclass
class FeatureSpec:
    """Method ``feature``: logit KD plus intermediate hidden states and attention."""

    hidden_weight: float = doc(
        "weight of the hidden-state term (0: off); it is averaged over the layer pairs", 1.0
    )
    hidden_loss: str = doc("mse (mean over the width) | cosine (1 − cos) per token", "mse")
    hidden_normalize: bool = doc(
        "layer-normalise both sides (no affine) before comparing hidden states", True
    )
    layer_map: list[list[int]] | None = doc(
        "[[student layer, teacher layer], ...] (0-based); null: every student layer i to "
        "teacher layer round((i + 1) · L_t / L_s) − 1",
        None,
    )
    attention_weight: float = doc("weight of the attention term (0: off)", 0.0)
    attention: str = doc(
        "relations (MiniLM-v2 Q–Q, K–K, V–V relations; any head counts) | probabilities "
        "(TinyBERT attention KL; equal head counts)",
        "relations",
    )
    attention_layers: list[int] | None = doc(
        "student layers whose attention is distilled (teacher layers from the layer map); "
        "null: the last",
        None,
    )
    relation_heads: int = doc(
        "relations: heads each Q, K and V is split into; must divide both models' widths", 8
    )
    relation_weight: float = doc(
        "weight of the relation term between the batch's documents (0: off)", 0.0
    )
    relation: str = doc(
        "kl (softmax of cosine similarities) | mse (cosine similarities) | rkd_distance | "
        "rkd_angle, over mean-pooled final hidden states",
        "kl",
    )
    relation_temperature: float = doc("relation=kl: the softmax temperature", 0.05)


@dataclass
class EmbeddingSpec:
    """Method ``embedding``: a sentence-encoder student."""

    loss: str = doc(
        "per sentence: cosine (1 − cos) | mse, student against teacher embedding", "cosine"
    )
    weight: float = doc("weight of the per-sentence embedding term (0: off)", 1.0)
    relation_weight: float = doc("weight of the batch's similarity-structure term (0: off)", 0.0)
    relation: str = doc("kl | mse | rkd_distance | rkd_angle (see feature.relation)", "kl")
    relation_temperature: float = doc("relation=kl: the softmax temperature", 0.05)
    attention_weight: float = doc(
        "weight of MiniLM-v2's Q/K/V relations, last student layer to last teacher layer (0: off)",
        0.0,
    )
    relation_heads: int = doc("attention: relation heads; must divide both widths", 12)


@dataclass
class DraftSpec:
    """Method ``draft``: a speculative-decoding draft for the teacher (the target)."""

    kl_warmup_steps: int = doc(
        "optimizer steps of forward KL before loss.kind (tvd) takes over: TVD's gradient "
        "vanishes where the draft already covers the target, forward KL moves a far-off draft "
        "faster",
        0,
    )
    gamma: int = doc(
        "drafted tokens per target pass: the held-out expected tokens per pass, and "
        "`potstill evaluate --speculative`'s decoding",
        4,
    )
    eval_prompts: int = doc(
        "`potstill evaluate --speculative`: held-out prompts decoded, target alone and with "
        "each draft",
        8,
    )
    eval_new_tokens: int = doc("`potstill evaluate --speculative`: tokens decoded per prompt", 64)


METHODS_DOC = " | ".join(f"{m.name} ({m.summary})" for m in METHODS.values())


@dataclass
class Recipe:
    method: str = doc(METHODS_DOC, "token_level")
    teacher: TeacherSpec = doc("the model to learn from", default_factory=TeacherSpec)
    student: StudentSpec = doc("the model being trained", default_factory=StudentSpec)
    data: DataSpec = doc("sequences to train and evaluate on", default_factory=DataSpec)
    loss: LossSpec = doc("the objective", default_factory=LossSpec)
    train: TrainSpec = doc("the optimisation loop", default_factory=TrainSpec)
    generate: GenerateSpec = doc(
        "teacher completions for sequence-level / CoT distillation (`potstill generate`)",
        default_factory=GenerateSpec,
    )
    on_policy: OnPolicySpec = doc(
        "student sampling for method on_policy (GKD)", default_factory=OnPolicySpec
    )

    cross_tokenizer: CrossTokenizerSpec = doc(
        "alignment for method cross_tokenizer", default_factory=CrossTokenizerSpec
    )
    cache: CacheSpec = doc(
        "the teacher cache `potstill cache` writes (teacher.cache names its folder)",
        default_factory=CacheSpec,
    )
    feature: FeatureSpec = doc(
        "hidden-state and attention terms for method feature", default_factory=FeatureSpec
    )
    embedding: EmbeddingSpec = doc(
        "the objective of method embedding", default_factory=EmbeddingSpec
    )
    draft: DraftSpec = doc("warm-up and the held-out γ of method draft", default_factory=DraftSpec)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- parsing


def all_keys(cls: type = Recipe, prefix: str = "") -> dict[str, str]:
    """Every dotted key of the recipe with its documentation."""
    out: dict[str, str] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(all_keys(hints[f.name], key + "."))
        else:
            out[key] = f.metadata.get("doc", "")
    return out


def _unknown_key(key: str) -> RecipeError:
    leaves = list(all_keys())
    sections = {k.rsplit(".", 1)[0] for k in leaves if "." in k}
    depth = key.count(".")
    same_depth = [k for k in [*leaves, *sorted(sections)] if k.count(".") == depth]
    close = difflib.get_close_matches(key, same_depth, n=1, cutoff=0.5)
    if not close:  # try the last component alone: `lr` -> `train.lr`
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in leaves if k.rsplit(".", 1)[-1] == leaf][:1]
    hint = f"; did you mean `{close[0]}`?" if close else "; run `potstill keys` for the list"
    return RecipeError(f"unknown recipe key `{key}`{hint}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert a YAML value to the annotated type, or raise naming the key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except RecipeError as e:
                errors.append(str(e))
        raise RecipeError(errors[0])
    if origin is list:
        if not isinstance(value, list | tuple):
            raise RecipeError(f"`{key}` must be a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"`{key}` must be a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise RecipeError(f"`{key}` must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise RecipeError(f"`{key}` must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise RecipeError(f"`{key}` must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise RecipeError(f"`{key}` must be a string, got {value!r}")
    raise TypeError(f"unsupported recipe type {tp} at {key}")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise RecipeError(f"`{prefix.rstrip('.') or 'recipe'}` must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise _unknown_key(f"{prefix}{key}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, f"{prefix}{name}")
    return cls(**kwargs)


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML) to a nested dict in place."""
    if "=" not in assignment:
        raise RecipeError(f"override `{assignment}` is not key=value (e.g. train.max_steps=2)")
    key, raw = assignment.split("=", 1)
    key = key.strip()
    keys = all_keys()
    known = key in keys or any(k.startswith(key + ".") for k in keys)
    # config_overrides is a free-form mapping: student.config_overrides.X=... is allowed
    if not known and not key.startswith("student.config_overrides."):
        raise _unknown_key(key)
    value = yaml.safe_load(raw) if raw.strip() else None
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"cannot set `{key}`: `{part}` is not a mapping")
    node[parts[-1]] = value


def value_at(tree: Any, key: str) -> Any:
    """The value at a dotted ``key`` ("train.lr") of a recipe's mapping; None where it has none."""
    for part in key.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def load_recipe(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> Recipe:
    """Read a YAML recipe (or start from defaults), apply overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"no recipe file at {path}; see recipes/ for examples")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e)
            raise RecipeError(
                f"{path}{where}: not valid YAML ({problem}); fix the recipe"
            ) from None
        if not isinstance(data, dict):
            raise RecipeError(
                f"{path}: a recipe is a mapping of sections, got {type(data).__name__}"
            )
    for assignment in overrides:
        apply_override(data, assignment)
    recipe = _build(Recipe, data)
    validate(recipe)
    return recipe


def validate_student_transforms(r: Recipe) -> None:
    """``student.lora`` and ``student.qat``."""
    from potstill.quant import FORMATS

    lora, qat = r.student.lora, r.student.qat
    if qat.format is not None and qat.format not in FORMATS:
        raise RecipeError(
            f"`student.qat.format` must be one of {FORMATS} or null, got {qat.format!r}"
        )
    if lora.r < 0 or lora.alpha <= 0 or not 0 <= lora.dropout < 1:
        raise RecipeError(
            "`student.lora` needs r >= 0 (0: off), alpha > 0 and 0 <= dropout < 1, got "
            f"r={lora.r}, alpha={lora.alpha}, dropout={lora.dropout}"
        )
    if lora.save not in ("merged", "adapter"):
        raise RecipeError(f"`student.lora.save` must be merged or adapter, got {lora.save!r}")
    if lora.r and lora.save == "adapter" and r.student.init != "pretrained":
        raise RecipeError(
            "`student.lora.save: adapter` saves adapters over student.model, but a "
            f"student.init: {r.student.init} student has no saved base to load them on: use "
            "student.lora.save: merged (or save the initialised student first and start from it)"
        )
    if lora.r and qat.format:
        raise RecipeError(
            "`student.lora` and `student.qat` together are not supported: the adapters' update "
            "would sit outside the quantized grid. Train LoRA, save merged, then run QAT on the "
            "merged student (student.model: that run's model/ folder)"
        )


def validate(r: Recipe) -> None:
    """Cross-field checks that need no model or data."""
    from potstill.losses.divergences import check_divergence_args

    method = method_info(r.method)
    if method.needs_teacher and not r.teacher.model:
        raise RecipeError(f"method `{r.method}` needs `teacher.model`")
    validate_teacher_source(r)
    if r.student.init not in ("pretrained", "prune", "config"):
        raise RecipeError(
            f"`student.init` must be pretrained, prune or config, got {r.student.init!r}"
        )
    if r.student.init == "pretrained" and not r.student.model:
        raise RecipeError(
            "`student.init: pretrained` needs `student.model` (or use init: prune / config)"
        )
    if r.student.init == "prune":
        if not r.student.keep_layers:
            raise RecipeError(
                "`student.init: prune` needs `student.keep_layers`, e.g. [0, 6, 12, 18, 24, 29]"
            )
        if not (r.student.model or r.teacher.model):
            raise RecipeError("`student.init: prune` needs a model to prune: set `teacher.model`")
    if r.student.init == "config" and not (r.student.model or r.teacher.model):
        raise RecipeError(
            "`student.init: config` needs a config source: `student.model` or `teacher.model`"
        )
    validate_student_transforms(r)
    d = r.draft
    if d.gamma < 1 or d.kl_warmup_steps < 0 or d.eval_prompts < 1 or d.eval_new_tokens < 1:
        raise RecipeError(
            "`draft.gamma`, `draft.eval_prompts` and `draft.eval_new_tokens` must be >= 1 and "
            f"`draft.kl_warmup_steps` >= 0, got {d.gamma}, {d.eval_prompts}, "
            f"{d.eval_new_tokens} and {d.kl_warmup_steps}"
        )
    for key in ("teacher.dtype", "student.dtype"):
        value = getattr(r, key.split(".")[0]).dtype
        if value not in ("float32", "bfloat16", "float16", "auto"):
            raise RecipeError(f"`{key}` must be float32, bfloat16, float16 or auto, got {value!r}")
    if r.loss.kind is None:
        r.loss.kind = method.default_kind
    try:
        check_divergence_args(
            r.loss.kind,
            temperature=r.loss.kd_temperature,
            beta=r.loss.beta,
            alpha=r.loss.skew_alpha,
        )
    except ValueError as e:  # name the key: "beta must be …" -> "`loss.beta` must be …"
        message = str(e)
        for word, key in (
            ("temperature", "kd_temperature"),
            ("beta", "beta"),
            ("alpha", "skew_alpha"),
        ):
            if message.startswith(word + " "):
                raise RecipeError(f"`loss.{key}`{message[len(word) :]}") from None
        raise RecipeError(f"`loss.kind`: {message}") from None
    if r.loss.path not in ("fused", "naive"):
        raise RecipeError(f"`loss.path` must be fused or naive, got {r.loss.path!r}")
    t = r.train
    if t.precision not in ("auto", "fp32", "bf16"):
        raise RecipeError(f"`train.precision` must be auto, fp32 or bf16, got {t.precision!r}")
    if t.schedule not in ("cosine", "linear", "constant"):
        raise RecipeError(
            f"`train.schedule` must be cosine, linear or constant, got {t.schedule!r}"
        )
    for key in ("batch_size", "grad_accum", "log_every"):
        if getattr(t, key) < 1:
            raise RecipeError(f"`train.{key}` must be ≥ 1, got {getattr(t, key)}")
    if t.lr <= 0:
        raise RecipeError(f"`train.lr` must be > 0, got {t.lr}")
    if len(t.betas) != 2:
        raise RecipeError(f"`train.betas` takes two numbers, got {t.betas}")
    if r.data.max_length < 2:
        raise RecipeError(f"`data.max_length` must be ≥ 2, got {r.data.max_length}")
    validate_generate(r.generate)
    validate_on_policy(r)
    c = r.cross_tokenizer
    if c.alignment not in ("spans", "uld"):
        raise RecipeError(f"`cross_tokenizer.alignment` must be spans or uld, got {c.alignment!r}")
    if c.uld_distance not in ("l1", "kl"):
        raise RecipeError(
            f"`cross_tokenizer.uld_distance` must be l1 or kl, got {c.uld_distance!r}"
        )
    if c.top_k < 1:
        raise RecipeError(f"`cross_tokenizer.top_k` must be ≥ 1, got {c.top_k}")
    validate_feature(r.feature)
    validate_embedding(r.embedding)
    if r.data.packing and not method.packing:
        raise RecipeError(
            f"method {r.method} reads one record per row (see its page in docs/methods/), so "
            "rows cannot be packed; set data.packing=false"
        )


def validate_teacher_source(r: Recipe) -> None:
    t, c = r.teacher, r.cache
    if t.source not in ("live", "cache", "server"):
        raise RecipeError(f"`teacher.source` must be live, cache or server, got {t.source!r}")
    if t.source == "server":
        if not t.server_url or not t.model:
            raise RecipeError(
                "`teacher.source: server` needs teacher.server_url (e.g. "
                "http://127.0.0.1:8000/v1) and teacher.model (the served model's name)"
            )
        if r.method not in ("token_level", "on_policy"):
            raise RecipeError(
                f"method {r.method} cannot use a served teacher; use token_level or on_policy"
            )
        if r.data.packing:
            raise RecipeError(
                "a served teacher scores each row as one sequence, so rows cannot be packed; "
                "set data.packing=false"
            )
        if r.on_policy.seq_kd and r.method == "on_policy":
            raise RecipeError(
                "on_policy.seq_kd samples from the teacher model, which a served teacher does "
                "not load; set on_policy.seq_kd=false or teacher.source=live"
            )
    if c.top_k < 1 or c.shard_positions < 1 or c.batch_size < 1:
        raise RecipeError(
            "`cache.top_k`, `cache.shard_positions` and `cache.batch_size` must be ≥ 1"
        )
    if c.tail_samples < 0:
        raise RecipeError(f"`cache.tail_samples` must be ≥ 0, got {c.tail_samples}")
    if c.coverage is not None and not 0 < c.coverage <= 1:
        raise RecipeError(f"`cache.coverage` must be in (0, 1] or null, got {c.coverage}")
    if c.dtype not in ("float16", "bfloat16", "float32"):
        raise RecipeError(f"`cache.dtype` must be float16, bfloat16 or float32, got {c.dtype!r}")
    if t.source == "cache":
        if not t.cache:
            raise RecipeError(
                "`teacher.source: cache` reads teacher.cache: set it to the folder "
                "`potstill cache` wrote"
            )
        if r.method != "token_level":
            raise RecipeError(
                f"method {r.method} cannot train from a teacher cache (it scores sequences the "
                "cache never saw, needs the teacher's own tokens, or its hidden states); use "
                "teacher.source=live, or method token_level"
            )


def validate_feature(f: FeatureSpec) -> None:
    if f.hidden_loss not in ("mse", "cosine"):
        raise RecipeError(f"`feature.hidden_loss` must be mse or cosine, got {f.hidden_loss!r}")
    if f.attention not in ("relations", "probabilities"):
        raise RecipeError(
            f"`feature.attention` must be relations or probabilities, got {f.attention!r}"
        )
    if min(f.hidden_weight, f.attention_weight, f.relation_weight) < 0:
        raise RecipeError(
            "`feature.hidden_weight`, `feature.attention_weight` and `feature.relation_weight` "
            "must be ≥ 0"
        )
    _validate_relations("feature", f)
    if f.layer_map is not None and any(len(pair) != 2 for pair in f.layer_map):
        raise RecipeError(
            f"`feature.layer_map` takes [student layer, teacher layer] pairs, got {f.layer_map}"
        )


def validate_embedding(e: EmbeddingSpec) -> None:
    if e.loss not in ("cosine", "mse"):
        raise RecipeError(f"`embedding.loss` must be cosine or mse, got {e.loss!r}")
    if min(e.weight, e.relation_weight, e.attention_weight) < 0:
        raise RecipeError(
            "`embedding.weight`, `embedding.relation_weight` and `embedding.attention_weight` "
            "must be ≥ 0"
        )
    _validate_relations("embedding", e)


def _validate_relations(section: str, spec: FeatureSpec | EmbeddingSpec) -> None:
    """The relation settings ``feature`` and ``embedding`` share."""
    if spec.relation not in ("kl", "mse", "rkd_distance", "rkd_angle"):
        raise RecipeError(
            f"`{section}.relation` must be kl, mse, rkd_distance or rkd_angle, "
            f"got {spec.relation!r}"
        )
    if spec.relation_temperature <= 0:
        raise RecipeError(
            f"`{section}.relation_temperature` must be > 0, got {spec.relation_temperature}"
        )
    if spec.relation_heads < 1:
        raise RecipeError(f"`{section}.relation_heads` must be ≥ 1, got {spec.relation_heads}")


def _require(needs: dict[str, bool], why: str, instead: str) -> None:
    """Refuse a setting whose ``needs`` (``"key=value": met``) are not all met, naming them."""
    missing = [k for k, ok in needs.items() if not ok]
    if missing:
        raise RecipeError(f"{why}; set {', '.join(missing)} (or {instead})")


def validate_on_policy(r: Recipe) -> None:
    o = r.on_policy
    if not 0 <= o.lmbda <= 1:
        raise RecipeError(f"`on_policy.lmbda` is a share of batches in [0, 1], got {o.lmbda}")
    if o.estimator not in ("full", "sampled"):
        raise RecipeError(f"`on_policy.estimator` must be full or sampled, got {o.estimator!r}")
    # what the sampled reverse KL of the student's own tokens needs (the sampled estimator's
    # soft term, credit=sequence's cost): reverse KL at T=1 from a live teacher
    sampled_kl = {
        "loss.kind=reverse_kl": r.loss.kind == "reverse_kl",
        "loss.kd_temperature=1": r.loss.kd_temperature == 1.0,
        "teacher.source=live": r.teacher.source == "live",
    }
    if o.estimator == "sampled" and r.method == "on_policy":
        _require(
            {**sampled_kl, "loss.hard_weight=0": r.loss.hard_weight == 0},
            "on_policy.estimator=sampled estimates reverse KL at T=1 from a live teacher's "
            "log-probabilities of the sampled tokens",
            "on_policy.estimator=full",
        )
    if o.credit not in ("token", "sequence"):
        raise RecipeError(f"`on_policy.credit` must be token or sequence, got {o.credit!r}")
    if o.credit == "sequence" and r.method == "on_policy":
        _require(
            {**sampled_kl, "on_policy.teacher_mix=0": not o.teacher_mix},
            "on_policy.credit=sequence charges each sampled token the reverse KL at T=1 of the "
            "student's own later tokens, from a live teacher's log-probabilities (a teacher "
            "mixture would need importance weights)",
            "on_policy.credit=token",
        )
    if not 0 <= o.teacher_mix < 1:
        raise RecipeError(
            f"`on_policy.teacher_mix` is the teacher's share α of the sampling mixture, in "
            f"[0, 1) (1 would be the teacher's own samples: on_policy.seq_kd), got {o.teacher_mix}"
        )
    if o.teacher_mix and r.method == "on_policy":
        _require(
            {
                "on_policy.engine=hf": o.engine == "hf",
                "teacher.source=live": r.teacher.source == "live",
                "on_policy.estimator=full": o.estimator == "full",
            },
            "on_policy.teacher_mix samples each token from a mixture of the student's and a "
            "live teacher's distributions in this process",
            "on_policy.teacher_mix=0",
        )
    from potstill.verify import VERIFY_MODES

    _one_of("on_policy.verify", o.verify, VERIFY_MODES)
    if o.verify != "none" and r.method == "on_policy":
        _require(
            {
                "on_policy.estimator=full": o.estimator == "full",
                "on_policy.credit=token": o.credit == "token",
            },
            "on_policy.verify puts the data's completion in place of a rejected sample, and "
            "the sampled estimator and sequence credit are defined on the student's own "
            "samples only",
            "on_policy.verify=none",
        )
    for key in ("collapse_distinct2", "collapse_repetition"):
        if not 0 <= getattr(o, key) <= 1:
            raise RecipeError(f"`on_policy.{key}` is a share in [0, 1], got {getattr(o, key)}")
    if o.collapse_patience < 0:
        raise RecipeError(
            f"`on_policy.collapse_patience` must be ≥ 0 (0: never stop), got {o.collapse_patience}"
        )
    if o.sampling_temperature <= 0:
        raise RecipeError(
            f"`on_policy.sampling_temperature` must be > 0 (on-policy KD samples), got "
            f"{o.sampling_temperature}"
        )
    if not 0 < o.top_p <= 1:
        raise RecipeError(f"`on_policy.top_p` must be in (0, 1], got {o.top_p}")
    if o.max_new_tokens < 1:
        raise RecipeError(f"`on_policy.max_new_tokens` must be ≥ 1, got {o.max_new_tokens}")
    if o.engine not in ("hf", "vllm"):
        raise RecipeError(f"`on_policy.engine` must be hf or vllm, got {o.engine!r}")
    if o.compile and o.engine != "hf":
        raise RecipeError(
            "`on_policy.compile` compiles the hf engine's decode step; vLLM compiles its own: "
            "set on_policy.compile=false or on_policy.engine=hf"
        )


GENERATE_CHOICES = {
    "backend": ("hf", "openai", "vllm"),
    "chat": ("auto", "chat", "completions"),
    "keep": ("all", "correct", "first_correct"),
    "reasoning": ("none", "think"),
}


def _one_of(key: str, value: Any, choices: tuple[str, ...]) -> None:
    """Refuse a ``value`` of ``key`` outside ``choices``, naming the closest one."""
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f"; did you mean `{close[0]}`?" if close else ""
        raise RecipeError(f"`{key}` must be one of {', '.join(choices)}, got {value!r}{hint}")


def validate_generate(g: GenerateSpec) -> None:
    """Checks of the `generate` section that need no model (the model itself: run_generate)."""
    from potstill.verify import VERIFY_MODES

    for key, choices in {**GENERATE_CHOICES, "verify": VERIFY_MODES}.items():
        _one_of(f"generate.{key}", getattr(g, key), choices)
    for key in ("n", "max_new_tokens", "batch_size", "concurrency"):
        if getattr(g, key) < 1:
            raise RecipeError(f"`generate.{key}` must be ≥ 1, got {getattr(g, key)}")
    if g.max_prompts is not None and g.max_prompts < 1:
        raise RecipeError(f"`generate.max_prompts` must be ≥ 1 or unset, got {g.max_prompts}")
    if g.max_retries < 0 or g.timeout <= 0:
        raise RecipeError(
            f"`generate.max_retries` must be ≥ 0 and `generate.timeout` > 0, got "
            f"{g.max_retries} and {g.timeout}"
        )
    if g.temperature < 0:
        raise RecipeError(f"`generate.temperature` must be ≥ 0 (0 = greedy), got {g.temperature}")
    if not 0 < g.top_p <= 1:
        raise RecipeError(f"`generate.top_p` must be in (0, 1], got {g.top_p}")
    if g.n > 1 and g.temperature == 0:
        raise RecipeError(
            f"`generate.n={g.n}` with `generate.temperature=0` draws {g.n} identical greedy "
            "samples; set generate.temperature > 0 (e.g. 0.8) or generate.n=1"
        )
    if g.keep != "all" and g.verify == "none":
        raise RecipeError(
            f"`generate.keep: {g.keep}` needs a verifier, but `generate.verify` is none; "
            "set generate.verify (e.g. auto) or generate.keep=all"
        )
    name = g.api_key_env
    if name is not None and (
        not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name)
        or (len(name) >= 24 and not name.isupper())
    ):
        raise RecipeError(
            "`generate.api_key_env` is the NAME of an environment variable that holds the key "
            "(e.g. OPENAI_API_KEY), not the key itself; export the key and name the variable"
        )
    if not g.output.endswith(".jsonl"):
        raise RecipeError(
            f"`generate.output` must be a .jsonl file (potstill train reads it), got {g.output!r}"
        )
