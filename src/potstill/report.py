"""``potstill report RUN_DIR [RUN_DIR …] [-o report.html]``: the report card of finished runs.

Every run is measured again on one held-out set, the first run's (its ``recipe.yaml``), beside
the teacher and, when every run started from the same student, that starting point ("before"):
the registry's quality metrics (:mod:`potstill.metrics`: teacher KL both ways, top-1 agreement,
perplexity, bits per byte, task accuracy from the model's own greedy and sampled answers where
the records carry an ``answer``, the diversity of its samples), then size, decoding speed and
training cost. From each run's ``metrics.jsonl``: loss curves per term and the held-out metrics
over training. A computed verdict per run, the environment, and each run's recipe with the
command that trains it.

Written as one self-contained HTML page (plots inlined, a content security policy that forbids
every fetch), the same content as Markdown beside it (plots in ``<stem>_files/``), and every
number as JSON. Held-out and generation figures are deterministic (fixed seeds, fixed prompts);
decoding speed is measured once per model and machine and kept in ``<stem>_files/speed.json``
for later reports of the same models (delete it to measure again).
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import platform
import re
import shlex
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from potstill.errors import RecipeError
from potstill.metrics import (
    COST,
    DRAFT,
    GENERAL,
    METRICS,
    QUALITY,
    TEACHER_ITSELF,
    Context,
    Settings,
    against_first,
    general_batches,
    markdown_lines,
    markdown_row,
    measure,
    present,
    removed,
    table_cells,
    verdict,
)

# ----------------------------------------------------------------------------- runs


@dataclass
class Run:
    name: str
    path: Path
    recipe: Any  # potstill.recipe.Recipe
    history: list[dict[str, Any]]

    @property
    def model_dir(self) -> Path:
        return self.path / "model"


def parse_runs(specs: list[str]) -> list[Run]:
    """["NAME=DIR" | "DIR", …] -> runs, each a finished ``potstill train`` output directory."""
    from potstill.methods.registry import method_info
    from potstill.recipe import load_recipe

    runs = []
    for spec in specs:
        name, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
        folder = Path(path)
        if not (folder / "recipe.yaml").is_file():
            raise RecipeError(
                f"{spec}: {folder} is not a run directory (no recipe.yaml); pass the "
                "train.output_dir of a finished `potstill train` run"
            )
        if not (folder / "model").is_dir():
            raise RecipeError(
                f"{spec}: {folder} has no saved model ({folder / 'model'}); the run has not "
                "finished, or trained with train.save_model=false: run `potstill train "
                f"{folder / 'recipe.yaml'}` again to finish it"
            )
        recipe = load_recipe(folder / "recipe.yaml")
        if method_info(recipe.method).encoder:
            raise RecipeError(
                f"{spec}: a {recipe.method} run trains a sentence encoder, not a language model; "
                f"its held-out metrics are in {folder / 'metrics.jsonl'}"
            )
        runs.append(
            Run(
                name=name or folder.name,
                path=folder,
                recipe=recipe,
                history=read_history(folder / "metrics.jsonl"),
            )
        )
    names = [r.name for r in runs]
    if len(set(names)) < len(names):
        raise RecipeError(f"two runs share a name ({names}); name them: NAME=DIR")
    return runs


def read_history(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a crash
            continue
    return rows


# ----------------------------------------------------------------------------- measuring


def build_report(
    specs: list[str],
    output: str | Path | None = None,
    settings: Settings | None = None,
    *,
    teacher: Any = None,
) -> dict[str, Any]:
    """Measure the runs, write ``output`` (.html) with its .md and .json; returns the JSON.

    ``teacher`` may be passed in to reuse one already loaded (the demo does)."""
    from potstill.evaluate import token_byte_lengths
    from potstill.models import load_model, load_tokenizer
    from potstill.prepare import load_data, load_models
    from potstill.train import fixed_batches
    from potstill.utils import autocast_dtype, pad_token_id

    settings = settings or Settings()
    runs = parse_runs(specs)
    output = Path(output) if output else _default_output(runs)
    files = output.with_name(output.stem + "_files")
    first = runs[0].recipe
    d = first.draft  # drafts are measured as the first recipe's `draft` section says
    settings = replace(
        settings, gamma=d.gamma, draft_prompts=d.eval_prompts, draft_new_tokens=d.eval_new_tokens
    )
    tokenizer = load_tokenizer(str(runs[0].model_dir))
    for run in runs[1:]:
        if load_tokenizer(str(run.model_dir)).get_vocab() != tokenizer.get_vocab():
            raise RecipeError(
                f"{run.name} ({run.path}) has another tokenizer than {runs[0].name}: a report card "
                "compares runs on one tokenisation of the held-out set; report them separately"
            )
    data = load_data(first, tokenizer, held_out_only=True)
    batches = fixed_batches(
        data.eval, batch_size=first.train.batch_size, pad_id=pad_token_id(tokenizer)
    )
    common = dict(
        tokenizer=tokenizer,
        settings=settings,
        batches=batches,
        records=data.eval_records,
        autocast_dtype=autocast_dtype(first.train.precision),
        byte_lengths=token_byte_lengths(tokenizer),
    )
    if settings.general:
        common["general"] = general_batches(
            tokenizer,
            settings.general,
            max_length=first.data.max_length,
            batch_size=first.train.batch_size,
        )
    speed = SpeedCache(files / "speed.json")
    rows: dict[str, dict[str, Any]] = {}
    teacher_name = first.teacher.model
    if teacher_name and teacher is None:
        teacher = load_model(
            teacher_name,
            dtype=first.teacher.dtype,
            trust_remote_code=first.teacher.trust_remote_code,
        )
    if teacher is not None:
        print(f"measuring the teacher ({teacher_name}) …")
        row = measure(
            Context(model=teacher, speed_cache=speed.bind(f"teacher {teacher_name}"), **common)
        )
        itself = {k: 0.0 for k in GENERAL} if settings.general else {}
        rows["teacher"] = {**TEACHER_ITSELF, **itself, **row}
        teacher_tokenizer = load_tokenizer(
            teacher_name, trust_remote_code=first.teacher.trust_remote_code
        )
    shared_start = all(
        r.recipe.student == first.student and r.recipe.teacher.model == teacher_name for r in runs
    )
    if shared_start:
        print("measuring the student before training …")
        before = load_models(first, teacher=teacher).student
        rows["before training"] = measure(
            Context(
                model=before,
                teacher=teacher,
                vocab_size=_shared_vocab(teacher, teacher_tokenizer, before, tokenizer)
                if teacher is not None
                else None,
                speed_cache=speed.bind(
                    f"before {json.dumps(asdict(first.student), sort_keys=True)} {teacher_name}"
                ),
                **common,
            )
        )
        del before
    for run in runs:
        print(f"measuring {run.name} ({run.path}) …")
        model = load_model(str(run.model_dir))
        shares = teacher is not None and _shared_vocab(teacher, teacher_tokenizer, model, tokenizer)
        rows[run.name] = measure(
            Context(
                model=model,
                teacher=teacher if shares else None,
                vocab_size=shares or None,
                model_dir=run.model_dir,
                run_dir=run.path,
                history=run.history,
                speed_cache=speed.bind(f"run {_weights_signature(run.model_dir)}"),
                **common,
            )
        )
        del model
    speed.save()
    report = {
        "command": command_line(specs, output, settings),
        "eval": {
            "source": first.data.eval or first.data.train,
            "examples": len(data.eval),
            "tokens": int(next(iter(rows.values())).get("eval_tokens", 0)),
        },
        "settings": asdict(settings),
        "rows": rows,
        "verdicts": verdicts(rows, [r.name for r in runs]),
        "runs": {
            r.name: {"path": str(r.path), "method": r.recipe.method, "history": r.history}
            for r in runs
        },
        "environment": environment(first.train.precision),
    }
    write_report(report, runs, output)
    return report


def _shared_vocab(teacher, teacher_tokenizer, model, tokenizer) -> int | None:
    """The shared vocabulary's rows, or None for a student of another tokenizer."""
    from potstill.errors import TokenizerMismatchError
    from potstill.models import check_vocab_compatible

    try:
        return check_vocab_compatible(
            teacher_tokenizer,
            tokenizer,
            teacher_vocab_rows=teacher.get_output_embeddings().weight.shape[0],
            student_vocab_rows=model.get_output_embeddings().weight.shape[0],
        )
    except TokenizerMismatchError:
        return None


def _default_output(runs: list[Run]) -> Path:
    """report.html in the runs' common folder."""
    common = Path(os.path.commonpath([str(r.path.resolve()) for r in runs]))
    if len(runs) == 1:
        common = runs[0].path.resolve()
    return common / "report.html"


def _weights_signature(model_dir: Path) -> str:
    """A saved model's identity for the speed cache: its files' names, sizes and times."""
    return ";".join(
        f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in sorted(model_dir.iterdir())
    )


class SpeedCache:
    """Decoding speeds measured on this machine, per model, kept between reports."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {}

    def bind(self, model_key: str):
        key = f"{model_key} | {_cpu_name()} | torch {_torch_version()}"

        def cached(run):
            if key not in self.data:
                self.data[key] = run()
            return self.data[key]

        return cached

    def save(self) -> None:
        from potstill.utils import atomic_write

        atomic_write(self.path, json.dumps(self.data, indent=1, sort_keys=True))


def verdicts(rows: dict[str, dict[str, Any]], names: list[str]) -> list[str]:
    """Each run against the student before training, then each run after the first against the
    first."""
    said = []
    if "before training" in rows:
        start = rows["before training"]
        said += [f"{verdict(n, rows[n], 'the student before training', start)}." for n in names]
    return said + against_first({n: rows[n] for n in names})


def command_line(specs: list[str], output: Path, s: Settings) -> str:
    default = Settings()
    flags = []
    if not s.generation:
        flags.append("--no-generation")
    if s.prompts != default.prompts:
        flags.append(f"--prompts {s.prompts}")
    if s.max_new_tokens != default.max_new_tokens:
        flags.append(f"--max-new-tokens {s.max_new_tokens}")
    if not s.speed:
        flags.append("--no-speed")
    if s.general:
        flags.append(f"--general {s.general}")
    if s.speculative:
        flags.append("--speculative")
    if s.harness_tasks:
        flags.append("--lm-eval " + ",".join(s.harness_tasks))
    if s.harness_include:
        flags.append(f"--lm-eval-include {s.harness_include}")
    if s.harness_limit is not None:
        flags.append(f"--lm-eval-limit {s.harness_limit}")
    return " ".join(["potstill report", *map(shlex.quote, specs), "-o", str(output), *flags])


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _torch_version() -> str:
    import torch

    return torch.__version__


def environment(precision: str) -> dict[str, Any]:
    import torch
    import transformers

    from potstill import __version__
    from potstill.utils import precision_note

    flags = set()
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = set(re.search(r"^flags\s*:(.*)$", text, re.M).group(1).split())
    except (OSError, AttributeError):
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
    return {
        "cpu": _cpu_name(),
        "cpu_features": [f for f in wanted if f in flags],
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "precision": precision_note(precision),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "potstill": __version__,
    }


# ----------------------------------------------------------------------------- the page


@dataclass
class Doc:
    """The report's content once, rendered as Markdown and as HTML."""

    blocks: list[tuple] = field(default_factory=list)
    images: dict[str, bytes] = field(default_factory=dict)  # file name -> PNG

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def items(self, items: list[str]) -> None:
        if items:
            self.blocks.append(("ul", items))

    def table(self, header: list[str], body: list[list[str]]) -> None:
        if body:
            self.blocks.append(("table", header, body))

    def image(self, name: str, alt: str, png: bytes) -> None:
        self.images[name] = png
        self.blocks.append(("img", name, alt))

    def code(self, text: str, summary: str | None = None) -> None:
        self.blocks.append(("code", text, summary))

    def markdown(self, files: str) -> str:
        out = []
        for kind, *rest in self.blocks:
            if kind == "h":
                out.append("#" * rest[0] + " " + rest[1])
            elif kind == "p":
                out.append(rest[0])
            elif kind == "ul":
                out.append("\n".join(f"- {item}" for item in rest[0]))
            elif kind == "table":
                out.append("\n".join(markdown_lines(*rest)))
            elif kind == "img":
                out.append(f"![{rest[1]}]({files}/{rest[0]})")
            elif kind == "code":
                text, summary = rest
                fence = (
                    f"```yaml\n{text.rstrip()}\n```" if summary else f"```\n{text.rstrip()}\n```"
                )
                out.append(f"{summary}:\n\n{fence}" if summary else fence)
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        body = []
        for kind, *rest in self.blocks:
            if kind == "h":
                body.append(f"<h{rest[0]}>{_inline(rest[1])}</h{rest[0]}>")
            elif kind == "p":
                body.append(f"<p>{_inline(rest[0])}</p>")
            elif kind == "ul":
                body.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in rest[0]) + "</ul>")
            elif kind == "table":
                header, rows = rest
                head = "".join(f"<th>{_inline(c)}</th>" for c in header)
                cells = "".join(
                    "<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>"
                    for row in rows
                )
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>")
            elif kind == "img":
                data = base64.b64encode(self.images[rest[0]]).decode()
                body.append(
                    f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(rest[1])}">'
                    f"<figcaption>{html.escape(rest[1])}</figcaption></figure>"
                )
            elif kind == "code":
                text, summary = rest
                pre = f"<pre><code>{html.escape(text.rstrip())}</code></pre>"
                body.append(
                    f"<details><summary>{_inline(summary)}</summary>{pre}</details>"
                    if summary
                    else pre
                )
        return _PAGE.format(title=html.escape(title), body="\n".join(body))


def _inline(text: str) -> str:
    """Markdown's `code` and **bold** in a line, as HTML (everything else escaped)."""
    text = html.escape(text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font: 15px/1.5 system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #1d1d1f; }}
h1 {{ font-size: 1.6em; }} h2 {{ font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.92em; }}
th, td {{ border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }} thead {{ background: #f3f3f5; }}
code {{ background: #f3f3f5; padding: 0 0.25em; border-radius: 3px; }}
pre {{ background: #f6f6f8; padding: 0.8em; overflow-x: auto; }}
img {{ max-width: 100%; }} figure {{ margin: 1em 0; }} figcaption {{ color: #555; font-size: 0.9em; }}
</style>
</head>
<body>
{body}
</body>
</html>
"""


def render(report: dict[str, Any], runs: list[Run]) -> Doc:
    doc = Doc()
    rows, e, s = report["rows"], report["eval"], report["settings"]
    doc.h(1, "potstill report card: " + ", ".join(r.name for r in runs))
    doc.p(f"Re-create this page: `{report['command']}`")
    doc.h(2, "Verdicts")
    doc.items(report["verdicts"])
    doc.h(2, "Held-out quality")
    generation = (
        f" Generation: the first {s['prompts']} held-out prompts, up to {s['max_new_tokens']} new "
        f"tokens, greedy and sampled at T=1 (seed {s['seed']}); task accuracy where the records "
        "carry an answer."
        if s["generation"]
        else " Generation measures were turned off (`--no-generation`)."
    )
    doc.p(
        f"Every model on the same held-out set: {e['examples']} examples, {e['tokens']:,} "
        f"supervised tokens from `{e['source']}` (the first run's recipe); teacher-forced metrics "
        f"per token, KL in nats.{generation}"
    )
    doc.table(*table_cells(rows, QUALITY))
    if present(rows, GENERAL):
        doc.h(2, "A general copy? Text of other kinds")
        doc.p(
            f"Teacher KL (nats per token) on the first {s['general']} held-out records of each "
            "kind of `bundled:general`: prose (Shakespeare's held-out plays), documentation (the "
            "docstrings of held-out Python modules), code (their source) and worked maths "
            "(gsm_symbolic), whatever the runs trained on."
        )
        doc.table(*table_cells(rows, GENERAL))
        doc.items(removed(rows, GENERAL, "before training"))
    if present(rows, DRAFT):
        doc.h(2, "As speculative-decoding drafts for the teacher")
        doc.p(
            f"γ = {s['gamma']} drafted tokens per target pass; measured on {s['draft_prompts']} held-out prompts."
        )
        doc.table(*table_cells(rows, DRAFT))
    harness = {n: r["harness"] for n, r in rows.items() if r.get("harness")}
    if harness:
        doc.h(2, "lm-evaluation-harness")
        limit = s["harness_limit"]
        doc.p(
            "Scored by the harness itself (`lm_eval.simple_evaluate`), "
            + (f"the first {limit} documents of each task." if limit else "every document.")
        )
        columns = sorted({(t, k) for h in harness.values() for t, ms in h.items() for k in ms})
        doc.table(
            ["model", *(f"{t} {k}" for t, k in columns)],
            [[n, *(_number(h.get(t, {}).get(k)) for t, k in columns)] for n, h in harness.items()],
        )
    doc.h(2, "Size, speed and training cost")
    if s["speed"]:
        doc.p(
            f"Decoding: greedy, {s['speed_new_tokens']} new tokens per prompt, one prompt at a time "
            f"and {s['speed_batch']} together, on {report['environment']['cpu']}"
            + (f" / {report['environment']['gpu']}" if report["environment"]["gpu"] else "")
            + " (measured once per model and machine: `"
            + "speed.json` beside this page)."
        )
    doc.table(*table_cells(rows, COST))
    plots = training_plots(runs, rows.get("before training"))
    if plots:
        doc.h(2, "Training")
        for name, alt, png in plots:
            doc.image(name, alt, png)
    doc.h(2, "Runs")
    for run in runs:
        r = run.recipe
        doc.p(
            f"**{run.name}**: method `{r.method}`, `{run.path}`; trained by "
            f"`potstill train {run.path / 'recipe.yaml'}`."
        )
        doc.code((run.path / "recipe.yaml").read_text(), summary=f"recipe of {run.name}")
    doc.h(2, "Environment")
    env = report["environment"]
    doc.table(
        ["", "value"],
        [
            [k, "—" if v in (None, []) else ", ".join(v) if isinstance(v, list) else str(v)]
            for k, v in env.items()
        ],
    )
    return doc


def _number(value: Any) -> str:
    return "—" if value is None else f"{value:.4g}"


_BOOKKEEPING = {
    "step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "train_seconds",
    "sequence_time_share", "peak_memory_mb",
}  # fmt: skip
_OVER_TRAINING = ("teacher_kl", "top1_agreement", "perplexity", "bits_per_byte", "acceptance")


def training_plots(runs: list[Run], before: dict[str, Any] | None) -> list[tuple[str, str, bytes]]:
    """(file name, caption, PNG): the loss and its terms per run; held-out metrics over training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    _thousands = FuncFormatter(lambda x, _: f"{x / 1000:g}k" if x >= 1000 else f"{x:g}")
    out = []
    logged = [r for r in runs if any("loss" in h for h in r.history)]
    if logged:
        fig, axes = plt.subplots(1, len(logged), figsize=(5.5 * len(logged), 3.8), squeeze=False)
        for ax, run in zip(axes[0], logged, strict=True):
            train_rows = [h for h in run.history if "loss" in h]
            terms = [
                k for k in train_rows[-1]
                if k not in _BOOKKEEPING and isinstance(train_rows[-1][k], int | float)
                and not k.startswith(("eval/", "own_", "on_policy", "student_", "teacher_sample"))
            ]  # fmt: skip
            xs = [h["tokens"] for h in train_rows]
            ax.plot(xs, [h["loss"] for h in train_rows], label="loss (weighted sum)", lw=2)
            for term in terms:
                ax.plot(xs, [h.get(term, float("nan")) for h in train_rows], label=term, lw=1)
            ax.set(title=f"{run.name} ({run.recipe.method})", xlabel="tokens", ylabel="nats/token")
            ax.xaxis.set_major_formatter(_thousands)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        out.append(("loss_terms.png", "training loss and its terms, per run", _png(fig)))
    keys = [
        k for k in _OVER_TRAINING
        if any(f"eval/{k}" in h for r in runs for h in r.history)
    ]  # fmt: skip
    if keys:
        fig, axes = plt.subplots(1, len(keys), figsize=(4.6 * len(keys), 3.6), squeeze=False)
        for ax, key in zip(axes[0], keys, strict=True):
            for run in runs:
                points = [
                    (h["tokens"], h[f"eval/{key}"]) for h in run.history if f"eval/{key}" in h
                ]
                if before is not None and key in before:
                    points = [(0, before[key]), *points]
                if points:
                    ax.plot(*zip(*points, strict=True), marker="o", label=run.name)
            m = METRICS[key]
            ax.set(title=f"held-out {m.header}{m.arrow}", xlabel="tokens")
            ax.xaxis.set_major_formatter(_thousands)
            if key == "perplexity":
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        out.append(("held_out.png", "held-out metrics over training (tokens 0: before)", _png(fig)))
    return out


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def write_report(report: dict[str, Any], runs: list[Run], output: Path) -> None:
    from potstill.utils import atomic_write

    doc = render(report, runs)
    files = output.with_name(output.stem + "_files")
    for name, png in doc.images.items():
        atomic_write(files / name, png)
    atomic_write(output.with_suffix(".md"), doc.markdown(files.name))
    atomic_write(output.with_suffix(".json"), json.dumps(report, indent=1, default=str))
    atomic_write(output, doc.html(f"potstill report card: {', '.join(r.name for r in runs)}"))
    print(
        f"report card: {output} (and {output.with_suffix('.md').name}, {output.with_suffix('.json').name})"
    )


def print_summary(report: dict[str, Any]) -> None:
    for keys in (QUALITY, GENERAL):
        header, body = table_cells(report["rows"], keys)
        for cells in (header, *body) if body else ():
            print(markdown_row(cells))
    for line in removed(report["rows"], GENERAL, "before training"):
        print(line)
    for line in report["verdicts"]:
        print(line)
