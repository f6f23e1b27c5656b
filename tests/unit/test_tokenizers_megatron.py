"""Megatron-LM's tokenizer type names: GPTSentencePieceTokenizer, Llama2Tokenizer,
HuggingFaceTokenizer with a local path; the trainer's choices; the export of each.

Oracles: SentencePiece's own API for the SentencePiece types (Megatron-LM's
``GPTSentencePieceTokenizer`` is ``encode_as_ids`` with EOD = the model's EOS;
``Llama2Tokenizer`` puts ``bos_id()`` first and takes EOD = ``eos_id()``), and
``transformers.AutoTokenizer`` for ``HuggingFaceTokenizer`` (Megatron-LM's calls
``AutoTokenizer(text).input_ids`` and takes EOD = ``eos_token_id``). Tokenizers are trained
here with ``tools/train_tokenizer.py`` (and sentencepiece directly for a model without EOS).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm
import transformers
from data_support import ROOT, TRICKY_DOCS, load_tool, training_text, write_jsonl
from flags import SMALL_GPT

from tst.data.indexed import open_indexed_dataset
from tst.data.tokenizers import (
    TOKENIZER_TYPES,
    GPTSentencePieceTokenizer,
    HuggingFaceTokenizer,
    Llama2Tokenizer,
    SentencePieceTokenizer,
    TokenizerFileError,
    TokenizerSpec,
    build_tokenizer,
)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning:torch.distributed")
TEXT = "  Ünïcödé — “quotes”, and\nThe Congress shall have Power, 1790."


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> dict[str, str]:
    """SentencePiece models with and without BOS / EOS, and a byte-level BPE folder."""
    tmp = tmp_path_factory.mktemp("tok")
    train = load_tool("train_tokenizer")
    corpus = write_jsonl(str(tmp / "c.jsonl"), training_text())
    base = ["--input", corpus, "--vocab-size", "400", "--num-threads", "1"]
    train.main([*base, "--model-prefix", str(tmp / "sp")])
    train.main([*base, "--model-prefix", str(tmp / "nobos"), "--bos-token", ""])
    train.main([*base, "--model-prefix", str(tmp / "hf"), "--library", "huggingface",
                "--user-defined-symbols", "<|im_end|>"])  # fmt: skip
    # No EOS piece at all, an <eod> user symbol instead (SentencePieceTokenizer's fallback).
    with open(corpus, encoding="utf-8") as f:
        sentences = [json.loads(line)["text"] for line in f]
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(sentences), model_prefix=str(tmp / "noeos"), vocab_size=400,
        eos_id=-1, bos_id=1, unk_id=0, user_defined_symbols=["<eod>"], minloglevel=2,
        hard_vocab_limit=False, num_threads=1,
    )  # fmt: skip
    return {
        "sp": str(tmp / "sp.model"),
        "nobos": str(tmp / "nobos.model"),
        "noeos": str(tmp / "noeos.model"),
        "hf": str(tmp / "hf"),
        "tmp": str(tmp),
    }


def test_trainer_choices_are_the_tokenizer_types_and_config_stays_light():
    from tst.config import DataArgs, build_parser

    field = DataArgs.__dataclass_fields__["tokenizer_type"]
    assert tuple(field.metadata["choices"]) == TOKENIZER_TYPES
    for name in ("Llama2Tokenizer", "GPTSentencePieceTokenizer", "ByteTokenizer"):
        assert name in TOKENIZER_TYPES
        assert build_parser().parse_args(["--tokenizer-type", name]) is not None
    # tst.config imports TOKENIZER_TYPES: neither may pull torch or numpy in.
    code = "import sys, tst.config; print(sorted({'torch', 'numpy'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_gpt_sentencepiece_is_megatrons(tok):
    sp = spm.SentencePieceProcessor(model_file=tok["sp"])
    ours = build_tokenizer("GPTSentencePieceTokenizer", tok["sp"])
    assert isinstance(ours, GPTSentencePieceTokenizer)
    assert ours.vocab_size == sp.get_piece_size() == 400
    assert (ours.eod, ours.bos) == (sp.eos_id(), None)
    for text in [TEXT, *TRICKY_DOCS]:
        assert ours.tokenize(text) == sp.encode_as_ids(text)  # no BOS, no EOS
        assert ours.detokenize(ours.tokenize(text)) == sp.decode_ids(sp.encode_as_ids(text))


def test_llama2_puts_bos_first_and_ends_documents_with_eos(tok, tmp_path):
    sp = spm.SentencePieceProcessor(model_file=tok["sp"])
    ours = build_tokenizer("Llama2Tokenizer", tok["sp"])
    assert isinstance(ours, Llama2Tokenizer)
    assert (ours.vocab_size, ours.bos, ours.eod) == (sp.vocab_size(), sp.bos_id(), sp.eos_id())
    assert ours.bos >= 0 and ours.eod >= 0 and ours.bos != ours.eod
    for text in [TEXT, *TRICKY_DOCS]:
        assert ours.tokenize(text) == [sp.bos_id(), *sp.encode(text)]
        assert ours.detokenize(ours.tokenize(text)) == text  # BOS is a control piece
    # The preprocessor as Megatron-LM's: [BOS] document [EOS] with --append-eod.
    preprocess_data = load_tool("preprocess_data")
    docs = training_text()[:6]
    corpus = write_jsonl(str(tmp_path / "c.jsonl"), docs)
    prefix = str(tmp_path / "out")
    preprocess_data.main(["--input", corpus, "--output-prefix", prefix, "--tokenizer-type",
                          "Llama2Tokenizer", "--tokenizer-model", tok["sp"], "--append-eod",
                          "--log-interval", "100"])  # fmt: skip
    ds = open_indexed_dataset(prefix + "_text_document", vocab_size=400)
    for i, doc in enumerate(docs):
        assert np.array(ds[i]).tolist() == [sp.bos_id(), *sp.encode(doc), sp.eos_id()]


def test_models_without_the_needed_pieces_are_refused(tok):
    with pytest.raises(TokenizerFileError, match=r"nobos.model has no BOS piece.*Llama2"):
        build_tokenizer("Llama2Tokenizer", tok["nobos"])
    assert build_tokenizer("GPTSentencePieceTokenizer", tok["nobos"]).eod == 2  # needs no BOS
    for kind in ("Llama2Tokenizer", "GPTSentencePieceTokenizer"):
        with pytest.raises(TokenizerFileError, match=r"noeos.model has no EOS piece.*EOD"):
            build_tokenizer(kind, tok["noeos"])
        with pytest.raises(TokenizerFileError, match=f"--tokenizer-type {kind} needs"):
            build_tokenizer(kind)
    # The project's SentencePieceTokenizer falls back to a user-defined <eod>.
    fallback = build_tokenizer("SentencePieceTokenizer", tok["noeos"])
    assert isinstance(fallback, SentencePieceTokenizer)
    assert fallback.eod == spm.SentencePieceProcessor(model_file=tok["noeos"]).PieceToId("<eod>")


def _hf_folder(tok, name: str, eos: str | None, bos_template: bool) -> str:
    """A copy of the trained tokenizer.json, optionally with a BOS post-processor and a
    tokenizer_config.json naming ``eos``."""
    from tokenizers import Tokenizer, processors

    folder = os.path.join(tok["tmp"], name)
    os.makedirs(folder, exist_ok=True)
    t = Tokenizer.from_file(os.path.join(tok["hf"], "tokenizer.json"))
    if bos_template:
        bos = t.token_to_id("<s>")
        t.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
        )
    t.save(os.path.join(folder, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast"}
    if eos:
        config["eos_token"] = eos
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return folder


@pytest.mark.parametrize(
    "name, eos, bos_template",
    [("plain", None, False), ("im_end", "<|im_end|>", False), ("llama3ish", "<|im_end|>", True)],
)
def test_hugging_face_folder_matches_autotokenizer(tok, name, eos, bos_template):
    folder = _hf_folder(tok, name, eos, bos_template)
    ours = build_tokenizer("HuggingFaceTokenizer", folder)
    assert isinstance(ours, HuggingFaceTokenizer)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    assert ours.vocab_size == len(theirs)
    for text in [TEXT, *TRICKY_DOCS]:
        assert ours.tokenize(text) == theirs(text)["input_ids"]  # Megatron-LM's tokenize
    want_eod = theirs.convert_tokens_to_ids(eos or "<|endoftext|>")
    assert ours.eod == want_eod
    if eos:
        assert ours.eod == theirs.eos_token_id
    assert ours.bos == (theirs.convert_tokens_to_ids("<s>") if bos_template else None)
    # The file itself (no folder, so no tokenizer_config.json): the candidate EOD.
    direct = build_tokenizer("HuggingFaceTokenizer", os.path.join(folder, "tokenizer.json"))
    assert direct.eod == theirs.convert_tokens_to_ids("<|endoftext|>")
    assert direct.tokenize(TEXT) == ours.tokenize(TEXT)


def test_hugging_face_folder_eos_must_exist(tok):
    folder = _hf_folder(tok, "bad_eos", "<|not-there|>", False)
    with pytest.raises(TokenizerFileError, match=r"eos_token '<\|not-there\|>', which is not"):
        build_tokenizer("HuggingFaceTokenizer", folder)
    empty = os.path.join(tok["tmp"], "empty_folder")
    os.makedirs(empty, exist_ok=True)
    with pytest.raises(TokenizerFileError, match="tokenizer.json: no such file"):
        build_tokenizer("HuggingFaceTokenizer", empty)


TINY = [
    "--mock-data", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
    "--group-query-attention", "--num-query-groups", "2", "--swiglu", "--seq-length", "16",
    "--micro-batch-size", "2", "--train-iters", "2", "--tst-bag-size", "2", "--tst-iters", "1",
    "--log-interval", "1", "--eval-interval", "100", "--eval-iters", "1", "--peak-tflops", "1",
    "--lr", "1e-3", *SMALL_GPT,
]  # fmt: skip


@pytest.fixture(scope="module")
def llama2_run(tok, tmp_path_factory) -> str:
    """The trainer with --tokenizer-type Llama2Tokenizer (vocabulary from the model: 400)."""
    import pretrain_tst

    save = str(tmp_path_factory.mktemp("llama2") / "ckpt")
    flags = ["--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", tok["sp"]]
    assert pretrain_tst.main([*TINY, *flags, "--save", save]) == 0
    return save


def test_export_of_the_megatron_types_loads_in_transformers(tok, llama2_run, tmp_path):
    from tst.export import convert

    out = str(tmp_path / "llama2")
    result = convert(llama2_run, out)  # the run's own tokenizer, from its saved config
    assert result.vocab_size == 400 and "tokenizer.model" in result.files
    ours = build_tokenizer("Llama2Tokenizer", tok["sp"])
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    # transformers' LlamaTokenizer encodes as SentencePiece does except for spaces at the
    # very start of a text (see tst/export/tokenizer_files.py): texts here start with a word.
    text = TEXT.lstrip()
    assert theirs(text)["input_ids"] == ours.tokenize(text)  # BOS first, as in training
    assert (theirs.bos_token_id, theirs.eos_token_id) == (ours.bos, ours.eod)
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert (config["bos_token_id"], config["eos_token_id"]) == (ours.bos, ours.eod)

    specs = {
        "GPTSentencePieceTokenizer": TokenizerSpec("GPTSentencePieceTokenizer", tok["sp"]),
        "HuggingFaceTokenizer": TokenizerSpec(
            "HuggingFaceTokenizer", _hf_folder(tok, "export_src", "<|im_end|>", True)
        ),
    }
    for kind, spec in specs.items():
        out = str(tmp_path / kind)
        convert(llama2_run, out, tokenizer=spec)  # these weights, another tokenizer
        ours = spec.build()
        theirs = transformers.AutoTokenizer.from_pretrained(out)
        assert theirs(text)["input_ids"] == ours.tokenize(text), kind
        assert theirs.eos_token_id == ours.eod, kind
        with open(os.path.join(out, "tst_export.json")) as f:
            assert json.load(f)["tokenizer_type"] == kind


def test_generate_with_a_llama2_run(llama2_run, capsys):
    generate = load_tool("generate")
    args = ["--prompt", "The Congress", "--max-new-tokens", "4", "--temperature", "0"]
    result = generate.main(["--load", llama2_run, *args])
    assert 1 <= len(result["ids"]) <= 4 and all(0 <= t < 400 for t in result["ids"])
    assert capsys.readouterr().out.rstrip("\n").endswith("The Congress" + result["completion"])


def test_legacy_tokenizer_flag_keeps_the_vocabulary_and_eod(tok):
    """--legacy-tokenizer (Megatron-LM's): its training takes the vocabulary size from the
    legacy tokenizer whatever the flag, and only the EOD id from the one chosen, which is the
    same in both of its systems for every type here but SentencePieceTokenizer (the legacy one
    adds <EOD> past the pieces): the trainer's tokenizer is the same with the flag, and that
    one type is refused with it, naming the way out."""
    import pretrain_tst
    from tst.config import parse_args

    base = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
            "--seq-length", "8", "--micro-batch-size", "1", "--train-iters", "2",
            "--lr", "1e-3", "--data-path", "unused"]  # fmt: skip
    for ttype, model in (("GPTSentencePieceTokenizer", tok["sp"]), ("Llama2Tokenizer", tok["sp"]),
                         ("HuggingFaceTokenizer", tok["hf"])):  # fmt: skip
        argv = base + ["--tokenizer-type", ttype, "--tokenizer-model", model]
        plain = pretrain_tst.build_tokenizer(parse_args(argv))
        cfg = parse_args(argv + ["--legacy-tokenizer"])
        assert cfg.data.legacy_tokenizer
        legacy = pretrain_tst.build_tokenizer(cfg)
        assert (legacy.vocab_size, legacy.eod, legacy.bos) == (plain.vocab_size, plain.eod,
                                                               plain.bos), ttype  # fmt: skip
        assert legacy.tokenize(TEXT) == plain.tokenize(TEXT), ttype
    with pytest.raises(ValueError, match=r"--legacy-tokenizer with SentencePieceTokenizer: .* "
                       "drop --legacy-tokenizer, or use GPTSentencePieceTokenizer"):  # fmt: skip
        parse_args(base + ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
                           tok["sp"], "--legacy-tokenizer"])  # fmt: skip
