"""The documentation holds to the code: the options table is what mitmdump reports, every relative
link and anchor of README.md and docs/*.md resolves, every module has its line in
docs/architecture.md, and the README stays short enough to read in ten minutes."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 250

_spec = importlib.util.spec_from_file_location("options_doc", ROOT / "scripts" / "options_doc.py")
options_doc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(options_doc)

_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"\]\(([^)\s]+)\)")


def prose(text: str) -> str:
    """The text without its fenced code blocks (their `#` lines are no headings, their `](` no links)."""
    return _FENCE.sub("", text)


def slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it: no markup or punctuation, lower case, spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    for line in prose(path.read_text()).splitlines():
        heading = re.match(r"#{1,6} (.+)", line)
        if heading:
            base = slug(heading[1])
            name, n = base, 0
            while name in found:  # GitHub numbers repeated headings
                n += 1
                name = f"{base}-{n}"
            found.add(name)
    return found


def links(path: Path) -> list[str]:
    return _LINK.findall(_CODE.sub(lambda m: m[0].replace("](", ""), prose(path.read_text())))


def broken_links(path: Path) -> list[str]:
    broken = []
    for target in links(path):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        where = (path.parent / file).resolve() if file else path
        if not where.exists():
            broken.append(f"{target}: no such file")
        elif anchor and (where.suffix != ".md" or anchor not in anchors(where)):
            broken.append(f"{target}: no such heading")
    return broken


@pytest.fixture(scope="module")
def generated() -> str:
    """The table as mitmdump reports it (a mitmdump start: made once)."""
    return options_doc.generated_block()


def test_the_options_table_is_what_mitmdump_reports(generated):
    documented = options_doc.documented_block(options_doc.DOC.read_text())
    # run .venv/bin/python scripts/options_doc.py --write when an option was added or changed
    assert documented.splitlines() == generated.splitlines()


def test_the_options_table_has_every_datalab_option(generated):
    assert "| `datalab_sign_key` | str | (empty) |" in generated
    assert "| `datalab_metrics_port` | int | `0` |" in generated  # an option another addon than config declares
    assert str(ROOT) not in generated, "a default shows this checkout's path"


@pytest.mark.parametrize("path", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_every_relative_link_and_anchor_resolves(path):
    assert broken_links(path) == []


def test_the_link_checker_sees_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[ok](#title) [gone](#nothing) [file](missing.md)\n```\n[code](#not-a-link)\n```\n")
    assert broken_links(page) == ["#nothing: no such heading", "missing.md: no such file"]


def test_github_anchors():
    assert slug("`GET /datalab/work/<id>?ts=<unix seconds>` (and `DELETE`)") == (
        "get-datalabworkidtsunix-seconds-and-delete"
    )
    assert slug("The user's work") == "the-users-work"
    assert slug("`bench_proxy.py`: the proxy against its peers") == "bench_proxypy-the-proxy-against-its-peers"


def test_every_module_has_its_line_in_the_architecture_page():
    page = (ROOT / "docs" / "architecture.md").read_text()
    modules = sorted(p.relative_to(ROOT / "addon") for p in (ROOT / "addon").rglob("*.py"))
    assert [str(m) for m in modules if f"(../addon/{m})" not in page] == []


def test_the_readme_is_short():
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines < README_MAX_LINES, f"README.md has {lines} lines: move detail to docs/"


def test_every_docs_page_is_reachable_from_the_readme():
    readme = links(ROOT / "README.md")
    assert [p.name for p in DOCS[1:] if f"docs/{p.name}" not in readme] == []
