"""Write a loaded checkpoint as a ``transformers`` folder: weights, config, tokenizer."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass

import torch

from tst.config import Config
from tst.data.tokenizers import TokenizerSpec
from tst.export.common import DTYPES, EXPORT_INFO, ExportError
from tst.export.loading import LoadedCheckpoint, load_checkpoint, single_process_world
from tst.export.mapping import hf_architecture, hf_config, hf_tensors, materialise
from tst.export.tokenizer_files import write_tokenizer_files


def write_safetensors(
    tensors: dict[str, torch.Tensor],
    output: str,
    max_shard_bytes: int,
    dtype: torch.dtype | None = None,
) -> list[str]:
    """``model.safetensors``, or numbered shards plus ``model.safetensors.index.json``.

    ``tensors`` may be views of a model's parameters on any device: each shard is copied to
    CPU (in ``dtype``, default each tensor's own) just before it is written and dropped
    after, so the writer holds at most one shard beside the model. Returns the file names.
    """
    from safetensors.torch import save_file

    def nbytes(t: torch.Tensor) -> int:
        return t.numel() * torch.empty((), dtype=dtype or t.dtype).element_size()

    shards: list[list[str]] = [[]]  # planned from the shapes alone
    size = total = 0
    for name, tensor in tensors.items():
        if shards[-1] and size + nbytes(tensor) > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes(tensor)
        total += nbytes(tensor)
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file, keys in zip(names, shards, strict=True):
        shard = {k: materialise(tensors[k], dtype or tensors[k].dtype) for k in keys}
        save_file(shard, os.path.join(output, file), metadata={"format": "pt"})
        del shard
        weight_map.update(dict.fromkeys(keys, file))
    if len(shards) == 1:
        return names
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    with open(os.path.join(output, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
    return [*names, "model.safetensors.index.json"]


def tokenizer_spec(
    cfg: Config,
    tokenizer_model: str | None = None,
    vocab_file: str | None = None,
    merge_file: str | None = None,
) -> TokenizerSpec:
    """The run's tokenizer, with files given here replacing the paths saved at training."""
    d = cfg.data
    return TokenizerSpec(
        d.tokenizer_type,
        tokenizer_model or d.tokenizer_model,
        vocab_file or d.vocab_file,
        merge_file or d.merge_file,
        d.vocab_size,
        d.tiktoken_pattern,
        d.tiktoken_num_special_tokens,
        d.tokenizer_special_tokens,
    )


# ---------------------------------------------------------------- export


@dataclass(frozen=True)
class ExportResult:
    output: str
    architecture: str
    vocab_size: int  # rows written
    padded_vocab_size: int  # rows in the checkpoint
    files: tuple[str, ...]
    left_out: tuple[str, ...] = ()  # trained weights the target class has no place for


def export_loaded(
    ckpt: LoadedCheckpoint,
    output: str,
    tokenizer: TokenizerSpec | None = None,
    keep_padded_vocab: bool = False,
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> ExportResult:
    """Write ``ckpt`` to ``output`` as a ``transformers`` checkpoint (see the module doc).

    ``tokenizer`` defaults to the run's own (:func:`tokenizer_spec`); ``dtype`` (float32,
    bfloat16, float16) to the checkpoint's parameter dtype.
    """
    architecture = hf_architecture(ckpt.cfg, ckpt.transformer_config)
    spec = tokenizer or tokenizer_spec(ckpt.cfg)
    try:
        tok = spec.build()
    except (OSError, ValueError) as error:
        raise ExportError(
            f"the run's tokenizer could not be built ({error}): pass --tokenizer-model "
            "(and --vocab-file / --merge-file for GPT2BPETokenizer) with the files it was "
            "trained with"
        ) from error
    vocab = spec.vocab_size or tok.vocab_size  # what the trainer used (pretrain_tst.py's rule)
    if vocab > ckpt.padded_vocab_size:
        raise ExportError(
            f"the tokenizer has {vocab} ids but the checkpoint only {ckpt.padded_vocab_size} "
            "embedding rows: wrong --tokenizer-model for this checkpoint"
        )
    rows = ckpt.padded_vocab_size if keep_padded_vocab else vocab
    left_out = _left_out(ckpt, architecture)
    if dtype is None:
        torch_dtype = ckpt.model.embedding.word_embeddings.weight.dtype
    elif dtype in DTYPES:
        torch_dtype = DTYPES[dtype]
    else:
        raise ExportError(f"--dtype {dtype} is not one of {sorted(DTYPES)}")
    # Everything is written to a staging folder beside ``output`` and moved in at the end:
    # an export that fails half-way leaves ``output`` as it was (a killed one also leaves
    # the staging folder, which the next export to ``output`` from that pid replaces).
    final = os.path.abspath(output)
    output = f"{final}.partial-{os.getpid()}"
    shutil.rmtree(output, ignore_errors=True)
    os.makedirs(output)
    try:
        tensors = hf_tensors(ckpt, architecture, rows)
        files = write_safetensors(tensors, output, max_shard_bytes, torch_dtype)
        config = hf_config(ckpt, architecture, rows, torch_dtype, tok.eod, tok.bos)
        with open(os.path.join(output, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        max_length = ckpt.cfg.model.max_position_embeddings
        tokenizer_files, tokenizer_names = write_tokenizer_files(spec, tok, output, max_length)
        info = {
            "architecture": architecture,
            "tokenizer_type": spec.tokenizer_type,
            "tokenizer_files": tokenizer_files,
            "vocab_size": vocab,
            "rows": rows,
            "padded_vocab_size": ckpt.padded_vocab_size,
            "seq_length": ckpt.cfg.model.seq_length,
            "source": {"checkpoint": os.path.abspath(ckpt.path), "iteration": ckpt.iteration},
            "config": ckpt.cfg.to_dict(),
            "left_out": list(left_out),
        }
        with open(os.path.join(output, EXPORT_INFO), "w") as f:
            json.dump(info, f, indent=2, default=str)
        names = [*files, "config.json", *tokenizer_names, EXPORT_INFO]
    except BaseException:  # an error or Ctrl-C: no half-written folder is left behind
        shutil.rmtree(output, ignore_errors=True)
        raise
    _move_into(output, final)
    return ExportResult(final, architecture, rows, ckpt.padded_vocab_size, tuple(names),
                        left_out)  # fmt: skip


def _left_out(ckpt: LoadedCheckpoint, architecture: str) -> tuple[str, ...]:
    """What the checkpoint trained that the export does not carry, said out loud: the
    multi-token prediction block (--mtp-num-layers) has no place in the target classes,
    which generate with the main head only (as the trained model does)."""
    mtp = getattr(ckpt.model, "mtp", None)
    if mtp is None:
        return ()
    count = sum(p.numel() for p in mtp.parameters())
    depths = ckpt.cfg.mtp.mtp_num_layers
    return (f"the multi-token prediction block ({depths} depth{'s' * (depths > 1)}, "
            f"{count:,} parameters): {architecture} has no MTP head; generation uses the "
            "main head, as in training",)  # fmt: skip


def _move_into(staging: str, output: str) -> None:
    """Move a finished export from ``staging`` into ``output`` (other files there are kept).

    Weight files of an earlier export are removed first (``transformers`` would read them
    with ours); ``config.json`` and the index, which make the folder loadable, move last.
    """
    os.makedirs(output, exist_ok=True)
    for name in os.listdir(output):
        if name.startswith("model") and ".safetensors" in name:
            os.remove(os.path.join(output, name))
    last = ("model.safetensors.index.json", "config.json")
    for name in sorted(os.listdir(staging), key=lambda n: n in last):
        os.replace(os.path.join(staging, name), os.path.join(output, name))
    os.rmdir(staging)


def refuse_output_inside_checkpoint(load: str, output: str) -> None:
    """Raise :class:`ExportError` when ``output`` is ``load`` or lies inside it (or inside
    the ``--save`` folder around an ``iter_*`` ``load``): the export's files would mix with
    the checkpoint's, and moving a finished export into place removes ``model*`` files."""
    out = os.path.realpath(output)
    folders = [os.path.realpath(load)]
    if os.path.basename(folders[0]).startswith("iter_"):
        folders.append(os.path.dirname(folders[0]))
    for folder in folders:
        if out == folder or out.startswith(folder.rstrip(os.sep) + os.sep):
            raise ExportError(
                f"--output {output} is inside the checkpoint folder {folder}: the export would "
                "mix its files with the checkpoint's; give a folder outside it, e.g. "
                f"{folder.rstrip(os.sep)}_hf"
            )


def convert(
    load: str,
    output: str,
    iteration: int | None = None,
    tokenizer: TokenizerSpec | None = None,
    tokenizer_model: str | None = None,
    vocab_file: str | None = None,
    merge_file: str | None = None,
    keep_padded_vocab: bool = False,
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> ExportResult:
    """Load ``load`` (any layout) in a world of one and export it to ``output``."""
    refuse_output_inside_checkpoint(load, output)
    with single_process_world() as layout:
        ckpt = load_checkpoint(load, layout, iteration)
        spec = tokenizer or tokenizer_spec(ckpt.cfg, tokenizer_model, vocab_file, merge_file)
        return export_loaded(ckpt, output, spec, keep_padded_vocab, dtype, max_shard_bytes)
