"""Tokenizers by Megatron type name: round trips, EOD, and errors for files of the wrong kind."""

from __future__ import annotations

import pytest
from data_support import TRICKY_DOCS, make_tokenizers

from tst.data.tokenizers import NullTokenizer, TokenizerFileError, build_tokenizer


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, dict[str, str]]:
    flags = make_tokenizers(str(tmp_path_factory.mktemp("tok")))
    names = {
        "--tokenizer-model": "tokenizer_model",
        "--vocab-file": "vocab_file",
        "--merge-file": "merge_file",
    }
    return {
        t: {names[k]: v for k, v in zip(f[0::2], f[1::2], strict=True)} for t, f in flags.items()
    }


@pytest.mark.parametrize(
    "ttype", ["SentencePieceTokenizer", "HuggingFaceTokenizer", "GPT2BPETokenizer", "NullTokenizer"]
)
def test_round_trip_and_eod(files, ttype):
    tok = build_tokenizer(ttype, **files[ttype])
    for text in TRICKY_DOCS:
        ids = tok.tokenize(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.detokenize(ids) == text
    assert 0 <= tok.eod < tok.vocab_size
    assert tok.eod not in tok.tokenize("plain text without specials")


def test_hf_and_gpt2_files_agree(files):
    # The GPT-2 vocab/merges pair was saved from the same BPE as the tokenizer.json.
    hf = build_tokenizer("HuggingFaceTokenizer", **files["HuggingFaceTokenizer"])
    gpt2 = build_tokenizer("GPT2BPETokenizer", **files["GPT2BPETokenizer"])
    for text in TRICKY_DOCS:
        assert hf.tokenize(text) == gpt2.tokenize(text)
    assert hf.eod == gpt2.eod


def test_null_tokenizer():
    tok = NullTokenizer()
    assert (tok.vocab_size, tok.eod) == (257, 256)
    assert tok.tokenize("é") == [0xC3, 0xA9]
    assert tok.detokenize([104, 105, 256]) == "hi"
    assert build_tokenizer("NullTokenizer", vocab_size=1024).vocab_size == 1024
    with pytest.raises(ValueError, match="vocab-size >= 257"):
        NullTokenizer(100)


def test_wrong_kind_of_file(files):
    sp_model = files["SentencePieceTokenizer"]["tokenizer_model"]
    hf_json = files["HuggingFaceTokenizer"]["tokenizer_model"]
    vocab = files["GPT2BPETokenizer"]["vocab_file"]
    merges = files["GPT2BPETokenizer"]["merge_file"]
    cases = [
        (("SentencePieceTokenizer", hf_json), rf"{hf_json} is a JSON file, not a SentencePiece"),
        (("SentencePieceTokenizer", merges), rf"{merges} is not a SentencePiece .model"),
        (("HuggingFaceTokenizer", sp_model), rf"{sp_model} is not a Hugging Face tokenizer.json"),
        (("GPT2BPETokenizer", None, hf_json, merges), rf"{hf_json} is JSON but not a GPT-2 vocab"),
        (("GPT2BPETokenizer", None, vocab, sp_model), rf"{sp_model} is not a GPT-2 merges.txt"),
        (("GPT2BPETokenizer", None, vocab, vocab), rf"{vocab} is not a GPT-2 merges.txt"),
        (("SentencePieceTokenizer", "/no/such.model"), "/no/such.model: no such file"),
        # A hub name, as Megatron-LM's scripts pass it (it downloads): read from disk only.
        (
            ("HuggingFaceTokenizer", "meta-llama/Llama-3.1-8B"),
            r"meta-llama/Llama-3.1-8B: no such file or folder; a Hugging Face hub name is not",
        ),
        (("HuggingFaceTokenizer", "/no/tokenizer.json"), "/no/tokenizer.json: no such file"),
        (("GPT2BPETokenizer",), "needs --vocab-file"),
    ]
    for args, message in cases:
        with pytest.raises(TokenizerFileError, match=message):
            build_tokenizer(*args)
    with pytest.raises(ValueError, match="is not one of"):
        build_tokenizer("BertWordPieceLowerCase")
