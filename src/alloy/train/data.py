"""Training data: sources read and checked with every bad line reported, tokenised once, cached.

A source is a text file (one document), a folder (its text files and JSONL files, recursively,
sorted), a JSONL file, or a domain of the lab corpus. JSONL records are one of:

    {"text": "..."}                                   a document (continued pre-training)
    {"prompt": "...", "completion": "..."}            an example: only the completion is scored
    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}, ...]}
                                                      a conversation, rendered with the tokenizer's
                                                      chat template: only assistant turns are scored
    {"prompt": ..., "chosen": ..., "rejected": ...}   a preference pair (pairs.py): two items

Every item becomes token ids and a mask of which ids are training targets. A document is
`[start] + tokens + [eos]` with every id scored (`start` is BOS, else EOS, as in `alloy eval`, so
a model trains on what it is scored on; when BOS is EOS the separator between documents is that
one token); an example is `[start] + prompt + completion + [eos]` with the completion and EOS
scored (prompt and completion are tokenised separately, as `alloy eval` tokenises a context and
its choices); a conversation is its rendered template, the assistant segments scored.

Tokenised sources are cached under the alloy cache folder ($ALLOY_CACHE_DIR, else
~/.cache/alloy) by a key of the tokenizer's full definition and the SHA-256 of every file, so a
second run, another recipe or another process on the same data reads them back instead of
tokenising again. `ALLOY_TOKEN_CACHE=0` turns the cache off.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from alloy.errors import InputError, Problem
from alloy.train.recipe import DataEntry, source_name, source_path

CACHE_VERSION = 1
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text", ".tex", ".html", ".py", ".csv"}
MAX_PROBLEMS = 20
ItemKind = Literal["text", "completion", "messages", "preference", "preference_chat"]
# A text segment of an item and whether its tokens are training targets.
Segment = tuple[str, bool]


@dataclass(frozen=True)
class Source:
    """A data source, resolved: its files and its share of the mixture."""

    name: str
    path: Path
    files: tuple[Path, ...]
    weight: float
    kind: str  # what the recipe asked for: auto, text, completion, messages
    bootstrap: int | None = None  # seed of a bootstrap resample of its items


@dataclass(frozen=True)
class Item:
    kind: ItemKind
    segments: tuple[Segment, ...]
    margin: float = 0.0  # a preference pair's `margin` (the reward objective's m)


@dataclass
class TokenizedSource:
    """Token ids of every item of a source, with the mask of training targets.

    `ids` and `mask` are flat; item `i` is `ids[starts[i]:starts[i + 1]]`.
    """

    name: str
    ids: np.ndarray  # (L,) uint32
    mask: np.ndarray  # (L,) bool: True where the id is a training target
    starts: np.ndarray  # (n + 1,) int64
    kinds: tuple[str, ...]  # the item kinds found (text, completion, messages)
    files: tuple[tuple[str, str], ...]  # (path, sha256) of every file read
    cached: bool = False
    margins: np.ndarray | None = None  # (n,) float32 margin of each item (preference pairs)

    @property
    def items(self) -> int:
        return len(self.starts) - 1

    @property
    def tokens(self) -> int:
        return int(self.starts[-1])


def resolve_sources(entries: Sequence[DataEntry], lab_root: Path) -> list[Source]:
    """The files of each recipe data entry (folders expanded, sorted)."""
    sources = []
    for entry in entries:
        path = source_path(entry, lab_root)
        if path.is_dir():
            files = tuple(
                sorted(
                    p
                    for p in path.rglob("*")
                    if p.is_file()
                    and not any(part.startswith(".") for part in p.relative_to(path).parts)
                    and (p.suffix.lower() in TEXT_SUFFIXES or p.suffix == ".jsonl")
                )
            )
        else:
            files = (path,)
        sources.append(
            Source(
                source_name(entry), path, files, float(entry.weight), entry.kind, entry.bootstrap
            )
        )
    return sources


# ---- reading ----------------------------------------------------------------------------------


def read_items(source: Source, tokenizer: Any, problems: list[Problem]) -> list[Item]:
    """Every item of `source`; bad files and lines are added to `problems` (file:line)."""
    from alloy.eval.data import jsonl_records

    if not source.files:
        problems.append(Problem(str(source.path), "no text or JSONL files", "check the path"))
    items: list[Item] = []
    for file in source.files:
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            problems.append(Problem(str(file), f"not UTF-8 text ({exc.reason})"))
            continue
        except OSError as exc:
            problems.append(Problem(str(file), f"cannot read ({exc.strerror})"))
            continue
        if file.suffix != ".jsonl":
            if text.strip():
                items.append(Item("text", ((text, True),)))
            else:
                problems.append(Problem(str(file), "empty file"))
            continue
        records = jsonl_records(text, file, problems)
        if not records:
            problems.append(Problem(str(file), "no records"))
        for number, record in records:
            items += _items(record, f"{file}:{number}", source.kind, tokenizer, problems)
    return items


def _items(
    record: dict[str, Any], where: str, want: str, tokenizer: Any, problems: list[Problem]
) -> list[Item]:
    from alloy.train.pairs import is_preference, preference_items

    if is_preference(record):
        if want not in ("auto", "preference"):
            problems.append(Problem(where, f"a preference record in a source of kind {want}"))
            return []
        return preference_items(record, where, tokenizer, problems)
    if want == "preference":
        problems.append(Problem(where, "not a preference record", "prompt, chosen, rejected"))
        return []
    item = _item(record, where, want, tokenizer, problems)
    return [] if item is None else [item]


def _item(
    record: dict[str, Any], where: str, want: str, tokenizer: Any, problems: list[Problem]
) -> Item | None:
    if "messages" in record:
        kind: ItemKind = "messages"
    elif "prompt" in record or "completion" in record:
        kind = "completion"
    elif "text" in record:
        kind = "text"
    else:
        hint = "expected text, prompt/completion, messages or prompt/chosen/rejected"
        problems.append(Problem(where, f"unknown record shape (keys {sorted(record)})", hint))
        return None
    if want != "auto" and kind != want:
        problems.append(Problem(where, f"a {kind} record in a source of kind {want}"))
        return None
    if kind == "text":
        text = record["text"]
        if not isinstance(text, str) or not text.strip():
            problems.append(Problem(where, "text must be a non-empty string"))
            return None
        return Item("text", ((text, True),))
    if kind == "completion":
        prompt, completion = record.get("prompt"), record.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str) or not completion:
            missing = [k for k in ("prompt", "completion") if k not in record]
            message = f"missing {', '.join(missing)}" if missing else "prompt and completion must"
            problems.append(
                Problem(
                    where, message + (" be strings, completion non-empty" if not missing else "")
                )
            )
            return None
        return Item("completion", ((prompt, False), (completion, True)))
    segments = render_messages(record["messages"], tokenizer, where, problems)
    return None if segments is None else Item("messages", tuple(segments))


def render_messages(
    messages: Any, tokenizer: Any, where: str, problems: list[Problem], *, first: int = 0
) -> list[Segment] | None:
    """A conversation as template text segments, assistant turns marked as targets.

    Rendered turn by turn: the text the template adds for an assistant message (its content and
    end-of-turn tokens), after the prompt that asks for it, is scored; everything else is not.
    Assistant messages before `first` are context too (a preference pair's prompt).
    Needs a template whose rendering of a conversation starts with the rendering of every
    shorter prefix of it (true of the common templates).
    """
    if not (
        isinstance(messages, list)
        and messages
        and all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in messages
        )
    ):
        message = "messages must be a non-empty list of {role, content} strings"
        problems.append(Problem(where, message))
        return None
    if not any(m["role"] == "assistant" for m in messages[first:]):
        problems.append(Problem(where, "no assistant message to train on"))
        return None
    if not getattr(tokenizer, "chat_template", None):
        problems.append(Problem(where, "the tokenizer has no chat template for messages"))
        return None
    segments: list[Segment] = []
    done = ""
    for i, message in enumerate(messages):
        assistant = message["role"] == "assistant" and i >= first
        if assistant:
            prompt = _render(tokenizer, messages[:i], generation_prompt=True) if i else ""
            if not prompt.startswith(done):
                problems.append(Problem(where, "the chat template does not render turn by turn"))
                return None
            if prompt[len(done) :]:
                segments.append((prompt[len(done) :], False))
            done = prompt
        full = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        if not full.startswith(done):
            problems.append(Problem(where, "the chat template does not render turn by turn"))
            return None
        if full[len(done) :]:
            segments.append((full[len(done) :], assistant))
        done = full
    return segments


def _render(tokenizer: Any, messages: list[dict[str, str]], *, generation_prompt: bool) -> str:
    return str(
        tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    )


# ---- tokenising ------------------------------------------------------------------------------


def special_ids(tokenizer: Any) -> tuple[int | None, int | None]:
    """(start, eos): the id every item starts with (BOS, else EOS, as `alloy eval` scores) and
    the id that ends a document or completion (None if the tokenizer has neither)."""
    from alloy.eval.scorer import start_ids

    start = start_ids(tokenizer)
    return (start[0] if start else None), tokenizer.eos_token_id


def tokenize_items(items: Sequence[Item], tokenizer: Any, batch: int = 512) -> TokenizedSource:
    """Token ids and target masks of `items` (see the module docstring for the layout)."""
    start, eos = special_ids(tokenizer)
    ids_parts: list[np.ndarray] = []
    mask_parts: list[np.ndarray] = []
    lengths = np.zeros(len(items), dtype=np.int64)
    for first in range(0, len(items), batch):
        chunk = items[first : first + batch]
        texts = [text for item in chunk for text, _ in item.segments]
        encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else None
        for offset, item in enumerate(chunk):
            ids: list[int] = []
            mask: list[bool] = []
            framed = item.kind in ("text", "completion", "preference")  # not a template's
            if framed and start is not None:
                ids.append(start)
                mask.append(item.kind == "text")
            for _, scored in item.segments:
                assert encoded is not None
                tokens = next(encoded)
                ids += tokens
                mask += [scored] * len(tokens)
            # A completion always ends in EOS (the model learns to stop); a document only when
            # EOS is not also the start token that opens the next document.
            if eos is not None and (
                item.kind in ("completion", "preference") or (item.kind == "text" and eos != start)
            ):
                ids.append(eos)
                mask.append(True)
            ids_parts.append(np.asarray(ids, dtype=np.uint32))
            mask_parts.append(np.asarray(mask, dtype=bool))
            lengths[first + offset] = len(ids)
    starts = np.zeros(len(items) + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    paired = any(item.kind in ("preference", "preference_chat") for item in items)
    return TokenizedSource(
        name="",
        ids=np.concatenate(ids_parts) if ids_parts else np.zeros(0, dtype=np.uint32),
        mask=np.concatenate(mask_parts) if mask_parts else np.zeros(0, dtype=bool),
        starts=starts,
        kinds=tuple(sorted({item.kind for item in items})),
        files=(),
        margins=np.asarray([item.margin for item in items], dtype=np.float32) if paired else None,
    )


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A digest of everything that decides how the tokenizer encodes and renders text."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab())
    parts = {
        "class": type(tokenizer).__name__,
        "definition": definition,
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "ids": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id],
        "chat_template": str(getattr(tokenizer, "chat_template", None)),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def load_sources(
    sources: Sequence[Source], tokenizer: Any, *, cache: bool | None = None
) -> list[TokenizedSource]:
    """Read, check and tokenise every source (from the cache when nothing changed).

    Raises:
        InputError: every unreadable file and bad record of every source, with file:line.
    """
    from alloy.io.digest import files_sha256

    use_cache = _cache_enabled() if cache is None else cache
    fingerprint = tokenizer_fingerprint(tokenizer)
    problems: list[Problem] = []
    out: list[TokenizedSource] = []
    for source in sources:
        digests = files_sha256(source.files) if source.files else []
        files = tuple((str(f), d) for f, d in zip(source.files, digests, strict=True))
        key = _cache_key(fingerprint, files, source.kind)
        folder = cache_root() / "tokens" / key
        tokenized = _read_cache(folder) if use_cache else None
        if tokenized is None:
            before = len(problems)
            items = read_items(source, tokenizer, problems)
            if len(problems) > before:
                continue
            tokenized = tokenize_items(items, tokenizer)
            if use_cache:
                _write_cache(folder, tokenized)
        else:
            tokenized.cached = True
        tokenized.name, tokenized.files = source.name, files
        if source.bootstrap is not None:
            tokenized = bootstrap(tokenized, source.bootstrap)
        out.append(tokenized)
    if problems:
        if len(problems) > MAX_PROBLEMS:
            extra = len(problems) - MAX_PROBLEMS
            problems = [*problems[:MAX_PROBLEMS], Problem("", f"... and {extra} more problems")]
        raise InputError("training data is not usable", problems)
    return out


def bootstrap(source: TokenizedSource, seed: int) -> TokenizedSource:
    """A bootstrap resample of `source`: as many items, drawn uniformly with replacement
    (Breiman 1996, bagging), seeded."""
    n = source.items
    return take_items(source, bootstrap_picks(n, seed))


def take_items(source: TokenizedSource, picks: np.ndarray) -> TokenizedSource:
    """`source` with its items `picks` (N',) in that order (a resample, or a reordering)."""
    lengths = np.diff(source.starts)[picks]
    starts = np.zeros(len(picks) + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    index = (
        np.concatenate([np.arange(source.starts[i], source.starts[i + 1]) for i in picks])
        if len(picks)
        else np.zeros(0, dtype=np.int64)
    )
    return TokenizedSource(
        source.name,
        np.asarray(source.ids)[index],
        np.asarray(source.mask)[index],
        starts,
        source.kinds,
        source.files,
        source.cached,
        None if source.margins is None else source.margins[picks],
    )


def bootstrap_picks(n: int, seed: int) -> np.ndarray:
    """(n,) the items a bootstrap resample of n items takes, sorted."""
    return np.sort(np.random.default_rng([seed, n]).integers(0, n, size=n))


def cache_root() -> Path:
    """$ALLOY_CACHE_DIR, else $XDG_CACHE_HOME/alloy, else ~/.cache/alloy."""
    folder = os.environ.get("ALLOY_CACHE_DIR")
    if folder:
        return Path(folder)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "alloy"


def _cache_enabled() -> bool:
    value = os.environ.get("ALLOY_TOKEN_CACHE", "1").strip().lower()
    return value not in {"0", "false", "no", "off"}


def _cache_key(fingerprint: str, files: tuple[tuple[str, str], ...], kind: str) -> str:
    # Files by content only (not by path), so a moved or copied corpus reuses its cache.
    content = {
        "v": CACHE_VERSION,
        "tokenizer": fingerprint,
        "files": [d for _, d in files],
        "kind": kind,
    }
    return hashlib.sha256(json.dumps(content).encode()).hexdigest()[:32]


def _read_cache(folder: Path) -> TokenizedSource | None:
    try:
        meta = json.loads((folder / "meta.json").read_text())
        arrays = {n: np.load(folder / f"{n}.npy", mmap_mode="r") for n in ("ids", "mask", "starts")}
        # Pairs cached before margins were kept have none: tokenised again rather than read as 0.
        paired = any(k in ("preference", "preference_chat") for k in meta["kinds"])
        margins = np.load(folder / "margins.npy") if paired else None
    except (OSError, ValueError, KeyError):
        return None
    if meta.get("version") != CACHE_VERSION or int(arrays["starts"][-1]) != len(arrays["ids"]):
        return None
    return TokenizedSource(
        "",
        arrays["ids"],
        arrays["mask"],
        arrays["starts"],
        tuple(meta["kinds"]),
        (),
        margins=margins,
    )


def _write_cache(folder: Path, tokenized: TokenizedSource) -> None:
    """Write into a temporary sibling, then rename: readers see a whole entry or none."""
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        for name in ("ids", "mask", "starts"):
            np.save(tmp / f"{name}.npy", getattr(tokenized, name))
        if tokenized.margins is not None:
            np.save(tmp / "margins.npy", tokenized.margins)
        meta = {
            "version": CACHE_VERSION,
            "kinds": list(tokenized.kinds),
            "files": [list(f) for f in tokenized.files],
        }
        (tmp / "meta.json").write_text(json.dumps(meta))
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    except OSError:
        pass  # only a cache: a read-only or full disk just means tokenising again next time
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def iter_item_ids(source: TokenizedSource) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(ids, mask) of each item."""
    for i in range(source.items):
        a, b = int(source.starts[i]), int(source.starts[i + 1])
        yield source.ids[a:b], source.mask[a:b]
