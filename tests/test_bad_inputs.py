"""Bad inputs through the real CLI, one process per case (forked by tests/_forker.py): each must exit with status 2, print one
line that names the fix (``potstill VERB: error: …``) and no traceback, and leave nothing behind —
every file the case had before is unchanged and nothing new is written.

The table (:data:`CASES`) is the documentation: ``docs/errors.md`` is rendered from it together
with the line each case prints; ``python tests/test_bad_inputs.py`` writes it again and a test
checks it is current. The cases run concurrently (two processes at a time) in one module-scoped
fixture; each case is its own test over the result.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import http.server
import json
import os
import queue
import re
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from _forker import Forker

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "errors.md"
TIMEOUT = 90  # seconds a case may take; a hang is a failure


@dataclass(frozen=True)
class Case:
    name: str  # the test id
    what: str  # what is wrong, for the docs
    argv: tuple[str, ...]  # the CLI's arguments; {b} is the shared base folder, {w} the case's own
    says: str  # a piece of the one line the case must print (a regular expression)
    files: dict[str, Callable[[Path], bytes | str]] = field(default_factory=dict)  # under {w}
    cache: str | None = (
        None  # write a real teacher cache at {w}/cache, then break it: shard | teacher
    )


def text(s: str) -> Callable[[Path], str]:
    return lambda b: s.replace("{b}", str(b))


def jsonl(*rows: object) -> Callable[[Path], str]:
    return text("".join(json.dumps(r) + "\n" for r in rows))


def copy_of(rel: str, mutate: Callable[[bytes], bytes] = lambda x: x) -> Callable[[Path], bytes]:
    return lambda b: mutate((b / rel).read_bytes())


KD = ("{b}/kd.yaml",)
OUT = "train.output_dir={w}/out"
OK_CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}


def check(*over: str) -> tuple:
    return ("check", *KD, *over)


CASES: list[Case] = [
    # --- the recipe -------------------------------------------------------------------------
    Case("recipe-missing", "the recipe file does not exist", ("check", "{w}/nope.yaml"),
         r"no recipe file at"),
    Case("recipe-not-yaml", "the recipe is not valid YAML", ("check", "{w}/r.yaml"),
         r"YAML", {"r.yaml": text("method: [token_level\n")}),
    Case("recipe-not-mapping", "the recipe is a list, not a mapping", ("check", "{w}/r.yaml"),
         r"mapping", {"r.yaml": text("- method\n- token_level\n")}),
    Case("unknown-section", "a misspelt section in the recipe file", ("check", "{w}/r.yaml"),
         r"did you mean `train`", {"r.yaml": text("method: sft\ntraining:\n  lr: 1\n")}),
    Case("unknown-key", "a misspelt override", check("train.lrr=1e-4"), r"did you mean `train.lr`"),
    Case("bare-field", "a field without its section", check("lr=1e-4"), r"train\.lr"),
    Case("not-key-value", "an override that is not KEY=VALUE", check("train.lr"), r"KEY=VALUE|key=value"),
    Case("mistyped-int", "a word where a number belongs", check("train.max_steps=two"),
         r"must be an integer"),
    Case("negative-lr", "a learning rate below zero", check("train.lr=-1"), r"train\.lr"),
    Case("zero-batch", "a batch of no examples", check("train.batch_size=0"), r"train\.batch_size"),
    Case("beta-out-of-range", "a JSD β outside [0, 1]", check("loss.kind=jsd", "loss.beta=1.5"),
         r"loss\.beta"),
    Case("zero-temperature", "a distillation temperature of 0", check("loss.kd_temperature=0"),
         r"kd_temperature"),
    Case("unknown-precision", "a precision potstill does not train in", check("train.precision=fp16"),
         r"precision` must be auto, fp32 or bf16"),
    Case("unknown-method", "a method that does not exist", check("method=distill"), r"method"),
    Case("unknown-loss", "a divergence that does not exist", check("loss.kind=kl_forward"),
         r"loss\.kind"),
    Case("prune-without-layers", "a pruned student with no layers to keep",
         check("student.init=prune", "student.model=null"), r"keep_layers"),
    Case("prune-beyond-depth", "keeping a layer the teacher does not have",
         check("student.init=prune", "student.model=null", "student.keep_layers=[0,7]"),
         r"keep_layers"),
    Case("max-length-tiny", "a max_length too short to hold anything", check("data.max_length=1"),
         r"max_length"),
    # --- models and tokenizers -------------------------------------------------------------
    Case("teacher-missing", "a teacher path that does not exist",
         check("teacher.model={w}/no/such/model"), r"no such model path"),
    Case("teacher-empty-folder", "a model folder with no config or weights",
         check("teacher.model={w}/empty"), r"config", {"empty/.keep": text("")}),
    Case("mismatched-tokenizers", "teacher and student map tokens to other ids",
         check("student.model={b}/swapped"), r"cross_tokenizer"),
    Case("mismatched-template", "teacher and student format chats differently",
         check("student.model={b}/template"), r"chat template"),
    Case("truncated-weights", "a model file cut short (an interrupted download)",
         ("train", *KD, "student.model={w}/m", OUT), r"model\.safetensors|truncated|corrupt",
         {"m/config.json": copy_of("model/config.json"),
          "m/tokenizer.json": copy_of("model/tokenizer.json"),
          "m/tokenizer_config.json": copy_of("model/tokenizer_config.json"),
          "m/model.safetensors": copy_of("model/model.safetensors", lambda x: x[: len(x) // 2])}),
    Case("remote-code", "a model folder whose config asks to run its own code",
         check("teacher.model={w}/evil"), r"trust_remote_code",
         {"evil/config.json": lambda b: json.dumps({
              **json.loads((b / "model/config.json").read_text()), "model_type": "evil",
              "auto_map": {"AutoConfig": "evil.EvilConfig",
                           "AutoModelForCausalLM": "evil.EvilModel"}}),
          "evil/evil.py": text("open('PWNED', 'w').write('ran')  # must never run\n"),
          "evil/tokenizer.json": copy_of("model/tokenizer.json"),
          "evil/tokenizer_config.json": copy_of("model/tokenizer_config.json")}),
    Case("pickle-checkpoint", "a model saved only as a pickle (pytorch_model.bin)",
         ("train", *KD, "student.model={b}/pickled", OUT), r"pickle|safetensors"),
    # --- data ------------------------------------------------------------------------------
    Case("data-missing", "a training file that does not exist", check("data.train={w}/no.jsonl"),
         r"no such file"),
    Case("jsonl-broken-line", "a JSONL line that is not JSON", check("data.train={w}/d.jsonl"),
         r"d\.jsonl:2", {"d.jsonl": text('{"text": "fine"}\n{"text": "broken"\n')}),
    Case("json-broken", "a JSON file that does not parse", check("data.train={w}/d.json"),
         r"d\.json", {"d.json": text('[{"text": "a"}, {"text": ')}),
    Case("json-not-records", "a JSON file holding a number, not records",
         check("data.train={w}/d.json"), r"d\.json", {"d.json": text("42\n")}),
    Case("csv-ragged", "a CSV row with more fields than the header", check("data.train={w}/d.csv"),
         r"d\.csv", {"d.csv": text('text\n"fine"\n"a","b","c"\n')}),
    Case("csv-no-field", "a CSV without a text, prompt or messages column",
         check("data.train={w}/d.csv"), r"text|prompt|messages", {"d.csv": text("foo\nbar\n")}),
    Case("parquet-garbage", "a .parquet file that is not Parquet", check("data.train={w}/d.parquet"),
         r"d\.parquet", {"d.parquet": text("not parquet at all\n")}),
    Case("data-empty", "an empty training file", check("data.train={w}/d.jsonl"), r"no records",
         {"d.jsonl": text("\n")}),
    Case("record-missing-field", "a record with none of text, prompt/completion, messages",
         check("data.train={w}/d.jsonl"), r"d\.jsonl:1", {"d.jsonl": jsonl({"foo": 1})}),
    Case("record-not-object", "a JSONL line holding a list", check("data.train={w}/d.jsonl"),
         r"d\.jsonl:2", {"d.jsonl": jsonl({"text": "a"}, ["b"])}),
    Case("chat-no-assistant", "a chat with no assistant turn", check("data.train={w}/d.jsonl"),
         r"assistant", {"d.jsonl": jsonl({"messages": [{"role": "user", "content": "hi"}]})}),
    Case("prompt-without-completion", "a prompt with no completion",
         check("data.train={w}/d.jsonl"), r"completion", {"d.jsonl": jsonl({"prompt": "hi"})}),
    Case("messages-not-list", "messages given as a string", check("data.train={w}/d.jsonl"),
         r"messages", {"d.jsonl": jsonl({"messages": "hi"})}),
    Case("text-not-string", "a text field holding a number", check("data.train={w}/d.jsonl"),
         r"text", {"d.jsonl": jsonl({"text": 7})}),
    Case("eval-broken", "a held-out file with a broken line",
         check("data.eval={w}/e.jsonl"), r"e\.jsonl:1", {"e.jsonl": text("{oops\n")}),
    Case("prompts-too-long", "every prompt longer than data.max_length: nothing left to learn",
         ("train", *KD, "data.train={w}/d.jsonl", "data.max_length=8", OUT),
         r"max_length", {"d.jsonl": jsonl(*[{"prompt": "x" * 40, "completion": "y"}] * 4)}),
    Case("verify-without-answers", "on-policy samples to verify, but no record has an answer",
         ("train", *KD, "method=on_policy", "on_policy.verify=auto", OUT),
         r"on_policy\.verify=none"),
    # --- the output directory ---------------------------------------------------------------
    Case("output-of-another-run", "train.output_dir holds an unrelated run",
         ("train", *KD, OUT), r"output_dir",
         {"out/recipe.yaml": text("method: sft\ndata: {train: other.jsonl}\n"),
          "out/metrics.jsonl": text('{"step": 1, "loss": 2.0}\n')}),
    Case("output-is-a-file", "train.output_dir is a file", ("train", *KD, OUT), r"output_dir",
         {"out": text("a file\n")}),
    Case("nan-teacher", "a teacher whose logits are NaN", ("train", *KD, "teacher.model={b}/nan", OUT),
         r"NaN|non-finite|not finite"),
    Case("generated-data-missing", "sequence_level before its generate step",
         ("train", "{b}/seq.yaml", OUT), r"potstill generate"),
    # --- the teacher cache ------------------------------------------------------------------
    Case("cache-missing", "teacher.source=cache with no cache written",
         ("train", *KD, "teacher.source=cache", "teacher.cache={w}/nocache", OUT), r"potstill cache"),
    Case("cache-shard-corrupt", "a cache shard cut short", ("train", *KD, "teacher.source=cache",
         "teacher.cache={w}/cache", OUT), r"potstill cache|corrupt|shard", cache="shard"),
    Case("cache-of-another-teacher", "a cache written by another teacher",
         ("train", *KD, "teacher.source=cache", "teacher.cache={w}/cache", OUT),
         r"teacher|potstill cache", cache="teacher"),
    # --- generate and API teachers -----------------------------------------------------------
    Case("api-unreachable", "an API teacher nobody answers at", ("generate", "{b}/api.yaml",
         "generate.base_url=http://127.0.0.1:9/v1", "generate.output={w}/g.jsonl"),
         r"127\.0\.0\.1:9"),
    Case("api-garbage", "an API teacher that answers with something that is not JSON",
         ("generate", "{b}/api.yaml", "generate.base_url={garbage}", "generate.output={w}/g.jsonl"),
         r"JSON|malformed|unexpected"),
    Case("api-key-unset", "an API key variable that is not set", ("generate", "{b}/api.yaml",
         "generate.api_key_env=POTSTILL_TEST_NO_SUCH_KEY", "generate.output={w}/g.jsonl"),
         r"POTSTILL_TEST_NO_SUCH_KEY"),
    Case("generate-output-is-folder", "generate.output is a folder",
         ("generate", "{b}/hfgen.yaml", "generate.output={w}/g"), r"generate\.output",
         {"g/.keep": text("")}),
    # --- other commands ---------------------------------------------------------------------
    Case("evaluate-no-student", "evaluate a student folder that does not exist",
         ("evaluate", *KD, "--student", "{w}/none"), r"--student .*no such model path"),
    Case("report-not-a-run", "report on a folder that is not a run", ("report", "{w}/x"),
         r"not a run directory", {"x/.keep": text("")}),
    Case("serve-missing-model", "serve a model that does not exist", ("serve", "{w}/none"),
         r"no such model path"),
    Case("serve-key-unset", "serve asked to require a key from a variable that is not set",
         ("serve", "{b}/model", "--api-key-env", "POTSTILL_TEST_NO_SUCH_KEY"),
         r"POTSTILL_TEST_NO_SUCH_KEY"),
    Case("export-not-a-model", "export a folder that holds no model",
         ("export", "{w}/x", "--gguf", "{w}/x.gguf"), r"config|model", {"x/.keep": text("")}),
    Case("cache-without-folder", "potstill cache with no teacher.cache to write",
         ("cache", *KD, "teacher.cache=null"), r"teacher\.cache"),
]  # fmt: skip


# ------------------------------------------------------------------------------------- the base


def _save(model, tokenizer, folder: Path) -> None:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_chat_lm):
    """Shared inputs: a tiny model (and broken variants), data and recipes."""
    import copy

    import torch

    b = tmp_path_factory.mktemp("base")
    model, tokenizer = tiny_chat_lm
    _save(model, tokenizer, b / "model")
    _save(model, tokenizer, b / "pickled")  # then the same weights as a pickle only
    torch.save(model.state_dict(), b / "pickled/pytorch_model.bin")
    (b / "pickled/model.safetensors").unlink()
    nan = copy.deepcopy(model)
    with torch.no_grad():
        nan.lm_head.weight.fill_(float("nan"))
    _save(nan, tokenizer, b / "nan")
    _save(model, tokenizer, b / "swapped")
    tok = json.loads((b / "swapped/tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    (b / "swapped/tokenizer.json").write_text(json.dumps(tok))
    _save(model, tokenizer, b / "template")
    cfg = json.loads((b / "template/tokenizer_config.json").read_text())
    (b / "template/chat_template.jinja").unlink(missing_ok=True)
    cfg["chat_template"] = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    (b / "template/tokenizer_config.json").write_text(json.dumps(cfg))
    (b / "train.jsonl").write_text("".join(json.dumps(OK_CHAT) + "\n" for _ in range(8)))
    (b / "eval.jsonl").write_text("".join(json.dumps(OK_CHAT) + "\n" for _ in range(2)))
    common = (
        f"data: {{train: {b}/train.jsonl, eval: {b}/eval.jsonl, max_length: 32}}\n"
        "train: {max_steps: 2, batch_size: 2, precision: fp32, eval_every: 0, save_every: 0}\n"
    )
    (b / "kd.yaml").write_text(
        f"method: token_level\nteacher: {{model: {b}/model}}\n"
        f"student: {{model: {b}/model, init: pretrained}}\n{common}"
    )
    (b / "seq.yaml").write_text(
        f"method: sequence_level\nteacher: {{model: {b}/model}}\n"
        f"student: {{model: {b}/model, init: pretrained}}\n"
        f"generate: {{prompts: {b}/train.jsonl, output: {b}/never.jsonl}}\n"
        f"data: {{train: {b}/never.jsonl}}\n"
        "train: {max_steps: 2, batch_size: 2, precision: fp32}\n"
    )
    gen = (
        f"method: sequence_level\nteacher: {{model: {b}/model}}\n"
        f"student: {{model: {b}/model, init: pretrained}}\n"
        "data: {max_length: 32}\n"
    )
    (b / "api.yaml").write_text(
        gen + f"generate: {{prompts: {b}/train.jsonl, backend: openai, model: tiny, "
        "base_url: 'http://127.0.0.1:9/v1', "
        "max_retries: 0, timeout: 5, max_new_tokens: 4}\n"
    )
    (b / "hfgen.yaml").write_text(
        gen + f"generate: {{prompts: {b}/train.jsonl, max_new_tokens: 4}}\n"
    )
    return b


def _write_cache(forker: Forker, b: Path, w: Path, how: str) -> None:
    """A real cache of the base teacher at w/cache, then broken as the case asks."""
    argv = ["cache", str(b / "kd.yaml"), f"teacher.cache={w / 'cache'}", "cache.top_k=4"]
    assert forker.run(argv, cwd=str(w))["code"] == 0
    if how == "shard":
        shard = w / "cache" / "train-00000.safetensors"
        shard.write_bytes(shard.read_bytes()[:100])
    else:  # another teacher: the manifest names another model
        manifest = w / "cache" / "manifest.json"
        meta = json.loads(manifest.read_text())
        meta["teacher"]["model"] = "someone/else"
        manifest.write_text(json.dumps(meta))


class _Garbage(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b"<html>this is not JSON")

    do_GET = do_POST

    def log_message(self, *args):
        pass


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        if p.is_file()
        else "/"
        for p in sorted(folder.rglob("*"))
    }


@dataclass
class Outcome:
    code: int
    stderr: str
    stdout: str
    before: dict[str, str]
    after: dict[str, str]
    base_changed: bool
    folders: dict[str, str]  # path -> how the docs write it


def _run_case(forker: Forker, case: Case, b: Path, w: Path, garbage: str) -> Outcome:
    w.mkdir(parents=True)
    for rel, make in case.files.items():
        path = w / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        data = make(b)
        path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
    if case.cache:
        _write_cache(forker, b, w, case.cache)
    argv = [a.format(b=b, w=w, garbage=garbage) for a in case.argv]
    before, base_before = _snapshot(w), _snapshot(b)
    got = forker.run(argv, kill_after=TIMEOUT, cwd=str(w))
    code, stderr, stdout = got["code"], got["stderr"], got["stdout"]
    if got["killed"]:
        code, stderr = -1, f"hung: no answer within {TIMEOUT} s\n{stderr}"
    folders = {f"{w}/": "", str(w): ".", str(b): "base", garbage: "http://127.0.0.1:PORT/v1"}
    return Outcome(code, stderr, stdout, before, _snapshot(w), base_before != _snapshot(b), folders)


@pytest.fixture(scope="module")
def outcomes(base, tmp_path_factory) -> dict[str, Outcome]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Garbage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    garbage = f"http://127.0.0.1:{server.server_address[1]}/v1"
    root = tmp_path_factory.mktemp("cases")
    forkers = queue.Queue()
    for _ in range(2):  # two cases at a time
        forkers.put(Forker(root))

    def run(case: Case) -> Outcome:
        forker = forkers.get()
        try:
            return _run_case(forker, case, base, root / case.name, garbage)
        finally:
            forkers.put(forker)

    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            return dict(zip([c.name for c in CASES], pool.map(run, CASES), strict=True))
    finally:
        server.shutdown()
        while not forkers.empty():
            forkers.get().close()


def error_line(case: Case, out: Outcome) -> str:
    """The one error line the case printed: the last on stderr (progress bars may come before)."""
    lines = [ln for ln in re.split(r"[\r\n]", out.stderr) if ln.strip()]
    errors = [ln for ln in lines if ": error: " in ln]
    assert len(errors) == 1 and lines[-1] == errors[0], f"not one error line:\n{out.stderr[-3000:]}"
    return errors[0]


def test_the_table_has_at_least_forty_cases_over_every_verb():
    assert len(CASES) >= 40 and len({c.name for c in CASES}) == len(CASES)
    verbs = {c.argv[0] for c in CASES}
    assert {"check", "train", "generate", "cache", "export", "serve", "evaluate"} <= verbs


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_a_bad_input_gets_one_line_and_leaves_nothing(case, outcomes):
    out = outcomes[case.name]
    assert out.code != -1, out.stderr[-3000:]
    assert "Traceback" not in out.stderr + out.stdout, out.stderr[-3000:]
    assert out.code == 2, f"exit {out.code}:\n{out.stderr[-3000:]}"
    line = error_line(case, out)
    assert line.startswith(f"potstill {case.argv[0]}: error: "), line
    assert re.search(case.says, line), line
    assert out.after == out.before, "the case's folder changed"
    assert not out.base_changed, "the shared inputs changed"


def render(outcomes: dict[str, Outcome]) -> str:
    """docs/errors.md: every case, the command it runs and the line potstill prints."""
    rows = []
    for case in CASES:
        out = outcomes[case.name]
        line = error_line(case, out).split(": error: ", 1)[1]
        argv = " ".join(case.argv).replace("{w}/", "").replace("{b}", "base")
        argv = argv.replace("{garbage}", "http://127.0.0.1:PORT/v1")
        for path, shown in out.folders.items():
            line = line.replace(path, shown)
        line = line.replace("|", "\\|")
        rows.append(f"| {case.what} | `potstill {argv}` | {line} |")
    return HEADER + "\n".join(rows) + "\n"


HEADER = """# Errors you can fix

A bad input — a recipe, a value, a data file, a model folder, a teacher cache, an API teacher, an
output folder — ends a command with exit status 2 and **one line** on stderr,
`potstill COMMAND: error: …`, that says what is wrong and what to do. There is no traceback, and
nothing is left behind: a run folder, cache or generation file the command had started is removed
again (a run that has saved a checkpoint keeps it, and a generation that has finished prompts keeps
them: running the same command again resumes).

This page is generated from the table in `tests/test_bad_inputs.py`, which runs every case below
through the real command line in a process of its own and checks all of that; `base` is the
suite's folder of inputs (a tiny model and its broken variants, data and recipes) and other paths
are relative to the case's own folder. `python tests/test_bad_inputs.py` writes this page again.

| what is wrong | command | what potstill says |
|---|---|---|
"""


def test_the_errors_page_is_the_table(outcomes):
    page = render(outcomes)
    if os.environ.get("POTSTILL_WRITE_ERRORS_DOC"):
        DOC.write_text(page)
    assert DOC.read_text() == page, "docs/errors.md is stale: run python tests/test_bad_inputs.py"


def test_a_pickle_checkpoint_loads_only_when_allowed(base):
    from potstill.errors import ModelLoadError
    from potstill.models import load_model

    with pytest.raises(ModelLoadError, match="allow_pickle"):
        load_model(str(base / "pickled"))
    assert load_model(str(base / "pickled"), allow_pickle=True).config.num_hidden_layers == 2


if __name__ == "__main__":
    sys.exit(
        subprocess.call(
            [sys.executable, "-m", "pytest", "-q", __file__, "-k", "errors_page"],
            env={**os.environ, "POTSTILL_WRITE_ERRORS_DOC": "1"},
        )
    )
