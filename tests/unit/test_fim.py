"""Fill-in-the-middle data (--fim-data and the --fim-* flags, Megatron-LM's names).

References: a plain implementation of the FIM paper's transform (Bavarian et al., 2022,
section 3: character-level split points, PSM / SPM layouts), written here on text, fed the
same random draws; the text round trip of every rearranged piece; the rates' binomial
spread; and the unbroken run, which a resumed run (and one read by loader workers) repeats
exactly.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from data_support import FIM_SENTINELS as SENTINELS
from data_support import make_fim_corpus, training_text
from trainer_runs import main_records

import pretrain_tst
from tst.config import parse_args
from tst.config_fim import FIMConfig
from tst.data.fim import FIMTransform
from tst.data.tokenizers import ByteTokenizer, build_tokenizer
from tst.errors import ConfigError, InputError

UNIT = 33  # L + 1


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    return make_fim_corpus(str(tmp_path_factory.mktemp("fim")))


@pytest.fixture(scope="module")
def tok(data):
    return build_tokenizer("HuggingFaceTokenizer", tokenizer_model=data["tokenizer"])


def _units(tok, count: int) -> list[np.ndarray]:
    """``count`` units of the corpus as the trainer cuts them (documents joined by EOD)."""
    ids: list[int] = []
    for doc in training_text():
        ids += [*tok.tokenize(doc), tok.eod]
    ids = ids * (1 + count * UNIT // len(ids))
    return [np.asarray(ids[i * UNIT : (i + 1) * UNIT]) for i in range(count)]


def _reference(unit, tok, rng, rate, spm_rate, ids) -> list[int]:
    """The FIM paper's transform of one unit, on text: each document piece (between EODs)
    is kept, or with probability ``rate`` cut at two uniform character positions into
    prefix / middle / suffix and laid out PSM or (probability ``spm_rate``) SPM."""
    out: list[int] = []
    piece: list[int] = []
    for token in [*unit.tolist(), None]:
        if token is not None and token != tok.eod:
            piece.append(token)
            continue
        if piece:
            if rng.random() < rate:
                text = tok.detokenize(piece)
                i, j = sorted(int(x) for x in rng.integers(0, len(text) + 1, size=2))
                p, m, s = (tok.encode_text(t) for t in (text[:i], text[i:j], text[j:]))
                if rng.random() < spm_rate:
                    piece = [ids["pre"], ids["suf"], *s, ids["mid"], *p, *m]
                else:
                    piece = [ids["pre"], *p, ids["suf"], *s, ids["mid"], *m]
            out += piece
            piece = []
        if token is not None:
            out.append(token)
    out = out[: len(unit)]
    return out + [ids["pad"]] * (len(unit) - len(out))


def _ids(tok) -> dict[str, int]:
    return {k: tok.token_to_id(t) for k, t in zip(("pre", "mid", "suf", "pad"), SENTINELS,
                                                   strict=True)}  # fmt: skip


@pytest.mark.parametrize("rate,spm_rate", [(0.5, 0.5), (1.0, 0.0), (1.0, 1.0), (0.0, 0.5)])
def test_units_match_the_papers_transform(tok, rate, spm_rate):
    fim = FIMTransform(FIMConfig(fim_data=True, fim_rate=rate, fim_spm_rate=spm_rate), tok,
                       seed=7, unit_length=UNIT)  # fmt: skip
    assert fim.eod == tok.eod  # <|endoftext|>: the corpus's document separator
    units = _units(tok, 60)
    sample = np.concatenate(units[:3])  # a big sample of a bag of 3
    got = fim(sample, split=0, index=5)
    for u in range(3):
        rng = np.random.default_rng([7, 0, 5, u])
        want = _reference(units[u], tok, rng, rate, spm_rate, _ids(tok))
        assert got[u * UNIT : (u + 1) * UNIT].tolist() == want
    if rate == 0.0:
        assert got.tolist() == sample.tolist()
    for i, unit in enumerate(units):  # every unit, one at a time, as a recovery sample
        want = _reference(unit, tok, np.random.default_rng([7, 1, i, 0]), rate, spm_rate,
                          _ids(tok))  # fmt: skip
        assert fim(unit, split=1, index=i).tolist() == want


@pytest.mark.parametrize("ttype", ["SentencePieceTokenizer", "GPTSentencePieceTokenizer",
                                   "Llama2Tokenizer"])  # fmt: skip
def test_sentencepiece_tokenizers_carry_the_sentinels(data, ttype):
    """The SentencePiece types: sentinels as user-defined pieces, document pieces encoded
    without BOS (Llama2Tokenizer puts one first in every document, not in a piece)."""
    sp = build_tokenizer(ttype, tokenizer_model=data["sp"])
    # tools/train_tokenizer.py names the EOS piece <|endoftext|>: --fim-eod-token's default.
    fim = FIMTransform(FIMConfig(fim_data=True, fim_rate=1.0), sp, 3, UNIT)
    assert fim.eod == sp.eod and sp.token_to_id("<no such piece>") is None
    units = _units(sp, 20)
    for i, unit in enumerate(units):
        want = _reference(unit, sp, np.random.default_rng([3, 0, i, 0]), 1.0, 0.5, _ids(sp))
        assert fim(unit, 0, i).tolist() == want
    if sp.bos is not None:
        assert sp.bos not in sp.encode_text(" the people")


def test_rearranged_pieces_round_trip_and_the_rates_hold(tok):
    """PSM pieces decode back to the piece's text; the share of rearranged pieces and of
    SPM among them are within 4 standard deviations of --fim-rate and --fim-spm-rate."""
    ids = _ids(tok)
    fim = FIMTransform(FIMConfig(fim_data=True, fim_rate=0.3, fim_spm_rate=0.25), tok, 1, 4000)
    doc = [t for d in training_text() for t in tok.tokenize(d)][:4000]
    pieces = rearranged = spm = 0
    for i in range(300):
        start = (i * 13) % (len(doc) - 40)
        piece = np.asarray(doc[start : start + 40])
        unit = np.concatenate([piece, [tok.eod] * 3960])  # room: nothing is cut
        out = fim.unit(unit, np.random.default_rng(i))
        body = out[: int(np.flatnonzero(out == tok.eod)[0])].tolist()
        pieces += 1
        if body[0] != ids["pre"]:
            assert body == piece.tolist()
            continue
        rearranged += 1
        if body[1] == ids["suf"]:  # SPM: <pre> <suf> suffix <mid> prefix middle
            spm += 1
            k = body.index(ids["mid"])
            text = tok.detokenize(body[k + 1 :]) + tok.detokenize(body[2:k])
        else:  # PSM: <pre> prefix <suf> suffix <mid> middle
            s, m = body.index(ids["suf"]), body.index(ids["mid"])
            text = tok.detokenize(body[1:s]) + tok.detokenize(body[m + 1 :]) + tok.detokenize(
                body[s + 1 : m])  # fmt: skip
        assert text == tok.detokenize(piece)
    assert abs(rearranged - 0.3 * pieces) < 4 * (pieces * 0.3 * 0.7) ** 0.5
    assert abs(spm - 0.25 * rearranged) < 4 * (rearranged * 0.25 * 0.75) ** 0.5 + 1


def test_split_sample_and_no_prefix(tok):
    """--fim-split-sample: fragments between split tokens are rearranged one by one (the
    split tokens kept); --fim-no-prefix leaves pieces starting with it alone."""
    ids = _ids(tok)
    cut = tok.token_to_id("<fim_pad>")  # any single vocabulary entry serves as the splitter
    words = tok.encode_text(" the people of the United States and the Congress")
    unit = np.asarray([*words, cut, *words, cut, *words, tok.eod] + [tok.eod] * 200)
    cfg = FIMConfig(fim_data=True, fim_rate=1.0, fim_spm_rate=0.0, fim_split_sample="<fim_pad>",
                    fim_fragment_rate=1.0)  # fmt: skip
    out = FIMTransform(cfg, tok, 3, len(unit)).unit(unit, np.random.default_rng(0)).tolist()
    assert out.count(ids["pre"]) == 3 and out.count(cut) >= 2  # three fragments, two cuts
    no = FIMConfig(fim_data=True, fim_rate=1.0, fim_no_prefix=" the people")
    kept = FIMTransform(no, tok, 3, len(unit)).unit(unit, np.random.default_rng(0)).tolist()
    assert kept[: len(words)] == words


def _run_args(data, tmp, name: str, *extra: str) -> list[str]:
    return [
        "--data-path", data["prefix"], "--split", "90,10,0", "--tokenizer-type",
        "HuggingFaceTokenizer", "--tokenizer-model", data["tokenizer"], "--num-layers", "2",
        "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", str(UNIT - 1),
        "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "6",
        "--tst-bag-size", "3", "--tst-iters", "3", "--lr", "3e-3", "--log-interval", "1",
        "--eval-interval", "3", "--eval-iters", "1", "--data-cache-path",
        os.path.join(tmp, "cache"), "--fim-data", "--fim-rate", "0.9", *extra,
    ]  # fmt: skip


def test_a_fim_run_trains_through_both_phases_and_resumes_exactly(data, tmp_path, monkeypatch):
    """Through pretrain_tst.main: the samples both phases read are rearranged (sentinels in
    them); a run stopped after the switch and resumed, read by two loader workers (the
    default), repeats the unbroken run's losses, read in the trainer's process, exactly (a
    unit's form depends on its place only)."""
    seen: list[np.ndarray] = []
    call = FIMTransform.__call__

    def spy(self, tokens, split, index):
        out = call(self, tokens, split, index)
        seen.append(out)
        return out

    monkeypatch.setattr(FIMTransform, "__call__", spy)
    tmp = str(tmp_path)
    # Read in this process (the spy sees it): no loader workers.
    whole = main_records(_run_args(data, tmp, "a", "--num-workers", "0"), str(tmp_path / "a.jsonl"))
    tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=data["tokenizer"])
    every = np.concatenate(seen)
    assert (every == tok.token_to_id("<fim_prefix>")).sum() > 10
    assert (every == tok.token_to_id("<fim_middle>")).sum() > 10
    monkeypatch.undo()
    ckpt = str(tmp_path / "ckpt")
    main_records(_run_args(data, tmp, "b", "--save", ckpt, "--exit-interval", "4"),
                 str(tmp_path / "b.jsonl"))  # fmt: skip
    resumed = main_records(_run_args(data, tmp, "c", "--load", ckpt, "--num-workers", "2"),
                           str(tmp_path / "c.jsonl"))  # fmt: skip

    def losses(records, first=1):
        return [(r["iteration"], r["loss"]) for r in records
                if r.get("loss") is not None and r["iteration"] >= first]  # fmt: skip

    assert losses(resumed, 5) == losses(whole, 5)
    assert len(losses(whole)) == 6
    without = main_records(_run_args(data, tmp, "d")[:-3], str(tmp_path / "d.jsonl"))
    assert "--fim-data" not in _run_args(data, tmp, "d")[:-3]
    assert losses(without) != losses(whole)  # the flag changes what is trained on


def test_fim_flags_are_checked(data):
    base = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
            "--seq-length", "16", "--micro-batch-size", "1", "--train-iters", "2",
            "--lr", "1e-3", "--data-path", data["prefix"], "--tokenizer-type",
            "HuggingFaceTokenizer", "--tokenizer-model", data["tokenizer"]]  # fmt: skip
    with pytest.raises(ConfigError, match=r"--fim-rate is a probability in \[0, 1\], got 1.5"):
        parse_args([*base, "--fim-data", "--fim-rate", "1.5"])
    with pytest.raises(ConfigError, match="--fim-split-sample <sep> .* --fim-fragment-rate"):
        parse_args([*base, "--fim-data", "--fim-split-sample", "<sep>"])
    with pytest.raises(InputError, match="--fim-prefix-token '<fim_prefix>' is not one entry"):
        FIMTransform(FIMConfig(fim_data=True),
                     build_tokenizer("HuggingFaceTokenizer", tokenizer_model=data["plain"]), 1, 9)  # fmt: skip
    with pytest.raises(InputError, match="ByteTokenizer has no vocabulary entries"):
        FIMTransform(FIMConfig(fim_data=True), ByteTokenizer(), 1, 9)


def test_fim_refusals_through_the_entry_point(data, tmp_path):
    """One line each, before any step: a tokenizer without the sentinels, mock data, the
    legacy tokenizer flag."""
    args = _run_args(data, str(tmp_path), "x")
    plain = args[:]
    plain[plain.index(data["tokenizer"])] = data["plain"]
    with pytest.raises(InputError, match="--fim-prefix-token '<fim_prefix>' is not one entry"):
        pretrain_tst.main(plain)
    mock = ["--mock-data", "--vocab-size", "400"] + args[args.index("--num-layers") :]
    with pytest.raises(ConfigError, match="--fim-data rearranges text: --mock-data has none"):
        pretrain_tst.main(mock)
    with pytest.raises(ConfigError, match="--fim-data with --legacy-tokenizer"):
        pretrain_tst.main([*args, "--legacy-tokenizer"])


def test_the_sentinel_flags_name_the_tokens(data, tok, tmp_path, monkeypatch):
    """--fim-prefix-token / --fim-middle-token / --fim-suffix-token / --fim-pad-token /
    --fim-eod-token pick the vocabulary entries used (here the sentinels swapped round, and
    the document separator given as it is by default), through the entry point."""
    swapped = ["--fim-prefix-token", "<fim_suffix>", "--fim-suffix-token", "<fim_prefix>",
               "--fim-middle-token", "<fim_pad>", "--fim-pad-token", "<fim_middle>",
               "--fim-eod-token", "<|endoftext|>", "--fim-spm-rate", "0"]  # fmt: skip
    made: list[FIMTransform] = []
    real = pretrain_tst._fim_transform
    monkeypatch.setattr(pretrain_tst, "_fim_transform",
                        lambda cfg, t: made.append(real(cfg, t)) or made[-1])  # fmt: skip
    args = _run_args(data, str(tmp_path), "s", *swapped)
    args[args.index("--train-iters") + 1] = "2"
    args[args.index("--tst-iters") + 1] = "1"
    main_records(args, str(tmp_path / "s.jsonl"))
    fim = made[-1]
    assert (fim.prefix, fim.suffix, fim.middle, fim.pad, fim.eod) == (
        tok.token_to_id("<fim_suffix>"), tok.token_to_id("<fim_prefix>"),
        tok.token_to_id("<fim_pad>"), tok.token_to_id("<fim_middle>"), tok.eod,
    )  # fmt: skip
    unit = np.asarray(tok.encode_text(" the people of the United States") + [tok.eod] * 40)
    out = fim.unit(unit, np.random.default_rng(1)).tolist()
    assert out[0] == tok.token_to_id("<fim_suffix>")  # PSM, led by the given prefix token
    assert tok.token_to_id("<fim_prefix>") in out and tok.token_to_id("<fim_pad>") in out


# Megatron-LM's own FIM functional test, as published (tests/functional_tests/test_cases/gpt/
# gpt3_mcore_te_tp1_pp1_dist_optimizer_fim_dataset/model_config.yaml at core_v0.16.1), its
# ${...} paths substituted.
MEGATRON_FIM_TEST = """
--num-layers 12 --hidden-size 512 --num-attention-heads 8 --log-params-norm
--log-num-zeros-in-grad --log-validation-ppl-to-tensorboard --log-timers-to-tensorboard
--tensorboard-dir /out/tb --micro-batch-size 4 --global-batch-size 32 --seq-length 1024
--max-position-embeddings 1024 --train-iters 50 --timing-log-level 0 --lr-decay-iters 320000
--save /out/ckpt --load /out/ckpt --data-path /data/my-gpt3_00_text_document
--vocab-file /data/bpe/vocab.json --merge-file /data/bpe/merges.txt --split 949,50,1
--distributed-backend nccl --lr 0.00015 --lr-decay-style cosine --min-lr 1.0e-5
--weight-decay 1e-2 --clip-grad 1.0 --lr-warmup-fraction .01 --log-interval 1
--save-interval 10000 --eval-interval 1000 --eval-iters 10 --transformer-impl transformer_engine
--tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 --use-distributed-optimizer
--deterministic-mode --no-gradient-accumulation-fusion --attention-softmax-in-fp32
--use-mcore-models --ckpt-format torch_dist --dist-ckpt-strictness log_all
--data-cache-path /out/cache --bf16 --attention-backend unfused --log-memory-to-tensorboard
--fim-data --fim-rate 0.5 --fim-spm-rate 0.5
""".split()  # noqa: SIM905 (the config as published, one flag after another)


def test_megatrons_fim_functional_test_config_runs_unchanged(capsys):
    """Its flags are all taken (a dry run lays it out; the GPT-2 vocabulary's size given, as
    the dry run reads no tokenizer file)."""
    argv = [*MEGATRON_FIM_TEST, "--dry-run", "--dry-run-world-size", "8", "--vocab-size", "50257"]
    assert pretrain_tst.main(argv) == 0
    assert "layout for a world of 8:" in capsys.readouterr().out


def test_the_fragment_flags_reach_the_transform_through_the_entry_point(data, tmp_path,
                                                                        monkeypatch):  # fmt: skip
    """--fim-split-sample / --fim-fragment-rate / --fim-no-prefix through pretrain_tst.main
    (their defaults, none, are the other runs here): the run trains with them."""
    made: list[FIMTransform] = []
    real = pretrain_tst._fim_transform
    monkeypatch.setattr(pretrain_tst, "_fim_transform",
                        lambda cfg, t: made.append(real(cfg, t)) or made[-1])  # fmt: skip
    args = _run_args(data, str(tmp_path), "f", "--fim-split-sample", "<fim_pad>",
                     "--fim-fragment-rate", "0.5", "--fim-no-prefix", "import ")  # fmt: skip
    args[args.index("--train-iters") + 1] = "2"
    args[args.index("--tst-iters") + 1] = "1"
    records = main_records(args, str(tmp_path / "f.jsonl"))
    assert len([r for r in records if r.get("loss") is not None]) == 2
    fim = made[-1]
    assert (fim.split_token, fim.fragment_rate, fim.no_prefix) == (
        made[-1].tokenizer.token_to_id("<fim_pad>"), 0.5, "import ")  # fmt: skip
