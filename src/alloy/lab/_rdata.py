"""Read R data objects out of an R package's lazy-load database, without R.

R packages store their data sets in `data/Rdata.rdx` (index) + `data/Rdata.rdb` (records). The
index is one serialized R list, gzip-compressed like an `.rds` file:
`list(variables = list(<name> = c(offset, length), ...), references = ..., compressed = ...)`.
Each record at `offset` in the `.rdb` is a 4-byte big-endian uncompressed length followed by the
compressed serialization; `compressed` says how: TRUE = zlib; 2 or 3 = one type byte first
('1' zlib, '2' bzip2, 'Z' raw LZMA2 with xz preset 6, '0' stored). See R's `src/main/serialize.c`
(`R_decompress1/2/3`, `ReadItem`) and "R Internals", section 1.8 (serialization formats).

Only the XDR ("X\n") format and the value types that data sets use are read: NULL, logical,
integer, double, complex, character, raw, list, pairlist, symbols and references to them, and
the ALTREP compact sequences and wrappers R writes for row names. Environments, closures, byte
code and external references raise `AlloyError`, as does anything malformed.

The `rdata` package on PyPI does the same but requires pandas and xarray; this reader is small
enough to keep the lab free of both.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alloy.errors import AlloyError

# SEXP type codes (Rinternals.h) and the pseudo-types of the serialization format (serialize.c).
NILSXP, SYMSXP, LISTSXP, LANGSXP, CHARSXP, LGLSXP = 0, 1, 2, 6, 9, 10
INTSXP, REALSXP, CPLXSXP, STRSXP, VECSXP, EXPRSXP, RAWSXP = 13, 14, 15, 16, 19, 20, 24
REFSXP, NILVALUE_SXP, EMPTYENV_SXP, BASEENV_SXP, GLOBALENV_SXP = 255, 254, 242, 241, 253
ALTREP_SXP = 238
_NA_INTEGER = -(2**31)
_LATIN1, _UTF8 = 1 << 2, 1 << 3  # CHARSXP encoding bits, in the "levels" part of the flags
_KINDS = {
    NILSXP: "null",
    LISTSXP: "pairlist",
    LANGSXP: "language",
    LGLSXP: "logical",
    INTSXP: "integer",
    REALSXP: "double",
    CPLXSXP: "complex",
    STRSXP: "character",
    VECSXP: "list",
    EXPRSXP: "expression",
    RAWSXP: "raw",
}


@dataclass
class RObject:
    """One R value. `value` is a Python list for vectors (None marks NA), a list of
    `(tag, RObject)` for pairlists, a str for symbols, bytes for raw vectors, None for NULL."""

    kind: str
    value: Any
    attributes: dict[str, RObject] = field(default_factory=dict)

    def names(self) -> list[str | None]:
        names = self.attributes.get("names")
        return list(names.value) if names is not None else []

    def classes(self) -> list[str]:
        classes = self.attributes.get("class")
        return [c for c in classes.value if c] if classes is not None else []


_NULL = RObject("null", None)


class _Reader:
    def __init__(self, data: bytes, where: str) -> None:
        self.data, self.pos, self.where = data, 0, where
        self.refs: list[RObject] = []
        self.native_encoding = "utf-8"

    def fail(self, message: str) -> AlloyError:
        return AlloyError(f"{self.where}: {message} (at byte {self.pos})")

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise self.fail("truncated R serialization")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def i32(self) -> int:
        return int(struct.unpack(">i", self.take(4))[0])

    def length(self) -> int:
        n = self.i32()
        if n == -1:  # long vector: two more words, upper then lower
            upper, lower = self.i32(), self.i32()
            n = (upper << 32) + (lower & 0xFFFFFFFF)
        if n < 0:
            raise self.fail(f"negative vector length {n}")
        return n

    def header(self) -> None:
        if self.take(2) != b"X\n":
            raise self.fail("not an XDR R serialization (R's default); other formats unsupported")
        version = self.i32()
        self.take(8)  # R version that wrote it, oldest R version that can read it
        if version == 3:
            self.native_encoding = self.take(self.i32()).decode("ascii", "replace")
        elif version != 2:
            raise self.fail(f"unknown serialization version {version}")

    def item(self, flags: int | None = None) -> RObject:
        flags = self.i32() if flags is None else flags
        sexp_type, levels = flags & 0xFF, flags >> 12
        has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if sexp_type == NILVALUE_SXP:
            return _NULL
        if sexp_type in (EMPTYENV_SXP, BASEENV_SXP, GLOBALENV_SXP):
            return RObject("environment", None)
        if sexp_type == REFSXP:
            index = (flags >> 8) or self.i32()
            if not 1 <= index <= len(self.refs):
                raise self.fail(f"reference {index} to an object not read yet")
            return self.refs[index - 1]
        if sexp_type == SYMSXP:
            symbol = RObject("symbol", self.item().value[0])
            self.refs.append(symbol)
            return symbol
        if sexp_type in (LISTSXP, LANGSXP):
            return self.pairlist(sexp_type, has_attr, has_tag)
        if sexp_type == ALTREP_SXP:
            return self.altrep()
        if sexp_type == CHARSXP:
            return RObject("character", [self.chars(levels)])
        obj = RObject(_KINDS.get(sexp_type, ""), self.vector(sexp_type))
        if has_attr:
            obj.attributes = self.attributes()
        return obj

    def vector(self, sexp_type: int) -> Any:
        if sexp_type not in _KINDS or sexp_type in (NILSXP, LISTSXP, LANGSXP):
            raise self.fail(f"unsupported R object type {sexp_type} (not a plain data value)")
        n = self.length()
        if sexp_type in (LGLSXP, INTSXP):
            ints = struct.unpack(f">{n}i", self.take(4 * n))
            if sexp_type == LGLSXP:
                return [None if v == _NA_INTEGER else bool(v) for v in ints]
            return [None if v == _NA_INTEGER else v for v in ints]
        if sexp_type == REALSXP:
            return list(struct.unpack(f">{n}d", self.take(8 * n)))
        if sexp_type == CPLXSXP:
            parts = struct.unpack(f">{2 * n}d", self.take(16 * n))
            return [complex(parts[i], parts[i + 1]) for i in range(0, 2 * n, 2)]
        if sexp_type == RAWSXP:
            return self.take(n)
        if sexp_type == STRSXP:
            strings = []
            for _ in range(n):
                flags = self.i32()
                if flags & 0xFF != CHARSXP:
                    raise self.fail(f"character vector holds SEXP type {flags & 0xFF}")
                strings.append(self.chars(flags >> 12))
            return strings
        return [self.item() for _ in range(n)]  # VECSXP, EXPRSXP

    def chars(self, levels: int) -> str | None:
        n = self.i32()
        if n == -1:
            return None  # NA_character_
        raw = self.take(n)
        if levels & _LATIN1:
            return raw.decode("latin-1")
        encoding = "utf-8" if levels & _UTF8 else self.native_encoding
        try:
            return raw.decode(encoding, "replace")
        except LookupError:  # a native encoding Python does not know
            return raw.decode("utf-8", "replace")

    def pairlist(self, sexp_type: int, has_attr: bool, has_tag: bool) -> RObject:
        # Iterative over the CDR chain: a long pairlist must not hit Python's recursion limit.
        # A dotted pair (CDR not a pairlist, as in ALTREP states) keeps its CDR as a last cell.
        cells: list[tuple[str | None, RObject]] = []
        attributes: dict[str, RObject] = {}
        while True:
            if has_attr:
                cell_attributes = self.attributes()  # only the first cell's belong to the list
                if not cells:
                    attributes = cell_attributes
            tag = self.item().value if has_tag else None
            cells.append((tag, self.item()))
            flags = self.i32()
            if flags & 0xFF == NILVALUE_SXP:
                return RObject(_KINDS[sexp_type], cells, attributes)
            if flags & 0xFF not in (LISTSXP, LANGSXP):
                cells.append((None, self.item(flags)))
                return RObject(_KINDS[sexp_type], cells, attributes)
            has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))

    def attributes(self) -> dict[str, RObject]:
        attrs = self.item()
        if attrs.kind != "pairlist":
            raise self.fail(f"attributes are a {attrs.kind}, not a pairlist")
        return {str(tag): value for tag, value in attrs.value}

    def altrep(self) -> RObject:
        info, state, attrs = self.item(), self.item(), self.item()
        class_name = info.value[0][1].value if info.kind == "pairlist" else "?"
        if class_name in ("compact_intseq", "compact_realseq"):
            n, start, step = state.value[:3]  # stored as doubles
            values = [start + i * step for i in range(int(n))]
            obj = RObject(
                "integer" if class_name == "compact_intseq" else "double",
                [int(v) for v in values] if class_name == "compact_intseq" else values,
            )
        elif class_name.startswith("wrap_"):
            wrapped = _car(state)  # state = CONS(x, metadata)
            obj = RObject(wrapped.kind, wrapped.value)
        elif class_name == "deferred_string":
            source = _car(state)  # state = CONS(argument vector, scalar info)
            obj = RObject("character", [None if v is None else str(v) for v in source.value])
        else:
            raise self.fail(f"unsupported ALTREP class {class_name!r}")
        if attrs.kind == "pairlist":
            obj.attributes = {str(tag): value for tag, value in attrs.value}
        return obj


def _car(state: RObject) -> RObject:
    first = state.value[0]
    return first[1] if state.kind == "pairlist" else first


def unserialize(data: bytes, where: str = "R data") -> RObject:
    """Decode one R serialization (XDR format, versions 2 and 3)."""
    reader = _Reader(data, where)
    reader.header()
    return reader.item()


def _decompress_file(raw: bytes) -> bytes:
    if raw.startswith(b"\x1f\x8b"):
        return gzip.decompress(raw)
    if raw.startswith(b"BZh"):
        return bz2.decompress(raw)
    if raw.startswith(b"\xfd7zXZ"):
        return lzma.decompress(raw)
    return raw


def _decompress_record(record: bytes, compressed: int, where: str) -> bytes:
    if len(record) < 5:
        raise AlloyError(f"{where}: truncated lazy-load record")
    size = struct.unpack(">I", record[:4])[0]
    try:
        if compressed in (2, 3):
            kind, payload = record[4:5], record[5:]
            if kind == b"Z":
                filters = [{"id": lzma.FILTER_LZMA2, "preset": 6}]
                data = lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=filters).decompress(payload)
            elif kind == b"2":
                data = bz2.decompress(payload)
            elif kind == b"1":
                data = zlib.decompress(payload)
            elif kind == b"0":
                data = payload
            else:
                raise AlloyError(f"{where}: unknown lazy-load compression type {kind!r}")
        else:
            data = zlib.decompress(record[4:])
    except (zlib.error, lzma.LZMAError, OSError, ValueError) as error:
        raise AlloyError(f"{where}: cannot decompress lazy-load record: {error}") from error
    if len(data) != size:
        raise AlloyError(f"{where}: record is {len(data)} bytes, its header says {size}")
    return data


def lazyload_index(base: Path) -> tuple[dict[str, tuple[int, int]], int]:
    """`{name: (offset, length)}` and the compression code of the database `base`.rdx/.rdb."""
    rdx = base.with_suffix(".rdx")
    try:
        index = unserialize(_decompress_file(rdx.read_bytes()), str(rdx))
    except (OSError, EOFError) as error:
        raise AlloyError(f"{rdx}: cannot read the lazy-load index: {error}") from error
    fields = dict(zip(index.names(), index.value if index.kind == "list" else [], strict=False))
    if "variables" not in fields:
        raise AlloyError(f"{rdx}: not a lazy-load index (no 'variables' entry)")
    variables = fields["variables"]
    entries = {
        str(name): (int(pos.value[0]), int(pos.value[1]))
        for name, pos in zip(variables.names(), variables.value, strict=True)
    }
    flag = fields["compressed"].value[0] if "compressed" in fields else True
    return entries, int(flag)


def lazyload(base: Path, name: str) -> RObject:
    """One object, by name, from the lazy-load database `base`.rdx/.rdb (e.g. `data/Rdata`)."""
    entries, compressed = lazyload_index(base)
    if name not in entries:
        raise AlloyError(
            f"{base}.rdx: no object {name!r}; it holds: {', '.join(sorted(entries)) or 'nothing'}"
        )
    offset, length = entries[name]
    rdb = base.with_suffix(".rdb")
    with rdb.open("rb") as f:
        f.seek(offset)
        record = f.read(length)
    where = f"{rdb}[{name}]"
    return unserialize(_decompress_record(record, compressed, where), where)
