"""ByteTokenizer: ids are UTF-8 bytes (Python's own codec is the oracle), EOD 256, vocab 257.

Round trip: every Unicode scalar value (all of U+0000..U+10FFFF but the surrogates) encodes
to ``str.encode("utf-8")`` and decodes back exactly. A lone surrogate (no UTF-8 encoding;
JSON ``\\ud800`` escapes make them) is refused by ``tokenize`` and skipped as a bad record by
the preprocessor. Ids that are not valid UTF-8 (a model can emit any byte order) decode like
``bytes.decode("utf-8", "replace")``: one U+FFFD per maximal invalid subsequence.

End to end: preprocess -> train a few steps across the phase switch -> export -> the
exported model and tokenizer load in ``transformers`` -> generation from the checkpoint and
from the export gives the same ids.
"""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch
import transformers
from data_support import TRICKY_DOCS, load_tool, training_text, write_jsonl
from flags import SMALL_GPT

import pretrain_tst
from tst.data.indexed import open_indexed_dataset
from tst.data.tokenizers import (
    ByteTokenizer,
    NullTokenizer,
    TokenizerInputError,
    TokenizerSpec,
    build_tokenizer,
)
from tst.errors import TSTError
from tst.export.tokenizer_files import byte_level_tokenizer, byte_to_char, write_tokenizer_files

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning:torch.distributed")

SCALARS = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF)


def _random_text(rng: random.Random, n: int) -> str:
    """Characters from every UTF-8 length class, controls and specials included."""
    pools = [(0, 0x7F), (0x80, 0x7FF), (0x800, 0xD7FF), (0xE000, 0xFFFF), (0x10000, 0x10FFFF)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(pools)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


def _invalid_byte_runs(rng: random.Random) -> list[list[int]]:
    handpicked = [
        [0xFF],  # never valid
        [0xC0, 0x80],  # overlong NUL
        [0xED, 0xA0, 0x80],  # an encoded surrogate
        [0xF4, 0x90, 0x80, 0x80],  # above U+10FFFF
        [0xF0, 0x9F, 0x99],  # an emoji cut before its last byte
        [0x80, 0xBF, 0x41],  # stray continuation bytes
        [0xE2, 0x82, 0x41, 0xE2, 0x82, 0xAC],  # cut sequence, then a good one
    ]
    return handpicked + [
        [rng.randrange(256) for _ in range(rng.randint(1, 40))] for _ in range(300)
    ]


def test_ids_vocab_and_eod():
    tok = build_tokenizer("ByteTokenizer")
    assert isinstance(tok, ByteTokenizer)
    assert (tok.vocab_size, tok.eod, tok.bos) == (257, 256, None)
    assert tok.tokenize("é€🙂") == [0xC3, 0xA9, 0xE2, 0x82, 0xAC, 0xF0, 0x9F, 0x99, 0x82]
    assert tok.tokenize("") == []
    assert build_tokenizer("ByteTokenizer", vocab_size=512).vocab_size == 257  # rows, not ids
    with pytest.raises(TSTError, match="ByteTokenizer needs --vocab-size >= 257"):
        build_tokenizer("ByteTokenizer", vocab_size=256)
    # NullTokenizer is the same bytes with a settable size.
    assert build_tokenizer("NullTokenizer", vocab_size=1024).tokenize("é") == [0xC3, 0xA9]
    assert NullTokenizer(1024).vocab_size == 1024


def test_every_scalar_value_round_trips_exactly():
    tok = ByteTokenizer()
    ids = tok.tokenize(SCALARS)
    assert ids == list(SCALARS.encode("utf-8"))  # Python's codec is the reference
    assert tok.detokenize(ids) == SCALARS
    assert tok.detokenize_bytes(ids) == SCALARS.encode("utf-8")
    assert np.array_equal(tok.tokenize_array(SCALARS), np.frombuffer(SCALARS.encode(), np.uint8))
    rng = random.Random(0)
    for _ in range(200):
        text = _random_text(rng, rng.randint(0, 60))
        assert tok.detokenize(tok.tokenize(text)) == text
    for text in TRICKY_DOCS:
        assert tok.detokenize(tok.tokenize(text)) == text


@pytest.mark.parametrize("surrogate", ["\ud800", "\udbff", "\udc00", "\udfff"])
def test_lone_surrogates_are_refused(surrogate):
    tok = ByteTokenizer()
    with pytest.raises(TokenizerInputError, match=f"U\\+{ord(surrogate):04X} at character 2"):
        tok.tokenize("ab" + surrogate + "cd")
    with pytest.raises(TokenizerInputError):
        tok.tokenize_array(surrogate)
    # A well-formed pair written as two JSON escapes is one astral character: fine.
    assert tok.tokenize(json.loads('"\\ud83d\\ude42"')) == list("🙂".encode())


def test_invalid_utf8_decodes_like_pythons_replace():
    tok = ByteTokenizer()
    for run in _invalid_byte_runs(random.Random(1)):
        assert tok.detokenize(run) == bytes(run).decode("utf-8", errors="replace"), run
        assert tok.detokenize_bytes(run) == bytes(run)
    assert tok.detokenize([0xF0, 0x9F, 0x99]) == "\ufffd"  # a cut character: one U+FFFD
    # EOD (and padded rows above it) are no bytes: dropped.
    assert tok.detokenize([104, 256, 105, 300]) == "hi"


def test_byte_level_tokenizer_json_is_the_same_tokenizer():
    from tokenizers import pre_tokenizers

    table = byte_to_char()
    assert sorted(table) == list(range(256))
    assert set(table.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    # The pre-tokenizer's output characters are the table's, byte by byte.
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    text = SCALARS[:0x800] + "🙂"
    (piece, _), = pre.pre_tokenize_str(text)  # fmt: skip
    assert piece == "".join(table[b] for b in text.encode("utf-8"))
    tok = byte_level_tokenizer()
    assert tok.encode(SCALARS[::97]).ids == list(SCALARS[::97].encode())


def test_transformers_reads_the_exported_byte_tokenizer(tmp_path):
    ours = ByteTokenizer()
    files, names = write_tokenizer_files(TokenizerSpec("ByteTokenizer"), ours, str(tmp_path), 64)
    assert files == {} and names == ["tokenizer.json", "tokenizer_config.json"]
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert (len(theirs), theirs.eos_token_id) == (257, 256)
    rng = random.Random(2)
    for text in [*TRICKY_DOCS, SCALARS[::31], *(_random_text(rng, 50) for _ in range(50))]:
        ids = ours.tokenize(text)
        assert theirs(text)["input_ids"] == ids
        assert theirs.decode(ids) == text
    for run in _invalid_byte_runs(random.Random(3)):
        assert theirs.decode(run + [256], skip_special_tokens=True) == ours.detokenize(run), run


def test_preprocess_writes_bytes_and_skips_lone_surrogates(tmp_path, capsys):
    preprocess_data = load_tool("preprocess_data")
    docs = [*TRICKY_DOCS, SCALARS[::1009]]
    corpus = write_jsonl(str(tmp_path / "c.jsonl"), docs)
    with open(corpus, "a", encoding="utf-8") as f:
        f.write('{"text": "half a pair \\ud83d here"}\n')  # line 7: JSON-valid, not UTF-8-able
    prefix = str(tmp_path / "out")
    argv = ["--input", corpus, "--output-prefix", prefix, "--tokenizer-type", "ByteTokenizer",
            "--append-eod", "--log-interval", "100"]  # fmt: skip
    summary = preprocess_data.main(argv)
    assert summary.documents == len(docs) and summary.bad_utf8_records == 1
    assert f"{corpus}:7: a lone surrogate U+D83D" in capsys.readouterr().err
    ds = open_indexed_dataset(prefix + "_text_document", vocab_size=257)
    for i, doc in enumerate(docs):
        assert np.array(ds[i]).tolist() == [*doc.encode("utf-8"), 256]
    with pytest.raises(Exception, match="lone surrogate U\\+D83D"):
        preprocess_data.main([*argv, "--on-bad-utf8", "fail"])


SEQ = 16
TRAIN = [
    "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
    "--group-query-attention", "--num-query-groups", "2", "--swiglu", "--seq-length", str(SEQ),
    "--micro-batch-size", "2", "--train-iters", "4", "--tst-bag-size", "2", "--tst-iters", "2",
    "--lr", "1e-2", *SMALL_GPT,
    "--init-method-std", "0.2", "--log-interval", "1", "--eval-interval", "2",
    "--eval-iters", "1", "--peak-tflops", "1", "--split", "90,10,0",
]  # fmt: skip


def test_preprocess_train_export_generate(tmp_path, capsys):
    preprocess_data = load_tool("preprocess_data")
    convert = load_tool("convert_to_hf")
    generate = load_tool("generate")
    corpus = write_jsonl(str(tmp_path / "c.jsonl"), training_text() * 2)
    prefix = str(tmp_path / "data")
    preprocess_data.main(["--input", corpus, "--output-prefix", prefix, "--tokenizer-type",
                          "ByteTokenizer", "--append-eod", "--log-interval", "100"])  # fmt: skip
    save = str(tmp_path / "ckpt")
    metrics = str(tmp_path / "metrics.jsonl")
    assert pretrain_tst.main([*TRAIN, "--data-path", prefix + "_text_document", "--tokenizer-type",
                              "ByteTokenizer", "--save", save, "--metrics-file", metrics]) == 0  # fmt: skip
    with open(metrics) as f:
        records = [json.loads(line) for line in f]
    assert any(r.get("phase") == "superposition" for r in records)
    assert any("val_loss" in r for r in records)

    out = str(tmp_path / "hf")
    result = convert.main(["--load", save, "--output", out])
    assert (result.vocab_size, result.padded_vocab_size) == (257, 384)
    assert {"tokenizer.json", "tokenizer_config.json", "tst_export.json"} <= set(os.listdir(out))
    with open(os.path.join(out, "tst_export.json")) as f:
        info = json.load(f)
    assert info["tokenizer_type"] == "ByteTokenizer" and info["tokenizer_files"] == {}

    # transformers loads model and tokenizer; its logits are the trainer model's.
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    prompt = "The Congress shall — é 🙂"
    ids = ByteTokenizer().tokenize(prompt)
    assert theirs(prompt)["input_ids"] == ids
    from tst.export import load_checkpoint, single_process_world

    with single_process_world() as layout:
        ckpt = load_checkpoint(save, layout)
        x = torch.tensor([[256, *ids][:SEQ]])  # the trained window
        with torch.no_grad():
            want = ckpt.model(x, torch.arange(x.shape[1])[None], attention_mask=None)[..., :257]
    with torch.no_grad():
        got = model(x).logits
    assert got.shape == want.shape and (got - want).abs().max().item() < 1e-4

    args = ["--prompt", prompt, "--max-new-tokens", "12", "--top-k", "50", "--seed", "3"]
    direct = generate.main(["--load", save, *args])
    exported = generate.main(["--load", out, *args])
    assert direct["ids"] == exported["ids"] and 1 <= len(direct["ids"]) <= 12
    assert all(0 <= t <= 256 for t in direct["ids"])  # never a padded row
    expected = ByteTokenizer().detokenize([t for t in direct["ids"] if t != 256])
    assert direct["completion"] == expected
    assert f"\n{prompt}{expected}\n" in capsys.readouterr().out
