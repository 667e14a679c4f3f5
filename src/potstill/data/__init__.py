"""The data layer: load records, tokenise them with loss masks, collate shifted labels.

records = load_records("data.jsonl")                       # or "bundled:rg/gsm_symbolic", ...
examples, stats = tokenize_records(records, tokenizer, max_length=512)
print(stats.summary())
batch = collate(examples[:8], pad_token_id=tokenizer.pad_token_id)
"""

from potstill.data.bundled import BUNDLED, final_answer, load_bundled
from potstill.data.records import load_records, record_format
from potstill.data.tokenize import (
    Example,
    TokenizeStats,
    batch_prompts,
    collate,
    completion_batch,
    cut_at_stop,
    model_inputs,
    pack,
    tokenize_record,
    tokenize_records,
    uncollate,
)
from potstill.errors import DataError

__all__ = [
    "BUNDLED",
    "DataError",
    "Example",
    "TokenizeStats",
    "batch_prompts",
    "collate",
    "completion_batch",
    "cut_at_stop",
    "final_answer",
    "load_bundled",
    "load_records",
    "model_inputs",
    "pack",
    "record_format",
    "tokenize_record",
    "tokenize_records",
    "uncollate",
]
