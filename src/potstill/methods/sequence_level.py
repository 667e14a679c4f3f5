"""Sequence-level distillation (Kim & Rush 2016) and chain-of-thought distillation.

Sequences: the teacher's own completions, written ahead of time by ``potstill generate`` into a
JSONL of ``{"prompt", "completion", ...}`` records (``data.train`` points at it). Kim & Rush train
on the teacher's mode (beam search; here greedy, ``generate.temperature=0``); CoT distillation
samples several reasoning chains per prompt and keeps the ones whose final answer checks out
(``generate.n``, ``generate.verify``, ``generate.keep``; Ho et al. 2023, "Large Language Models
Are Reasoning Teachers"; Hsieh et al. 2023, "Distilling Step-by-Step"; STaR, Zelikman et al. 2022).
Teacher signal: none at training time — the text is the signal, so no teacher is loaded, and
teacher and student may use different tokenizers.
Objective: next-token cross-entropy on the completion tokens only (the prompt is masked), which is
exactly :class:`potstill.methods.sft.SFT`; this class only gives it its own name.
"""

from __future__ import annotations

from dataclasses import dataclass

from potstill.methods.sft import SFT


@dataclass
class SequenceLevel(SFT, name="sequence_level"):
    """SFT on teacher-written completions (see the module docstring)."""
