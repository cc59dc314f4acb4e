"""The documentation holds together: every link in README.md, docs/*.md and the READMEs under
results/ resolves (a relative link names a file or folder of the repository, a `#anchor` a
heading of its target by GitHub's slug rules, an external http(s) link is well-formed; none
is fetched), every docs/ page is linked from the README, and the README stays a front door
(under 250 lines). A planted broken link shows that the check can fail."""

from __future__ import annotations

import re
import urllib.parse
from pathlib import Path

import pytest

from conftest import REPO

README = REPO / "README.md"
DOCS = REPO / "docs"
README_MAX_LINES = 250  # a front door; the long explanations live in docs/

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
# a code span, never across a blank line; its text is no link
CODE_SPAN = re.compile(r"(`+)(?:(?!\n[ \t]*\n).)+?\1", re.DOTALL)
# [text](target) and ![alt](target), with an optional title; the text may wrap lines and
# hold one level of brackets
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>\n]*>|[^\s)]+)"
                         r"(?:\s+(?:\"[^\"]*\"|'[^']*'|\([^)]*\)))?\s*\)")
REFERENCE_LINK = re.compile(r"^ {0,3}\[[^\]]+\]:[ \t]*(<[^>\n]*>|\S+)", re.MULTILINE)
AUTOLINK = re.compile(r"<([a-zA-Z][a-zA-Z0-9+.-]*:[^>\s]*)>")
HTML_LINK = re.compile(r"""\b(?:href|src)\s*=\s*["']([^"']+)["']""")
HTML_ANCHOR = re.compile(r"""<a\s[^>]*\b(?:name|id)\s*=\s*["']([^"']+)["']""")
ATX_HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
SETEXT_UNDERLINE = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
LINE_ANCHOR = re.compile(r"L\d+(-L\d+)?")  # GitHub's anchors into a file that is not Markdown
HOST = re.compile(r"(localhost|[a-z0-9-]+(\.[a-z0-9-]+)+)")


def documents() -> list[Path]:
    """The Markdown files whose links are checked."""
    return [README, *sorted(DOCS.glob("*.md")), *sorted((REPO / "results").rglob("README.md"))]


def prose(text: str) -> str:
    """`text` with fenced code blocks and code spans blanked out, so that offsets, and so
    line numbers, stay those of the file."""
    lines, fence = [], None
    for line in text.split("\n"):
        opening = FENCE.match(line)
        if fence is None and opening:
            fence = opening.group(1)[0] * len(opening.group(1))
            lines.append("")
        elif fence is not None:
            lines.append("")
            if line.strip().startswith(fence) and not line.strip().strip(fence[0]):
                fence = None
        else:
            lines.append(line)
    return CODE_SPAN.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), "\n".join(lines))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: its text (a link's text, no markup) lowercased,
    punctuation dropped (letters, digits, `_`, `-` and spaces stay, in any script), spaces
    turned into hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text)
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every `#anchor` a Markdown file has: its headings' slugs (a repeated one gets -1, -2,
    as on GitHub) and explicit <a name> / id anchors."""
    raw = path.read_text(encoding="utf-8")
    text = prose(raw)
    lines = text.split("\n")
    found: set[str] = set()
    counts: dict[str, int] = {}
    for i, line in enumerate(lines):
        heading = ATX_HEADING.match(line)
        if heading:
            title = raw.split("\n")[i]  # the heading with its code spans, which GitHub keeps
            title = ATX_HEADING.match(title).group(1)
        elif (i + 1 < len(lines) and line.strip() and SETEXT_UNDERLINE.match(lines[i + 1])
              and not line.lstrip().startswith(("|", "-", "*", ">"))):
            title = raw.split("\n")[i]
        else:
            continue
        base = slug(title)
        n = counts.get(base, 0)
        counts[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    found.update(HTML_ANCHOR.findall(text))
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link in a Markdown file, code left out."""
    text = prose(path.read_text(encoding="utf-8"))
    found = []
    for pattern in (INLINE_LINK, REFERENCE_LINK, AUTOLINK, HTML_LINK):
        for match in pattern.finditer(text):
            target = match.group(1)
            if target.startswith("<") and target.endswith(">"):
                target = target[1:-1]
            found.append((text.count("\n", 0, match.start()) + 1, target))
    return sorted(found)


def external_problem(target: str) -> str | None:
    """Why an external link is malformed, or None; it is never fetched (no network)."""
    parts = urllib.parse.urlsplit(target)
    if parts.scheme not in ("http", "https"):
        return f"scheme {parts.scheme!r} (only http, https and relative links)"
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        return "a malformed port"
    if not parts.hostname or not HOST.fullmatch(parts.hostname):
        return "no host name"
    if re.search(r"\s", target):
        return "white space"
    return None


def link_problem(doc: Path, target: str, root: Path) -> str | None:
    """Why `target`, a link in `doc`, does not resolve inside `root`, or None."""
    parts = urllib.parse.urlsplit(target)
    if parts.scheme or parts.netloc:
        return external_problem(target)
    path, fragment = urllib.parse.unquote(parts.path), urllib.parse.unquote(parts.fragment)
    if not path:
        file = doc
    elif path.startswith("/"):  # GitHub reads /x from the repository's root
        file = (root / path.lstrip("/")).resolve()
    else:
        file = (doc.parent / path).resolve()
    if not file.is_relative_to(root.resolve()):
        return "outside the repository"
    if not file.exists():
        return "no such file or folder"
    if not fragment:
        return None
    if file.is_dir():
        return "an anchor into a folder"
    if file.suffix.lower() != ".md":
        return None if LINE_ANCHOR.fullmatch(fragment) else "an anchor into a file that is not Markdown"
    return None if fragment in anchors(file) else f"no heading #{fragment} in {file.name}"


def problems(doc: Path, root: Path = REPO) -> list[str]:
    """Every link of `doc` that does not resolve, as `file:line: target: why`."""
    name = doc.relative_to(root) if doc.is_relative_to(root) else doc.name
    out = []
    for line, target in links(doc):
        why = link_problem(doc, target, root)
        if why:
            out.append(f"{name}:{line}: {target}: {why}")
    return out


def test_every_link_in_the_documentation_resolves():
    docs = documents()
    # not vacuous: the README, the docs/ pages and results/README.md are all read
    assert README in docs and REPO / "results" / "README.md" in docs
    assert len([d for d in docs if d.parent == DOCS]) >= 5
    assert len(links(README)) >= 20
    found = [p for doc in docs for p in problems(doc)]
    assert not found, "broken links:\n" + "\n".join(found)


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(README.parent / urllib.parse.urlsplit(t).path).resolve() for _, t in links(README)
              if not urllib.parse.urlsplit(t).scheme}
    unlinked = [p.name for p in sorted(DOCS.glob("*.md")) if p.resolve() not in linked]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


def test_the_readme_stays_a_front_door():
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines < README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/ (< {README_MAX_LINES})"


@pytest.mark.parametrize("heading, anchor", [
    ("Is the difference real?", "is-the-difference-real"),
    ("What `make study-lr` does", "what-make-study-lr-does"),
    ("The package's shape", "the-packages-shape"),
    ("Measured on an H100", "measured-on-an-h100"),
    ("A_b c-d (e, f)", "a_b-c-d-e-f"),
    ("[Linked](x.md) title", "linked-title"),
    ("Über §7 × 2", "über-7--2"),
])
def test_slugs_follow_githubs_rules(heading, anchor):
    assert slug(heading) == anchor


def test_a_planted_broken_link_fails(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## Twice\n\n## Twice\n\nSetext\n------\n")
    (tmp_path / "data.csv").write_text("a,b\n")
    (tmp_path / "sub").mkdir()
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n## Is it real?\n\n"
        "Good: [here](#is-it-real), [other](other.md#twice-1), [setext](other.md#setext),\n"
        "[a folder](sub/), [csv](data.csv#L2), ![img](data.csv), [wrapped\ntext](other.md),\n"
        "<https://example.org/x?y=1>, [ext](https://github.com/a/b#readme \"title\").\n"
        "In code, not links: `[x](missing.md)` and\n\n```\n[y](missing-too.md)\n```\n\n"
        "Bad: [gone](missing.md), [anchor](other.md#nowhere), [self](#not-here),\n"
        "[folder anchor](sub/#x), [csv anchor](data.csv#top), [out](../../etc/passwd),\n"
        "[no host](https:///path), [port](http://example.org:port/), [mail](mailto:a@b.c),\n"
        "[ref]\n\n[ref]: gone-too.md\n")
    found = problems(page, root=tmp_path)
    bad = {p.split(": ")[1] for p in found}
    assert bad == {"missing.md", "other.md#nowhere", "#not-here", "sub/#x", "data.csv#top",
                   "../../etc/passwd", "https:///path", "http://example.org:port/", "mailto:a@b.c",
                   "gone-too.md"}, found
    assert "page.md:15: missing.md: no such file or folder" in found  # where, and why
