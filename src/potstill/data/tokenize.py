"""Records -> token ids with a target mask, and the collator that turns them into shifted labels.

Convention. An `Example` is `input_ids` plus `target_mask` of the same length; `target_mask[i]` is
True when token i is something the model should learn to *predict*. The collator shifts once:

    labels[t] = input_ids[t + 1] if target_mask[t + 1] else ignore_index;   labels[-1] = ignore_index

so position t is scored on predicting token t+1 and no loss function ever shifts again.
`target_mask[0]` is never read (nothing predicts the first token).

What is a target, per record shape (see `potstill.data.records`):
    text               every token (plus EOS)
    prompt/completion  the completion tokens and the EOS; never the prompt
    messages           each assistant reply and the chat template's end-of-turn tokens after it
                       (ChatML: "<|im_end|>\\n"); never system/user text or the assistant header

Packing and attention (transformers 5.x, checked in `masking_utils._preprocess_mask_arguments`):
packed blocks carry `position_ids` that restart at 0 at every document start. transformers derives
a block-diagonal causal mask from them (`find_packed_sequence_indices`: a new document wherever
position_ids do not step by +1) ONLY when `attention_mask is None` AND `past_key_values is None`.
Two traps follow, both verified on a tiny Llama:
  * passing the collator's all-ones `attention_mask` silently lets documents attend to each other;
  * `use_cache` defaults to `config.use_cache` (True) even in train mode, which creates an empty
    cache before the mask is built and again disables the per-document mask.
So for packed batches the trainer must call `model(input_ids, position_ids=..., attention_mask=None,
use_cache=False)`; `model_inputs(batch)` returns exactly those keyword arguments. Right padding of a
short last block is safe then: padding has position 0, so each pad token is its own "document" and
no real token attends to it (pad labels are ignore_index anyway).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass

import torch

from potstill.data.records import record_format
from potstill.errors import DataError


@dataclass
class Example:
    input_ids: list[int]
    target_mask: list[bool]  # True where the token is a supervised target; same length as ids
    position_ids: list[int] | None = None  # set by packing (restarts at 0 per document)
    # Per-method integer sequences of any length (e.g. the teacher's own token ids for
    # cross-tokenizer distillation); the collator right-pads each key with -1.
    extra: dict[str, list[int]] | None = None


@dataclass
class TokenizeStats:
    records: int = 0  # records read
    examples: int = 0  # examples produced (blocks, when packing)
    tokens: int = 0  # total tokens in the examples
    target_tokens: int = 0  # supervised predictions: target tokens that have a previous token
    truncated: int = 0  # records cut to max_length (never when packing: documents flow on)
    dropped: int = 0  # records with no target token left (after truncation), skipped
    max_length: int = 0
    packed: bool = False

    def summary(self) -> str:
        """One line, e.g. "1,000 records → 1,000 examples, 231,402 tokens (98,120 supervised); ..."."""
        line = (
            f"{self.records:,} records → {self.examples:,} "
            f"{'packed blocks' if self.packed else 'examples'}, "
            f"{self.tokens:,} tokens ({self.target_tokens:,} supervised)"
        )
        notes = []
        if self.truncated:
            notes.append(f"{self.truncated:,} truncated to max_length={self.max_length}")
        if self.packed:
            notes.append(f"packed into blocks of max_length={self.max_length}")
        if self.dropped:
            notes.append(f"{self.dropped:,} dropped with no target tokens")
        return "; ".join([line, *notes])


# ---------------------------------------------------------------------------------------------
# one record


def tokenize_record(record: dict, tokenizer, *, max_length: int) -> tuple[Example, bool]:
    """Tokenise one record into an Example, cut to `max_length` tokens; returns (example, truncated)."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 (one input, one target), got {max_length}")
    shape = record_format(record)
    if shape == "text":
        ids, mask = _text_ids(record["text"], tokenizer)
    elif shape == "messages":
        ids, mask = _chat_ids(record["messages"], tokenizer, first_target=0)
    elif isinstance(record["prompt"], str):
        ids, mask = _prompt_completion_ids(record["prompt"], record["completion"], tokenizer)
    else:  # prompt and completion are message lists: learn only the completion's assistant turns
        messages = record["prompt"] + record["completion"]
        ids, mask = _chat_ids(messages, tokenizer, first_target=len(record["prompt"]))
    truncated = len(ids) > max_length
    return Example(ids[:max_length], mask[:max_length]), truncated


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _special_wrapping(tokenizer) -> tuple[list[int], list[int]]:
    """The tokens the tokenizer adds around a text by itself: ([BOS] or [], [EOS] or [] ...)."""
    probe = "a"
    plain = _encode(tokenizer, probe)
    full = list(tokenizer(probe)["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    return [], []  # the tokenizer rewrites the text itself; assume it adds nothing


def _with_eos(ids: list[int], mask: list[bool], tokenizer) -> tuple[list[int], list[bool]]:
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        return [*ids, eos], [*mask, True]
    return ids, mask


def _text_ids(text: str, tokenizer) -> tuple[list[int], list[bool]]:
    prefix, suffix = _special_wrapping(tokenizer)
    ids = prefix + _encode(tokenizer, text) + suffix
    return _with_eos(ids, [True] * len(ids), tokenizer)


def _prompt_completion_ids(prompt: str, completion: str, tokenizer) -> tuple[list[int], list[bool]]:
    # Tokenised apart and concatenated, so the prompt/completion boundary is exact.
    prefix, suffix = _special_wrapping(tokenizer)
    prompt_ids = prefix + _encode(tokenizer, prompt)
    completion_ids = _encode(tokenizer, completion) + suffix
    mask = [False] * len(prompt_ids) + [True] * len(completion_ids)
    return _with_eos(prompt_ids + completion_ids, mask, tokenizer)


def _render(tokenizer, messages: list[dict], *, add_generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    # The rendered text already holds any BOS the template writes: add no special tokens again.
    return _encode(tokenizer, text)


def _chat_ids(
    messages: list[dict], tokenizer, *, first_target: int
) -> tuple[list[int], list[bool]]:
    """Render with the chat template; targets are assistant turns at index >= first_target.

    For assistant message i, render(messages[:i], add_generation_prompt=True) must be a token
    prefix of render(messages[:i+1]), and both of the whole conversation; the tokens between the
    two prefixes are the reply plus the template's end-of-turn tokens.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "this tokenizer has no chat template, so 'messages' records cannot be rendered; use "
            "text or prompt/completion records, or set tokenizer.chat_template"
        )
    ids = _render(tokenizer, messages, add_generation_prompt=False)
    mask = [False] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i < first_target:
            continue
        if i == 0:
            raise DataError(
                "the conversation opens with an assistant message; start it with a system or "
                "user message (the reply needs something to answer)"
            )
        start = _render(tokenizer, messages[:i], add_generation_prompt=True)
        end = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if end[: len(start)] != start or ids[: len(end)] != end:
            raise DataError(
                f"the chat template is not prefix-stable at message {i} (assistant): rendering "
                "the conversation up to a reply does not extend the rendering before it, so the "
                "reply's tokens cannot be located (templates that rewrite earlier turns, e.g. "
                "strip reasoning, do this); use prompt/completion records or a simpler template"
            )
        mask[len(start) : len(end)] = [True] * (len(end) - len(start))
    return ids, mask


# ---------------------------------------------------------------------------------------------
# many records


def tokenize_records(
    records: Iterable[dict],
    tokenizer,
    *,
    max_length: int,
    packing: bool = False,
    progress: bool = False,
    encode: Callable[..., tuple[Example, bool]] | None = None,
) -> tuple[list[Example], TokenizeStats]:
    """Tokenise records; drop those with nothing to learn; optionally pack into blocks.

    ``encode(record, max_length=)`` -> (example, truncated) replaces :func:`tokenize_record` (a
    method that reads records its own way, e.g. with two tokenizers).

    Without packing, each record becomes one example cut to `max_length`. With packing, whole
    documents are concatenated in order and cut into blocks of exactly `max_length` tokens (the
    last block may be shorter); a document may continue into the next block.
    """
    records = list(records)
    stats = TokenizeStats(records=len(records), max_length=max_length, packed=packing)
    if progress:
        from tqdm.auto import tqdm

        records = tqdm(records, desc="tokenizing", unit="rec")
    # Packing keeps whole documents (they flow across blocks), so nothing is cut here.
    per_record_limit = 2**62 if packing else max_length
    examples = []
    for record in records:
        if encode is None:
            example, truncated = tokenize_record(record, tokenizer, max_length=per_record_limit)
        else:
            example, truncated = encode(record, max_length=per_record_limit)
        stats.truncated += truncated
        if not any(example.target_mask[1:]):
            stats.dropped += 1
            continue
        examples.append(example)
    if packing:
        examples = pack(examples, max_length)
    stats.examples = len(examples)
    stats.tokens = sum(len(e.input_ids) for e in examples)
    stats.target_tokens = sum(sum(e.target_mask[1:]) for e in examples)
    return examples, stats


def pack(examples: Sequence[Example], block_size: int) -> list[Example]:
    """Concatenate examples and cut into blocks of `block_size` (last one may be shorter).

    position_ids restart at 0 at each document start and at each block start (a continued piece
    is a fresh document to the model: it cannot see the previous block). The first token of each
    document is made a non-target: from inside a packed block, the previous document's last
    position would otherwise be trained to predict the next document's first token.
    """
    ids: list[int] = []
    mask: list[bool] = []
    doc_start: list[bool] = []
    for e in examples:
        ids += e.input_ids
        mask += [False, *e.target_mask[1:]]
        doc_start += [True] + [False] * (len(e.input_ids) - 1)
    blocks = []
    for lo in range(0, len(ids), block_size):
        hi = min(lo + block_size, len(ids))
        positions, p = [], 0
        for t in range(lo, hi):
            p = 0 if doc_start[t] or t == lo else p + 1
            positions.append(p)
        blocks.append(Example(ids[lo:hi], mask[lo:hi], positions))
    return blocks


# ---------------------------------------------------------------------------------------------
# batches


def collate(
    examples: Sequence[Example], *, pad_token_id: int, ignore_index: int = -100
) -> dict[str, torch.Tensor]:
    """Right-pad a batch and build shifted labels (position t is scored on token t+1).

    Returns input_ids, attention_mask, labels, all (B, T) long; plus position_ids (B, T) when any
    example has them (padding gets position 0). For packed batches see `model_inputs`.
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    B, T = len(examples), max(len(e.input_ids) for e in examples)
    input_ids = torch.full((B, T), pad_token_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((B, T), dtype=torch.long)  # (B, T)
    targets = torch.zeros((B, T), dtype=torch.bool)  # (B, T) target_mask, False on padding
    with_positions = any(e.position_ids is not None for e in examples)
    position_ids = torch.zeros((B, T), dtype=torch.long)  # (B, T)
    for b, e in enumerate(examples):
        n = len(e.input_ids)
        if len(e.target_mask) != n:
            raise ValueError(f"example {b}: {n} input_ids but {len(e.target_mask)} mask entries")
        input_ids[b, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        attention_mask[b, :n] = 1
        targets[b, :n] = torch.tensor(e.target_mask, dtype=torch.bool)
        positions = e.position_ids if e.position_ids is not None else range(n)
        position_ids[b, :n] = torch.tensor(list(positions), dtype=torch.long)
    labels = torch.full((B, T), ignore_index, dtype=torch.long)  # (B, T)
    labels[:, :-1] = torch.where(targets[:, 1:], input_ids[:, 1:], ignore_index)  # shift by one
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if with_positions:
        batch["position_ids"] = position_ids
    for key in examples[0].extra or {}:
        rows = [e.extra[key] for e in examples]  # type: ignore[index]
        padded = torch.full((B, max(len(r) for r in rows)), -1, dtype=torch.long)  # (B, T_key)
        for b, row in enumerate(rows):
            padded[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        batch[key] = padded
    return batch


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | bool | None]:
    """Keyword arguments for a transformers causal LM forward pass on a collated batch.

    Packed batches (with position_ids) get attention_mask=None: with use_cache=False, the only way
    transformers 5.x keeps documents in a block from attending to each other (module docstring).
    use_cache=False always: training needs no KV cache.
    """
    if "position_ids" in batch:
        return {
            "input_ids": batch["input_ids"],
            "position_ids": batch["position_ids"],
            "attention_mask": None,
            "use_cache": False,
        }
    return {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "use_cache": False,
    }


# ----------------------------------------------------------------------------- prompts → samples
# On-policy distillation rewrites a batch: the prompt of each row is kept and its completion is
# replaced by one a model samples.


def batch_prompts(batch: dict[str, torch.Tensor], ignore_index: int = -100) -> list[list[int]]:
    """The prompt of each row of a collated batch: every token before the first supervised one.

    (Multi-turn chats keep their earlier turns as prompt; anything after the first supervised
    token is dropped.)"""
    prompts = []
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist(), strict=True):
        first = next((t for t, y in enumerate(labels) if y != ignore_index), None)
        if first is None:
            raise ValueError("a row has no supervised token, so no prompt/completion boundary")
        prompts.append(ids[: first + 1])  # labels[t] is token t+1: the completion starts at t+1
    return prompts


def cut_at_stop(ids: Sequence[int], stop_ids: Collection[int]) -> list[int]:
    """``ids`` up to and including the first stop id (the model must learn to stop; whatever an
    engine wrote after it is no part of the sample)."""
    for i, token in enumerate(ids):
        if token in stop_ids:
            return list(ids[: i + 1])
    return list(ids)


def completion_batch(
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int] | None],
    *,
    pad_token_id: int,
    ignore_index: int = -100,
    device: torch.device | str | None = None,
    rows: Sequence[Example] | None = None,
) -> dict[str, torch.Tensor]:
    """Collate ``prompt + completion`` rows with only the completion tokens supervised, on
    ``device`` (default: the CPU). A completion of None takes ``rows[b]`` whole instead (e.g.
    the data's own row, from :func:`uncollate`)."""
    examples = [
        rows[b]  # type: ignore[index]
        if c is None
        else Example(input_ids=[*p, *c], target_mask=[False] * len(p) + [True] * len(c))
        for b, (p, c) in enumerate(zip(prompts, completions, strict=True))
    ]
    batch = collate(examples, pad_token_id=pad_token_id, ignore_index=ignore_index)
    return {k: v.to(device) for k, v in batch.items()} if device is not None else batch


def uncollate(batch: dict[str, torch.Tensor], ignore_index: int = -100) -> list[Example]:
    """The examples a right-padded, unpacked batch was collated from (ids and target masks; the
    first token, never a target once shifted, comes back as a non-target)."""
    examples = []
    ids, labels = batch["input_ids"].tolist(), batch["labels"].tolist()
    lengths = batch["attention_mask"].sum(1).tolist()
    for row, row_labels, n in zip(ids, labels, lengths, strict=True):
        targets = [False] + [y != ignore_index for y in row_labels[: n - 1]]
        examples.append(Example(input_ids=row[:n], target_mask=targets))
    return examples
