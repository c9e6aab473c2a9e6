"""Docs and comments stand alone: every file they cite is in the repository.

Code comments, docstrings, docs and test comments cite Envoy's and kgateway's own documentation,
or the project's notes under docs/internals/ as ``docs/internals/<note>.md §N``. This test fails
on a citation of a file that is not in the repository, on a ``§N`` that the named note does not
have, and on a link to a heading anchor of a note that does not exist.

A ``§N`` cites the note named before it on the same line; failing that, the last note named above
it in the same file (a docstring naming the note once, then bare ``§N``s); inside a note, the note
itself. ``RFC 6749 §2.3.1`` and the like are not the notes' and are left alone.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
INTERNALS = ROOT / "docs" / "internals"
SCANNED = ["extsvc", "plugins", "controller", "docs", "tests", "bench", "examples", "scripts", "README.md"]
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".sh", ".cfg", ".ini", ".json", ""}
SKIPPED_DIRS = {"__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache", ".hypothesis"}
THIS_FILE = Path(__file__).resolve()

# Reference files that once lived outside the repository; citing them leaves a reader stranded.
# (Spelled in pieces so that this file does not match itself.)
MISSING = [
    "envoy-" + "protocols.md",
    "kgateway-" + "api.md",
    "xds-" + "server.md",
    "kmock" + ".md",
    "container-" + "images.md",
    "../" + "shared",
    "shared/" + "reference",
    "STYLE" + ".md",
    "STYLE" + " §",
]

HEADING = re.compile(r"^#{2,6} (\d+(?:\.\d+)*)\.? +(.+?)\s*$", re.M)
SECTION = re.compile(r"§(\d+(?:\.\d+)*)")
ANCHOR_LINK = re.compile(r"\]\(((?:[^()\s#]*/)?([a-z0-9-]+)\.md)#([^)\s]+)\)")


def notes() -> dict[str, str]:
    return {path.stem: path.read_text(encoding="utf-8") for path in sorted(INTERNALS.glob("*.md"))}


NOTES = notes()
NOTE_NAME = re.compile(r"\b(" + "|".join(map(re.escape, NOTES)) + r")\.md\b") if NOTES else None


def sections(text: str) -> set[str]:
    return {number for number, _ in HEADING.findall(text)}


def slug(title: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", title.lower())
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    return {slug(f"{number} {title}") for number, title in HEADING.findall(text)} | {
        slug(line.lstrip("#").strip()) for line in text.splitlines() if line.startswith("#")
    }


def scanned_files() -> list[Path]:
    files: list[Path] = []
    for entry in SCANNED:
        path = ROOT / entry
        candidates = [path] if path.is_file() else sorted(path.rglob("*"))
        for candidate in candidates:
            if not candidate.is_file() or candidate.resolve() == THIS_FILE:
                continue
            if SKIPPED_DIRS.intersection(candidate.relative_to(ROOT).parts):
                continue
            if candidate.suffix in TEXT_SUFFIXES:
                files.append(candidate)
    return files


FILES = scanned_files()


def read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return ""


def citation_problems(path: Path, text: str) -> list[str]:
    assert NOTE_NAME is not None
    where = path.relative_to(ROOT)
    own_note = path.stem if path.parent == INTERNALS else None
    problems: list[str] = []
    last_named = own_note
    for number, line in enumerate(text.splitlines(), 1):
        for match in SECTION.finditer(line):
            before = line[: match.start()]
            named = NOTE_NAME.findall(before)
            if named:
                note: str | None = named[-1]
            elif "RFC" in before:
                continue
            else:
                note = own_note or last_named
            if note is None:
                problems.append(f"{where}:{number}: §{match.group(1)} names no note of docs/internals/")
            elif match.group(1) not in sections(NOTES[note]):
                problems.append(f"{where}:{number}: docs/internals/{note}.md has no §{match.group(1)}")
        mentioned = NOTE_NAME.findall(line)
        if mentioned and own_note is None:
            last_named = mentioned[-1]
    for match in ANCHOR_LINK.finditer(text):
        target, note, anchor = match.groups()
        resolved = (path.parent / target).resolve()
        if resolved.parent == INTERNALS.resolve() and note in NOTES and anchor not in anchors(NOTES[note]):
            problems.append(f"{where}: link to {target}#{anchor}: no such heading")
    return problems


def test_the_notes_exist_and_are_numbered() -> None:
    assert set(NOTES) >= {"envoy-behaviour", "kgateway-translation"}
    for name, text in NOTES.items():
        numbers = sections(text)
        assert numbers, f"docs/internals/{name}.md has no numbered sections"


def test_readme_links_the_internal_notes() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for name in NOTES:
        assert f"docs/internals/{name}.md" in readme, f"README.md does not link docs/internals/{name}.md"


def test_nothing_cites_files_outside_the_repository() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{number}: {name}"
        for path in FILES
        for number, line in enumerate(read(path).splitlines(), 1)
        for name in MISSING
        if name in line
    ]
    assert not found, "cites files that are not in the repository:\n" + "\n".join(found)


def test_every_section_cited_exists() -> None:
    problems = [
        problem
        for path in FILES
        if "§" in (text := read(path)) or ".md#" in text
        for problem in citation_problems(path, text)
    ]
    assert not problems, "\n".join(problems)


def test_the_checker_catches_what_it_should(tmp_path: Path) -> None:
    sample = ROOT / "extsvc" / "sample.py"  # never written: only its name is used
    text = (
        "# docs/internals/envoy-behaviour.md §1.1 and §99.9\n"
        "# RFC 6749 §2.3.1 is not a note\n"
        "# bare §1.2 after envoy-behaviour.md; kgateway-translation.md §3.7\n"
        "# see [x](../docs/internals/kgateway-translation.md#12-status) and (../docs/internals/"
        "kgateway-translation.md#no-such-heading)\n"
    )
    problems = citation_problems(sample, text)
    assert problems == ["extsvc/sample.py:1: docs/internals/envoy-behaviour.md has no §99.9"]
    assert citation_problems(sample, "# §1.1 of nothing\n") == [
        "extsvc/sample.py:1: §1.1 names no note of docs/internals/"
    ]
    doc = ROOT / "docs" / "sample.md"
    assert citation_problems(doc, "[a](internals/envoy-behaviour.md#99-nothing)\n") == [
        "docs/sample.md: link to internals/envoy-behaviour.md#99-nothing: no such heading"
    ]
