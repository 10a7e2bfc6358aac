"""The documentation's references hold: every repository path that README.md and docs/*.md name in code
spans (a test file, a source file, a results folder) exists, and every test they cite by name
(``file.py::test_name``) is defined there. A renamed or moved file otherwise leaves the docs pointing at
nothing (docs/security.md named four test and source files that had moved)."""

import argparse
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TOP = ("tests/", "src/", "lab/", "scripts/", "docs/", "examples/", "benchmarks/", "lordba/", "lordba_lab/")
PACKAGES = ("_util/", "cli/", "convert/", "core/", "format/", "kernels/", "nn/", "quant/", "serve/", "train/")
ILLUSTRATIVE = {"src/lordba/pkg/x.py", "tests/pkg/test_x.py"}  # README's "pkg/x.py -> tests/pkg/test_x.py" rule
SPAN = re.compile(r"`([^`\s]+)`")


def _candidates(ref: str) -> list[Path]:
    """Where a reference may point: from the root, a package path under src/ or lab/, a subpackage's
    path under src/lordba/ or tests/."""
    return [ROOT / ref, ROOT / "src" / ref, ROOT / "lab" / ref, ROOT / "src" / "lordba" / ref, ROOT / "tests" / ref]


def _references() -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        for ref in SPAN.findall(doc.read_text(encoding="utf-8")):
            path = ref.split("::", 1)[0].rstrip("/")
            if path.startswith(TOP + PACKAGES) and not re.search(r"[*{}<>]", path) and path not in ILLUSTRATIVE:
                found.append((doc.name, ref))
    return sorted(set(found))


REFERENCES = _references()


def test_the_docs_name_repository_paths():
    assert len(REFERENCES) > 50  # the pattern still finds what it checks


@pytest.mark.parametrize("doc, ref", REFERENCES)
def test_a_referenced_path_exists(doc, ref):
    path, _, test = ref.partition("::")
    where = next((p for p in _candidates(path.rstrip("/")) if p.exists()), None)
    assert where is not None, f"{doc} names {path}, which does not exist"
    if test:
        assert re.search(rf"^\s*def {re.escape(test)}\b", where.read_text(encoding="utf-8"), re.M), (
            f"{doc} cites {ref}: no such test"
        )


def test_tests_cited_by_name_in_the_parity_table_exist():
    """docs/peft-parity.md cites tests as ``dir/test_x.py::name`` (paths under tests/), continued as ``::name``."""
    text = (ROOT / "docs" / "peft-parity.md").read_text(encoding="utf-8")
    missing = []
    for row in text.splitlines():
        current = None
        for ref in SPAN.findall(row):
            if re.fullmatch(r"[\w/]+\.py(::\w+)?", ref):
                current, _, name = ref.partition("::")
            elif re.fullmatch(r"::\w+", ref) and current is not None:
                name = ref[2:]
            else:
                continue
            file = ROOT / "tests" / current
            if not file.is_file():
                missing.append(current)
            elif name and not re.search(rf"^\s*def {name}\b", file.read_text(encoding="utf-8"), re.M):
                missing.append(f"{current}::{name}")
    assert not missing, missing


LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchors(doc: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+\s+(.*)$", doc.read_text(encoding="utf-8"), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_every_relative_link_in_the_docs_leads_somewhere():
    """A Markdown link ``[text](path#anchor)`` of README.md, docs/*.md, the results' and the benchmarks' READMEs
    names a file or folder that exists and, into a Markdown file, one of its headings. The path check above reads
    code spans only: a moved results folder or a renamed section left a link a new user clicks into nothing."""
    docs = [*DOCS, ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs" / "results").rglob("*.md"))]
    checked, broken = 0, []
    for doc in docs:
        text = re.sub(r"```.*?```", "", doc.read_text(encoding="utf-8"), flags=re.S)
        for link in LINK.findall(text):
            if re.match(r"[a-z]+:", link):  # https:, mailto:
                continue
            path, _, anchor = link.partition("#")
            target = (doc.parent / path).resolve() if path else doc
            checked += 1
            if not target.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {link}: no such file")
            elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
                broken.append(f"{doc.relative_to(ROOT)}: {link}: no such heading")
    assert checked > 30  # the pattern still finds the links
    assert not broken, "\n".join(broken)


def _command_lines() -> list[tuple[str, str]]:
    """``lordba ...`` command lines the docs show: lines of fenced blocks (a ``#`` comment cut off) and
    code spans (a span may wrap onto the next line)."""
    found = []
    for doc in DOCS:
        text, fenced = doc.read_text(encoding="utf-8"), False
        for line in text.splitlines():
            if line.lstrip().startswith("```"):
                fenced = not fenced
            elif fenced and line.strip().removeprefix("$ ").startswith("lordba "):
                found.append((doc.name, line.strip().removeprefix("$ ").split(" #")[0].strip()))
        found += [(doc.name, " ".join(span.split())) for span in re.findall(r"`(lordba [a-z][^`]*)`", text)]
    return sorted(set(found))


def test_every_option_the_docs_show_is_one_the_command_accepts():
    """Each ``--option`` a doc writes after ``lordba COMMAND`` (``lordba generate/chat`` names both) is one
    of that command's options, and a value it shows for an option with choices is one of them (``a|b``
    lists alternatives, ``[...]`` marks an optional part, capitals are placeholders). Renaming or dropping
    an option otherwise leaves the docs telling users to type a command that exits with a usage error."""
    from lordba.cli import build_parser, commands

    names = {c.name for c in commands()}
    options: dict[str, dict] = {}
    lines, problems = _command_lines(), []
    assert len(lines) > 40  # the extraction still finds what it checks
    for doc, line in lines:
        words = line.replace("[", " ").replace("]", " ").split()
        for command in words[1].split("/"):
            if command not in names:
                problems.append(f"{doc}: `{line}`: no command {command!r}")
                continue
            if command not in options:
                parser = build_parser(command)
                sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
                options[command] = {s: a for a in sub.choices[command]._actions for s in a.option_strings}
            for i, word in enumerate(words[2:], start=2):
                if not word.startswith("--"):
                    continue
                flag, _, value = word.partition("=")
                action = options[command].get(flag)
                if action is None:
                    problems.append(f"{doc}: `{line}`: lordba {command} has no option {flag}")
                    continue
                if action.choices and action.nargs != 0:
                    value = value or (words[i + 1] if i + 1 < len(words) else "")
                    for choice in value.split("|"):
                        if choice and not choice.isupper() and choice not in action.choices:
                            problems.append(f"{doc}: `{line}`: {flag} {choice} is not one of {sorted(action.choices)}")
    assert not problems, "\n".join(problems)


def _sweep_rows() -> list[list[str]]:
    """The rows of README's sweep table (``| method | variant | BPW | exact match [95% CI] | ...``)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    table = text.split("| method | variant | BPW | exact match [95% CI] | held-out loss [95% CI] |", 1)[1]
    rows = []
    for line in table.splitlines()[2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip().replace("*", "") for c in line.strip("|").split("|")])
    return rows


def test_the_readme_sweep_table_is_the_committed_sweeps_summary():
    """README quotes docs/results/reproduce/reproduce.json's summary by hand: each row's BPW, exact match and
    held-out loss with their intervals are the JSON's, rounded as shown."""
    summary = json.loads((ROOT / "docs/results/reproduce/reproduce.json").read_text())["summary"]
    by_name = {(r["family"], r["label"].replace(" x ", " × ")): r for r in summary}
    rows = _sweep_rows()
    assert len(rows) > 10
    for family, label, bpw, metric, loss in rows:
        r = by_name[family, label]
        assert float(bpw) == pytest.approx(r["bpw"], abs=0.005), (family, label)
        for shown, key, digits in ((metric, "metric", 3), (loss, "eval_loss", 4)):
            mean, ci = r[f"{key}_mean"], r[f"{key}_ci"]
            if family == "base":  # no interval shown: the mean, to the digits shown
                assert float(shown) == pytest.approx(mean, abs=0.5 * 10.0 ** -len(shown.split(".")[1]))
                continue
            assert shown == f"{mean:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]", (family, label, key)


def test_every_benchmark_suite_the_docs_name_exists():
    """``lordba bench --suite NAME`` takes any string (no argparse choices), so the option check above cannot
    catch a renamed suite: each NAME the docs show is one of the lab's suites."""
    from lordba_lab.bench import suites

    docs = [*DOCS, ROOT / "benchmarks" / "README.md"]
    shown = {(d.name, n) for d in docs for n in re.findall(r"--suite ([a-z][\w-]*)", d.read_text(encoding="utf-8"))}
    assert len(shown) > 5
    unknown = sorted((doc, name) for doc, name in shown if name not in suites())
    assert not unknown, unknown


def test_the_readme_python_example_loads_only_adapters_it_saved():
    """README's Python API example runs as printed: every folder it loads an adapter from (``load_adapter``,
    ``from_pretrained``, ``hotswap_adapter``, ``export_lora`` of a folder) is one it saved before (it loaded an
    ``other_adapter`` that nothing wrote: an AdapterFormatError on the first run)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8").split("## Python API", 1)[1]
    block = text.split("```python", 1)[1].split("```", 1)[0]
    saved, problems = set(), []
    for line in block.splitlines():
        code = line.split("#", 1)[0]
        saved |= set(re.findall(r"save_pretrained\(\"([^\"]+)\"", code))
        for call, args in re.findall(r"(load_adapter|from_pretrained|hotswap_adapter|export_lora)\((.*)\)", code):
            pattern = r"^\s*\"([^\"]+)\"" if call == "export_lora" else r"(?:^|,)\s*\"([^\"]+)\""  # positional
            problems += [f"{line.strip()}: nothing saved {f!r}" for f in re.findall(pattern, args) if f not in saved]
    assert saved, "the example saves no adapter any more: update this test"
    assert not problems, "\n".join(problems)


def test_the_quickstart_example_runs_as_shipped_on_a_tiny_model(tmp_path, monkeypatch, capsys):
    """examples/quickstart.py runs from start to end, unchanged, and shows what it says: the training loss falls,
    the saved adapter reloads to identical logits, PEFT runs its export. No test ran it, so a renamed call or a
    changed default would have broken it unseen. The embedded SmolLM2 its loader gives by default takes minutes on
    2 cores: the loader gives a tiny Llama instead (the example's q_proj / v_proj are there too)."""
    import runpy

    import lordba_lab.assets
    from tiny_model import tiny_model_dir

    folder = tiny_model_dir(tmp_path / "tiny")
    load = lordba_lab.assets.load_model_and_tokenizer
    monkeypatch.setattr(lordba_lab.assets, "load_model_and_tokenizer", lambda name_or_path=None: load(str(folder)))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # its mkdtemp() under tmp_path
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    losses = [float(x) for x in re.findall(r"step \d+: loss ([\d.]+)", out)]
    assert len(losses) == 8 and losses[-1] < losses[0], out
    assert "reloaded adapter gives identical logits: True" in out, out
    diff = float(re.search(r"max logit difference vs LoRDBA: ([\d.e+-]+)", out).group(1))
    assert diff < 1e-2, out
