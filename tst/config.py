"""Run configuration: one small dataclass per concern, and the command line built from them.

Every field is a Megatron-style flag (``num_layers`` is ``--num-layers``); its help text is
declared with the field. Each dataclass checks its own fields in ``__post_init__`` with an
error that names the flag; checks that span several concerns (and the world size) live in
:func:`validate`.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field

from tst.data.tokenizers import TOKENIZER_TYPES

__all__ = [
    "ModelConfig",
    "ParallelConfig",
    "TrainingConfig",
    "DataArgs",
    "TSTConfig",
    "RunConfig",
    "Config",
    "build_parser",
    "parse_args",
    "validate",
]


def _f(default, help: str, choices=None, **kwargs):
    """A dataclass field that carries its command-line help (and choices)."""
    metadata = {"help": help, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass
class ModelConfig:
    num_layers: int = _f(2, "Transformer layers.")
    hidden_size: int = _f(64, "Hidden size.")
    ffn_hidden_size: int | None = _f(
        None,
        "MLP hidden size (default 4 x hidden, or the "
        "SwiGLU-equivalent 8/3 x hidden with --swiglu).",
    )
    num_attention_heads: int = _f(4, "Attention heads.")
    num_query_groups: int | None = _f(None, "Key/value head groups (GQA); default = heads.")
    seq_length: int = _f(
        64,
        "Positions the transformer sees per sample, in both phases; the "
        "superposition phase reads bag_size times more raw tokens.",
    )
    max_position_embeddings: int | None = _f(None, "Maximum positions (default seq-length).")
    position_embedding_type: str = _f(
        "rope", "Position embedding.", choices=["rope", "learned_absolute"]
    )
    rotary_base: int = _f(10000, "RoPE base.")
    normalization: str = _f("RMSNorm", "Normalisation layer.", choices=["RMSNorm", "LayerNorm"])
    swiglu: bool = _f(False, "SwiGLU MLP (gated SiLU).")
    untie_embeddings_and_output_weights: bool = _f(False, "Separate input and output embeddings.")
    qk_layernorm: bool = _f(False, "Normalise queries and keys (Qwen3-style).")
    init_method_std: float = _f(0.02, "Std of the normal weight initialisation.")
    add_bias_linear: bool = _f(False, "Biases in linear layers.")
    num_experts: int | None = _f(None, "MoE experts per layer (omit for a dense model).")
    moe_router_topk: int = _f(2, "Experts each token is routed to.")
    moe_ffn_hidden_size: int | None = _f(None, "Expert MLP hidden size (default ffn-hidden-size).")
    moe_shared_expert_intermediate_size: int | None = _f(None, "Shared-expert MLP hidden size.")
    moe_aux_loss_coeff: float = _f(0.0, "Load-balancing auxiliary loss coefficient.")
    moe_token_dispatcher_type: str = _f(
        "alltoall", "MoE token dispatcher.", choices=["allgather", "alltoall"]
    )
    transformer_impl: str = _f(
        "auto",
        "Layer implementation: Transformer Engine where "
        "importable (auto), or megatron-core's local PyTorch spec.",
        choices=["auto", "local", "transformer_engine"],
    )

    def __post_init__(self):
        for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length"):
            _require(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be >= 1")
        _require(
            self.hidden_size % self.num_attention_heads == 0,
            f"--hidden-size {self.hidden_size} must be divisible by "
            f"--num-attention-heads {self.num_attention_heads}",
        )
        if self.num_query_groups is not None:
            _require(
                self.num_attention_heads % self.num_query_groups == 0,
                "--num-attention-heads must be divisible by --num-query-groups",
            )
        if self.max_position_embeddings is None:
            self.max_position_embeddings = self.seq_length
        _require(
            self.max_position_embeddings >= self.seq_length,
            "--max-position-embeddings must be >= --seq-length",
        )
        if self.num_experts is not None:
            _require(self.num_experts >= 1, "--num-experts must be >= 1")
            _require(
                1 <= self.moe_router_topk <= self.num_experts,
                "--moe-router-topk must be between 1 and --num-experts",
            )

    @property
    def resolved_ffn_hidden_size(self) -> int:
        """``--ffn-hidden-size``, or 4 x hidden (8/3 x hidden rounded up to 64 with SwiGLU)."""
        if self.ffn_hidden_size:
            return self.ffn_hidden_size
        if self.swiglu:
            return -(-8 * self.hidden_size // (3 * 64)) * 64
        return 4 * self.hidden_size


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = _f(1, "Tensor-parallel size (TP).")
    pipeline_model_parallel_size: int = _f(1, "Pipeline-parallel size (PP).")
    num_layers_per_virtual_pipeline_stage: int | None = _f(
        None, "Layers per virtual pipeline stage (interleaved 1F1B)."
    )
    expert_model_parallel_size: int = _f(1, "Expert-parallel size (EP).")
    sequence_parallel: bool = _f(False, "Sequence parallelism in TP regions.")
    use_distributed_optimizer: bool = _f(False, "Shard optimizer state over data parallel.")

    def __post_init__(self):
        for name in (
            "tensor_model_parallel_size",
            "pipeline_model_parallel_size",
            "expert_model_parallel_size",
        ):
            _require(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be >= 1")


@dataclass
class TrainingConfig:
    micro_batch_size: int = _f(4, "Samples per micro-batch per data-parallel rank.")
    global_batch_size: int | None = _f(None, "Samples per optimizer step (default micro x DP).")
    train_iters: int = _f(100, "Optimizer steps in the whole run (both phases).")
    lr: float = _f(1e-3, "Peak learning rate.")
    min_lr: float = _f(0.0, "Final learning rate.")
    lr_decay_style: str = _f(
        "cosine",
        "LR decay after warm-up; one schedule spans both phases.",
        choices=["cosine", "linear", "wsd", "constant"],
    )
    lr_warmup_iters: int = _f(0, "Linear warm-up steps.")
    lr_wsd_decay_iters: int | None = _f(
        None, "Decay steps at the end of a WSD schedule (default 10%% of train-iters)."
    )
    weight_decay: float = _f(0.1, "AdamW weight decay.")
    adam_beta1: float = _f(0.9, "Adam beta1.")
    adam_beta2: float = _f(0.95, "Adam beta2.")
    adam_eps: float = _f(1e-8, "Adam epsilon.")
    clip_grad: float = _f(1.0, "Gradient-norm clipping (0 = off).")
    seed: int = _f(1234, "Random seed (weights, data order, dropout).")
    bf16: bool = _f(False, "bf16 parameters and compute (fp32 master weights).")
    fp8_format: str | None = _f(None, "FP8 through Transformer Engine.", choices=["e4m3", "hybrid"])
    fp8_recipe: str = _f(
        "delayed",
        "Transformer Engine FP8 recipe.",
        choices=["delayed", "tensorwise", "mxfp8", "blockwise"],
    )
    max_skipped_steps: int = _f(5, "Consecutive non-finite steps before the run stops.")

    def __post_init__(self):
        _require(self.micro_batch_size >= 1, "--micro-batch-size must be >= 1")
        _require(self.train_iters >= 1, "--train-iters must be >= 1")
        _require(
            self.lr > 0 and self.min_lr >= 0 and self.min_lr <= self.lr,
            "need --lr > 0 and 0 <= --min-lr <= --lr",
        )
        _require(
            0 <= self.lr_warmup_iters <= self.train_iters,
            "--lr-warmup-iters must be between 0 and --train-iters",
        )
        if self.lr_wsd_decay_iters is None:
            self.lr_wsd_decay_iters = max(1, self.train_iters // 10)


@dataclass
class DataArgs:
    data_path: list[str] = _f(
        [],
        "Dataset prefixes, optionally weighted: "
        "'0.7 corpusA_text_document 0.3 corpusB_text_document'.",
    )
    split: str = _f("969,30,1", "Train/valid/test split of each prefix.")
    mock_data: bool = _f(False, "Synthetic data (no --data-path needed).")
    tokenizer_type: str = _f(
        "NullTokenizer",
        "Tokenizer.",
        choices=TOKENIZER_TYPES,
    )
    tokenizer_model: str | None = _f(None, "Tokenizer model file (.model / tokenizer.json).")
    vocab_file: str | None = _f(None, "GPT-2 BPE vocab.json.")
    merge_file: str | None = _f(None, "GPT-2 BPE merges.txt.")
    vocab_size: int | None = _f(None, "Vocabulary size (default: the tokenizer's).")
    make_vocab_size_divisible_by: int = _f(
        128,
        "Pad the vocabulary to a multiple of this value x TP (even shards, aligned GEMMs). "
        "A checkpoint resumes at another TP only if the padded size stays the same.",
    )
    data_cache_path: str | None = _f(None, "Where dataset sample indices are cached.")
    pad_documents_to_bag: bool = _f(
        False,
        "Pad each document with EOD to a multiple of the bag "
        "size so bags never straddle documents.",
    )

    def __post_init__(self):
        _require(
            self.mock_data or bool(self.data_path),
            "give --data-path PREFIX [...] (or --mock-data for synthetic data)",
        )


@dataclass
class TSTConfig:
    tst_bag_size: int = _f(1, "Tokens per bag in the superposition phase (1 = plain training).")
    tst_fraction: float | None = _f(
        None, "Share of --train-iters in the superposition phase (the paper: 0.2-0.4; default 0.3)."
    )
    tst_iters: int | None = _f(None, "Superposition-phase steps (instead of --tst-fraction).")
    tst_mode: str = _f(
        "full",
        "Superpose inputs and outputs (full), or one side only.",
        choices=["full", "input-only", "output-only"],
    )
    tst_loss: str = _f(
        "mce",
        "Superposition loss: multi-hot CE, or -log sum p (mce-alt).",
        choices=["mce", "mce-alt"],
    )
    tst_slot_weights: str = _f(
        "uniform", "Target-slot weights (power = 1/i).", choices=["uniform", "power"]
    )
    tst_layout: str = _f(
        "full",
        "Sample layout: full target bags (bag*(L+1) tokens) or the "
        "paper's bag*L+1 tokens with one target at the end.",
        choices=["full", "paper"],
    )
    tst_reinit_embeddings_at_switch: bool = _f(
        False,
        "Control (the paper's ablation): re-initialise the input embeddings and the output "
        "layer to their initial values at the phase switch.",
    )
    tst_reset_optimizer_at_switch: bool = _f(
        False, "Control: zero Adam's moments and step count at the phase switch."
    )

    def __post_init__(self):
        _require(1 <= self.tst_bag_size <= 64, "--tst-bag-size must be between 1 and 64")
        _require(
            self.tst_bag_size > 1
            or not (self.tst_reinit_embeddings_at_switch or self.tst_reset_optimizer_at_switch),
            "--tst-reinit-embeddings-at-switch and --tst-reset-optimizer-at-switch need "
            "--tst-bag-size > 1 (with bag size 1 there is no switch)",
        )
        _require(
            self.tst_fraction is None or self.tst_iters is None,
            "give --tst-fraction or --tst-iters, not both",
        )
        if self.tst_fraction is not None:
            _require(
                0.0 <= self.tst_fraction < 1.0,
                f"--tst-fraction must be in [0, 1), got {self.tst_fraction} "
                "(1.0 leaves no recovery phase; the paper shows that fails)",
            )
        if self.tst_iters is not None:
            _require(self.tst_iters >= 0, "--tst-iters must be >= 0")


@dataclass
class RunConfig:
    save: str | None = _f(None, "Checkpoint directory.")
    load: str | None = _f(None, "Resume from the latest complete checkpoint here.")
    save_interval: int | None = _f(None, "Save every N steps (and at the end).")
    eval_interval: int = _f(100, "Evaluate next-token loss every N steps.")
    eval_iters: int = _f(4, "Batches per evaluation.")
    log_interval: int = _f(10, "Log every N steps.")
    tensorboard_dir: str | None = _f(None, "TensorBoard log directory.")
    metrics_file: str | None = _f(None, "JSON-lines metrics file.")
    exit_interval: int | None = _f(None, "Save and exit when the step is a multiple of N.")
    exit_duration_in_mins: float | None = _f(None, "Save and exit after this many minutes.")
    peak_tflops: float | None = _f(
        None,
        "Per-device peak TFLOP/s for MFU (default: 989 on CUDA, a measured fp32 GEMM rate on CPU).",
    )
    dry_run: bool = _f(
        False,
        "Build the model on the meta device, print parameter counts and "
        "the per-rank layout, and exit.",
    )
    dry_run_world_size: int | None = _f(
        None,
        "Processes (GPUs) the --dry-run lays the model out on "
        "(default: the smallest world that fits TP x PP x EP).",
    )

    def __post_init__(self):
        for name in ("eval_interval", "eval_iters", "log_interval"):
            _require(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be >= 1")
        _require(
            self.dry_run_world_size is None or self.dry_run_world_size >= 1,
            "--dry-run-world-size must be >= 1",
        )


@dataclass
class Config:
    model: ModelConfig
    parallel: ParallelConfig
    training: TrainingConfig
    data: DataArgs
    tst: TSTConfig
    run: RunConfig

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_SECTIONS = {
    "model": ModelConfig,
    "parallel": ParallelConfig,
    "training": TrainingConfig,
    "data": DataArgs,
    "tst": TSTConfig,
    "run": RunConfig,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pretrain_tst.py",
        description="Token Superposition Training of megatron-core GPT / MoE models.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for section, cls in _SECTIONS.items():
        group = parser.add_argument_group(section)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            kind = hints[f.name]
            args = typing.get_args(kind)
            base = next((a for a in args if a is not type(None)), kind) if args else kind
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            kwargs = dict(dest=f"{section}.{f.name}", help=f.metadata["help"], default=default)
            if base is bool:
                group.add_argument(flag, action="store_true", **kwargs)
                continue
            if typing.get_origin(kind) is list or typing.get_origin(base) is list:
                kwargs["nargs"] = "+"
                base = str
            if f.metadata["choices"]:
                kwargs["choices"] = f.metadata["choices"]
            else:
                kwargs["metavar"] = f.name.upper()  # not the "section.name" destination
            group.add_argument(flag, type=base, **kwargs)
    return parser


def parse_args(argv=None) -> Config:
    """Parse the command line into a :class:`Config` (field checks run; see :func:`validate`)."""
    namespace = build_parser().parse_args(argv)
    values: dict[str, dict] = {section: {} for section in _SECTIONS}
    for key, value in vars(namespace).items():
        section, name = key.split(".", 1)
        values[section][name] = value
    return Config(**{section: cls(**values[section]) for section, cls in _SECTIONS.items()})


def validate(cfg: Config, world_size: int, vocab_size: int) -> dict:
    """Checks across concerns; returns derived values (dp, num_microbatches, vpp, padded vocab)."""
    m, p, t, tst = cfg.model, cfg.parallel, cfg.training, cfg.tst
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    _require(
        world_size % (tp * pp) == 0,
        f"world size {world_size} is not divisible by TP x PP = {tp * pp}",
    )
    dp = world_size // (tp * pp)
    _require(
        m.num_attention_heads % tp == 0,
        f"--num-attention-heads {m.num_attention_heads} is not divisible by "
        f"--tensor-model-parallel-size {tp}",
    )
    groups = m.num_query_groups or m.num_attention_heads
    _require(groups % tp == 0, f"--num-query-groups {groups} is not divisible by TP={tp}")
    _require(
        m.num_layers % pp == 0,
        f"--num-layers {m.num_layers} is not divisible by --pipeline-model-parallel-size {pp}",
    )
    vpp = None
    if p.num_layers_per_virtual_pipeline_stage is not None:
        per_stage = m.num_layers // pp
        _require(pp > 1, "virtual pipeline stages need --pipeline-model-parallel-size > 1")
        _require(
            per_stage % p.num_layers_per_virtual_pipeline_stage == 0,
            "--num-layers / PP must be divisible by --num-layers-per-virtual-pipeline-stage",
        )
        vpp = per_stage // p.num_layers_per_virtual_pipeline_stage
        vpp = vpp if vpp > 1 else None
    if p.sequence_parallel:
        _require(tp > 1, "--sequence-parallel needs --tensor-model-parallel-size > 1")
        _require(
            m.seq_length % tp == 0, "--seq-length must be divisible by TP with --sequence-parallel"
        )
    if m.num_experts is not None:
        _require(
            m.num_experts % p.expert_model_parallel_size == 0,
            "--num-experts must be divisible by --expert-model-parallel-size",
        )
        _require(
            (dp * tp) % p.expert_model_parallel_size == 0,
            "--expert-model-parallel-size must divide DP x TP",
        )
    else:
        _require(
            p.expert_model_parallel_size == 1,
            "--expert-model-parallel-size > 1 needs --num-experts",
        )
    gbs = t.global_batch_size or t.micro_batch_size * dp
    _require(
        gbs % (t.micro_batch_size * dp) == 0,
        f"--global-batch-size {gbs} is not divisible by --micro-batch-size "
        f"{t.micro_batch_size} x data-parallel size {dp}",
    )
    num_micro = gbs // (t.micro_batch_size * dp)
    if vpp:
        _require(
            num_micro % pp == 0,
            "interleaved pipelining needs the number of "
            f"micro-batches ({num_micro}) to be a multiple of PP={pp}",
        )
    if tst.tst_iters is not None:
        _require(tst.tst_iters <= t.train_iters, "--tst-iters must be <= --train-iters")
    _require(vocab_size >= 1, "vocabulary size must be >= 1")
    divisible_by = cfg.data.make_vocab_size_divisible_by
    _require(
        divisible_by >= 1,
        f"--make-vocab-size-divisible-by must be >= 1, got {divisible_by}",
    )
    # Megatron's rule: pad to a multiple of --make-vocab-size-divisible-by x TP.
    multiple = divisible_by * tp
    padded = -(-vocab_size // multiple) * multiple
    if t.fp8_format is not None:
        _require(
            m.transformer_impl != "local",
            "FP8 needs Transformer Engine: drop --fp8-format or use "
            "--transformer-impl transformer_engine",
        )
    return dict(
        dp=dp, vpp=vpp, global_batch_size=gbs, num_microbatches=num_micro, padded_vocab_size=padded
    )
