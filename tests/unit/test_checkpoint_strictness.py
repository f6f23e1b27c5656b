"""--dist-ckpt-strictness (Megatron-LM's choices and default) through pretrain_tst.main.

A tied-embedding checkpoint loaded into an untied model lacks ``output_layer.weight``
("unexpected" in megatron-core's terms); an untied checkpoint loaded into a tied model holds
one the model does not use ("missing"). The default refuses the first with one line naming
the tensor and the fix, and ignores the second; log_unexpected loads the rest and keeps the
output layer at its initial value (checked against the checkpoint's tensors and against a
fresh run's initial weights, exactly); the *_all choices list or refuse the second. The
two-rank pipeline case (the output layer on the last stage only) is in
tests/distributed/test_checkpoint_moe_flags.py.
"""

from __future__ import annotations

import pytest
import torch
from flags import SMALL_GPT

import pretrain_tst
from tst.checkpointing import CheckpointError, checkpoint_path

BASE = [
    "--mock-data", "--vocab-size", "384", "--num-layers", "2", "--hidden-size", "32",
    "--num-attention-heads", "4", "--seq-length", "8", "--micro-batch-size", "2",
    "--global-batch-size", "4", "--train-iters", "4", "--tst-bag-size", "2", "--tst-iters", "2",
    "--lr", "1e-2", "--log-interval", "1", "--eval-iters", "0", "--num-workers", "0",
    *SMALL_GPT,
]  # fmt: skip
UNTIE = "--untie-embeddings-and-output-weights"


def _weights_at_start(argv: list[str]) -> dict[str, torch.Tensor]:
    """Run pretrain_tst.main; return the model's weights as the first step found them."""
    from tst.trainer import Trainer

    original, seen = Trainer.train, {}

    def train(self):
        for chunk in self.raw_chunks:
            seen.update({k: v.detach().clone() for k, v in chunk.state_dict().items()
                         if isinstance(v, torch.Tensor)})  # fmt: skip
        return original(self)

    Trainer.train = train
    try:
        assert pretrain_tst.main(argv) == 0
    finally:
        Trainer.train = original
    return seen


def _saved(root: str, tmp_path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, read with torch's own DCP reader (no megatron-core)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    plain = tmp_path / "plain.pt"
    dcp_to_torch_save(checkpoint_path(root), plain)
    return {k: v for k, v in torch.load(plain).items() if isinstance(v, torch.Tensor)}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("strict")
    tied, untied = str(folder / "tied"), str(folder / "untied")
    assert pretrain_tst.main(BASE + ["--save", tied]) == 0
    assert pretrain_tst.main(BASE + ["--save", untied, UNTIE]) == 0
    return tied, untied


def test_a_tensor_the_checkpoint_lacks(checkpoints, capsys, tmp_path):
    tied, _ = checkpoints
    # The default (and raise_*): refused before anything is read, naming tensor and fix.
    for extra in ([], ["--dist-ckpt-strictness", "raise_unexpected"],
                  ["--dist-ckpt-strictness", "raise_all"]):  # fmt: skip
        with pytest.raises(CheckpointError) as error:
            pretrain_tst.main(BASE + ["--load", tied, UNTIE, "--finetune", *extra])
        message = str(error.value)
        assert "lacks 1 tensor of this model (output_layer.weight)" in message, message
        assert "--dist-ckpt-strictness log_unexpected with --finetune or --no-load-optim" in (
            message)  # fmt: skip
    # Let through, the saved optimizer state cannot cover the new tensor: refused.
    with pytest.raises(CheckpointError, match="add --no-load-optim \\(or --finetune\\)"):
        pretrain_tst.main(BASE + ["--load", tied, UNTIE, "--dist-ckpt-strictness",
                                  "log_unexpected"])  # fmt: skip
    capsys.readouterr()
    fresh = _weights_at_start(BASE + [UNTIE])
    saved = _saved(tied, tmp_path)
    for mode in ("log_unexpected", "return_all", "ignore_all"):
        got = _weights_at_start(BASE + ["--load", tied, UNTIE, "--finetune",
                                        "--dist-ckpt-strictness", mode])  # fmt: skip
        out = capsys.readouterr().out
        listed = "1 tensor of this model not in" in out and "output_layer.weight" in out
        assert listed == (mode != "ignore_all"), (mode, out)
        # The output layer is the fresh model's initial one; everything else is the saved.
        assert torch.equal(got["output_layer.weight"], fresh["output_layer.weight"]), mode
        assert not torch.equal(
            got["output_layer.weight"], saved["embedding.word_embeddings.weight"]
        )
        for key in ("embedding.word_embeddings.weight", "decoder.final_layernorm.weight"):
            assert torch.equal(got[key], saved[key]), (mode, key)
        layer = saved["decoder.layers.self_attention.linear_qkv.weight"]
        assert torch.equal(got["decoder.layers.1.self_attention.linear_qkv.weight"], layer[1])


def test_a_tensor_the_model_does_not_use(checkpoints, capsys, tmp_path):
    _, untied = checkpoints
    saved = _saved(untied, tmp_path)
    capsys.readouterr()
    # The default ignores it, silently (megatron-core's and Megatron-LM's behaviour); log_all
    # lists it; neither lists the optimizer state a weights-only load leaves unread.
    for mode, listed in (("assume_ok_unexpected", False), ("log_unexpected", False),
                         ("log_all", True), ("return_all", True)):  # fmt: skip
        got = _weights_at_start(BASE + ["--load", untied, "--finetune",
                                        "--dist-ckpt-strictness", mode])  # fmt: skip
        out = capsys.readouterr().out
        line = [s for s in out.splitlines() if "not used by this model" in s]
        assert bool(line) == listed, (mode, out)
        if listed:
            assert line[0].endswith(
                "1 tensor of "
                + checkpoint_path(untied)
                + " not used by this model: output_layer.weight"
            ), line
        assert torch.equal(got["embedding.word_embeddings.weight"],
                           saved["embedding.word_embeddings.weight"])  # fmt: skip
        assert "output_layer.weight" not in got
    with pytest.raises(CheckpointError) as error:
        pretrain_tst.main(BASE + ["--load", untied, "--finetune", "--dist-ckpt-strictness",
                                  "raise_all"])  # fmt: skip
    assert "holds 1 tensor this model does not use (output_layer.weight)" in str(error.value)
    assert "--dist-ckpt-strictness log_all" in str(error.value)


def test_a_matching_checkpoint_resumes_the_same_under_every_choice(tmp_path):
    """No mismatch: every choice resumes exactly as the default (the 125 Megatron-LM
    functional configs that pass log_all are resume tests)."""
    import json

    ckpt = str(tmp_path / "ckpt")
    six = BASE + [UNTIE, "--train-iters", "6"]
    assert pretrain_tst.main(six + ["--save", ckpt, "--exit-interval", "4"]) == 0
    runs = {}
    for mode in ("assume_ok_unexpected", "log_all", "raise_all", "ignore_all"):
        metrics = tmp_path / f"{mode}.jsonl"
        argv = six + ["--load", ckpt, "--metrics-file", str(metrics), "--dist-ckpt-strictness",
                      mode]  # fmt: skip
        assert pretrain_tst.main(argv) == 0
        records = [json.loads(line) for line in metrics.read_text().splitlines()]
        runs[mode] = [(r["iteration"], r["loss"]) for r in records if r.get("loss") is not None]
    assert [i for i, _ in runs["assume_ok_unexpected"]] == [5, 6]
    assert all(run == runs["assume_ok_unexpected"] for run in runs.values()), runs
