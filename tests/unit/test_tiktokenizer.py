"""TikTokenizer (Megatron-LM's tiktoken vocabularies: Nemotron, Mistral-NeMo).

The reference is a plain byte-pair encoder written here from tiktoken's definition: split the
text with the pattern (the ``regex`` module), then in each piece merge the adjacent pair whose
joined bytes have the lowest rank until no pair is a rank; a token's id is its rank plus the
special-token count. The vocabulary is learned here from prose (256 byte ranks, then greedy
pair merges) and written in Megatron-LM's JSON format.

End to end: preprocess -> train a few steps across the phase switch -> export -> the exported
tokenizer loads in ``transformers`` and encodes as ours -> generation from the checkpoint and
from the export gives the same ids.
"""

from __future__ import annotations

import base64
import collections
import json
import pathlib
import random

import numpy as np
import pytest
import regex
import transformers
from data_support import TRICKY_DOCS, load_tool, training_text, write_jsonl
from flags import SMALL_GPT

import pretrain_tst
from tst.data.indexed import open_indexed_dataset
from tst.data.tokenizers import (
    TIKTOKEN_PATTERNS,
    TikTokenizer,
    TokenizerFileError,
    TokenizerSpec,
    build_tokenizer,
)
from tst.errors import InputError
from tst.export.tokenizer_files import write_tokenizer_files

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning:torch.distributed")

S = 16  # special tokens in most tests (Megatron-LM's default is 1000)


def _learn_ranks(texts: list[str], merges: int) -> list[bytes]:
    """The 256 byte ranks, then the most frequent adjacent pair of each round, joined."""
    ranks = [bytes([b]) for b in range(256)]
    words = [[bytes([b]) for b in w.encode()] for t in texts for w in t.split()]
    for _ in range(merges):
        pairs = collections.Counter(p for w in words for p in zip(w, w[1:], strict=False))
        if not pairs:
            break
        (a, b), _count = pairs.most_common(1)[0]
        ranks.append(a + b)
        joined = []
        for w in words:
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == (a, b):
                    out.append(a + b)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            joined.append(out)
        words = joined
    return ranks


def _write_vocabulary(path, ranks: list[bytes]) -> str:
    entries = [{"rank": i, "token_bytes": base64.b64encode(t).decode(),
                "token_str": t.decode("utf-8", "replace")} for i, t in enumerate(ranks)]  # fmt: skip
    with open(path, "w") as f:
        json.dump(entries, f)
    return str(path)


def _reference(text: str, ranks: list[bytes], pattern: str, specials: int) -> list[int]:
    rank = {t: i for i, t in enumerate(ranks)}
    ids = []
    for piece in regex.findall(TIKTOKEN_PATTERNS[pattern], text):
        parts = [bytes([b]) for b in piece.encode()]
        while len(parts) > 1:
            best = min(range(len(parts) - 1), key=lambda i: rank.get(parts[i] + parts[i + 1],
                                                                      len(rank)))  # fmt: skip
            if parts[best] + parts[best + 1] not in rank:
                break
            parts[best : best + 2] = [parts[best] + parts[best + 1]]
        ids += [rank[p] + specials for p in parts]
    return ids


@pytest.fixture(scope="module")
def vocabulary(tmp_path_factory):
    ranks = _learn_ranks(training_text(), 300)
    return _write_vocabulary(tmp_path_factory.mktemp("tiktoken") / "vocab.json", ranks), ranks


def _texts() -> list[str]:
    rng = random.Random(5)
    alphabet = "abcdefghij ÄÖü漢字🙂 \t\n.,;!?0123456789'\"-"
    return [*TRICKY_DOCS, *("".join(rng.choice(alphabet) for _ in range(80)) for _ in range(40))]


@pytest.mark.parametrize("pattern", ["v1", "v2"])
def test_ids_are_the_plain_byte_pair_encoding(vocabulary, pattern):
    path, ranks = vocabulary
    tok = TikTokenizer(path, pattern, vocab_size=S + len(ranks), num_special_tokens=S)
    assert (tok.vocab_size, tok.eod, tok.bos) == (S + len(ranks), 2, None)
    assert tok.special_tokens[:3] == ["<unk>", "<s>", "</s>"]
    assert tok.special_tokens[3:] == [f"<SPECIAL_{i}>" for i in range(3, S)]
    for text in _texts():
        ids = tok.tokenize(text)
        assert ids == _reference(text, ranks, pattern, S), text
        assert tok.detokenize(ids) == text
    assert tok.detokenize([*tok.tokenize("abc"), S + len(ranks) + 5]) == "abc"  # padding row


def test_vocab_size_keeps_the_first_ranks_and_special_tokens_are_configurable(vocabulary):
    path, ranks = vocabulary
    spec = TokenizerSpec("TikTokenizer", path, vocab_size=8 + 300, tiktoken_pattern="v2",
                         tiktoken_num_special_tokens=8,
                         special_tokens=("<pad>", "</s>", "<unk>", "<s>"))  # fmt: skip
    tok = spec.build()
    assert tok.special_tokens == ["<pad>", "</s>", "<unk>", "<s>", *(f"<SPECIAL_{i}>" for i in
                                                                      range(4, 8))]  # fmt: skip
    assert tok.eod == 1
    text = " ".join(TRICKY_DOCS)
    assert tok.tokenize(text) == _reference(text, ranks[:300], "v2", 8)
    # Megatron-LM's default size (2**17) with a file this small is refused by name.
    with pytest.raises(TokenizerFileError, match=r"holds \d+ ranks, fewer than --vocab-size "
                       r"131072 minus --tiktoken-num-special-tokens 1000"):  # fmt: skip
        build_tokenizer("TikTokenizer", path, tiktoken_pattern="v2")


def test_bad_vocabularies_and_flags_are_refused(vocabulary, tmp_path):
    path, ranks = vocabulary
    size = S + len(ranks)
    with pytest.raises(TokenizerFileError, match=r"needs --tiktoken-pattern v1 or v2"):
        TikTokenizer(path, None, size, S)
    with pytest.raises(InputError, match=r"must include \['<unk>', '<s>', '</s>'\]"):
        TikTokenizer(path, "v2", size, S, special_tokens=["<s>", "</s>"])
    with pytest.raises(InputError, match=r"each special token once"):
        TikTokenizer(path, "v2", size, S, special_tokens=["<unk>", "<s>", "</s>", "<s>"])
    with pytest.raises(InputError, match=r"--tiktoken-num-special-tokens 2 must be at least"):
        TikTokenizer(path, "v2", size, 2)
    entries = json.loads(pathlib.Path(path).read_text())
    entries[300]["rank"] = 7
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(entries))
    with pytest.raises(TokenizerFileError, match=r"entry 300 is not \{'rank': 300"):
        TikTokenizer(str(bad), "v2", size, S)
    entries = json.loads(pathlib.Path(path).read_text())
    entries[65]["token_bytes"] = base64.b64encode(b"B").decode()
    bad.write_text(json.dumps(entries))
    with pytest.raises(TokenizerFileError, match=r"rank 65 must be the byte 65 itself"):
        TikTokenizer(str(bad), "v2", size, S)
    model = tmp_path / "tok.model"
    model.write_bytes(b"\x0a\x00binary")
    with pytest.raises(TokenizerFileError, match=r"is not a tiktoken vocabulary"):
        TikTokenizer(str(model), "v2", size, S)


def test_transformers_reads_the_exported_tokenizer(vocabulary, tmp_path):
    path, ranks = vocabulary
    spec = TokenizerSpec("TikTokenizer", path, vocab_size=S + len(ranks), tiktoken_pattern="v2",
                         tiktoken_num_special_tokens=S)  # fmt: skip
    ours = spec.build()
    files, names = write_tokenizer_files(spec, ours, str(tmp_path), 64)
    assert files == {"tokenizer_model": "tiktoken_vocab.json"}
    assert sorted(names) == ["tiktoken_vocab.json", "tokenizer.json", "tokenizer_config.json"]
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert (len(theirs), theirs.eos_token_id, theirs.unk_token_id) == (S + len(ranks), 2, 0)
    for text in _texts():
        ids = ours.tokenize(text)
        assert theirs(text)["input_ids"] == ids, text
        assert theirs.decode(ids) == text


SEQ = 16
TRAIN = [
    "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--swiglu",
    "--seq-length", str(SEQ), "--micro-batch-size", "2", "--train-iters", "4",
    "--tst-bag-size", "2", "--tst-iters", "2", "--lr", "1e-2", *SMALL_GPT,
    "--log-interval", "1", "--eval-interval", "2", "--eval-iters", "1", "--peak-tflops", "1",
    "--split", "90,10,0",
]  # fmt: skip


def test_preprocess_train_export_generate(vocabulary, tmp_path, capsys):
    path, ranks = vocabulary
    special = ["<pad>", "<unk>", "<s>", "</s>"]
    flags = ["--tokenizer-type", "TikTokenizer", "--tokenizer-model", path, "--tiktoken-pattern",
             "v2", "--tiktoken-num-special-tokens", str(S), "--vocab-size", str(S + len(ranks)),
             "--tokenizer-special-tokens", *special]  # fmt: skip
    tok = TikTokenizer(path, "v2", S + len(ranks), S, special)
    assert tok.eod == 3
    corpus = write_jsonl(str(tmp_path / "c.jsonl"), training_text())
    prefix = str(tmp_path / "data")
    load_tool("preprocess_data").main(["--input", corpus, "--output-prefix", prefix, *flags,
                                       "--append-eod", "--log-interval", "100"])  # fmt: skip
    ds = open_indexed_dataset(prefix + "_text_document", vocab_size=S + len(ranks))
    for i, doc in enumerate(training_text()[:3]):
        assert np.array(ds[i]).tolist() == [*_reference(doc, ranks, "v2", S), tok.eod]

    save, metrics = str(tmp_path / "ckpt"), str(tmp_path / "m.jsonl")
    argv = [*TRAIN, *flags, "--data-path", prefix + "_text_document", "--save", save,
            "--metrics-file", metrics]  # fmt: skip
    assert pretrain_tst.main(argv) == 0
    with open(metrics) as f:
        records = [json.loads(line) for line in f]
    assert {r.get("phase") for r in records if "loss" in r} == {"superposition", "recovery"}

    out = str(tmp_path / "hf")
    result = load_tool("convert_to_hf").main(["--load", save, "--output", out])
    assert result.vocab_size == S + len(ranks)
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    prompt = "The Congress shall — é 🙂"
    assert theirs(prompt)["input_ids"] == tok.tokenize(prompt)
    generate = load_tool("generate")
    args = ["--prompt", prompt, "--max-new-tokens", "8", "--top-k", "20", "--seed", "3"]
    direct = generate.main(["--load", save, *args])
    exported = generate.main(["--load", out, *args])
    assert direct["ids"] == exported["ids"] and 1 <= len(direct["ids"]) <= 8
    assert all(0 <= t < S + len(ranks) for t in direct["ids"])
    expected = tok.detokenize([t for t in direct["ids"] if t != tok.eod])
    assert direct["completion"] == expected
    assert f"\n{prompt}{expected}\n" in capsys.readouterr().out


def test_tiktoken_flags_with_another_tokenizer_warn_that_they_are_ignored():
    from tst.config import parse_args

    base = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
            "--seq-length", "8", "--micro-batch-size", "1", "--train-iters", "2", "--lr", "1e-3",
            "--mock-data", "--vocab-size", "512"]  # fmt: skip
    with pytest.warns(UserWarning, match=r"--tiktoken-pattern, --tokenizer-special-tokens: only "
                      r"TikTokenizer reads them \(as in Megatron-LM\); ignored with NullTokenizer"):  # fmt: skip
        cfg = parse_args([*base, "--tiktoken-pattern", "v2", "--tiktoken-special-tokens", "<x>"])
    assert cfg.data.tokenizer_special_tokens == ["<x>"]  # the deprecated spelling's target


def test_fim_sentinels_are_special_tokens(vocabulary):
    """--fim-data with TikTokenizer: the sentinels are --tokenizer-special-tokens entries
    (ids by position), a whole token's bytes is its rank, pieces encode as tokenize does."""
    from tst.config_fim import FIMConfig
    from tst.data.fim import FIMTransform

    path, ranks = vocabulary
    special = ["<unk>", "<s>", "</s>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>"]
    tok = TikTokenizer(path, "v2", S + len(ranks), S, special)
    fim = FIMTransform(FIMConfig(fim_data=True, fim_eod_token="</s>"), tok, 1, 17)
    assert (fim.prefix, fim.middle, fim.suffix, fim.pad, fim.eod) == (3, 4, 5, 6, tok.eod)
    assert tok.token_to_id("a") == tok.tokenize("a")[0] and tok.token_to_id("<nope>") is None
    assert tok.encode_text(TRICKY_DOCS[0]) == tok.tokenize(TRICKY_DOCS[0])
