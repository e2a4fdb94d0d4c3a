"""Delimited text tables: a fast Arrow parse, and a line-by-line pass that only runs to explain a failure.

The bulk path (``pyarrow.csv``) is what makes multi-million-line files load in seconds, but its errors do not
name a line reliably. When it fails, :func:`read_table` re-reads the file one line at a time with the same
rules and raises :class:`DataFormatError` at the first offending line and field. Line numbers are 1-based and
count every physical line, the header and blank lines included. Quoting is off by default: every byte between
separators is data (HetRec's ``"Weird Al" Yankovic`` keeps its quotes); ``quoted=True`` reads RFC-4180 double
quotes (MovieLens 20M/25M ``movies.csv``). Blank lines are skipped (pandas and RecBole skip them too).

A separator of several bytes (MovieLens 1M/10M ``::``) is rewritten to one reserved byte while the file streams
into Arrow (:class:`SeparatorRewriter`), so those files take the bulk path too, without a copy on disk or in
memory.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NoReturn

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from recadapt.data.readers._common import require_file
from recadapt.errors import DataFormatError

Kind = Literal["int", "float", "str"]

_ARROW_TYPES: dict[str, pa.DataType] = {"int": pa.int64(), "float": pa.float64(), "str": pa.string()}
_INT_RE = re.compile(r"-?[0-9]+")
_BLOCK_SIZE = 16 << 20
RESERVED_SEPARATOR = b"\x1f"  # ASCII unit separator: stands in for a multi-byte separator in the bulk parse


@dataclass(frozen=True)
class Field:
    """One column of a delimited file: its name and how its text converts."""

    name: str
    kind: Kind = "str"


def _describe(delimiter: str) -> str:
    return {"\t": "tab", "|": "pipe", ",": "comma"}.get(delimiter, repr(delimiter))


class SeparatorRewriter(io.RawIOBase):
    """A binary stream over ``path`` in which every ``separator`` reads as :data:`RESERVED_SEPARATOR`.

    Arrow only splits on one byte; this feeds it ``::`` files chunk by chunk. Occurrences are replaced left to
    right without overlap (``:::`` reads as separator + ``:``), exactly as ``str.split`` splits them in the
    line-by-line pass. A chunk's trailing run of the separator's first byte is held back and joined to the
    next chunk, so a separator cut by a chunk boundary is still seen whole. ``reserved_seen`` records whether
    the file itself holds the reserved byte (the parse is then not trustworthy; the caller reports its line).
    """

    def __init__(self, path: Path, separator: bytes, chunk_size: int = _BLOCK_SIZE) -> None:
        super().__init__()
        if len(separator) < 2 or len(set(separator)) != 1:
            raise ValueError(f"separator must repeat one byte at least twice, not {separator!r}")
        self._handle = open(path, "rb")  # noqa: SIM115 (closed by close())
        self._separator = separator
        self._lead = separator[:1]
        self._chunk_size = chunk_size
        self._carry = b""
        self._out = b""  # rewritten bytes not yet read, from self._pos on
        self._pos = 0
        self._eof = False
        self.reserved_seen = False

    def readable(self) -> bool:
        return True

    def _refill(self) -> None:
        chunk = self._handle.read(self._chunk_size)
        pending = self._out[self._pos :]
        self._pos = 0
        if not chunk:
            self._eof = True
            self._out = pending + self._carry.replace(self._separator, RESERVED_SEPARATOR)
            self._carry = b""
            return
        self.reserved_seen |= RESERVED_SEPARATOR in chunk
        data = self._carry + chunk
        body = data.rstrip(self._lead)
        self._carry = data[len(body) :]
        self._out = pending + body.replace(self._separator, RESERVED_SEPARATOR)

    def read(self, size: int = -1) -> bytes:
        while not self._eof and (size < 0 or len(self._out) - self._pos < size):
            self._refill()
        end = len(self._out) if size < 0 else self._pos + size
        piece = self._out[self._pos : end]
        self._pos += len(piece)
        return piece

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        piece = self.read(len(buffer))
        buffer[: len(piece)] = piece
        return len(piece)

    def close(self) -> None:
        self._handle.close()
        super().close()


def iter_lines(path: Path, skip: int = 0) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, bytes without the line ending) for every line after the first ``skip``."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if number > skip:
                yield number, raw.rstrip(b"\n").rstrip(b"\r")


def line_of_row(path: Path, row: int, header_lines: int) -> int | None:
    """The line number of the 0-based data ``row`` (blank lines are not rows)."""
    seen = -1
    for number, raw in iter_lines(path, header_lines):
        if raw:
            seen += 1
            if seen == row:
                return number
    return None


def raise_at_row(path: Path, row: int, header_lines: int, field: str | None, message: str) -> NoReturn:
    """Raise :class:`DataFormatError` for a data row found bad after a successful bulk parse."""
    raise DataFormatError(path, line_of_row(path, row, header_lines), field, message)


def decode_line(
    path: Path, number: int, raw: bytes, encoding: str, delimiter: str, names: Sequence[str]
) -> str:
    """Decode one line strictly, naming the field that holds an undecodable byte."""
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as exc:
        index = raw[: exc.start].count(delimiter.encode(encoding))
        field = names[index] if index < len(names) else None
        bad = raw[exc.start : exc.start + 1].hex()
        raise DataFormatError(
            path, number, field, f"byte 0x{bad} at column {exc.start + 1} is not valid {encoding}"
        ) from None


def check_value(path: Path, number: int, field: Field, text: str) -> None:
    """Apply the conversion rule of ``field`` to ``text``: the slow twin of the Arrow conversion.

    Mirrors Arrow: surrounding spaces are allowed, other whitespace, digit separators and non-ASCII digits are
    not (Python's own ``int``/``float`` would accept them).
    """
    if field.kind == "str":
        return
    value = text.strip(" ")
    if not value:
        raise DataFormatError(path, number, field.name, "empty value")
    if field.kind == "int":
        if not _INT_RE.fullmatch(value) or not -(2**63) <= int(value) < 2**63:
            raise DataFormatError(path, number, field.name, f"{text!r} is not an integer")
        return
    try:
        if not value.isascii() or "_" in value or value != value.strip():
            raise ValueError(value)
        number_value = float(value)
    except ValueError:
        raise DataFormatError(path, number, field.name, f"{text!r} is not a number") from None
    if not math.isfinite(number_value):
        raise DataFormatError(path, number, field.name, f"{text!r} is not a finite number")


def split_checked(
    path: Path, number: int, text: str, fields: Sequence[Field], delimiter: str, quoted: bool = False
) -> list[str]:
    """Split one decoded line and check its field count (a short line is reported as truncated).

    ``quoted``: RFC-4180 double quotes, strictly (:func:`split_quoted`; a quoting mistake is an error at the
    field where it happens).
    """
    if quoted:
        try:
            parts = split_quoted(text, delimiter)
        except QuotingError as exc:
            field = fields[min(exc.index, len(fields) - 1)].name
            raise DataFormatError(path, number, field, f"bad quoting: {exc}") from None
    else:
        parts = text.split(delimiter)
    if len(parts) != len(fields):
        expected = f"expected {len(fields)} {_describe(delimiter)}-separated fields, found {len(parts)}"
        if len(parts) < len(fields):
            raise DataFormatError(path, number, fields[len(parts)].name, f"truncated line: {expected}")
        raise DataFormatError(path, number, fields[-1].name, f"too many fields: {expected}")
    return parts


class QuotingError(ValueError):
    """A quoting mistake in one line; ``index`` is the 0-based field it happens in."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index


def split_quoted(text: str, delimiter: str) -> list[str]:
    """Split one line with RFC-4180 double quotes (``""`` inside quotes is one quote), strictly.

    An unterminated quote, text after a closing quote and a quote inside an unquoted value are errors.
    """
    fields: list[str] = []
    i, n = 0, len(text)
    while True:
        if i < n and text[i] == '"':
            pieces, i = [], i + 1
            while True:
                close = text.find('"', i)
                if close < 0:
                    raise QuotingError(len(fields), "unterminated quoted value")
                pieces.append(text[i:close])
                if text.startswith('"', close + 1):
                    pieces.append('"')
                    i = close + 2
                    continue
                i = close + 1
                break
            fields.append("".join(pieces))
            if i < n and text[i] != delimiter:
                raise QuotingError(len(fields) - 1, "text after the closing quote")
        else:
            found = text.find(delimiter, i)
            end = n if found < 0 else found
            if '"' in text[i:end]:
                raise QuotingError(len(fields), "quote inside an unquoted value")
            fields.append(text[i:end])
            i = end
        if i >= n:
            return fields
        i += len(delimiter)


def locate_error(
    path: Path,
    fields: Sequence[Field],
    delimiter: str,
    encoding: str,
    header_lines: int,
    quoted: bool = False,
) -> DataFormatError | None:
    """Walk the file line by line and return the first error the bulk parser could have met."""
    names = [f.name for f in fields]
    for number, raw in iter_lines(path, header_lines):
        if not raw:
            continue
        try:
            if b"\r" in raw:
                index = raw[: raw.index(b"\r")].count(delimiter.encode(encoding))
                field = names[index] if index < len(names) else None
                raise DataFormatError(path, number, field, "carriage return inside a line")
            text = decode_line(path, number, raw, encoding, delimiter, names)
            parts = split_checked(path, number, text, fields, delimiter, quoted)
            for field, part in zip(fields, parts, strict=True):
                check_value(path, number, field, part)
        except DataFormatError as exc:
            return exc
    return None


def read_table(
    path: Path,
    fields: Sequence[Field],
    *,
    delimiter: str,
    encoding: str = "utf-8",
    header_lines: int = 0,
    quoted: bool = False,
) -> pa.Table:
    """Parse a delimited file into an Arrow table with one typed column per field.

    ``delimiter`` may be one character, or one byte repeated (``::``: streamed through
    :class:`SeparatorRewriter`). ``quoted`` reads RFC-4180 double quotes, and then also walks the file line by
    line (strict quoting; meant for catalogue files, not for millions of lines). Raises :class:`DataFormatError`
    naming the line and field for an undecodable byte, a wrong field count, a value that does not convert, a
    non-finite float, bad quoting, or the reserved byte in a ``::`` file.
    """
    require_file(path)
    if quoted and len(delimiter) != 1:
        raise ValueError("quoted files need a one-character delimiter")
    read_options = pacsv.ReadOptions(
        column_names=[f.name for f in fields],
        skip_rows=header_lines,
        encoding=encoding,
        block_size=_BLOCK_SIZE,
    )
    parse_options = pacsv.ParseOptions(
        delimiter=delimiter if len(delimiter) == 1 else RESERVED_SEPARATOR.decode(),
        quote_char='"' if quoted else False,
        double_quote=quoted,
        escape_char=False,
        newlines_in_values=False,
        ignore_empty_lines=True,
    )
    convert_options = pacsv.ConvertOptions(
        column_types={f.name: _ARROW_TYPES[f.kind] for f in fields},
        null_values=[],
        strings_can_be_null=False,
        quoted_strings_can_be_null=False,
        check_utf8=True,
    )
    source: Path | SeparatorRewriter = path
    if len(delimiter) > 1:
        source = SeparatorRewriter(path, delimiter.encode(encoding))
    try:
        table = pacsv.read_csv(
            source, read_options=read_options, parse_options=parse_options, convert_options=convert_options
        )
    except pa.ArrowInvalid as exc:
        _refuse_reserved_byte(path, source)
        located = locate_error(path, fields, delimiter, encoding, header_lines, quoted)
        if located is not None:
            raise located from None
        raise DataFormatError(path, None, None, f"cannot parse: {exc}") from None
    finally:
        if isinstance(source, SeparatorRewriter):
            source.close()
    _refuse_reserved_byte(path, source)
    if quoted:
        # Arrow is lenient with quotes (text after a closing quote is appended; an unterminated quote swallows
        # the next lines), so quoted files, small catalogues here, are also checked line by line, strictly.
        located = locate_error(path, fields, delimiter, encoding, header_lines, quoted=True)
        if located is not None:
            raise located
    for field in fields:
        if field.kind == "float":
            values = table.column(field.name).to_numpy()
            bad = np.flatnonzero(~np.isfinite(values))
            if bad.size:
                raise_at_row(path, int(bad[0]), header_lines, field.name, "value is not a finite number")
    return table


def _refuse_reserved_byte(path: Path, source: Path | SeparatorRewriter) -> None:
    """A ``::`` file holding the reserved byte itself was split wrongly: report its first line."""
    if not isinstance(source, SeparatorRewriter) or not source.reserved_seen:
        return
    for number, raw in iter_lines(path):
        if RESERVED_SEPARATOR in raw:
            column = raw.index(RESERVED_SEPARATOR) + 1
            raise DataFormatError(
                path, number, None, f"control byte 0x1f at column {column}: not allowed in a '::' file"
            )


def read_header(path: Path, encoding: str = "utf-8") -> str:
    """The first line of a file, decoded strictly (line 1 in errors).

    A carriage return inside it is refused: Arrow would end the header there and read the rest as data.
    """
    require_file(path)
    with open(path, "rb") as handle:
        raw = handle.readline().rstrip(b"\n").rstrip(b"\r")
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as exc:
        raise DataFormatError(path, 1, None, f"header is not valid {encoding}: {exc.reason}") from None
    if "\r" in text:
        raise DataFormatError(path, 1, None, "carriage return inside the header")
    return text


def read_id2name(path: Path) -> list[str]:
    """LLaRA's ``id::name`` file (UTF-8): names indexed by id; ids must run 0..N-1 in order.

    Names may themselves contain ``::`` (Steam: ``Depths of Fear :: Knossos``), so only the first one splits.
    """
    names: list[str] = []
    fields = ("id", "name")
    for number, raw in iter_lines(require_file(path)):
        if not raw:
            continue
        text = decode_line(path, number, raw, "utf-8", "::", fields)
        ident, sep, name = text.partition("::")
        if not sep:
            raise DataFormatError(path, number, "name", "truncated line: expected 'id::name'")
        if not _INT_RE.fullmatch(ident):
            raise DataFormatError(path, number, "id", f"{ident!r} is not an integer")
        if int(ident) != len(names):
            raise DataFormatError(
                path, number, "id", f"expected id {len(names)} (ids must run 0..N-1 in order)"
            )
        names.append(name)
    if not names:
        raise DataFormatError(path, None, None, "no names")
    return names
