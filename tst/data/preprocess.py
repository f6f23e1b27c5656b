"""Text -> Megatron ``.bin/.idx``: the engine behind ``tools/preprocess_data.py``.

The main process reads raw records (:mod:`tst.data.corpus`) and cuts them into chunks of a
fixed number of records; workers decode, parse and tokenize a chunk at a time and send back
one flat token array per JSON key; the main process writes them, in input order, through
:class:`~tst.data.indexed.AtomicIndexedWriter`. Chunks never depend on the worker count and
results are consumed in order, so any ``--workers`` gives byte-identical files.

Output prefixes follow Megatron-LM: ``{output_prefix}_{key}_document`` per JSON key (plain
text uses the key ``text``). Token dtype follows the vocabulary: uint16 below 65,500 ids,
int32 above, as megatron-core's ``DType.optimal_dtype``.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from tst.data.corpus import (
    BadRecord,
    CorpusError,
    InputFile,
    Record,
    decode_record,
    expand_inputs,
    read_records,
)
from tst.data.indexed import AtomicIndexedWriter, token_dtype_for
from tst.data.tokenizers import TokenizerSpec, lone_surrogate
from tst.errors import InputError

__all__ = ["PreprocessConfig", "PreprocessError", "PreprocessSummary", "preprocess"]

_MAX_REPORTED_BAD = 10  # bad-UTF-8 locations printed in full; the rest are counted


class PreprocessError(InputError):
    """The run stopped on bad input; nothing was left at the output prefix."""


@dataclass(frozen=True)
class PreprocessConfig:
    """One preprocessing run; the fields mirror the command-line flags."""

    inputs: tuple[str, ...]  # --input: files, globs or folders
    output_prefix: str  # --output-prefix
    tokenizer: TokenizerSpec
    json_keys: tuple[str, ...] = ("text",)  # --json-keys
    append_eod: bool = False  # --append-eod
    workers: int = 1  # --workers (1 = tokenize in this process)
    input_format: str = "auto"  # --input-format
    text_mode: str = "line"  # --text-mode
    on_bad_utf8: str = "skip"  # --on-bad-utf8
    chunk_records: int = 64  # records per worker task, at most
    chunk_bytes: int = 1 << 18  # bytes per worker task, at most (long documents: more tasks)
    log_interval_s: float = 2.0  # seconds between progress lines

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if self.on_bad_utf8 not in ("skip", "fail"):
            raise ValueError(f"--on-bad-utf8 must be skip or fail, got {self.on_bad_utf8!r}")
        if not self.json_keys:
            raise ValueError("--json-keys needs at least one key")
        if self.chunk_records < 1 or self.chunk_bytes < 1:
            raise ValueError("--chunk-records and chunk_bytes must be >= 1")


@dataclass
class PreprocessSummary:
    """Totals of a run, printed at the end and returned to callers (tests, benchmarks)."""

    documents: int = 0  # documents written, over all keys
    empty_documents: int = 0  # skipped: no non-whitespace text
    bad_utf8_records: int = 0  # skipped (or the first, when fatal)
    bad_utf8_locations: list[str] = field(default_factory=list)  # "file:line: why", first few
    tokens: int = 0
    input_bytes: int = 0  # uncompressed bytes of the records read
    seconds: float = 0.0
    outputs: dict[str, str] = field(default_factory=dict)  # json key -> output prefix

    def rates(self) -> tuple[float, float, float]:
        """(documents/s, MB/s, tokens/s) over the whole run."""
        t = max(self.seconds, 1e-9)
        return self.documents / t, self.input_bytes / 1e6 / t, self.tokens / t


@dataclass
class _Chunk:
    """Worker output for one chunk of records."""

    tokens: list[np.ndarray]  # per key: the chunk's documents back to back
    lengths: list[np.ndarray]  # per key: document lengths
    empty: int = 0
    bad: list[tuple[int, int, str]] = field(default_factory=list)  # (source, line, why)
    nbytes: int = 0
    error: tuple[int, int, str] | None = None  # fatal (source, line, why)
    disk_end: int = 0  # input bytes on disk read up to this chunk's last record (progress)


class _Encoder:
    """Decodes and tokenizes chunks; one per worker process."""

    def __init__(
        self, spec: TokenizerSpec, formats: list[str], keys: tuple[str, ...], eod: bool
    ) -> None:
        self.tokenizer = spec.build()
        self.dtype = token_dtype_for(self.tokenizer.vocab_size)
        self.formats = formats
        self.keys = keys
        self.append_eod = eod

    def encode(self, task: tuple[list[Record], int]) -> _Chunk:
        records, disk_end = task
        chunk = _Chunk([], [], disk_end=disk_end)
        texts: list[list[str]] = [[] for _ in self.keys]
        for rec in records:
            chunk.nbytes += len(rec.data)
            fmt = self.formats[rec.source]
            try:
                docs = decode_record(rec.data, fmt, self.keys if fmt == "jsonl" else ("text",))
            except BadRecord as err:
                chunk.bad.append((rec.source, rec.line, str(err)))
                continue
            except CorpusError as err:
                chunk.error = (rec.source, rec.line, str(err))
                return chunk
            if _may_hold_surrogates(rec.data, fmt) and any(
                lone_surrogate(d) is not None for d in docs
            ):
                # JSON "\ud800"-style escapes decode to lone surrogates, which no UTF-8 byte
                # sequence encodes: the record is as unusable as one with invalid UTF-8.
                chunk.bad.append((rec.source, rec.line, _surrogate_why(docs)))
                continue
            for k, doc in enumerate(docs):
                if doc.strip():
                    texts[k].append(doc)
                else:
                    chunk.empty += 1
        for docs in texts:
            ids, lengths = self._tokenize(docs)
            chunk.tokens.append(ids)
            chunk.lengths.append(lengths)
        return chunk

    def _tokenize(self, docs: list[str]) -> tuple[np.ndarray, np.ndarray]:
        tok = self.tokenizer
        if hasattr(tok, "tokenize_array"):
            arrays = [tok.tokenize_array(d) for d in docs]
        elif hasattr(tok, "tokenize_batch"):
            arrays = [np.asarray(ids, dtype=self.dtype) for ids in tok.tokenize_batch(docs)]
        else:
            arrays = [np.asarray(tok.tokenize(d), dtype=self.dtype) for d in docs]
        if self.append_eod:
            eod = np.asarray([tok.eod], dtype=self.dtype)
            arrays = [np.concatenate([a.astype(self.dtype, copy=False), eod]) for a in arrays]
        lengths = np.fromiter((a.size for a in arrays), dtype=np.int64, count=len(arrays))
        flat = np.concatenate(arrays).astype(self.dtype) if arrays else np.empty(0, self.dtype)
        return flat, lengths


# Per-worker-process encoder, set once by the pool initializer: worker processes have no
# other way to keep a tokenizer between tasks. Never set in the main process.
_WORKER_ENCODER: _Encoder | None = None


def _init_worker(spec, formats, keys, eod) -> None:
    global _WORKER_ENCODER
    # Each worker is one process already; letting the Rust tokenizer also spread over every
    # core would oversubscribe the machine.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER_ENCODER = _Encoder(spec, formats, keys, eod)


def _encode_in_worker(task: tuple[list[Record], int]) -> _Chunk:
    assert _WORKER_ENCODER is not None
    return _WORKER_ENCODER.encode(task)


def _may_hold_surrogates(data: bytes, fmt: str) -> bool:
    """Only a JSON ``\\uD8xx``-``\\uDFxx`` escape makes a lone surrogate (strict UTF-8
    decoding never does): a byte search rules most records out before any scan of the text."""
    return fmt == "jsonl" and (b"\\ud" in data or b"\\uD" in data)


def _surrogate_why(docs: list[str]) -> str:
    for doc in docs:
        at = lone_surrogate(doc)
        if at is not None:
            return (
                f"a lone surrogate U+{ord(doc[at]):04X} (a JSON \\u escape of half a pair) at "
                f"character {at} has no UTF-8 encoding"
            )
    raise AssertionError("no lone surrogate")


def _chunks(
    records: Iterator[Record], size: int, max_bytes: int, disk: list[int]
) -> Iterator[tuple[list[Record], int]]:
    """Chunks of records, each with the input bytes read (``disk[0]``) when it was cut.

    Cut by record count and by bytes: a few long documents must still make enough tasks to
    keep every worker busy. The cut depends on the input only, never on the worker count.
    The position travels with the chunk because the pool reads ahead of what is written:
    progress must count what was written, not what was read.
    """
    chunk: list[Record] = []
    nbytes = 0
    for rec in records:
        chunk.append(rec)
        nbytes += len(rec.data)
        if len(chunk) == size or nbytes >= max_bytes:
            yield chunk, disk[0]
            chunk, nbytes = [], 0
    if chunk:
        yield chunk, disk[0]


class _Progress:
    """Progress lines on stderr: percent of input bytes, docs/s, MB/s, tokens/s."""

    def __init__(self, total_bytes: int, interval_s: float, out) -> None:
        self.total = max(total_bytes, 1)
        self.interval = interval_s
        self.out = out
        self.start = time.perf_counter()
        self.last = self.start
        self.tty = hasattr(out, "isatty") and out.isatty()

    def update(self, summary: PreprocessSummary, disk_bytes: int, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self.last < self.interval:
            return
        self.last = now
        t = max(now - self.start, 1e-9)
        line = (
            f"[{100.0 * min(disk_bytes / self.total, 1.0):5.1f}%] {summary.documents:,} docs | "
            f"{summary.documents / t:,.0f} docs/s | {summary.input_bytes / 1e6 / t:,.2f} MB/s | "
            f"{summary.tokens / t:,.0f} tokens/s"
        )
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=self.out)
        self.out.flush()

    def close(self) -> None:
        if self.tty:
            print(file=self.out)


def preprocess(
    cfg: PreprocessConfig, log: Callable[[str], None] | None = None
) -> PreprocessSummary:
    """Run the whole conversion; returns the totals. Raises :class:`PreprocessError` (with
    ``file:line``) on fatal bad input, leaving no output files."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    files = expand_inputs(list(cfg.inputs), cfg.input_format)
    formats = [f.format for f in files]
    tokenizer = cfg.tokenizer.build()  # fail fast on a bad tokenizer file, before any worker
    dtype = token_dtype_for(tokenizer.vocab_size)
    keys = cfg.json_keys if "jsonl" in formats else ("text",)
    summary = PreprocessSummary()
    summary.outputs = {k: f"{cfg.output_prefix}_{k}_document" for k in keys}
    log(
        f"preprocess: {len(files)} file(s), {sum(f.size for f in files) / 1e6:,.1f} MB on disk, "
        f"tokenizer {cfg.tokenizer.tokenizer_type} (vocab {tokenizer.vocab_size}, eod "
        f"{tokenizer.eod}), tokens as {dtype.__name__}, {cfg.workers} worker(s)"
    )

    writers = [AtomicIndexedWriter(summary.outputs[k], dtype) for k in keys]
    disk = [0]
    total = sum(f.size for f in files)
    progress = _Progress(total, cfg.log_interval_s, sys.stderr)
    records = read_records(files, cfg.text_mode, disk)
    chunks = _chunks(records, cfg.chunk_records, cfg.chunk_bytes, disk)
    pool = None
    try:
        if cfg.workers == 1:
            encoder = _Encoder(cfg.tokenizer, formats, keys, cfg.append_eod)
            results: Iterator[_Chunk] = map(encoder.encode, chunks)
        else:
            # Workers start from a fresh server process, never forked from this one: a fork
            # of a process with threads (a tokenizer's thread pool, a process group's
            # threads) can copy a held lock and hang forever.
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload([__name__])
            pool = context.Pool(
                cfg.workers, _init_worker, (cfg.tokenizer, formats, keys, cfg.append_eod)
            )
            results = pool.imap(_encode_in_worker, chunks)
        for chunk in results:
            _consume(chunk, writers, files, cfg, summary)
            progress.update(summary, chunk.disk_end)
        summary.seconds = time.perf_counter() - progress.start
        progress.update(summary, total, force=True)
        progress.close()
        _refuse_empty(writers, keys, files, summary)
        for writer in writers:
            writer.commit()
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    summary.seconds = time.perf_counter() - progress.start
    _report(summary, log)
    return summary


def _refuse_empty(
    writers: list[AtomicIndexedWriter],
    keys: tuple[str, ...],
    files: list[InputFile],
    summary: PreprocessSummary,
) -> None:
    """A dataset of 0 documents cannot be trained on (megatron-core cannot even map its
    empty ``.bin``): stop here, naming the input, instead of writing one."""
    for key, writer in zip(keys, writers, strict=True):
        if writer.num_documents:
            continue
        names = ", ".join(f.path for f in files[:3]) + (" ..." if len(files) > 3 else "")
        if summary.input_bytes == 0 and not summary.bad_utf8_records:
            why = "it holds no text"
        else:
            skipped = summary.empty_documents + summary.bad_utf8_records
            why = f"every one of its documents was empty or unreadable ({skipped:,} skipped)"
        what = f" under json key {key!r}" if len(keys) > 1 else ""
        raise PreprocessError(
            f"--input {names}: no documents to write{what}: {why}; nothing was written"
        )


def _consume(
    chunk: _Chunk,
    writers: list[AtomicIndexedWriter],
    files: list[InputFile],
    cfg: PreprocessConfig,
    summary: PreprocessSummary,
) -> None:
    if chunk.error is not None:
        source, line, why = chunk.error
        raise PreprocessError(f"{files[source].path}:{line}: {why}; no output was written")
    for source, line, why in chunk.bad:
        summary.bad_utf8_records += 1
        where = f"{files[source].path}:{line}: {why}"
        if cfg.on_bad_utf8 == "fail":
            raise PreprocessError(
                f"{where}; fix the file or pass --on-bad-utf8 skip; no output was written"
            )
        if len(summary.bad_utf8_locations) < _MAX_REPORTED_BAD:
            summary.bad_utf8_locations.append(where)
    summary.empty_documents += chunk.empty
    summary.input_bytes += chunk.nbytes
    for writer, tokens, lengths in zip(writers, chunk.tokens, chunk.lengths, strict=True):
        start = 0
        for n in lengths.tolist():
            writer.add_document(tokens[start : start + n])
            start += n
        summary.documents += lengths.size
        summary.tokens += int(tokens.size)


def _report(summary: PreprocessSummary, log: Callable[[str], None]) -> None:
    docs_s, mb_s, tok_s = summary.rates()
    log(
        f"done in {summary.seconds:.2f} s: {summary.documents:,} documents, {summary.tokens:,} "
        f"tokens, {summary.input_bytes / 1e6:,.2f} MB of text ({docs_s:,.0f} docs/s, "
        f"{mb_s:,.2f} MB/s, {tok_s:,.0f} tokens/s)"
    )
    if summary.empty_documents:
        log(f"skipped {summary.empty_documents:,} empty document(s)")
    if summary.bad_utf8_records:
        log(f"skipped {summary.bad_utf8_records:,} record(s) with invalid UTF-8:")
        for where in summary.bad_utf8_locations:
            log(f"  {where}")
        hidden = summary.bad_utf8_records - len(summary.bad_utf8_locations)
        if hidden > 0:
            log(f"  ... and {hidden:,} more")
    for key, prefix in summary.outputs.items():
        log(f"wrote {prefix}.bin / {prefix}.idx  (json key {key!r})")
