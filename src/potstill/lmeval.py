"""lm-evaluation-harness tasks on a model in memory: the ``lmeval`` extra.

:func:`harness` hands the model and its tokenizer to the harness's own Hugging Face wrapper
(``lm_eval.models.huggingface.HFLM``) and runs ``lm_eval.simple_evaluate`` on the named tasks,
the harness's built-in ones (downloaded from the Hub by the harness) or custom ones from YAML
files in ``include_path`` (a local JSONL needs no network, e.g.::

    task: my_qa
    dataset_path: json
    dataset_kwargs: {data_files: {test: /data/my_qa.jsonl}}
    test_split: test
    output_type: multiple_choice
    doc_to_text: "{{question}}"
    doc_to_choice: "{{choices}}"
    doc_to_target: "{{label}}"
    metric_list: [{metric: acc}]

). The scoring is the harness's; potstill only returns its numbers: ``{task: {metric: value}}``
with the filter suffix (``acc,none`` -> ``acc``) and the standard errors dropped.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from potstill.errors import RecipeError

INSTALL = "pip install 'potstill[lmeval]'"


def harness(
    model: Any,
    tokenizer: Any,
    tasks: list[str],
    *,
    include_path: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Run the harness ``tasks`` on ``model``; ``limit`` documents per task (all when None)."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise RecipeError(
            f"--lm-eval needs the lm-evaluation-harness, which is not installed: {INSTALL}"
        ) from None
    if include_path is not None and not Path(include_path).is_dir():
        raise RecipeError(f"--lm-eval-include {include_path} is not a folder of task YAML files")
    manager = _task_manager(str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise RecipeError(
            f"lm-evaluation-harness has no task {', '.join(unknown)}"
            + ("" if include_path else "; custom tasks need --lm-eval-include DIR")
            + " (`lm-eval ls tasks` lists the built-in ones)"
        )
    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        task_manager=manager,
        limit=limit,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
        log_samples=False,
    )
    out: dict[str, dict[str, float]] = {}
    for task, metrics in results["results"].items():
        out[task] = {
            key.split(",")[0]: float(value)
            for key, value in metrics.items()
            if isinstance(value, int | float) and "_stderr" not in key
        }
    return out


@functools.cache
def _task_manager(include_path: str | None):
    """The harness's index of its tasks (and ``include_path``'s): built once per process, as
    indexing every built-in task takes seconds."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)
