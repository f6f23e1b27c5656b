"""--reset-position-ids / --reset-attention-mask (Megatron-LM's flags): documents packed in a
row are read as if each had the row to itself.

Megatron-LM's GPT dataset (``_get_ltor_masks_and_position_ids``) starts a new document after
each EOD of the input: its positions count from 0 again and it attends to no earlier token.
Here the same rule holds per bag in a bag phase (a new document starts after each bag that
holds an EOD). Checked against megatron-core's own function (next-token rows), against a
per-bag reference written here, and at the model: a row of two packed documents gives each
document's logits as the document alone does (fp32, rel 1e-5 / abs 1e-5), for megatron-core's
unfused attention, the fused (SDPA) one and the arbitrary-mask build Transformer Engine gets;
then through pretrain_tst.main (every batch in both phases and evaluation) and the rules.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from flags import one_rank_gpt

from tst.data.batch import document_positions_and_mask

from gpt_helpers import one_rank_layout

EOD, VOCAB, L = 0, 64, 8
LEARNED = [*one_rank_gpt(VOCAB, L, 2, layers=2), "--position-embedding-type", "learned_absolute"]
DOCS = ["--reset-position-ids", "--reset-attention-mask"]


def _per_bag_reference(row: list[int], bag: int) -> tuple[list[int], list[list[bool]]]:
    """Positions and mask (True = masked) of one row, by walking its bags."""
    positions, docs, doc, pos = [], [], 0, 0
    for j in range(len(row) // bag):
        positions.append(pos)
        docs.append(doc)
        pos += 1
        if EOD in row[j * bag:(j + 1) * bag]:  # fmt: skip
            doc, pos = doc + 1, 0
    n = len(positions)
    mask = [[k > q or docs[k] != docs[q] for k in range(n)] for q in range(n)]
    return positions, mask


def test_next_token_rows_match_megatron_cores_own_rule():
    from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids

    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 4, (64, 12), generator=gen)  # EOD (0) one token in four
    rows[0] = EOD  # every token an EOD
    rows[1] = 1  # none
    positions, mask = document_positions_and_mask(rows, 1, EOD, True, True)
    assert positions.shape == (64, 12) and mask.shape == (64, 1, 12, 12)
    for r, row in enumerate(rows):
        want_mask, _, want_positions = _get_ltor_masks_and_position_ids(
            row, EOD, True, True, False, True
        )
        assert torch.equal(positions[r], want_positions), r
        assert torch.equal(mask[r], want_mask), r
    # Each flag alone: the other output is the plain one.
    only_positions, none = document_positions_and_mask(rows, 1, EOD, True, False)
    assert none is None and torch.equal(only_positions, positions)
    plain, only_mask = document_positions_and_mask(rows, 1, EOD, False, True)
    assert torch.equal(plain, torch.arange(12).expand(64, -1)) and torch.equal(only_mask, mask)


@pytest.mark.parametrize("bag", [2, 3])
def test_bags_start_a_document_after_each_bag_holding_an_eod(bag):
    gen = torch.Generator().manual_seed(bag)
    rows = torch.randint(1, 9, (16, bag * 6), generator=gen)
    rows[rows > 6] = EOD
    rows[:2] = 5
    rows[1, [1, bag * 2 - 1, bag * 2]] = EOD  # mid-bag, the end of a bag, the next bag's start
    positions, mask = document_positions_and_mask(rows, bag, EOD, True, True)
    for r, row in enumerate(rows.tolist()):
        want_positions, want_mask = _per_bag_reference(row, bag)
        assert positions[r].tolist() == want_positions, (r, row)
        assert mask[r, 0].tolist() == want_mask, (r, row)
    assert positions[0].tolist() == list(range(6))  # no EOD: one document
    assert positions[1].tolist() == [0, 0, 0, 0, 1, 2]
    with pytest.raises(ValueError, match="do not fold into bags of"):
        document_positions_and_mask(rows[:, :-1], bag, EOD, True, True)


def _model(layout, extra=(), arbitrary=False):
    """pretrain_tst.py's model for LEARNED + extra; ``arbitrary``: built as under
    Transformer Engine with --reset-attention-mask (an arbitrary mask type)."""
    from tst.config import parse_args
    from tst.megatron_config import transformer_config
    from tst.model import ModelShape, build_gpt
    from tst.plan import validate

    cfg = parse_args([*LEARNED, *extra])
    plan = validate(cfg, 1, VOCAB)
    config = transformer_config(cfg, plan, layout)
    shape = ModelShape.from_config(cfg.model, plan.padded_vocab_size, False)
    shape = dataclasses.replace(shape, arbitrary_attention_mask=arbitrary)
    torch.manual_seed(0)
    return build_gpt(config, shape).eval()


def _two_documents(bag: int, first: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A row of L bags: document A (``first`` bags, its last token an EOD), then B."""
    gen = torch.Generator().manual_seed(bag * 10 + first)
    row = torch.randint(1, VOCAB, (1, L * bag), generator=gen)
    row[0, first * bag - 1] = EOD
    return row, row[:, first * bag:]  # fmt: skip


@pytest.mark.parametrize("bag", [1, 2])
@pytest.mark.parametrize("attention", ["unfused", "flash", "arbitrary", "rope"])
def test_packed_documents_read_as_each_document_alone(bag, attention):
    """``rope``: rotary positions are relative, so the mask alone keeps documents apart (the
    position ids reach no rotary embedding)."""
    from tst.export.loading import single_process_world

    extra = ["--attention-backend", "flash" if attention == "flash" else "unfused"]
    if attention == "rope":
        extra += ["--position-embedding-type", "rope"]
    first = 3
    with single_process_world() as layout, torch.no_grad():
        model = _model(layout, extra, arbitrary=attention == "arbitrary")
        model.embedding.bag_size = bag
        row, second = _two_documents(bag, first)
        positions, mask = document_positions_and_mask(row, bag, EOD, True, True)
        assert positions.tolist() == [[0, 1, 2, 0, 1, 2, 3, 4]]
        if attention == "rope":
            positions = torch.arange(L)[None]
        packed = model(row, positions, mask)  # logits [1, L, V]
        alone = model(second, torch.arange(L - first)[None], None)
        torch.testing.assert_close(packed[:, first:], alone, rtol=1e-5, atol=1e-5)
        # Without the flags the second document reads the first (the check can fail).
        across = model(row, torch.arange(L)[None], None)
        assert (across[:, first:] - alone).abs().max() > 1e-2
        torch.testing.assert_close(across[:, :first], packed[:, :first], rtol=1e-5, atol=1e-5)


def test_the_arbitrary_mask_build_attends_causally_without_a_mask():
    """The model built for Transformer Engine's arbitrary mask type fills in the causal mask
    for a forward given none (evaluation tools, generation): the same logits as the causal
    build, which megatron-core's attention would otherwise compute without any mask."""
    from megatron.core.transformer.enums import AttnMaskType

    from tst.export.loading import single_process_world

    row, _ = _two_documents(1, 3)
    with single_process_world() as layout, torch.no_grad():
        causal = _model(layout)(row, torch.arange(L)[None], None)
        model = _model(layout, arbitrary=True)
        types = {layer.self_attention.attn_mask_type for layer in model.decoder.layers}
        assert types == {AttnMaskType.arbitrary}
        torch.testing.assert_close(model(row, torch.arange(L)[None], None), causal)
        model.arbitrary_attention_mask = False  # what the fill-in prevents: no mask at all
        assert (model(row, torch.arange(L)[None], None) - causal).abs().max() > 1e-2


def test_through_pretrain_tst_in_both_phases_and_evaluation(monkeypatch, tmp_path):
    """The flags reach every forward the trainer runs (bag positions in the superposition
    phase, tokens in recovery and evaluation) with the tokenizer's EOD, and change the run;
    by default no mask is passed and positions run along the row."""
    import json
    import sys
    from pathlib import Path

    import pretrain_tst
    from tst import model as model_module

    sys.path.insert(0, str(Path(__file__).parents[2] / "bench"))
    import fault_injection

    from tst.data.tokenizers import NullTokenizer

    eod = NullTokenizer(512).eod  # --mock-data's tokenizer
    seen = []
    real = model_module.TSTGPTModel.forward

    def spy(self, input_ids, position_ids, attention_mask, *args, **kwargs):
        bag = input_ids.shape[1] // position_ids.shape[1]
        want_positions, want_mask = document_positions_and_mask(input_ids, bag, eod, True, True)
        seen.append((self.training, bag, attention_mask is not None,
                     torch.equal(position_ids, want_positions),
                     attention_mask is None or torch.equal(attention_mask, want_mask),
                     bool((input_ids == eod).any())))  # fmt: skip
        return real(self, input_ids, position_ids, attention_mask, *args, **kwargs)

    monkeypatch.setattr(model_module.TSTGPTModel, "forward", spy)
    argv = [*fault_injection.ARGS, "--train-iters", "8", "--eval-interval", "4",
            "--save-interval", "100", "--position-embedding-type", "learned_absolute"]  # fmt: skip
    losses = {}
    for flags in ([], ["--reset-position-ids", "--reset-attention-mask"]):
        seen.clear()
        metrics = str(tmp_path / f"doc_{bool(flags)}.jsonl")
        assert pretrain_tst.main([*argv, *flags, "--metrics-file", metrics]) == 0
        with open(metrics) as f:
            losses[bool(flags)] = [r["loss"] for r in map(json.loads, f) if r.get("loss")]
        assert {(training, bag) for training, bag, *_ in seen} == {(True, 3), (True, 1),
                                                                   (False, 1)}  # fmt: skip
        assert any(eod for *_, eod in seen)  # the mock documents' EODs were read
        if flags:
            assert all(has_mask and same_pos and same_mask
                       for _, _, has_mask, same_pos, same_mask, _ in seen)  # fmt: skip
        else:
            assert not any(has_mask for _, _, has_mask, *_ in seen)
            # Positions along the row: they differ from the document ones where an EOD is.
            assert all(same_pos or eod for _, _, _, same_pos, _, eod in seen)
            assert not all(same_pos for _, _, _, same_pos, *_ in seen)
    assert losses[True] != losses[False]


def test_the_dry_run_says_so(capsys):
    import pretrain_tst

    assert pretrain_tst.main([*LEARNED, "--dry-run"]) == 0
    plain = capsys.readouterr().out
    assert pretrain_tst.main([*LEARNED, *DOCS, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "within each document" not in plain and "restarting at each document" not in plain
    assert "positions learned absolute, restarting at each document (--reset-position-ids)" in out
    assert "attention softmax, within each document (--reset-attention-mask)" in out


def test_the_dry_run_counts_the_mask_per_micro_batch_in_flight(tmp_path):
    """The activation column of each stage gains micro-batch x L x L bytes (booleans) per
    micro-batch in flight: at PP 2, 2 on stage 0 and 1 on stage 1 at the 1F1B peak."""
    import contextlib
    import io
    import json

    import pretrain_tst

    argv = [*LEARNED, "--dry-run", "--dry-run-world-size", "2", "--pipeline-model-parallel-size",
            "2", "--num-layers", "4", "--global-batch-size", "8"]  # fmt: skip

    def activations(*extra):
        report = str(tmp_path / "report.json")
        with contextlib.redirect_stdout(io.StringIO()) as out:
            assert pretrain_tst.main([*argv, *extra, "--dry-run-report", report]) == 0
        with open(report) as f:
            stages = json.load(f)["stages"]
        return [stage["bytes"]["activations"] for stage in stages], out.getvalue()

    (plain0, plain1), text = activations()
    (mask0, mask1), masked_text = activations("--reset-attention-mask")
    per_micro_batch = 2 * L * L  # micro-batch 2, L 8
    assert (mask0 - plain0, mask1 - plain1) == (2 * per_micro_batch, per_micro_batch)
    assert "document mask per micro-batch in flight" in masked_text
    assert "document mask" not in text
    # Under CP 2 (the default world now TP x PP x CP = 4) a rank keeps the rows of its
    # queries: half the mask.
    at = argv.index("--dry-run-world-size")
    del argv[at : at + 2]
    (cp0, _), _ = activations("--context-parallel-size", "2")
    (cpm0, _), cp_text = activations("--context-parallel-size", "2", "--reset-attention-mask")
    assert cpm0 - cp0 == 2 * per_micro_batch // 2 and "CP=2" in cp_text


def _validate(*extra, world=1):
    from tst.config import parse_args
    from tst.plan import validate

    cfg = parse_args([*LEARNED, *extra])
    return cfg, validate(cfg, world, VOCAB)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--no-create-attention-mask-in-dataloader"],
         r"--reset-attention-mask with --no-create-attention-mask-in-dataloader: Megatron-LM "
         r"then builds no mask"),
        (["--context-parallel-size", "2", "--transformer-impl", "transformer_engine"],
         r"with context parallelism \(CP 2\) under Transformer Engine: its CP attention takes "
         r"no arbitrary mask; drop one, or use the local spec"),
        (["--window-size", "4,0"], r"with --window-size: megatron-core's sliding-window"),
        (["--transformer-impl", "transformer_engine", "--attention-backend", "flash"],
         r"under Transformer Engine: TE's flash attention takes no arbitrary mask"),
    ],
)  # fmt: skip
def test_what_cannot_keep_documents_apart_is_refused_in_one_line(extra, message):
    from tst.errors import ConfigError

    world = 2 if "--context-parallel-size" in extra else 1
    with pytest.raises(ConfigError) as caught:
        _validate("--reset-attention-mask", *extra, world=world)
    assert re.search(message, str(caught.value)) and "\n" not in str(caught.value)
    _validate(*extra, world=world) if "--transformer-impl" not in extra else None


def test_te_flash_is_refused_once_auto_resolves_to_transformer_engine(monkeypatch):
    """--transformer-impl auto on a GPU with TE importable resolves to TE at start: its
    flash attention with the document mask is refused there, before any model is built."""
    import tst.megatron_config
    from tst.errors import ConfigError
    from tst.megatron_config import transformer_config

    monkeypatch.setattr(tst.megatron_config, "use_transformer_engine", lambda cfg, layout: True)
    cuda = one_rank_layout("cuda")
    cfg, plan = _validate("--reset-attention-mask", "--attention-backend", "flash")  # auto
    with pytest.raises(ConfigError, match=r"flash under Transformer Engine: TE's flash"):
        transformer_config(cfg, plan, cuda)


def test_rotary_positions_are_warned_and_the_gpu_fused_softmax_turned_off(monkeypatch):
    import tst.megatron_config
    from tst.megatron_config import transformer_config

    with pytest.warns(UserWarning, match=r"--reset-position-ids with --position-embedding-"
                      r"type rope: .* changes nothing"):  # fmt: skip
        _validate("--reset-position-ids", "--position-embedding-type", "rope")
    # On a GPU without Transformer Engine, megatron-core's fused causal softmax would ignore
    # the mask: turned off with a warning (the flag that turns it off silences it).
    monkeypatch.setattr(tst.megatron_config, "megatron_softmax_kernels_available", lambda: True)
    cuda = one_rank_layout("cuda")
    unfused = ["--attention-backend", "unfused"]
    with pytest.warns(UserWarning, match=r"--masked-softmax-fusion.*ignores "
                      r"--reset-attention-mask's document mask"):  # fmt: skip
        config = transformer_config(*_validate("--reset-attention-mask", *unfused), cuda,
                                    check_device=False)  # fmt: skip
    assert not config.masked_softmax_fusion
    assert transformer_config(*_validate(*unfused), cuda, check_device=False).masked_softmax_fusion
