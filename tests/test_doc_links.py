"""Every relative link in README.md and docs/*.md points to a file that exists, and a link to a
heading (`page.md#heading`) to a heading that exists, by GitHub's anchor rules.

Checked by hand: pointing the README's docs/data.md link at docs/datas.md turned
test_relative_links_resolve red, naming README.md and the link; pointing docs/scaling-out.md's
link to results.md#seed-spread-three-runs-of-the-default at results.md#no-such-heading turned
test_heading_anchors_resolve red, naming both.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # http:, https:, mailto:, ...


def prose(text: str) -> str:
    """The Markdown outside fenced code blocks and inline code spans (links there are not links)."""
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.S | re.M)
    return re.sub(r"(`+)(?!`).*?(?<!`)\1(?!`)", "", text, flags=re.S)


def links(path: Path) -> list[str]:
    return [m[1] for m in LINK.finditer(prose(path.read_text()))]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|<[^>]+>", "", heading.strip()).lower()
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in prose(path.read_text()).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match[1])
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def relative_links() -> list[tuple[Path, str]]:
    return [
        (doc, target) for doc in DOCUMENTS for target in links(doc) if not EXTERNAL.match(target)
    ]


def test_the_documents_have_relative_links():
    # the README links every docs page; a parser that finds nothing would pass vacuously
    assert len(relative_links()) > 20


@pytest.mark.parametrize(
    "doc, target", relative_links(), ids=lambda x: x.name if isinstance(x, Path) else x
)
def test_relative_links_resolve(doc, target):
    file = target.split("#", 1)[0]
    where = doc if not file else (doc.parent / file)
    assert where.exists(), f"{doc.relative_to(ROOT)}: link to {target}: no such file"


def test_heading_anchors_resolve():
    broken = []
    for doc, target in relative_links():
        if "#" not in target:
            continue
        file, anchor = target.split("#", 1)
        page = doc if not file else (doc.parent / file)
        if page.suffix == ".md" and page.exists() and anchor not in anchors(page):
            broken.append(f"{doc.relative_to(ROOT)}: {target}")
    assert not broken, f"links to headings that do not exist: {broken}"


def test_slug_follows_github():
    assert slug("The study's leaky split: how much it inflates the metrics") == (
        "the-studys-leaky-split-how-much-it-inflates-the-metrics"
    )
    assert slug("Seed spread: three runs of the default") == "seed-spread-three-runs-of-the-default"
    assert slug("Predict, validate, calibrate, your own data") == (
        "predict-validate-calibrate-your-own-data"
    )
