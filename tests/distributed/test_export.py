"""Export to Hugging Face ``transformers`` and generation, on tiny models trained in-process.

Each model is trained for a few steps across the phase switch by ``pretrain_tst.main`` (one
process, gloo), loaded back at TP=1, exported, and loaded with ``transformers`` on CPU. The
oracle is the trainer's own model: ``transformers`` must give the same logits over the real
vocabulary to 1e-4 (fp32; measured ~1e-6). Weights are drawn with ``--init-method-std 0.2``
so that attention scores are far from uniform: with the default 0.02, a RoPE or head-order
mistake moves the logits by only ~3e-4, too close to the tolerance to catch reliably.

MoE routing matches exactly: megatron-core's default (``moe_router_pre_softmax=False``, no
top-k scaling) is a softmax over the top-k router logits, which equals the softmax over all
experts renormalised over the top-k, i.e. Mixtral and Qwen3-MoE with ``norm_topk_prob``.
Qwen3-MoE always has q/k norms, so an MoE model without ``--qk-layernorm`` is exported as
Mixtral; both are tested. What cannot match (shared experts, pre-softmax routing without
q/k norms, ...) is refused by the exporter with an error naming the setting (tested below).

A checkpoint saved at TP=2 (vocabulary padded to 512, not 384) exports to the same weights
as the same run at TP=1, within what two Adam steps at lr 1e-5 can move them apart (5e-5).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers
from data_support import load_tool, make_tokenizers
from flags import SMALL_GPT

import pretrain_tst
from tst.export import (
    ExportError,
    export_loaded,
    hf_architecture,
    load_checkpoint,
    single_process_world,
)

# torch.distributed.checkpoint's deprecation notices, raised inside dist_checkpointing.load.
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning:torch.distributed")

SEQ = 16
TOLERANCE = 1e-4
TINY = [
    "--mock-data", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
    "--group-query-attention", "--num-query-groups", "2", "--swiglu", "--seq-length", str(SEQ),
    "--micro-batch-size", "2",
    "--train-iters", "3", "--tst-bag-size", "2", "--tst-iters", "1", "--lr", "1e-2",
    "--init-method-std", "0.2", "--log-interval", "1", "--eval-interval", "100",
    "--eval-iters", "1", "--peak-tflops", "1", *SMALL_GPT,
]  # fmt: skip
MOE = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "32"]
# A model shape for the configuration-only checks.
SHAPE = [
    "--mock-data", "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
    "--seq-length", "16", "--micro-batch-size", "2", "--train-iters", "2", "--lr", "1e-3",
    *SMALL_GPT,
]  # fmt: skip


def _train(save: str, extra: list[str]) -> str:
    assert pretrain_tst.main([*TINY, *extra, "--save", save]) == 0
    return save


@pytest.fixture(scope="module")
def tokenizer_flags(tmp_path_factory) -> dict[str, list[str]]:
    return make_tokenizers(str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory, tokenizer_flags) -> str:
    """Llama-style: tied embeddings, GQA, SwiGLU; SentencePiece (400 ids, 512 rows)."""
    sp = ["--tokenizer-type", "SentencePieceTokenizer", *tokenizer_flags["SentencePieceTokenizer"]]
    return _train(str(tmp_path_factory.mktemp("dense") / "ckpt"), sp)


def _input_ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, SEQ), generator=torch.Generator().manual_seed(0))


def _export_and_reference(save: str, output: str, vocab: int):
    """Export ``save``; return the trainer model's logits ``[b, L, vocab]`` on fixed ids."""
    ids = _input_ids(vocab)
    with single_process_world() as layout:
        ckpt = load_checkpoint(save, layout)
        positions = torch.arange(SEQ).expand(ids.shape[0], -1)
        with torch.no_grad():
            want = ckpt.model(ids, positions, attention_mask=None)[..., :vocab]
        result = export_loaded(ckpt, output)
    return result, ids, want


def _hf_logits(folder: str, ids: torch.Tensor):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        return model.eval()(ids).logits, model


def test_dense_llama_matches_trainer(dense_run, tmp_path):
    out = str(tmp_path / "hf")
    result, ids, want = _export_and_reference(dense_run, out, 400)
    assert (result.architecture, result.vocab_size, result.padded_vocab_size) == (
        "LlamaForCausalLM",
        400,
        512,
    )
    got, model = _hf_logits(out, ids)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.tie_word_embeddings and model.config.vocab_size == 400
    diff = (got - want).abs().max().item()
    assert got.shape == want.shape and diff < TOLERANCE, diff
    assert want.std() > 0.5  # the logits are far from trivial


def test_sharded_export_replaces_an_earlier_one_and_survives_a_failure(
    dense_run, tmp_path, monkeypatch
):
    """Small shards load in ``transformers``; a re-export replaces the earlier weights but
    keeps the user's other files; an export that fails half-way leaves the folder as it was."""
    import safetensors.torch

    out = str(tmp_path / "hf")
    _, ids, want = _export_and_reference(dense_run, out, 400)  # one model.safetensors
    with open(os.path.join(out, "NOTES.md"), "w") as f:
        f.write("the user's own file")
    real_save, written = safetensors.torch.save_file, []

    def save_file(tensors, path, metadata=None):
        written.append(path)
        if fail_at and len(written) == fail_at:
            raise OSError("disk full (injected)")
        return real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    with single_process_world() as layout:
        ckpt = load_checkpoint(dense_run, layout)
        fail_at = None
        result = export_loaded(ckpt, out, max_shard_bytes=20_000)
        shards = [f for f in result.files if f.endswith(".safetensors")]
        assert len(shards) >= 3, result.files
        written.clear()
        fail_at = 2  # a bf16 re-export dies writing its second shard
        with pytest.raises(OSError, match="injected"):
            export_loaded(ckpt, out, max_shard_bytes=20_000, dtype="bfloat16")
    assert all(os.path.dirname(p) != out for p in written)  # only the staging folder
    files = set(os.listdir(out))
    assert files >= {*shards, "model.safetensors.index.json", "config.json", "NOTES.md"}
    assert "model.safetensors" not in files  # the first export's weights were replaced
    assert not [f for f in os.listdir(tmp_path) if ".partial-" in f]  # staging cleaned up
    on_disk = safetensors.torch.load_file(os.path.join(out, shards[0]))
    assert {t.dtype for t in on_disk.values()} == {torch.float32}  # not the failed bf16 one
    got, _ = _hf_logits(out, ids)  # the complete sharded export loads and matches
    diff = (got - want).abs().max().item()
    assert got.shape == want.shape and diff < TOLERANCE, diff


def test_writer_holds_one_shard_at_a_time(tmp_path, monkeypatch):
    """Views of 'parameters' go in; at each file written only that shard's copies are alive."""
    import weakref

    import safetensors.torch

    from tst.export import mapping, write_safetensors, writer

    weights = torch.randn(64, 256)  # 64 KiB in fp32; 8 views of 8 rows, 4 KiB each in bf16
    views = {f"w{i}": weights[8 * i : 8 * (i + 1)] for i in range(8)}
    alive: list[weakref.ref] = []

    def tracked(tensor, dtype):
        copy = mapping.materialise(tensor, dtype)
        alive.append(weakref.ref(copy))
        return copy

    real_save, live_at_save = safetensors.torch.save_file, []

    def save_file(tensors, path, metadata=None):
        live_at_save.append(sum(1 for ref in alive if ref() is not None))
        return real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(writer, "materialise", tracked)
    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    files = write_safetensors(views, str(tmp_path), 3 * 4096, torch.bfloat16)
    assert len(files) == 4 and files[-1] == "model.safetensors.index.json"  # 3 + 3 + 2 views
    assert live_at_save == [3, 3, 2]  # the earlier shards' copies were already freed
    with open(tmp_path / "model.safetensors.index.json") as f:
        index = json.load(f)
    assert index["metadata"]["total_size"] == 8 * 8 * 256 * 2
    loaded = {}
    for name in files[:-1]:
        loaded.update(safetensors.torch.load_file(str(tmp_path / name)))
    for name, view in views.items():
        assert loaded[name].dtype == torch.bfloat16
        assert torch.equal(loaded[name], view.to(torch.bfloat16))


@pytest.mark.parametrize(
    "name, flags, architecture",
    [
        ("qwen3", ["--qk-layernorm", "--untie-embeddings-and-output-weights"], "Qwen3ForCausalLM"),
        # Zero-centred norm weights: exported as 1 + weight.
        ("qwen3_1p", ["--qk-layernorm", "--apply-layernorm-1p"], "Qwen3ForCausalLM"),
        ("qwen3_moe", [*MOE, "--qk-layernorm"], "Qwen3MoeForCausalLM"),
        ("mixtral", MOE, "MixtralForCausalLM"),
        # The MTP block is left out, and the export says so; the main head is exported.
        ("llama_mtp", ["--mtp-num-layers", "1"], "LlamaForCausalLM"),
    ],
)
def test_variants_match_trainer(tmp_path, name, flags, architecture):
    save = _train(str(tmp_path / "ckpt"), ["--vocab-size", "300", *flags])
    result, ids, want = _export_and_reference(save, str(tmp_path / "hf"), 300)
    assert result.architecture == architecture
    mtp = "--mtp-num-layers" in flags
    assert len(result.left_out) == mtp
    assert not mtp or "multi-token prediction block (1 depth," in result.left_out[0]
    got, model = _hf_logits(str(tmp_path / "hf"), ids)
    assert type(model).__name__ == architecture
    diff = (got - want).abs().max().item()
    assert got.shape == want.shape and diff < TOLERANCE, (name, diff)
    if "--num-experts" in flags:
        assert model.config.num_experts_per_tok == 2
        assert getattr(model.config, "norm_topk_prob", True)


def test_cli_tokenizer_files_and_generate(dense_run, tmp_path, capsys):
    convert = load_tool("convert_to_hf")
    generate = load_tool("generate")
    out = str(tmp_path / "hf")
    convert.main(["--load", dense_run, "--output", out])
    assert "wrote LlamaForCausalLM" in capsys.readouterr().out
    names = set(os.listdir(out))
    assert {"model.safetensors", "config.json", "tokenizer.model", "tst_export.json"} <= names
    with open(os.path.join(out, "tst_export.json")) as f:
        info = json.load(f)
    assert info["tokenizer_type"] == "SentencePieceTokenizer" and info["source"]["iteration"] == 3

    # transformers reads the copied SentencePiece model as the trainer's tokenizer does.
    from tst.data.tokenizers import build_tokenizer

    ours = build_tokenizer("SentencePieceTokenizer", os.path.join(out, "tokenizer.model"))
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    text = "The Congress shall have Power To lay and collect Taxes, 1790."
    assert theirs(text, add_special_tokens=False)["input_ids"] == ours.tokenize(text)
    assert theirs.eos_token_id == ours.eod

    args = ["--prompt", "The Congress", "--max-new-tokens", "6", "--top-k", "20", "--seed", "7"]
    direct = generate.main(["--load", dense_run, *args])
    again = generate.main(["--load", dense_run, *args])
    exported = generate.main(["--load", out, *args])
    assert direct["ids"] == again["ids"] == exported["ids"]
    assert 1 <= len(direct["ids"]) <= 6 and all(0 <= t < 400 for t in direct["ids"])
    assert capsys.readouterr().out.startswith("The Congress")
    greedy = generate.main(["--load", out, "--prompt", "The", "--temperature", "0",
                            "--max-new-tokens", "3", "--seed", "1"])  # fmt: skip
    assert (
        greedy["ids"]
        == generate.main(
            ["--load", out, "--prompt", "The", "--temperature", "0", "--max-new-tokens", "3"]
        )["ids"]
    )


@pytest.mark.parametrize(
    "flags, names",
    [
        (["--position-embedding-type", "learned_absolute"], "--position-embedding-type"),
        (["--normalization", "LayerNorm"], "--normalization LayerNorm"),
        (["--add-qkv-bias"], "linear biases"),
        ([], "--swiglu"),
        ([*MOE, "--moe-shared-expert-intermediate-size", "32"], "--moe-shared-expert"),
        ([*MOE, "--moe-latent-size", "8"], "moe_latent_size=8"),
    ],
)
def test_refuses_what_transformers_cannot_express(flags, names):
    from tst.config import parse_args
    from tst.megatron_config import transformer_config
    from tst.plan import validate

    swiglu = [] if names == "--swiglu" else ["--swiglu"]
    cfg = parse_args([*SHAPE, *swiglu, *flags])
    with single_process_world() as layout:
        config = transformer_config(cfg, validate(cfg, 1, 512), layout)
    with pytest.raises(ExportError, match=names):
        hf_architecture(cfg, config)


def test_router_pre_softmax_needs_qwen3_moe():
    from tst.config import parse_args
    from tst.megatron_config import transformer_config
    from tst.plan import validate

    plain = parse_args([*SHAPE, "--swiglu", *MOE])
    qk = parse_args([*SHAPE, "--swiglu", "--qk-layernorm", *MOE])
    with single_process_world() as layout:
        config = transformer_config(plain, validate(plain, 1, 512), layout)
    config.moe_router_pre_softmax = True  # top-k of the softmax, not renormalised
    with pytest.raises(ExportError, match="moe_router_pre_softmax"):
        hf_architecture(plain, config)
    assert hf_architecture(qk, config) == "Qwen3MoeForCausalLM"


def _train_rank(save: str, extra: list[str]) -> None:
    import torch.distributed as dist

    assert pretrain_tst.main([*TINY, *extra, "--save", save]) == 0
    dist.barrier()


@pytest.mark.slow
def test_tp2_checkpoint_exports_like_tp1(world2, tmp_path):
    from safetensors.torch import load_file

    from tst.export import convert

    slow = ["--vocab-size", "300", "--lr", "1e-5", "--train-iters", "2", "--tst-iters", "1"]
    tp2 = str(tmp_path / "tp2")
    world2.run(_train_rank, tp2, [*slow, "--tensor-model-parallel-size", "2"])
    tp1 = _train(str(tmp_path / "tp1"), slow)
    a = convert(tp2, str(tmp_path / "hf2"))
    b = convert(tp1, str(tmp_path / "hf1"))
    assert (a.padded_vocab_size, b.padded_vocab_size, a.vocab_size) == (512, 384, 300)
    got = load_file(os.path.join(a.output, "model.safetensors"))
    want = load_file(os.path.join(b.output, "model.safetensors"))
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=5e-5, msg=name)


@pytest.mark.parametrize("kind", ["HuggingFaceTokenizer", "GPT2BPETokenizer"])
def test_bpe_tokenizer_files_load_in_transformers(dense_run, tokenizer_flags, tmp_path, kind):
    from tst.config import parse_args
    from tst.export import convert, tokenizer_spec

    cfg = parse_args([*SHAPE, "--tokenizer-type", kind, *tokenizer_flags[kind]])
    out = str(tmp_path / "hf")
    convert(dense_run, out, tokenizer=tokenizer_spec(cfg))  # these weights, another tokenizer
    ours = tokenizer_spec(cfg).build()
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    text = "  Ünïcödé — “quotes”, and\nThe Congress shall have Power, 1790."
    ids = ours.tokenize(text)
    assert theirs(text, add_special_tokens=False)["input_ids"] == ids
    assert theirs.decode(ids) == ours.detokenize(ids) == text
    assert theirs.eos_token_id == ours.eod


def test_tools_have_help(capsys):
    for tool, flag in (("convert_to_hf", "--keep-padded-vocab"), ("generate", "--top-k")):
        with pytest.raises(SystemExit) as exit_info:
            load_tool(tool).get_args(["--help"])
        assert exit_info.value.code == 0 and flag in capsys.readouterr().out
