"""Answer extraction and checking: the extractors, numeric comparison, reasoning-gym's scorers."""

from __future__ import annotations

from fractions import Fraction

import pytest

from potstill.verify import (
    VerifyError,
    answer_region,
    answers_match,
    extract_answer_line,
    extract_boxed,
    extract_hash,
    extract_last_number,
    parse_number,
    reasoning_gym_score,
    reference_of,
    verify,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("17 + 25 = 42\n\nAnswer: 42", "42"),
        ("**Answer:** 1,200.", "1,200"),
        ("Final answer: $12$", "12"),
        ("answer: Paris", "Paris"),
        ("Answer: 3\n...on second thought\nAnswer: 4", "4"),  # the last one wins
        ("Answer:\n", None),
        ("no final line here", None),
    ],
)
def test_answer_line(text, expected):
    assert extract_answer_line(text) == expected


def test_hash_boxed_and_last_number():
    assert extract_hash("She pays 5 * 3 = 15 dollars.\n#### 15") == "15"
    assert extract_hash("#### 1,000\nmore\n#### 72 ") == "72"
    assert extract_hash("no hashes") is None
    assert extract_boxed(r"so $\boxed{\frac{1}{2}}$.") == r"\frac{1}{2}"
    assert extract_boxed(r"\boxed{a} then \boxed{\{x\}_{n}}") == r"\{x\}_{n}"  # nested, last
    assert extract_boxed(r"\boxed 7") == "7"
    assert extract_boxed(r"cut off \boxed{\frac{1}{") is None  # unbalanced: nothing to read
    assert extract_boxed(r"\boxed{3} and cut \boxed{4") == "3"  # falls back to an earlier one
    assert extract_last_number("He has 3 apples, then 1,250.5 more.") == "1,250.5"
    assert extract_last_number("down to -7") == "-7"
    assert extract_last_number("no digits") is None


def test_parse_number_and_answers_match():
    assert parse_number("1,234.50") == Fraction(246_9, 2)
    assert parse_number("$12") == 12 and parse_number("12.000") == 12 and parse_number("50%") == 50
    assert parse_number(r"\frac{3}{4}") == parse_number("3/4") == Fraction(3, 4)
    assert parse_number("12 apples") == 12
    assert parse_number("12 or 15") is None and parse_number("x") is None
    assert answers_match("$1,200.50", "1200.5")
    assert answers_match(" 36.0 ", "36")
    assert answers_match("17 + 19 = 36", "36")  # the right-hand side is judged
    assert answers_match(r"\frac{3}{4}", "0.75")
    assert not answers_match("12 or 15", "15")
    assert not answers_match("35", "36")
    assert answers_match("Paris.", "paris") and not answers_match("Lyon", "Paris")
    assert not answers_match(None, "36")


def test_think_region():
    assert answer_region("<think>2+2 is 4</think>\nAnswer: 4", think=True) == "\nAnswer: 4"
    assert answer_region("<think>still thinking about Answer: 3", think=True) is None
    assert answer_region("Answer: 4", think=True) is None  # the format was ignored
    assert answer_region("Answer: 4", think=False) == "Answer: 4"
    # an unasked-for reasoning block is skipped even without reasoning=think
    assert answer_region("<think>Answer: 3?</think>Answer: 4", think=False) == "Answer: 4"


def test_verify_modes():
    text = "<think>3 + 4 = 7, Answer: 7?</think>\n#### 7\nAnswer: 7"
    v = verify(text, answer="7", mode="auto", think=True)
    assert (v.answer, v.correct, v.method) == ("7", True, "answer_line")
    assert verify(text, answer="7", mode="hash").method == "hash"
    assert verify("Answer: 8", answer="7", mode="auto").correct is False
    none = verify("I am not sure.", answer="7", mode="auto")
    assert (none.answer, none.correct) == (None, False)  # no answer: counted, never a crash
    assert verify("the total is 7 apples", answer="7").method == "number"  # numeric fallback
    assert verify("the colour is blue", answer="red").answer is None  # no number guess for text
    assert verify("Answer: 7", answer=None).correct is None  # nothing to check against
    assert verify("Answer: 7", answer="7", mode="none").correct is None
    with pytest.raises(VerifyError, match="unknown verify mode 'exact'"):
        verify("Answer: 7", answer="7", mode="exact")


def test_reference_of_reads_what_verify_needs_from_a_record():
    sys_user_reply = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "Answer: 5"},
    ]
    ref = reference_of({"messages": sys_user_reply, "answer": 5, "task": "basic_arithmetic"})
    assert ref == {"answer": "5", "task": "basic_arithmetic", "question": "What is 2 + 3?",
                   "metadata": None}  # fmt: skip
    assert (
        reference_of({"prompt": "2 + 3?", "question": "Add 2 and 3."})["question"] == "Add 2 and 3."
    )
    assert reference_of({"prompt": "2 + 3?"})["question"] == "2 + 3?"
    assert reference_of({"prompt": "x"}, [{"role": "user", "content": "y"}])["question"] == "y"
    odd = reference_of({"prompt": 7, "task": 3, "metadata": [1], "answer": None})
    assert odd == {"answer": None, "task": None, "question": None, "metadata": None}


# ---------------------------------------------------------------------------------------------
# reasoning-gym


def rg_entry(task: str, **config):
    reasoning_gym = pytest.importorskip("reasoning_gym")
    return reasoning_gym.create_dataset(task, size=1, seed=3, **config)[0]


def test_reasoning_gym_basic_arithmetic():
    entry = rg_entry("basic_arithmetic", min_terms=2, max_terms=2, max_digits=2)
    ref, question = entry["answer"], entry["question"]
    good = verify(f"{question}\n\nAnswer: {ref}", answer=ref, task="basic_arithmetic")
    assert (good.correct, good.method, good.score) == (True, "reasoning_gym", 1.0)
    wrong = str(int(ref) + 1)
    bad = verify(f"Answer: {wrong}", answer=ref, task="basic_arithmetic")
    assert bad.correct is False and bad.score < 1
    # the scorer alone wants the exact string; an equal number passes too
    assert verify(f"Answer: {ref}.0", answer=ref, task="basic_arithmetic").correct
    unanswered = verify("I give up", answer=ref, task="basic_arithmetic", mode="reasoning_gym")
    assert (unanswered.answer, unanswered.correct) == (None, False)


def test_reasoning_gym_gsm_symbolic():
    entry = rg_entry("gsm_symbolic")
    ref = entry["answer"]
    cot = entry["metadata"]["answer_cot"]  # a worked solution ending in "#### N"
    assert verify(cot, answer=ref, task="gsm_symbolic").correct
    assert verify(f"So it is {ref} in all.\nAnswer: {ref}", answer=ref, task="gsm_symbolic").correct
    assert not verify("Answer: 1", answer=ref, task="gsm_symbolic").correct
    score = reasoning_gym_score("gsm_symbolic", "1", reference=ref, question=entry["question"])
    assert score is not None and score < 1


def test_reasoning_gym_scorers_that_need_metadata():
    entry = rg_entry("word_sorting")
    ref = entry["answer"]
    with_meta = verify(
        f"Answer: {ref}", answer=ref, task="word_sorting", metadata=entry["metadata"]
    )
    assert (with_meta.correct, with_meta.method) == (True, "reasoning_gym")
    # without the metadata the task's scorer cannot run: plain comparison instead, no crash
    without = verify(f"Answer: {ref}", answer=ref, task="word_sorting")
    assert (without.correct, without.method) == (True, "reasoning_gym_fallback")


def test_reasoning_gym_mode_needs_a_task():
    pytest.importorskip("reasoning_gym")
    with pytest.raises(VerifyError, match="needs records with a reasoning-gym `task`"):
        verify("Answer: 1", answer="1", mode="reasoning_gym")
    with pytest.raises(VerifyError, match="'my_quiz' is not a reasoning-gym task"):
        verify("Answer: 1", answer="1", task="my_quiz", mode="reasoning_gym")
    # auto treats an unknown task as plain data
    assert verify("Answer: 1", answer="1", task="my_quiz").method == "answer_line"
