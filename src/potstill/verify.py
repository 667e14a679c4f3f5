"""Is a teacher's completion right? Extract its final answer and check it against the reference.

Extractors (each returns the answer text or None — None is "no answer", never an error):

    answer_line    the last "Answer: X" line (the format the bundled reasoning-gym replies teach)
    hash           GSM8K's "#### N" (Cobbe et al. 2021)
    boxed          the last \\boxed{...} (nested braces), MATH's convention (Hendrycks et al. 2021)
    number         the last number in the text (1,234.50 / -3 / 3/4 / .5)

Checks:

    answers_match  numbers compare as exact rationals ("1,200.50" == "$1200.5" == "2401/2"); other
                   answers compare case- and whitespace-insensitively
    reasoning_gym  the task's own ``score_answer`` (correct = score 1.0, or equal numbers for a
                   numeric reference); tasks whose scorer needs metadata the record does not carry
                   fall back to ``answers_match``

``verify(text, answer=..., task=..., mode=...)`` ties them together; with ``think=True`` the answer
is read only after the closing ``</think>`` of a reasoning block, and a reply without one has no
answer. ``reference_of(record)`` reads those keywords off a data record, for ``potstill generate``
and on_policy's ``verify`` alike.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from potstill.errors import VerifyError

VERIFY_MODES = ("none", "auto", "answer_line", "number", "hash", "boxed", "reasoning_gym")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass(frozen=True)
class Verification:
    answer: str | None  # the extracted final answer; None = the completion gave none
    correct: bool | None  # None when there is nothing to check against (mode none, no reference)
    method: str  # how: "answer_line", "hash", ..., "reasoning_gym", "reasoning_gym_fallback"
    score: float | None = None  # reasoning-gym's score in [0, 1], when it was asked


# ---------------------------------------------------------------------------------------------
# extractors


_ANSWER_LINE = re.compile(r"(?i)\banswer\s*\**\s*[:：][ \t*]*([^\n]*)")  # "**Answer:** 42" too
_HASH = re.compile(r"(?m)^\s*####\s*(.+?)\s*$")
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")
# 1,234,567.89 | 1234.5 | .5 | 3/4 — thousands separators only in groups of three
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?|-?\.\d+")


def extract_answer_line(text: str) -> str | None:
    """'... \\n\\nAnswer: 42' -> '42'; also '**Answer:** 42', 'Final answer: 42'; the last wins."""
    found = [m for m in _ANSWER_LINE.findall(text) if _clean(m)]
    return _clean(found[-1]) if found else None


def extract_hash(text: str) -> str | None:
    """GSM8K's '#### 42' -> '42' (the last such line)."""
    found = _HASH.findall(text)
    return _clean(found[-1]) if found else None


def extract_boxed(text: str) -> str | None:
    r"""The content of the last '\boxed{...}', braces balanced: '\boxed{\frac{1}{2}}' -> '\frac{1}{2}'."""
    starts = list(_BOXED.finditer(text))
    for match in reversed(starts):
        rest = text[match.end() :]
        if not rest.startswith("{"):  # '\boxed 5' (no braces): one token
            token = rest.split(maxsplit=1)
            if token and token[0] not in ("$", "\\]"):
                return _clean(token[0].rstrip("$"))
            continue
        depth = 0
        for i, ch in enumerate(rest):
            depth += {"{": 1, "}": -1}.get(ch, 0)
            if depth == 0:
                return _clean(rest[1:i])
        # unbalanced (cut off by max_new_tokens): try an earlier one
    return None


def extract_last_number(text: str) -> str | None:
    """The last number in the text, as written: 'so 1,200 apples.' -> '1,200'."""
    found = _NUMBER.findall(text)
    return found[-1] if found else None


EXTRACTORS = {
    "answer_line": extract_answer_line,
    "hash": extract_hash,
    "boxed": extract_boxed,
    "number": extract_last_number,
}


def _clean(answer: str) -> str:
    """Strip markdown emphasis, LaTeX maths delimiters, quotes and a trailing full stop."""
    answer = answer.strip().strip("*_`").strip()
    answer = re.sub(r"^(\$+|\\\(|\\\[)|(\$+|\\\)|\\\])$", "", answer).strip()
    return answer.removesuffix(".").strip().strip("\"'").strip()


def answer_region(text: str, *, think: bool) -> str | None:
    """The part of a completion that holds the final answer.

    think=True: the text after the last ``</think>``; None when the block was never closed (the
    reasoning ran out of tokens or the format was ignored). think=False: the whole text, except
    that a reasoning block the teacher wrote unasked is skipped too.
    """
    if THINK_CLOSE in text:
        return text.rsplit(THINK_CLOSE, 1)[1]
    return None if think else text


# ---------------------------------------------------------------------------------------------
# comparison


def parse_number(text: str) -> Fraction | None:
    r"""'1,234.50' / '$12' / '-3' / '3/4' / '\frac{3}{4}' / '50%' -> an exact Fraction, else None.

    Exactly one number must be present once currency signs, thousands separators, a percent sign
    and surrounding words without digits are ignored ("12 apples" is 12; "12 or 15" is None).
    """
    s = text.strip()
    s = re.sub(r"\\[dt]?frac\s*\{([^{}]+)\}\s*\{([^{}]+)\}", r"\1/\2", s)  # \frac{3}{4} -> 3/4
    s = re.sub(r"\\text\{[^{}]*\}|\\[,!;: ]|\\%|[$€£%]", " ", s)
    found = _NUMBER.findall(s)
    if len(found) != 1:
        return None
    number = found[0].replace(",", "").replace(" ", "")
    try:
        if "/" in number:
            num, den = number.split("/")
            return Fraction(num) / Fraction(den) if Fraction(den) != 0 else None
        return Fraction(number)  # exact: Fraction("0.1") == 1/10, so 12.50 == 12.5
    except ValueError:
        return None


def _normalise_text(text: str) -> str:
    text = re.sub(r"\\text\{([^{}]*)\}", r"\1", text)
    return re.sub(r"\s+", " ", text).strip().strip(".").strip().casefold()


def answers_match(predicted: str | None, reference: str) -> bool:
    """True when ``predicted`` means ``reference``: as numbers when the reference is one, else as
    text (case, whitespace and a trailing full stop ignored). A missing answer never matches."""
    if predicted is None:
        return False
    ref_number = parse_number(reference)
    if ref_number is not None:
        if "=" in predicted:  # "17 + 25 = 42" -> judge the right-hand side
            predicted = predicted.rsplit("=", 1)[1]
        return parse_number(predicted) == ref_number
    return _normalise_text(predicted) == _normalise_text(reference)


# ---------------------------------------------------------------------------------------------
# reasoning-gym


@functools.cache
def reasoning_gym_tasks() -> frozenset[str]:
    """The reasoning-gym task names, or an empty set when reasoning-gym is not installed."""
    try:
        from reasoning_gym.factory import DATASETS
    except ImportError:
        return frozenset()
    return frozenset(DATASETS)


def is_reasoning_gym_task(task: Any) -> bool:
    return isinstance(task, str) and task in reasoning_gym_tasks()


@functools.cache
def _rg_dataset(task: str) -> Any:
    """A one-item dataset of ``task``: its ``score_answer`` is what we need, not its items."""
    import reasoning_gym

    return reasoning_gym.create_dataset(task, size=1, seed=0)


def reasoning_gym_score(
    task: str,
    answer: str | None,
    *,
    reference: str,
    question: str | None = None,
    metadata: dict | None = None,
) -> float | None:
    """reasoning-gym's own ``score_answer(answer, entry)`` in [0, 1], or None when the task's
    scorer cannot run on this entry (many read fields of ``entry["metadata"]``, which a record
    carries only if it was exported with it; the bundled records do carry it)."""
    if not reasoning_gym_tasks():
        raise VerifyError(
            "verify: reasoning_gym needs reasoning-gym: pip install 'potstill[bundled]'"
        )
    if task not in reasoning_gym_tasks():
        raise VerifyError(
            f"verify: reasoning_gym: {task!r} is not a reasoning-gym task; "
            "use generate.verify=auto (or answer_line / number) for other data"
        )
    entry = {"question": question or "", "answer": reference, "metadata": dict(metadata or {})}
    try:
        return float(_rg_dataset(task).score_answer(answer, entry))
    except Exception:  # a third-party scorer: KeyError on missing metadata, parse errors, ...
        return None


def reference_of(record: dict, prompt: str | list[dict] | None = None) -> dict[str, Any]:
    """What ``verify`` needs of a data record, as its keywords: ``answer`` (a string, or None),
    ``task`` and ``metadata`` when well-typed, and ``question`` — the record's own, else the last
    user turn of ``prompt`` (default: the record's ``prompt`` or ``messages``), for a
    reasoning-gym scorer that reads it."""
    task, metadata, answer = record.get("task"), record.get("metadata"), record.get("answer")
    if prompt is None:
        prompt = record.get("prompt") or record.get("messages")
    return {
        "answer": None if answer is None else str(answer),
        "task": task if isinstance(task, str) else None,
        "question": record.get("question") or _last_user_turn(prompt),
        "metadata": metadata if isinstance(metadata, dict) else None,
    }


def _last_user_turn(prompt: Any) -> str | None:
    if isinstance(prompt, str):
        return prompt
    if not isinstance(prompt, list):
        return None
    turns = [m for m in prompt if isinstance(m, dict) and isinstance(m.get("content"), str)]
    users = [m["content"] for m in turns if m.get("role") == "user"]
    return users[-1] if users else (turns[-1]["content"] if turns else None)


# ---------------------------------------------------------------------------------------------
# the one entry point


def verify(
    text: str,
    *,
    answer: Any = None,
    task: str | None = None,
    question: str | None = None,
    metadata: dict | None = None,
    mode: str = "auto",
    think: bool = False,
) -> Verification:
    """Extract the final answer of ``text`` and check it against the reference ``answer``.

    mode: none (no check: correct None) | answer_line | number | hash | boxed (that extractor,
    then ``answers_match``) | reasoning_gym (the task's ``score_answer``; needs ``task``) | auto
    (reasoning_gym when ``task`` is a reasoning-gym task, else the first extractor that finds
    something of answer_line, hash, boxed, then — only for numeric references — number).
    A reference of None leaves ``correct`` None (the answer is still extracted).
    """
    if mode not in VERIFY_MODES:
        raise VerifyError(f"unknown verify mode {mode!r}; choose one of {', '.join(VERIFY_MODES)}")
    if mode == "none":
        return Verification(answer=None, correct=None, method="none")
    reference = None if answer is None else str(answer)
    region = answer_region(text, think=think)
    use_rg = mode == "reasoning_gym" or (mode == "auto" and is_reasoning_gym_task(task))
    if mode in EXTRACTORS:
        order = [mode]
    else:  # the last number is a guess; only worth it when the reference is a number
        numeric = reference is not None and parse_number(reference) is not None
        order = ["answer_line", "hash", "boxed", *(["number"] if numeric else [])]
    method, extracted = order[0], None
    if region is not None:
        for name in order:
            extracted = EXTRACTORS[name](region)
            if extracted is not None:
                method = name
                break
    if use_rg:
        if task is None:
            raise VerifyError(
                "verify: reasoning_gym needs records with a reasoning-gym `task` field; "
                "use generate.verify=auto for other data"
            )
        if reference is None:
            return Verification(extracted, None, "reasoning_gym")
        if extracted is None:
            return Verification(None, False, "reasoning_gym", 0.0)
        score = reasoning_gym_score(
            task, extracted, reference=reference, question=question, metadata=metadata
        )
        if score is not None:
            # Equal numbers also pass: some scorers reject "28,080" or "36.0" for 28080 / 36.
            numeric = parse_number(reference) is not None and answers_match(extracted, reference)
            return Verification(extracted, score >= 1.0 or numeric, "reasoning_gym", score)
        return Verification(
            extracted, answers_match(extracted, reference), "reasoning_gym_fallback"
        )
    if reference is None:
        return Verification(extracted, None, method)
    return Verification(extracted, answers_match(extracted, reference), method)
