"""Reading raw corpora for the preprocessor: files, globs, gzip, JSONL and plain text.

The main process only splits input files into raw records (bytes, with the file and line
where each starts); decoding UTF-8, parsing JSON and tokenizing happen in the workers
(:func:`decode_record`), so that the single reader is never the bottleneck.

Record kinds:

``jsonl``
    one JSON object per line; each ``--json-keys`` field is a document (a blank line is an
    empty record, skipped and counted).
``text`` with ``line`` mode
    one document per line (its newline dropped).
``text`` with ``block`` mode
    one document per block of lines separated by blank lines (inner newlines kept).

Files ending in ``.gz`` are decompressed on the fly; the format is guessed from the name
without ``.gz`` (``.jsonl``, ``.json``, ``.ndjson`` are JSONL, anything else text) unless
forced.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from tst.errors import InputError

__all__ = [
    "INPUT_FORMATS",
    "TEXT_MODES",
    "BadRecord",
    "CorpusError",
    "InputFile",
    "Record",
    "decode_record",
    "expand_inputs",
    "read_records",
]

INPUT_FORMATS = ("auto", "jsonl", "text")
TEXT_MODES = ("line", "block")
_JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


class CorpusError(InputError):
    """An input file cannot be read as asked (missing, malformed JSON, missing key)."""


class BadRecord(InputError):
    """One record is not valid UTF-8; carries where, for the report."""


@dataclass(frozen=True)
class InputFile:
    """One input file and how to read it."""

    path: str
    format: str  # "jsonl" or "text"
    size: int  # bytes on disk (compressed size for .gz), for progress


@dataclass(frozen=True)
class Record:
    """Raw bytes of one record and where it starts (1-based line) in ``files[source]``."""

    source: int
    line: int
    data: bytes


def expand_inputs(patterns: list[str], input_format: str = "auto") -> list[InputFile]:
    """Files named by ``patterns`` (paths, globs or folders), in order, each once."""
    if input_format not in INPUT_FORMATS:
        raise CorpusError(f"--input-format must be one of {INPUT_FORMATS}, got {input_format!r}")
    paths: list[str] = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = sorted(
                os.path.join(pattern, name)
                for name in os.listdir(pattern)
                if os.path.isfile(os.path.join(pattern, name))
            )
        elif os.path.isfile(pattern):
            found = [pattern]
        else:
            found = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not found:
            raise CorpusError(f"--input {pattern}: no such file, and no file matches it as a glob")
        paths.extend(p for p in found if p not in paths)
    return [InputFile(p, _format_of(p, input_format), os.path.getsize(p)) for p in paths]


def _format_of(path: str, forced: str) -> str:
    if forced != "auto":
        return forced
    name = path[:-3] if path.endswith(".gz") else path
    return "jsonl" if name.endswith(_JSONL_SUFFIXES) else "text"


class _Opened:
    """A binary line reader over a file, through gzip if needed; ``position`` is the byte
    offset in the file on disk, for a progress figure that also works for .gz."""

    def __init__(self, path: str) -> None:
        self._raw: BinaryIO = open(path, "rb")  # noqa: SIM115 (closed by close())
        self._stream: BinaryIO = self._raw
        self.compressed = path.endswith(".gz")
        if self.compressed:
            self._stream = gzip.GzipFile(fileobj=self._raw, mode="rb")
        self._reader = io.BufferedReader(self._stream, buffer_size=1 << 20)  # type: ignore[arg-type]

    @property
    def position(self) -> int:
        return self._raw.tell()

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._reader)

    def close(self) -> None:
        self._reader.close()
        self._raw.close()


def read_records(
    files: list[InputFile], text_mode: str = "line", progress: list[int] | None = None
) -> Iterator[Record]:
    """All records of ``files`` in order. ``progress`` (a one-element list), if given, is
    updated with the bytes read on disk so far, over all files."""
    if text_mode not in TEXT_MODES:
        raise CorpusError(f"--text-mode must be one of {TEXT_MODES}, got {text_mode!r}")
    done = 0
    for source, file in enumerate(files):
        opened = _Opened(file.path)
        try:
            lines = _lines(opened, progress, done)
            if file.format == "text" and text_mode == "block":
                yield from _blocks(source, lines)
            else:
                for line_no, line in lines:
                    yield Record(source, line_no, line)
        except (OSError, EOFError, gzip.BadGzipFile) as err:
            raise CorpusError(f"{file.path}: cannot read ({err})") from err
        finally:
            opened.close()
        done += file.size
        if progress is not None:
            progress[0] = done


def _lines(opened: _Opened, progress: list[int] | None, done: int) -> Iterator[tuple[int, bytes]]:
    # Progress moves with every line: a corpus of a few hundred long documents (one a line)
    # must not sit at 0% until its file ends. A plain file counts the bytes of the lines read
    # (exact); a .gz file can only tell how far its compressed stream was read, which runs
    # ahead of the lines by the reader's buffer.
    consumed = 0
    for line_no, line in enumerate(opened, start=1):
        if progress is not None:
            consumed += len(line)
            progress[0] = done + (opened.position if opened.compressed else consumed)
        yield line_no, _strip_newline(line)


def _strip_newline(line: bytes) -> bytes:
    if line.endswith(b"\n"):
        line = line[:-1]
        if line.endswith(b"\r"):
            line = line[:-1]
    return line


def _blocks(source: int, lines: Iterator[tuple[int, bytes]]) -> Iterator[Record]:
    block: list[bytes] = []
    start = 0
    for line_no, line in lines:
        if line.strip():
            if not block:
                start = line_no
            block.append(line)
        elif block:
            yield Record(source, start, b"\n".join(block))
            block = []
    if block:
        yield Record(source, start, b"\n".join(block))


def decode_record(data: bytes, fmt: str, json_keys: tuple[str, ...]) -> list[str]:
    """The documents of one record, one per JSON key (text records have one).

    Raises :class:`BadRecord` for invalid UTF-8 and :class:`CorpusError` for a line that is
    not a JSON object or lacks a key; a blank JSONL line yields empty documents.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadRecord(f"invalid UTF-8 at byte {err.start} of the record") from None
    if fmt == "text":
        return [text]
    if not text.strip():
        return ["" for _ in json_keys]
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise CorpusError(f"not a JSON line ({err.msg} at column {err.colno})") from None
    if not isinstance(obj, dict):
        raise CorpusError(f"a JSON line must be an object, got {type(obj).__name__}")
    docs = []
    for key in json_keys:
        if key not in obj:
            raise CorpusError(
                f"no key {key!r} (keys: {sorted(obj)[:8]}); choose them with --json-keys"
            )
        value = obj[key]
        if not isinstance(value, str):
            raise CorpusError(f"key {key!r} holds a {type(value).__name__}, not a string")
        docs.append(value)
    return docs
