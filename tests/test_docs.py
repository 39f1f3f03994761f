"""The examples in README.md and docs/*.md agree with the code: every `medsr-*` option they use exists in that
CLI (and is not a hidden old spelling), every Python example compiles, and the README's API example runs."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import click
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CLIS = {"medsr-infer": "infer", "medsr-export": "export", "medsr-train": "train", "medsr-eval": "eval",
        "medsr-bench": "bench", "medsr-node": "node"}
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)


def _blocks(lang: tuple[str, ...]) -> list[tuple[str, int, str, str]]:
    out = []
    for doc in DOCS:
        text = doc.read_text()
        for m in FENCE.finditer(text):
            if m[1] in lang:
                out.append((doc.name, text[: m.start()].count("\n") + 1, m[1], m[2]))
    return out


def _visible_options(cli: str) -> set[str]:
    cmd: click.Command = importlib.import_module(f"medsr.cli.{cli}").main
    names = {"-h", "--help"}
    for p in cmd.params:
        hidden = getattr(p, "hidden_aliases", frozenset())
        names |= {o for o in (*p.opts, *getattr(p, "secondary_opts", ())) if o not in hidden}
    return names


def _commands(block: str, lang: str = "bash") -> list[tuple[str, list[str]]]:
    """(cli, options) for every medsr-* command line in a shell block (comments and continuations handled); in
    an untagged block only lines that start with a medsr-* command (synopses: ``[--opt X]``)."""
    found = []
    for line in block.replace("\\\n", " ").splitlines():
        if not lang and line.split(" ")[0] not in CLIS:
            continue
        line = line.split(" #")[0] if not line.lstrip().startswith("#") else ""
        try:
            tokens = shlex.split(line)
        except ValueError:
            continue
        cli = None
        for tok in tokens:
            tok = tok.strip("[]")
            if tok in ("&&", "||", "|", ";"):
                cli = None
            elif tok.split("/")[-1] in CLIS:
                cli = tok.split("/")[-1]
                found.append((cli, []))
            elif cli and tok.startswith("-") and tok not in ("-", "--"):
                found[-1][1].append(tok.split("=")[0])
    return found


SHELL = _blocks(("bash", "sh", "shell", "console", ""))


@pytest.mark.quick
def test_docs_have_examples() -> None:
    assert sum(len(_commands(b, lang)) for _, _, lang, b in SHELL) > 30


@pytest.mark.quick
@pytest.mark.parametrize("doc,line,lang,block", SHELL, ids=[f"{d}:{n}" for d, n, _, _ in SHELL])
def test_every_documented_option_exists(doc: str, line: int, lang: str, block: str) -> None:
    for cli, opts in _commands(block, lang):
        known = _visible_options(CLIS[cli])
        unknown = [o for o in opts if o not in known]
        assert not unknown, f"{doc}:{line}: {cli} has no option {', '.join(unknown)} (see {cli} --help)"


PYTHON = _blocks(("python",))


@pytest.mark.quick
@pytest.mark.parametrize("doc,line,lang,block", PYTHON, ids=[f"{d}:{n}" for d, n, _, _ in PYTHON])
def test_python_examples_compile(doc: str, line: int, lang: str, block: str) -> None:
    compile(block, f"{doc}:{line}", "exec")


def test_readme_api_example_runs() -> None:
    """The README's Python API block runs as written (it loads the default model, as medsr-infer does)."""
    blocks = [b for d, _, _, b in PYTHON if d == "README.md" and "Upscaler.load()" in b]
    assert len(blocks) == 1
    exec(compile(blocks[0], "README.md", "exec"), {})


@pytest.mark.quick
def test_commented_toml_lines_are_valid_when_uncommented() -> None:
    """docs/pacs.md's node.toml: each commented `# key = value` example parses once uncommented."""
    import tomllib

    text = (ROOT / "docs" / "pacs.md").read_text()
    block = next(m[2] for m in FENCE.finditer(text) if m[1] == "toml")
    tomllib.loads(block)
    for line in block.splitlines():
        m = re.match(r"^# (\w+ = .*?)(\s+#.*)?$", line)
        if m:
            tomllib.loads(m[1])


@pytest.mark.quick
def test_no_machine_paths_in_docs() -> None:
    for doc in DOCS:
        for n, line in enumerate(doc.read_text().splitlines(), 1):
            assert not re.search(r"/work/|/home/\w|/Users/\w", line), f"{doc.name}:{n}: a machine path: {line.strip()}"


@pytest.mark.quick
def test_training_doc_lists_the_shipped_configs() -> None:
    from medsr.train.config import shipped_configs

    line = next(ln for ln in (ROOT / "docs" / "training.md").read_text().splitlines() if "--list-configs" in ln)
    assert set(re.findall(r"`(\w+)`", line)) >= set(shipped_configs())
