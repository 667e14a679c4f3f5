"""Two tokenizations of one text, aligned on the character positions where both put a boundary.

Cross-tokenizer distillation needs to know which positions of the student's sequence and of the
teacher's sequence talk about the same text. Each model reads the record through its own tokenizer
(and, for chat records, its own chat template); the character offsets of the tokens then say where
each model's *context* ends: position ``p`` has read the text up to ``end[p]`` and predicts what
comes next.

Coordinates. Only text both models read is comparable: the whole text of a ``text`` record, prompt
and completion of a string ``prompt``/``completion`` record, the assistant replies of a chat (the
templates around them differ). These *shared regions* are laid end to end in one coordinate line,
each region one character apart from the previous, so a boundary of one region never meets a
boundary of another. A token ending in a region gets that coordinate; template tokens outside any
region get none.

Clean boundaries. Byte-level BPE splits a multi-byte character over several tokens, whose offsets
then overlap (they all point at the whole character). A position is a *clean* boundary only when
the next token starts at or after its end: the context is a whole number of characters.

What the alignment gives (all per position; -1 where nothing applies):
* ``span_student[p]`` / ``span_teacher[i]``: the index of the *span* whose text the label of the
  position belongs to. Spans run between consecutive clean boundaries the two sides share, so each
  span is exactly the same text for both models. The first position of a span is where both
  contexts end at the same character: the two next-token distributions there are about the same
  continuation.
* ``start_teacher[p]``: at the first student position of a span, the first teacher position of the
  same span (where the two next-token distributions are compared); -1 elsewhere.
* ``uld_teacher[p]``: ULD's pairing (Boizard et al. 2024, "Towards Cross-Tokenizer Distillation:
  the Universal Logit Distillation Loss"): for student position ``p``, the teacher position whose
  context end is closest to ``p``'s. An approximation: where the boundaries differ, the two
  distributions are about different continuations.
"""

from __future__ import annotations

import bisect
import itertools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from potstill.data.records import record_format
from potstill.data.tokenize import Example, _special_wrapping
from potstill.errors import DataError

NO = -1  # no span / no partner / no coordinate


# ----------------------------------------------------------------------------- vocabulary bytes


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the printable character standing for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_bytes(tokenizer) -> list[bytes | None]:
    """The bytes each vocabulary entry writes into the text; None for special tokens.

    Reads the fast tokenizer's decoder: byte-level BPE (GPT-2, Llama 3, SmolLM, Qwen) maps each
    byte to a printable character; SentencePiece-style vocabularies (Llama 2, Gemma) write spaces
    as "▁" and unknown bytes as ``<0xNN>``.
    """
    return list(_token_bytes(tokenizer))


def _token_bytes(tokenizer) -> tuple[bytes | None, ...]:
    key = (getattr(tokenizer, "name_or_path", ""), len(tokenizer))
    cached = _BYTES_CACHE.get(key)
    if cached is not None and cached[0] is tokenizer:
        return cached[1]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise DataError(
            "cross-tokenizer alignment needs a fast (Rust) tokenizer with character offsets; "
            f"{type(tokenizer).__name__} is a slow one: load it with use_fast=True"
        )
    decoder = json.dumps(json.loads(backend.to_str()).get("decoder"))
    byte_level = '"ByteLevel"' in decoder
    to_byte = _byte_decoder()
    added = tokenizer.added_tokens_decoder  # a property that rebuilds a dict: read it once
    special = set(tokenizer.all_special_ids) | {i for i, t in added.items() if t.special}
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    out: list[bytes | None] = []
    for i, piece in enumerate(pieces):
        if i in special or piece is None:
            out.append(None)
        elif i in added:  # a plain added token: its own text
            out.append(piece.encode())
        elif byte_level:
            out.append(
                bytes(to_byte[c] for c in piece) if all(c in to_byte for c in piece) else None
            )
        elif m := _BYTE_FALLBACK.fullmatch(piece):
            out.append(bytes([int(m.group(1), 16)]))
        else:
            out.append(piece.replace("▁", " ").encode())
    result = tuple(out)
    _BYTES_CACHE[key] = (tokenizer, result)
    return result


_BYTES_CACHE: dict[tuple, tuple[object, tuple]] = {}


def byte_lengths(tokenizer) -> list[int]:
    """UTF-8 bytes each vocabulary entry writes (0 for special tokens): the bits-per-byte divisor."""
    return [len(b) if b is not None else 0 for b in _token_bytes(tokenizer)]


def _spelling_index(tokenizer) -> dict[bytes, int]:
    """bytes -> the one entry that writes them. Several may (SentencePiece's ``<0x41>`` and
    ``A``): the tokenizer emits the ordinary piece, so byte-fallback entries lose, then higher ids."""
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    index: dict[bytes, int] = {}
    fallback: dict[bytes, int] = {}
    for i, b in enumerate(_token_bytes(tokenizer)):
        if not b:
            continue
        into = fallback if _BYTE_FALLBACK.fullmatch(pieces[i] or "") else index
        into.setdefault(b, i)
    return {**fallback, **index}


def shared_vocab(student_tokenizer, teacher_tokenizer) -> tuple[list[int], list[int]]:
    """(student ids, teacher ids), one-to-one, of the entries both vocabularies spell alike."""
    s, t = _spelling_index(student_tokenizer), _spelling_index(teacher_tokenizer)
    common = sorted(set(s) & set(t), key=lambda b: s[b])
    return [s[b] for b in common], [t[b] for b in common]


# ----------------------------------------------------------------------------- one side


@dataclass
class Side:
    """One model's reading of a record."""

    ids: list[int]
    target: list[bool]  # token is a supervised target (as in tokenize.Example.target_mask)
    end: list[int]  # coordinate where the context ending with this token ends; NO outside regions
    clean: list[bool]  # the context is a whole number of characters (no character split after it)
    chars: list[tuple[int, int]] = field(default_factory=list)  # rendered-text offsets


def _offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def _side_from_pieces(
    tokenizer,
    pieces: Sequence[tuple[str, bool]],
    regions: Sequence[tuple[int, int, int]],
    *,
    wrap: bool,
) -> Side:
    """Tokenise ``pieces`` (text, is_target) apart and join them; ``regions`` are shared regions
    (start, stop, coordinate of start) in the joined text's characters.

    ``wrap``: add the tokenizer's own BOS/EOS around the whole (text records) and an EOS target at
    the end, as :mod:`potstill.data.tokenize` does.
    """
    ids: list[int] = []
    spans: list[tuple[int, int]] = []
    target: list[bool] = []
    prefix, suffix = _special_wrapping(tokenizer) if wrap else ([], [])
    ids += prefix
    spans += [(0, 0)] * len(prefix)
    target += [True] * len(prefix)
    shift = 0
    for text, is_target in pieces:
        piece_ids, offsets = _offsets(tokenizer, text)
        ids += piece_ids
        spans += [(a + shift, b + shift) for a, b in offsets]
        target += [is_target] * len(piece_ids)
        shift += len(text)
    ids += suffix
    spans += [(shift, shift)] * len(suffix)
    target += [True] * len(suffix)
    eos = tokenizer.eos_token_id
    if wrap and eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
        spans.append((shift, shift))
        target.append(True)
    return _locate(ids, spans, target, regions)


def _locate(ids, spans, target, regions) -> Side:
    # Offsets may skip characters (tokenizers that trim whitespace from offsets): a token's context
    # then still ends at its own end, and the skipped characters belong to the next token.
    end, clean = [], []
    for p, (_, stop) in enumerate(spans):
        coordinate = NO
        for r_start, r_stop, base in regions:
            if r_start <= stop <= r_stop:
                coordinate = base + stop - r_start
                break
        end.append(coordinate)
        following = spans[p + 1][0] if p + 1 < len(spans) else stop
        clean.append(coordinate != NO and following >= stop)
    return Side(ids, target, end, clean, list(spans))


def read_record(record: dict, tokenizer) -> Side:
    """``record`` through ``tokenizer``: ids, targets and coordinates (see the module docstring)."""
    shape = record_format(record)
    if shape == "text":
        text = record["text"]
        return _side_from_pieces(tokenizer, [(text, True)], [(0, len(text), 0)], wrap=True)
    if shape == "prompt_completion" and isinstance(record["prompt"], str):
        text = record["prompt"] + record["completion"]
        pieces = [(record["prompt"], False), (record["completion"], True)]
        return _side_from_pieces(tokenizer, pieces, [(0, len(text), 0)], wrap=True)
    if shape == "messages":
        return _chat_side(record["messages"], tokenizer, first_target=0)
    messages = record["prompt"] + record["completion"]
    return _chat_side(messages, tokenizer, first_target=len(record["prompt"]))


def _chat_side(messages: list[dict], tokenizer, *, first_target: int) -> Side:
    """Each model's own chat template; the assistant replies are the shared regions."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template, so "
            "chat records cannot be rendered for it; use text or prompt/completion records, or "
            "give it a template (tokenizer.chat_template)"
        )

    def render(upto: list[dict], prompt: bool) -> str:
        return tokenizer.apply_chat_template(upto, tokenize=False, add_generation_prompt=prompt)

    text = render(messages, False)
    regions: list[tuple[int, int, int]] = []
    targets: list[tuple[int, int]] = []
    base = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i < first_target:
            continue
        head, whole = render(messages[:i], True), render(messages[: i + 1], False)
        if not (whole.startswith(head) and text.startswith(whole)):
            raise DataError(
                f"the chat template is not prefix-stable at message {i} (assistant), so the "
                "reply cannot be located; use prompt/completion records"
            )
        content = message["content"]
        at = whole.find(content, len(head))
        if content and at >= 0:
            regions.append((at, at + len(content), base))
            base += len(content) + 1
        targets.append((len(head), len(whole)))
    ids, offsets = _offsets(tokenizer, text)
    target = [any(a <= start < b for a, b in targets) for start, _ in offsets]
    return _locate(ids, offsets, target, regions)


def truncate(side: Side, n: int) -> Side:
    """The first ``n`` tokens. Cleanliness is kept from the whole reading: a token cut off in the
    middle of a character must not look like the end of it."""
    return Side(side.ids[:n], side.target[:n], side.end[:n], side.clean[:n], side.chars[:n])


# ----------------------------------------------------------------------------- the pair


@dataclass
class Alignment:
    span_student: list[int]  # per student position
    span_teacher: list[int]  # per teacher position
    start_teacher: list[int]  # per student position: at a span's start, the teacher's start
    uld_teacher: list[int]  # per student position: the ULD partner among teacher positions
    spans: int  # number of spans


def _labelled(side: Side) -> list[int]:
    """Positions whose next token is a target (they carry a label)."""
    return [p for p in range(len(side.ids) - 1) if side.target[p + 1]]


def _boundaries(side: Side) -> dict[int, tuple[int, int]]:
    """coordinate -> (first, last) position whose context cleanly ends there."""
    out: dict[int, tuple[int, int]] = {}
    for p, (c, ok) in enumerate(zip(side.end, side.clean, strict=True)):
        if ok:
            out[c] = (out[c][0], p) if c in out else (p, p)
    return out


def align(student: Side, teacher: Side) -> Alignment:
    """Spans between shared clean boundaries, and ULD's nearest-end pairing."""
    span_s, span_t = [NO] * len(student.ids), [NO] * len(teacher.ids)
    start_t = [NO] * len(student.ids)
    b_s, b_t = _boundaries(student), _boundaries(teacher)
    common = sorted(set(b_s) & set(b_t))
    spans = 0
    for c_a, c_b in itertools.pairwise(common):
        ranges = []
        for side, b in ((student, b_s), (teacher, b_t)):
            first, stop = b[c_a][1], b[c_b][0]  # labels of positions first..stop-1: tokens after
            ok = (
                first < stop
                and all(side.target[p + 1] for p in range(first, stop))
                and all(side.end[p + 1] != NO for p in range(first, stop))
            )
            ranges.append((first, stop) if ok else None)
        if None in ranges:
            continue
        for spans_of, (first, stop) in zip((span_s, span_t), ranges, strict=True):
            spans_of[first:stop] = [spans] * (stop - first)
        start_t[ranges[0][0]] = ranges[1][0]
        spans += 1
    return Alignment(span_s, span_t, start_t, _uld_pairs(student, teacher), spans)


def _uld_pairs(student: Side, teacher: Side) -> list[int]:
    pairs = [NO] * len(student.ids)
    candidates = [i for i in _labelled(teacher) if teacher.end[i] != NO]
    if not candidates:
        return pairs
    ends = [teacher.end[i] for i in candidates]  # non-decreasing: offsets run forward
    last = ends[-1]
    for p in _labelled(student):
        e = student.end[p]
        if e == NO or e > last:  # past what the teacher read: no partner (truncation)
            continue
        k = bisect.bisect_left(ends, e)
        best = min((j for j in (k - 1, k) if 0 <= j < len(ends)), key=lambda j: abs(ends[j] - e))
        pairs[p] = candidates[best]
    return pairs


def cross_example(
    record: dict,
    student_tokenizer,
    teacher_tokenizer,
    *,
    max_length: int,
    teacher_max_length: int | None = None,
) -> tuple[Example, bool]:
    """The student's Example with the teacher's reading and the alignment in ``extra``.

    The student is cut to ``max_length`` tokens; the teacher reads the same stretch of text (cut
    where the student's was, and to ``teacher_max_length`` tokens, default ``2 * max_length``).
    Returns (example, truncated).
    """
    student, teacher = (
        read_record(record, student_tokenizer),
        read_record(record, teacher_tokenizer),
    )
    truncated = len(student.ids) > max_length
    if truncated:
        student = truncate(student, max_length)
        limit = student.chars[-1][1] if student.chars else 0  # the student read up to here
        keep = sum(1 for a, _ in teacher.chars if a < limit)
        teacher = truncate(teacher, keep)
    teacher_cap = teacher_max_length or 2 * max_length
    if len(teacher.ids) > teacher_cap:
        teacher, truncated = truncate(teacher, teacher_cap), True
    a = align(student, teacher)
    extra = {
        "teacher_input_ids": teacher.ids,
        "teacher_labels": [
            teacher.ids[i + 1] if i + 1 < len(teacher.ids) and teacher.target[i + 1] else NO
            for i in range(len(teacher.ids))
        ],
        "span_student": a.span_student,
        "span_teacher": a.span_teacher,
        "start_teacher": a.start_teacher,
        "uld_teacher": a.uld_teacher,
    }
    return Example(student.ids, student.target, extra=extra), truncated
