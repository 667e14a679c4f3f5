"""The docs stay true to the code: runnable examples run, every `potstill …` command shown parses
with the real CLI and names real recipes and keys, every import path shown imports, and every
relative link leads to a file.

A python block is run when its fence says so: ```` ```python runnable ````.
"""

from __future__ import annotations

import importlib
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from potstill.cli import build_parser, parse
from potstill.recipe import apply_override, load_recipe

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", re.M | re.S)
SHELL = {"bash", "sh", "shell", "console", "text", ""}


def blocks(path: Path) -> list[tuple[str, str]]:
    """(info string, body) of every fenced block."""
    return [(m.group(1).strip(), m.group(2)) for m in FENCE.finditer(path.read_text())]


def prose(path: Path) -> str:
    """The page without its fenced blocks."""
    return FENCE.sub("", path.read_text())


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


RUNNABLE = [
    pytest.param(body, id=f"{rel(p)}#{i}")
    for p in DOCS
    for i, (info, body) in enumerate(blocks(p))
    if info.split()[:2] == ["python", "runnable"]
]


def test_the_docs_have_runnable_examples():
    assert any("fused_distill_loss" in p.values[0] for p in RUNNABLE)


@pytest.mark.parametrize("code", RUNNABLE)
def test_runnable_blocks_run(code, tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]


# --- commands ----------------------------------------------------------------------------------


def _commands_in(text: str) -> list[str]:
    """`potstill …` invocations in shell text (continuations joined, prompts and comments cut)."""
    found = []
    for line in text.replace("\\\n", " ").splitlines():
        line = line.strip().removeprefix("$ ").split(" #")[0].strip().removesuffix(" &")
        if line.startswith("#"):
            continue
        match = re.search(r"(?:^|\s|&&\s*|\|\s*)(potstill\s.*)$", line)
        if match:
            found.append(match.group(1).strip())
    return found


# Pages whose commands run against the fixtures of the test that writes them, not real recipes
GENERATED = {"docs/errors.md"}  # tests/test_bad_inputs.py runs every command it shows


def shown_commands() -> list[tuple[str, str]]:
    out = []
    for path in DOCS:
        if rel(path) in GENERATED:
            continue
        for info, body in blocks(path):
            if info.split()[:1] in ([], *[[s] for s in SHELL if s]):
                out += [(rel(path), c) for c in _commands_in(body)]
        for span in re.findall(r"`(potstill [^`]+)`", prose(path)):
            out.append((rel(path), span))
    return out


COMMANDS = shown_commands()


def test_the_docs_show_commands():
    verbs = {shlex.split(c)[1] for _, c in COMMANDS}
    assert {"train", "check", "demo", "keys"} <= verbs


@pytest.mark.parametrize(("where", "command"), COMMANDS, ids=[f"{w}: {c}" for w, c in COMMANDS])
def test_shown_commands_parse_with_real_verbs_recipes_and_keys(where, command):
    argv = shlex.split(command)[1:]
    parser = build_parser()
    verbs = parser._subparsers._group_actions[0].choices  # name -> its subparser
    if argv[-1:] in (["--help"], ["-h"]):  # `potstill [VERB] --help`
        assert len(argv) == 1 or argv[0] in verbs, f"{where}: no verb `{argv[0]}`"
        return
    if len(argv) == 1 and argv[0] in verbs and argv[0] not in ("demo", "keys"):
        return  # a verb named in prose, without its arguments
    try:
        args = parse(argv)
    except SystemExit:
        pytest.fail(f"{where}: `{command}` does not parse with potstill's CLI")
    overrides = getattr(args, "overrides", None) or []
    try:
        for assignment in overrides:  # real keys
            apply_override({}, assignment)
        recipe = getattr(args, "recipe", None)
        if recipe is not None:  # a real recipe, and values its checks accept
            assert (ROOT / recipe).is_file(), f"no recipe file {recipe}"
            load_recipe(ROOT / recipe, overrides)
    except Exception as err:
        pytest.fail(f"{where}: `{command}`: {err}")


# --- import paths -----------------------------------------------------------------------------


def shown_imports() -> list[tuple[str, str]]:
    """(page, dotted name) for every `from potstill… import …`, `import potstill…` and inline
    `potstill.x.y` reference."""
    out = []
    for path in DOCS:
        text = path.read_text()
        for module, names in re.findall(r"^\s*from (potstill[\w.]*) import ([^\n#]+)", text, re.M):
            for name in re.split(r"[,\s()]+", names):
                if name and name != "as" and name.isidentifier():
                    out.append((rel(path), f"{module}.{name}"))
                    if " as " in names:
                        break
        for module in re.findall(r"^\s*import (potstill[\w.]*)", text, re.M):
            out.append((rel(path), module))
        for dotted in re.findall(r"`(potstill(?:\.\w+)+)(?:\(\))?`", prose(path)):
            out.append((rel(path), dotted))
    return sorted(set(out))


IMPORTS = shown_imports()


def resolve(dotted: str) -> object:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


def test_the_docs_name_the_public_loss_entry_point():
    assert ("docs/losses.md", "potstill.losses.fused_distill_loss") in IMPORTS


@pytest.mark.parametrize(("where", "dotted"), IMPORTS, ids=[f"{w}: {d}" for w, d in IMPORTS])
def test_documented_import_paths_import(where, dotted):
    try:
        resolve(dotted)
    except (ImportError, AttributeError) as err:
        pytest.fail(f"{where}: `{dotted}` does not import ({err})")


# --- links ------------------------------------------------------------------------------------


LINKS = [
    (rel(p), target)
    for p in DOCS
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", prose(p))
    if not re.match(r"[a-z]+:", target)
]


@pytest.mark.parametrize(("where", "target"), LINKS, ids=[f"{w} -> {t}" for w, t in LINKS])
def test_relative_links_lead_to_files(where, target):
    assert ((ROOT / where).parent / target).exists(), f"{where} links to missing {target}"


def test_the_readme_is_an_entry_point():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 220, f"README.md has {len(lines)} lines; details go to docs/"
    text = "\n".join(lines)
    assert "make demo" in text and "make test" in text
    methods = {p.stem for p in (ROOT / "docs" / "methods").glob("*.md")}
    from potstill.methods.registry import METHODS

    assert set(METHODS) <= methods, f"methods without a page: {set(METHODS) - methods}"
    assert all(f"docs/methods/{m}.md" in text for m in METHODS), "README links every method"
