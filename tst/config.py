"""Run configuration: one small dataclass per concern, and the command line built from them.

Every field is a Megatron-LM flag with Megatron-LM's name, meaning and default
(``num_layers`` is ``--num-layers``; a few take Megatron's own spelling, e.g.
``add_bias_linear`` is ``--disable-bias-linear``); its help text is declared with the field.
Each dataclass checks its own fields in ``__post_init__`` with an error that names the flag;
checks that span several concerns (and the world size) live in :func:`tst.plan.validate`.
Megatron-LM flags that change nothing here, or cannot run here, are listed in
:mod:`tst.megatron_flags`: accepted with the reason, or refused with one line.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import math
import os
import sys
import typing
import warnings
from dataclasses import dataclass

from tst.config_fields import _f, _require
from tst.config_fim import FIMConfig
from tst.config_mla import MLAConfig
from tst.config_moe import MoEConfig, parse_layer_freq
from tst.config_mtp import MTPConfig
from tst.config_mup import MuPConfig
from tst.config_rerun import RerunConfig
from tst.data.tokenizers import (
    LEGACY_SENTENCEPIECE_REFUSED,
    TIKTOKEN_NUM_SPECIAL,
    TIKTOKEN_PATTERNS,
    TOKENIZER_TYPES,
)
from tst.errors import ConfigError
from tst.phases import parse_schedule

__all__ = [
    "ModelConfig",
    "ParallelConfig",
    "TrainingConfig",
    "DataArgs",
    "TSTConfig",
    "RunConfig",
    "LoggingConfig",
    "MoEConfig",
    "FIMConfig",
    "MTPConfig",
    "MLAConfig",
    "RerunConfig",
    "Config",
    "build_parser",
    "parse_args",
]


def parse_window(text: str) -> tuple[int, int]:
    """``--window-size`` 'L,R' (or '(L,R)'), two non-negative ints, as Megatron-LM reads it."""
    try:
        window = tuple(int(v) for v in str(text).strip().strip("()").split(","))
    except ValueError:
        window = ()
    _require(
        len(window) == 2 and min(window) >= 0,
        f"--window-size {text}: give two non-negative ints 'L,R' such as 128,0",
    )
    return window


@dataclass
class ModelConfig:
    """The network: shape, position encoding, norms, biases, dropout, kernels, experts.

    Every default is Megatron-LM's, so a Megatron launch script trains the model its author
    meant (learned absolute positions, LayerNorm, biases, dropout 0.1, GELU MLP of 4 x hidden,
    tied embeddings). Fused kernels default on, as in Megatron; they run where the device and
    library have them (CUDA) and are off on CPU.
    """

    num_layers: int | None = _f(None, "Transformer layers (required).")
    hidden_size: int | None = _f(None, "Hidden size (required).")
    ffn_hidden_size: int | None = _f(
        None,
        "MLP hidden size (default 4 x hidden; with --swiglu Megatron's int(8/3 x hidden / 64) x 64).",
    )
    num_attention_heads: int | None = _f(None, "Attention heads (required).")
    kv_channels: int | None = _f(None, "Projection size per head (default hidden / heads).")
    group_query_attention: bool = _f(False, "Grouped-query attention with --num-query-groups.")
    num_query_groups: int = _f(
        1, "Key/value head groups; used only with --group-query-attention (as in Megatron-LM)."
    )
    seq_length: int | None = _f(
        None,
        "Positions the transformer sees per sample, in both phases (required); the "
        "superposition phase reads bag_size times more raw tokens.",
    )
    max_position_embeddings: int | None = _f(None, "Maximum positions (default seq-length).")
    position_embedding_type: str = _f(
        "learned_absolute",
        "Position embedding.",
        choices=["learned_absolute", "rope", "yarn", "none", "mrope", "relative"],
    )
    add_position_embedding: bool = _f(
        True,
        "Deprecated in Megatron-LM: accepted with --position-embedding-type rope (no effect), "
        "refused otherwise (use --position-embedding-type none).",
        flag="--no-position-embedding",
    )
    rotary_base: int = _f(10000, "RoPE base.")
    rotary_percent: float = _f(1.0, "Share of each head's dimensions that RoPE rotates.")
    rotary_seq_len_interpolation_factor: int | None = _f(
        None, "RoPE position interpolation factor (positions divided by it)."
    )
    use_rope_scaling: bool = _f(False, "Llama-3.x RoPE frequency scaling.")
    rope_scaling_factor: float = _f(8.0, "Llama-3.x RoPE scaling factor.")
    # --position-embedding-type yarn (Megatron-LM 0.19's YaRN for ordinary attention; its
    # scaling factor and mscales are --rotary-scaling-factor, --mscale, --mscale-all-dim).
    yarn_original_max_position_embeddings: int | None = _f(
        None, "YaRN: the context length the frequencies were trained for (default 4096)."
    )
    yarn_beta_fast: float | None = _f(
        None, "YaRN: rotations below which dimensions are interpolated (default 32)."
    )
    yarn_beta_slow: float | None = _f(
        None, "YaRN: rotations above which dimensions are extrapolated (default 1)."
    )
    yarn_correction_range_round_to_int: bool = _f(
        True, "YaRN: keep the correction range's ends unrounded.",
        flag="--no-yarn-correction-range-round-to-int",
    )  # fmt: skip
    normalization: str = _f("LayerNorm", "Normalisation layer.", choices=["LayerNorm", "RMSNorm"])
    norm_epsilon: float = _f(1e-5, "Epsilon of the norms.")
    apply_layernorm_1p: bool = _f(
        False,
        "Zero-centred norm weights: every norm starts at 0 and scales by 1 + weight "
        "(weight decay pulls it towards 1); all specs, all devices.",
    )
    swiglu: bool = _f(False, "SwiGLU MLP (gated SiLU) instead of GELU.")
    squared_relu: bool = _f(False, "Squared-ReLU MLP (relu(x)^2) instead of GELU.")
    quick_geglu: bool = _f(
        False, "Quick-GELU gated MLP (GPT-OSS): quick_gelu(x W_gate) x (x W_linear + offset)."
    )
    glu_linear_offset: float = _f(
        0.0,
        "Offset added to a gated MLP's linear half: act(gate) x (linear + offset) (GPT-OSS 1.0).",
    )
    activation_func_clamp_value: float | None = _f(
        None,
        "Clamp a gated MLP's inputs: the gate to at most V, the linear half to [-V, V] "
        "(GPT-OSS 7.0).",
    )
    softmax_type: str = _f(
        "vanilla",
        "Attention softmax: vanilla; off-by-one (one more zero logit in the denominator); "
        "learnable (a learned logit per head, GPT-OSS's attention sinks).",
        choices=["vanilla", "off-by-one", "learnable"],
    )
    window_size: str | None = _f(
        None,
        "Sliding-window attention 'L,R': each position attends to the L positions before it "
        "(R must be 0: a GPT looks back only), e.g. 128,0; off by default.",
    )
    window_attn_skip_freq: str | None = _f(
        None,
        "Layers of full attention among --window-size layers: N makes every N-th layer full "
        "(N-1 windowed, then 1 full), or a list with one 1 (windowed) / 0 (full) per layer such "
        "as '[1,0]*12'. Default: every layer windowed.",
    )
    untie_embeddings_and_output_weights: bool = _f(False, "Separate input and output embeddings.")
    qk_layernorm: bool = _f(False, "Normalise queries and keys (Qwen3-style).")
    qk_l2_norm: bool = _f(
        False, "Llama-4's parameter-free norm of queries and keys (x / rms(x) per head)."
    )
    log_max_attention_logit: bool = _f(
        False,
        "Log each step's largest pre-softmax attention logit over the decoder layers "
        "(max_attention_logit: every head, token, micro-batch and rank; a sign of the logit "
        "growth that precedes loss spikes).",
    )
    qk_clip: bool = _f(
        False,
        "QK-clip (MuonClip's, Kimi K2): after each step, a head group whose largest logit "
        "passed --qk-clip-threshold has its query and key weights scaled down so it would "
        "not have (query by eta^alpha, key by eta^(1-alpha), eta = threshold / max logit). "
        "Logs max_attention_logit too.",
    )
    qk_clip_alpha: float = _f(0.5, "QK-clip: the query's share of the scaling (0 < alpha < 1).")
    qk_clip_threshold: float = _f(100.0, "QK-clip: the largest logit a head group may reach.")
    attention_output_gate: bool = _f(
        False,
        "Gated attention (Qwen3-Next): the QKV projection also yields a gate per head channel; "
        "the attention output is multiplied by its sigmoid before the output projection.",
    )
    apply_query_key_layer_scaling: bool = _f(
        False,
        "Scale q.k by 1 / layer number before a softmax in fp32 that undoes it (fp16 range); "
        "turns --attention-softmax-in-fp32 on.",
    )
    rotary_interleaved: bool = _f(
        False, "RoFormer-style RoPE: rotate pairs of even / odd dimensions, not the two halves."
    )
    no_rope_freq: str | None = _f(
        None,
        "Layers without RoPE (Llama-4): N skips it on every N-th layer (N-1 with, then 1 "
        "without), or a list with one 1 (no RoPE) / 0 (RoPE) per layer such as '[0,0,0,1]*4'.",
    )
    fp32_residual_connection: bool = _f(
        False,
        "The embedding output (the residual stream's start) in fp32 under --bf16 / --fp16; "
        "megatron-core 0.16.1's layers add their outputs in the weights' dtype from there.",
    )
    init_method_std: float = _f(0.02, "Std of the normal weight initialisation.")
    embedding_init_method_std: float | None = _f(
        None, "Std of the embeddings' normal initialisation (default --init-method-std)."
    )
    init_method_xavier_uniform: bool = _f(
        False,
        "Xavier-uniform initialisation of every weight matrix (bound sqrt(6 / (fan_in + "
        "fan_out)) over the whole, unsplit matrix) instead of the normal one.",
    )
    add_bias_linear: bool = _f(True, "No biases in linear layers.", flag="--disable-bias-linear")
    add_qkv_bias: bool = _f(False, "Biases in the QKV projection only (on with biases anyway).")
    hidden_dropout: float = _f(0.1, "Dropout after attention and MLP outputs.")
    attention_dropout: float = _f(0.1, "Dropout of attention probabilities.")
    attention_backend: str = _f(
        "auto",
        "Attention kernel (megatron-core AttnBackend) with TE. The local spec: flash/fused run "
        "torch's scaled_dot_product_attention, unfused/local megatron-core's unfused "
        "attention, auto the first on CUDA and the second elsewhere.",
        choices=["auto", "flash", "fused", "unfused", "local"],
    )
    attention_softmax_in_fp32: bool = _f(False, "Attention masking and softmax in fp32.")
    masked_softmax_fusion: bool = _f(
        True, "Unfused scale-mask-softmax.", flag="--no-masked-softmax-fusion"
    )
    bias_dropout_fusion: bool = _f(True, "Unfused bias + dropout.", flag="--no-bias-dropout-fusion")
    bias_gelu_fusion: bool = _f(True, "Unfused bias + GELU.", flag="--no-bias-gelu-fusion")
    bias_swiglu_fusion: bool = _f(True, "Unfused bias + SwiGLU.", flag="--no-bias-swiglu-fusion")
    apply_rope_fusion: bool = _f(True, "Unfused RoPE.", flag="--no-rope-fusion")
    persist_layer_norm: bool = _f(
        True, "No persistent fused layer norm.", flag="--no-persist-layer-norm"
    )
    gradient_accumulation_fusion: bool = _f(
        True,
        "No fused weight-gradient accumulation (needs CUDA and APEX's/TE's kernel).",
        flag="--no-gradient-accumulation-fusion",
    )
    cross_entropy_loss_fusion: bool = _f(
        False, "Fused cross-entropy for the recovery phase's single-target loss (CUDA)."
    )
    cross_entropy_fusion_impl: str = _f(
        "native", "Kernel of --cross-entropy-loss-fusion.", choices=["native", "te"]
    )
    delay_wgrad_compute: bool = _f(
        False, "Delay weight-gradient GEMMs to overlap them with communication (TE, CUDA)."
    )
    num_experts: int | None = _f(None, "MoE experts per layer (omit for a dense model).")
    moe_router_topk: int = _f(2, "Experts each token is routed to.")
    moe_ffn_hidden_size: int | None = _f(None, "Expert MLP hidden size (default ffn-hidden-size).")
    moe_shared_expert_intermediate_size: int | None = _f(None, "Shared-expert MLP hidden size.")
    moe_use_upcycling: bool = _f(
        False, "Start this MoE run from a dense checkpoint (--load): each MoE layer's experts "
        "are copies (or, with --moe-upcycling-granularity, slices) of its dense MLP, the rest "
        "is loaded as it is; saved to --save at once, and the run goes on from there "
        "(iteration, optimizer, schedule and data position fresh). For the first launch only.",
    )  # fmt: skip
    moe_upcycling_granularity: int = _f(
        1, "Each expert is this many times narrower than the dense MLP it comes from "
        "(granular upcycling: the dense FFN is --moe-ffn-hidden-size x this).",
    )  # fmt: skip
    moe_latent_size: int | None = _f(
        None,
        "Routed experts compute in this latent width: the MoE layer projects hidden -> latent "
        "before the dispatch and back after the combine (Nemotron 3's latent MoE); the router "
        "and the shared expert see the full hidden state.",
    )
    moe_aux_loss_coeff: float = _f(0.0, "Load-balancing auxiliary loss coefficient.")
    moe_router_load_balancing_type: str = _f(
        "aux_loss",
        "Load balancing of the router (weighted by --moe-aux-loss-coeff).",
        choices=["aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "none"],
    )
    moe_grouped_gemm: bool = _f(
        False,
        "Grouped-GEMM experts (Transformer Engine spec, CUDA); the local spec computes the "
        "same experts one by one.",
    )
    moe_token_dispatcher_type: str = _f(
        "allgather",
        "MoE token dispatcher (flex: DeepEP, CUDA only).",
        choices=["allgather", "alltoall", "flex"],
    )
    transformer_impl: str = _f(
        "auto",
        "Layer implementation: Transformer Engine where importable (auto; Megatron-LM's default "
        "is transformer_engine, which fails where TE is absent), or megatron-core's local spec.",
        choices=["auto", "local", "transformer_engine"],
    )

    def __post_init__(self):
        if self.qk_clip:  # Megatron-LM's rules
            _require(0.0 < self.qk_clip_alpha < 1.0,
                     "--qk-clip-alpha must be between 0.0 and 1.0 when using --qk-clip")  # fmt: skip
            _require(self.qk_clip_threshold > 0,
                     "--qk-clip-threshold must be greater than 0 when using --qk-clip")  # fmt: skip
        elif self.qk_clip_alpha != 0.5 or self.qk_clip_threshold != 100.0:
            warnings.warn("--qk-clip-alpha / --qk-clip-threshold: no effect without --qk-clip",
                          stacklevel=3)  # fmt: skip
        for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length"):
            value = getattr(self, name)
            flag = "--" + name.replace("_", "-")
            _require(value is not None, f"{flag} is required")
            _require(value >= 1, f"{flag} must be >= 1")
        if self.kv_channels is None:
            _require(
                self.hidden_size % self.num_attention_heads == 0,
                f"--hidden-size {self.hidden_size} must be divisible by --num-attention-heads "
                f"{self.num_attention_heads} (or give --kv-channels)",
            )
        _require(
            self.position_embedding_type not in ("mrope", "relative"),
            f"--position-embedding-type {self.position_embedding_type} is not supported for GPT "
            "pretraining here: use learned_absolute, rope or none",
        )
        _require(
            self.add_position_embedding or self.position_embedding_type == "rope",
            "--no-position-embedding is deprecated (Megatron-LM refuses it too unless RoPE is "
            "used): use --position-embedding-type none",
        )
        _require(self.num_query_groups >= 1, "--num-query-groups must be >= 1")
        if self.group_query_attention:
            _require(
                self.num_attention_heads % self.num_query_groups == 0,
                "--num-attention-heads must be divisible by --num-query-groups",
            )
        _require(0 < self.rotary_percent <= 1, "--rotary-percent must be in (0, 1]")
        self._check_yarn()
        self._check_gpt_oss_features()
        for name in ("hidden_dropout", "attention_dropout"):
            value = getattr(self, name)
            _require(0 <= value < 1, f"--{name.replace('_', '-')} must be in [0, 1), got {value}")
        _require(
            math.isfinite(self.init_method_std) and self.init_method_std > 0,
            f"--init-method-std must be a positive number, got {self.init_method_std}",
        )
        _require(self.norm_epsilon > 0, "--norm-epsilon must be > 0")
        if self.max_position_embeddings is None:
            self.max_position_embeddings = self.seq_length
        _require(
            self.max_position_embeddings >= self.seq_length,
            "--max-position-embeddings must be >= --seq-length",
        )
        if self.add_bias_linear:  # Megatron-LM keeps the two bias flags in step
            self.add_qkv_bias = True
        if self.num_experts == 0:  # Megatron-LM reads 0 experts as a dense model
            self.num_experts = None
        if self.num_experts is not None:
            _require(self.num_experts >= 1, "--num-experts must be >= 1")
            _require(
                1 <= self.moe_router_topk <= self.num_experts,
                "--moe-router-topk must be between 1 and --num-experts",
            )
        _require(self.moe_upcycling_granularity >= 1, "--moe-upcycling-granularity must be >= 1")
        _require(not self.moe_use_upcycling or self.num_experts is not None,
                 "--moe-use-upcycling turns a dense checkpoint into an MoE model: give "
                 "--num-experts")  # fmt: skip
        if self.moe_latent_size is not None:
            _require(
                self.num_experts is not None,
                "--moe-latent-size is the routed experts' width: it needs --num-experts",
            )
            _require(self.moe_latent_size > 0,
                     "MoE latent projection dimension has to be greater than zero "
                     f"(--moe-latent-size {self.moe_latent_size})")  # fmt: skip

    def _check_gpt_oss_features(self) -> None:
        """The gated-MLP variants and the attention window (GPT-OSS's), as Megatron-LM takes
        them, refusing what would train a silently different model."""
        mlps = [f for f, on in (("--swiglu", self.swiglu), ("--quick-geglu", self.quick_geglu),
                                ("--squared-relu", self.squared_relu)) if on]  # fmt: skip
        _require(len(mlps) <= 1, f"{' and '.join(mlps)} are {len(mlps)} MLPs: pick one")
        for flag in ("--embedding-init-method-std", "--activation-func-clamp-value"):
            value = getattr(self, flag[2:].replace("-", "_"))
            _require(value is None or (math.isfinite(value) and value > 0),
                     f"{flag} must be a positive number, got {value}")  # fmt: skip
        if self.no_rope_freq is not None:
            _require(
                self.position_embedding_type == "rope",
                "--no-rope-freq picks layers without RoPE: it needs --position-embedding-type rope",
            )
            _require(any(self.no_rope_layers()),
                     f"--no-rope-freq {self.no_rope_freq} leaves every layer with RoPE")  # fmt: skip
        gated = self.swiglu or self.quick_geglu
        for flag, given in (
            ("--glu-linear-offset", self.glu_linear_offset != 0.0),
            ("--activation-func-clamp-value", self.activation_func_clamp_value is not None),
        ):
            if given and not gated:
                warnings.warn(f"{flag} changes only a gated MLP (--swiglu or --quick-geglu); "
                              f"this {self.mlp_name} MLP ignores it, as Megatron-LM does", stacklevel=3)  # fmt: skip
        _require(
            self.window_attn_skip_freq is None or self.window_size is not None,
            "--window-attn-skip-freq picks the windowed layers of --window-size: give both",
        )
        if self.window_size is None:
            return
        window = parse_window(self.window_size)
        _require(
            window[1] == 0,
            f"--window-size {self.window_size}: a GPT attends only to earlier positions, so the "
            f"window's right side must be 0 (--window-size {window[0]},0)",
        )
        freq = self.window_skip_freq  # parsed (and its list checked) once, by the property
        _require(not isinstance(freq, int) or freq >= 1,
                 f"--window-attn-skip-freq must be >= 1, got {freq}")  # fmt: skip

    def _check_yarn(self) -> None:
        """--position-embedding-type yarn: megatron-core's YaRN rotates every dimension of a
        head, unscaled positions, in halves; what it would ignore is refused, and the YaRN
        flags without it warn (Megatron-LM ignores them)."""
        yarn = [flag for flag, given in (
            ("--yarn-original-max-position-embeddings",
             self.yarn_original_max_position_embeddings is not None),
            ("--yarn-beta-fast", self.yarn_beta_fast is not None),
            ("--yarn-beta-slow", self.yarn_beta_slow is not None),
            ("--no-yarn-correction-range-round-to-int", not self.yarn_correction_range_round_to_int),
        ) if given]  # fmt: skip
        if self.position_embedding_type != "yarn":
            if yarn:
                warnings.warn(f"{', '.join(yarn)} apply to --position-embedding-type yarn "
                              "only: they change nothing here (Megatron-LM ignores them too)",
                              stacklevel=4)  # fmt: skip
            return
        for flag, given, why in (
            ("--rotary-interleaved", self.rotary_interleaved, "rotates the two halves only"),
            (f"--rotary-percent {self.rotary_percent}", self.rotary_percent != 1.0,
             "rotates every dimension of a head (Megatron-LM ignores the share)"),
            ("--rotary-seq-len-interpolation-factor",
             self.rotary_seq_len_interpolation_factor is not None,
             "interpolates by --rotary-scaling-factor, not by dividing the positions"),
        ):  # fmt: skip
            _require(not given, f"{flag} with --position-embedding-type yarn: megatron-core's "
                     f"YaRN {why}: drop {flag.split()[0]}")  # fmt: skip
        if self.use_rope_scaling:
            warnings.warn("--use-rope-scaling (Llama 3's RoPE scaling) with "
                          "--position-embedding-type yarn changes nothing: YaRN scales by "
                          "--rotary-scaling-factor (Megatron-LM ignores it too)", stacklevel=4)  # fmt: skip
        for flag, value in (("--yarn-original-max-position-embeddings",
                             self.yarn_original_max_position_embeddings),
                            ("--yarn-beta-fast", self.yarn_beta_fast),
                            ("--yarn-beta-slow", self.yarn_beta_slow)):  # fmt: skip
            _require(value is None or (math.isfinite(value) and value > 0),
                     f"{flag} must be a positive number, got {value}")  # fmt: skip

    def yarn_config_fields(self, mla) -> dict:
        """The ``yarn_*`` attributes megatron-core's GPTModel reads for ordinary attention's
        YaRN (Megatron-LM 0.19's names and defaults); ``mla`` is the MLA section (its
        --rotary-scaling-factor, --mscale, --mscale-all-dim)."""
        if self.position_embedding_type != "yarn":
            return {}
        orig = self.yarn_original_max_position_embeddings
        return {
            "yarn_rotary_scaling_factor": mla.rotary_scaling_factor,
            "yarn_original_max_position_embeddings": 4096 if orig is None else orig,
            "yarn_beta_fast": 32.0 if self.yarn_beta_fast is None else self.yarn_beta_fast,
            "yarn_beta_slow": 1.0 if self.yarn_beta_slow is None else self.yarn_beta_slow,
            "yarn_mscale": mla.mscale,
            "yarn_mscale_all_dim": mla.mscale_all_dim,
            "yarn_correction_range_round_to_int": self.yarn_correction_range_round_to_int,
        }

    def no_rope_layers(self) -> list[int]:
        """``--no-rope-freq`` per layer (0-based), 1 where the layer skips RoPE; megatron-core's
        rule: an int N must divide the layers and makes layers N, 2N, ... (1-based) skip it."""
        if self.no_rope_freq is None:
            return [0] * self.num_layers
        freq = parse_layer_freq(self.no_rope_freq, self.num_layers, flag="--no-rope-freq",
                                ones="no RoPE", zeros="RoPE")  # fmt: skip
        if isinstance(freq, list):
            return freq
        _require(
            freq >= 1 and self.num_layers % freq == 0,
            f"--no-rope-freq {freq} must be >= 1 and divide --num-layers {self.num_layers} "
            "(megatron-core's rule), or give a list",
        )
        return [int((i + 1) % freq == 0) for i in range(self.num_layers)]

    @property
    def window(self) -> tuple[int, int] | None:
        """``--window-size`` as megatron-core takes it: (left, right), or None."""
        return None if self.window_size is None else parse_window(self.window_size)

    @property
    def window_skip_freq(self) -> int | list[int] | None:
        """``--window-attn-skip-freq`` as megatron-core takes it: an int N or a 0/1 list."""
        if self.window_attn_skip_freq is None:
            return None
        return parse_layer_freq(self.window_attn_skip_freq, self.num_layers,
                                flag="--window-attn-skip-freq", ones="windowed", zeros="full")  # fmt: skip

    def windowed_layers(self) -> list[int]:
        """Per layer (0-based), 1 where it attends through the window (megatron-core's rule:
        with an int N, layer numbers 1..L that N does not divide are windowed)."""
        if self.window_size is None:
            return [0] * self.num_layers
        freq = self.window_skip_freq
        if freq is None:
            return [1] * self.num_layers
        if isinstance(freq, int):
            return [int((i + 1) % freq != 0) for i in range(self.num_layers)]
        return list(freq)

    @property
    def mlp_name(self) -> str:
        return ("SwiGLU" if self.swiglu else "quick-GEGLU" if self.quick_geglu
                else "squared-ReLU" if self.squared_relu else "GELU")  # fmt: skip

    @property
    def gated_mlp(self) -> bool:
        """Whether the MLP is gated (two input halves): SwiGLU or quick-GEGLU."""
        return self.swiglu or self.quick_geglu

    @property
    def query_groups(self) -> int:
        """Key/value groups the model has: --num-query-groups only with --group-query-attention."""
        return self.num_query_groups if self.group_query_attention else self.num_attention_heads

    @property
    def resolved_ffn_hidden_size(self) -> int:
        """``--ffn-hidden-size``, or Megatron-LM's default: 4 x hidden, or with SwiGLU
        ``int(4 x hidden x 2/3 / 64) x 64`` (the same parameters as a 4 x hidden GELU MLP)."""
        if self.ffn_hidden_size:
            return self.ffn_hidden_size
        if self.swiglu:
            return int((4 * self.hidden_size * 2 / 3) / 64) * 64
        return 4 * self.hidden_size

    @property
    def resolved_kv_channels(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads


@dataclass
class ParallelConfig:
    """How the model and batch are split over processes, and how their traffic overlaps."""

    tensor_model_parallel_size: int = _f(1, "Tensor-parallel size (TP).")
    pipeline_model_parallel_size: int = _f(1, "Pipeline-parallel size (PP).")
    num_layers_per_virtual_pipeline_stage: int | None = _f(
        None, "Layers per virtual pipeline stage (interleaved 1F1B)."
    )
    num_virtual_stages_per_pipeline_rank: int | None = _f(
        None, "Virtual pipeline stages per pipeline rank (interleaved 1F1B; uneven stages too)."
    )
    microbatch_group_size_per_virtual_pipeline_stage: int | None = _f(
        None,
        "Interleaved 1F1B: micro-batches run back to back on one virtual stage (default PP, "
        "depth-first; up to the micro-batches per step, breadth-first).",
    )
    decoder_first_pipeline_num_layers: int | None = _f(
        None, "Layers of the first pipeline stage (default: an even split)."
    )
    decoder_last_pipeline_num_layers: int | None = _f(
        None, "Layers of the last pipeline stage (default: an even split)."
    )
    pipeline_model_parallel_layout: str | None = _f(
        None,
        "Layers per pipeline stage, megatron-core's layout string: E (embedding), t (layer), "
        "m (MTP depth), L (loss), stages split by |, (...)*N repeats, e.g. 'Et|(tt|)*30L' or "
        "'Et*3|(tt|)*29,m|L'; PP x VPP stages.",
    )
    account_for_embedding_in_pipeline_split: bool = _f(
        False,
        "Count the input embedding as a layer when splitting layers over pipeline stages: the "
        "first stage builds one decoder layer fewer ((--num-layers + 1) / PP per stage).",
    )
    account_for_loss_in_pipeline_split: bool = _f(
        False,
        "Count the loss (output layer) as a layer when splitting layers over pipeline stages: "
        "the last stage builds one decoder layer fewer.",
    )
    context_parallel_size: int = _f(
        1, "Context-parallel size (CP): the sequence split over ranks (Transformer Engine's CP "
        "attention, or the local spec's, which all-gathers keys and values).",
    )  # fmt: skip
    cp_comm_type: list[str] = _f(
        ["p2p"], "Transformer Engine's context-parallel attention communication, one for every "
        "layer or one per layer: p2p, a2a, allgather, or a2a+p2p (a2a inside the first of "
        "--hierarchical-context-parallel-sizes, p2p across the second). The local spec's "
        "all-gathers.",
        choices=["p2p", "a2a", "allgather", "a2a+p2p"],
    )  # fmt: skip
    hierarchical_context_parallel_sizes: list[int] | None = _f(
        None, "With --cp-comm-type a2a+p2p: the context-parallel group split into levels (e.g. "
        "2 4 for CP 8), their product CP.", type=int,
    )  # fmt: skip
    expert_model_parallel_size: int = _f(1, "Expert-parallel size (EP).")
    expert_tensor_parallel_size: int | None = _f(
        None, "Tensor-parallel size of the experts (ETP; default: TP)."
    )
    sequence_parallel: bool = _f(False, "Sequence parallelism in TP regions (off with TP 1).")
    use_distributed_optimizer: bool = _f(False, "Shard optimizer state over data parallel.")
    use_torch_fsdp2: bool = _f(
        False, "PyTorch FSDP2 (ZeRO-3): parameters, gradients and optimizer state sharded over "
        "data parallel, each layer's weights gathered for its forward and backward (no PP, "
        "no EP, untied embeddings, bf16 or fp32; Megatron-LM's rules).",
    )  # fmt: skip
    torch_fsdp2_reshard_after_forward: bool = _f(
        True, "With --use-torch-fsdp2: keep each layer's gathered weights from its forward "
        "to its backward (one all-gather fewer per layer, more memory).",
        flag="--torch-fsdp2-no-reshard-after-forward",
    )  # fmt: skip
    overlap_grad_reduce: bool = _f(False, "Overlap the data-parallel gradient reduction.")
    overlap_param_gather: bool = _f(
        False, "Overlap the distributed optimizer's parameter all-gather with the forward."
    )
    overlap_param_gather_with_optimizer_step: bool = _f(
        False,
        "Start the first model chunk's parameter all-gather inside the optimizer step (the "
        "other chunks' run in their forwards); needs --use-distributed-optimizer, "
        "--overlap-param-gather and virtual pipeline stages (Megatron-LM's rules).",
    )
    align_grad_reduce: bool = _f(
        True,
        "Let each pipeline stage start its gradient reduction on its own.",
        flag="--no-align-grad-reduce",
    )
    align_param_gather: bool = _f(
        True,
        "Let each pipeline stage start its parameter gather on its own.",
        flag="--no-align-param-gather",
    )
    ddp_bucket_size: int | None = _f(
        None, "Elements per data-parallel communication bucket (default megatron-core's)."
    )
    ddp_num_buckets: int | None = _f(
        None, "Data-parallel communication buckets: the bucket size is the parameters / N."
    )
    ddp_pad_buckets_for_high_nccl_busbw: bool = _f(
        False, "Pad each bucket to a multiple of 2^16 elements (NCCL bus bandwidth at large DP)."
    )
    ddp_reduce_scatter_with_fp32_accumulation: bool = _f(
        False,
        "Distributed optimizer: reduce-scatter sending bf16 but accumulating in fp32 "
        "(an all-to-all).",
    )
    gradient_reduce_div_fusion: bool = _f(
        True,
        "Divide gradients in a separate step, not fused into the reduction.",
        flag="--no-gradient-reduce-div-fusion",
    )
    grad_reduce_in_bf16: bool = _f(False, "Reduce gradients in bf16 (with --bf16).")
    accumulate_allreduce_grads_in_fp32: bool = _f(
        False, "Accumulate and all-reduce gradients in fp32 (on by itself with --bf16)."
    )
    enable_gloo_process_groups: bool = _f(
        True,
        "No gloo copies of the data-parallel groups beside the device's (megatron-core makes "
        "them for host-side gathers this trainer does not need): less host memory and setup.",
        flag="--disable-gloo-process-groups",
    )
    tp_comm_overlap: bool = _f(
        False, "Overlap TP communication with GEMMs (Transformer Engine userbuffers, CUDA)."
    )
    tp_comm_overlap_cfg: str | None = _f(
        None, "YAML file of Transformer Engine userbuffer settings for --tp-comm-overlap "
        "(Megatron-LM's format; default TE's own).",
    )  # fmt: skip
    tp_comm_bootstrap_backend: str = _f(
        "nccl", "Backend that bootstraps TE's userbuffers for --tp-comm-overlap.",
        choices=["nccl", "mpi", "gloo"],
    )  # fmt: skip
    # Which of Transformer Engine's userbuffer overlaps --tp-comm-overlap uses (megatron-core's
    # TE layers read them; without --tp-comm-overlap they do nothing, as in Megatron-LM).
    tp_comm_bulk_wgrad: bool = _f(
        True, "With --tp-comm-overlap: no bulk all-gather overlap with the backward's "
        "activation-gradient GEMM.", flag="--no-tp-comm-bulk-wgrad",
    )  # fmt: skip
    tp_comm_bulk_dgrad: bool = _f(
        True, "With --tp-comm-overlap: no bulk reduce-scatter overlap with the backward's "
        "weight-gradient GEMM.", flag="--no-tp-comm-bulk-dgrad",
    )  # fmt: skip
    tp_comm_overlap_ag: bool = _f(
        True, "With --tp-comm-overlap: no pipelined all-gather overlap with the GEMMs.",
        flag="--no-tp-comm-overlap-ag",
    )  # fmt: skip
    tp_comm_overlap_rs: bool = _f(
        True, "With --tp-comm-overlap: no pipelined reduce-scatter overlap with the GEMMs.",
        flag="--no-tp-comm-overlap-rs",
    )  # fmt: skip
    tp_comm_overlap_rs_dgrad: bool = _f(
        False, "With --tp-comm-overlap: overlap the reduce-scatter with the backward's "
        "activation-gradient GEMM.",
    )  # fmt: skip
    tp_comm_split_ag: bool = _f(
        True, "With --tp-comm-overlap: no split all-gather overlap (deprecated in Transformer "
        "Engine 1.6).", flag="--no-tp-comm-split-ag",
    )  # fmt: skip
    tp_comm_split_rs: bool = _f(
        True, "With --tp-comm-overlap: no split reduce-scatter overlap (deprecated in "
        "Transformer Engine 1.6).", flag="--no-tp-comm-split-rs",
    )  # fmt: skip
    recompute_granularity: str | None = _f(
        None,
        "Activation recomputation: whole layers (full) or the memory-heavy parts (selective).",
        choices=["full", "selective"],
    )
    recompute_method: str | None = _f(
        None,
        "Full recomputation: layers split in uniform groups, or the first N per stage (block).",
        choices=["uniform", "block"],
    )
    recompute_num_layers: int | None = _f(
        None, "Layers per group (uniform) or per stage (block) that full recomputation covers."
    )
    recompute_modules: list[str] | None = _f(
        None,
        "Selective recomputation's modules (megatron-core's names: core_attn, moe_act, "
        "layernorm, mla_up_proj, mlp, moe, shared_experts; default core_attn).",
    )
    fine_grained_activation_offloading: bool = _f(
        False,
        "Copy what the --offload-modules keep for the backward pass to host memory during "
        "the forward and back for the backward (megatron-core's fine-grained activation "
        "offloading): less device memory, the same model.",
    )
    offload_modules: list[str] | None = _f(
        None,
        "What --fine-grained-activation-offloading moves: the inputs kept by attn_norm, "
        "qkv_linear, core_attn, attn_proj (with core_attn), mlp_norm, expert_fc1, moe_act "
        "(megatron-core's names).",
        nargs="+",
    )
    min_offloaded_tensor_size: int = _f(
        1024 * 1024,
        "--fine-grained-activation-offloading moves tensors of at least this many elements.",
    )
    distribute_saved_activations: bool = _f(
        False,
        "Full recomputation: each tensor-parallel rank keeps 1/TP of every recomputed layer "
        "group's saved input, gathered again for the recomputation (TP > 1, no "
        "--sequence-parallel).",
    )
    moe_layer_recompute: bool = _f(
        False,
        "Deprecated in Megatron-LM: the same as --recompute-granularity selective with moe "
        "added to --recompute-modules.",
    )
    distributed_timeout_minutes: int = _f(
        10, "Timeout of collectives: a rank lost mid-step ends the job after this long."
    )
    overlap_p2p_comm: bool = _f(
        True, "Interleaved schedules (virtual stages): batch the pipeline's sends and receives "
        "instead of overlapping them with the chunks' compute (needs PP > 2, as in "
        "Megatron-LM). Other schedules always batch them.",
        flag="--no-overlap-p2p-communication",
    )  # fmt: skip
    overlap_p2p_comm_warmup_flush: bool = _f(
        False, "Interleaved schedules: overlap the warm-up's and the flush's sends and "
        "receives with compute too.", flag="--overlap-p2p-communication-warmup-flush",
    )  # fmt: skip
    nccl_communicator_config_path: str | None = _f(
        None, "A YAML file of NCCL settings per process group (cga_cluster_size, max_ctas, "
        "min_ctas, net_name, is_high_priority_stream), given to megatron-core's groups; "
        "checked at start (NCCL only).",
    )  # fmt: skip
    high_priority_stream_groups: list[str] | None = _f(
        None, "Process groups whose NCCL communicators use high-priority streams (e.g. dp_cp "
        "ep_dp; NCCL only).", nargs="*",
    )  # fmt: skip
    use_nccl_ub: bool = _f(
        False, "Allocate the DDP parameter and gradient buffers from NCCL's memory pool and "
        "register them as NCCL user buffers (fewer GPU cores for the data-parallel "
        "collectives; CUDA only).",
    )  # fmt: skip
    disable_symmetric_registration: bool = _f(
        False, "With --use-nccl-ub: register the buffers locally, not as symmetric windows."
    )
    use_sharp: bool = _f(
        False, "InfiniBand SHARP in-network reductions for one NCCL group (NCCL's CollNet; "
        "the data-parallel group unless --sharp-enabled-group).",
    )  # fmt: skip
    sharp_enabled_group: str | None = _f(
        None, "The group SHARP serves (dp_replica: with --num-distributed-optimizer-instances "
        "> 1).", choices=["dp", "dp_replica"],
    )  # fmt: skip
    pipeline_model_parallel_comm_backend: str | None = _f(
        None, "Backend of the pipeline's sends and receives (default NCCL; ucc: PyTorch with "
        "UCC, no GPU cores used).", choices=["nccl", "ucc"],
    )  # fmt: skip
    defer_embedding_wgrad_compute: bool = _f(
        False, "Defer the output layer's weight gradient of each micro-batch to the "
        "pipeline's flush, where it overlaps the last stage's idle time (needs pipeline "
        "parallelism and the fused weight-gradient kernel).",
    )  # fmt: skip
    wgrad_deferral_limit: int = _f(
        0, "With --defer-embedding-wgrad-compute: defer only the first N micro-batches' (0: "
        "all of them).",
    )  # fmt: skip
    distributed_timeout_seconds_after_init: int | None = _f(
        None, "After the first step, the collectives' timeout in seconds (the first step, "
        "with its set-up, gets --distributed-timeout-minutes): a rank lost later ends the job "
        "sooner.",
    )  # fmt: skip
    use_tp_pp_dp_mapping: bool = _f(
        False, "Number the ranks tensor-, then pipeline-, then data-parallel first "
        "(megatron-core's order tp-cp-ep-pp-dp) instead of tp-cp-ep-dp-pp: neighbouring ranks "
        "(one node) hold a replica's pipeline stages, data-parallel groups span the nodes.",
    )  # fmt: skip
    num_distributed_optimizer_instances: int = _f(
        1, "Distributed optimizer: N copies of the optimizer state over the data-parallel "
        "ranks, each sharded over DP / N of them (gradients reduce-scattered inside a copy, "
        "all-reduced across copies): the shards stay inside a node.",
    )  # fmt: skip

    def __post_init__(self):
        for name in (
            "tensor_model_parallel_size",
            "pipeline_model_parallel_size",
            "context_parallel_size",
            "expert_model_parallel_size",
        ):
            _require(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be >= 1")
        if self.expert_tensor_parallel_size is not None:
            _require(
                self.expert_tensor_parallel_size >= 1, "--expert-tensor-parallel-size must be >= 1"
            )
        _require(
            self.distributed_timeout_minutes >= 1, "--distributed-timeout-minutes must be >= 1"
        )
        _require(
            self.distributed_timeout_seconds_after_init is None
            or self.distributed_timeout_seconds_after_init >= 1,
            "--distributed-timeout-seconds-after-init must be >= 1",
        )
        _require(
            self.num_distributed_optimizer_instances >= 1,
            "--num-distributed-optimizer-instances must be >= 1",
        )
        if self.ddp_bucket_size is not None:
            _require(self.ddp_bucket_size >= 1, "--ddp-bucket-size must be >= 1")
        if self.ddp_num_buckets is not None:
            _require(self.ddp_num_buckets >= 1, "--ddp-num-buckets must be >= 1")
            _require(self.ddp_bucket_size is None,
                     "give --ddp-num-buckets or --ddp-bucket-size, not both (as Megatron-LM)")  # fmt: skip
        _require(
            not self.overlap_param_gather or self.use_distributed_optimizer,
            "--overlap-param-gather needs --use-distributed-optimizer",
        )
        if self.overlap_param_gather_with_optimizer_step:  # Megatron-LM's rules
            _require(self.use_distributed_optimizer and self.overlap_param_gather,
                     "--overlap-param-gather-with-optimizer-step needs "
                     "--use-distributed-optimizer and --overlap-param-gather")  # fmt: skip
        if self.moe_layer_recompute:  # megatron-core's translation of the deprecated flag
            _require(
                self.recompute_granularity != "full",
                "--moe-layer-recompute with --recompute-granularity full: full recomputation "
                "covers the MoE layer already; drop one (megatron-core refuses both too)",
            )
            warnings.warn("--moe-layer-recompute is deprecated (as in Megatron-LM): running "
                          "--recompute-granularity selective with --recompute-modules ... moe",
                          stacklevel=3)  # fmt: skip
            self.recompute_granularity = "selective"
            modules = self.recompute_modules or ["core_attn"]
            self.recompute_modules = modules + ([] if "moe" in modules else ["moe"])
        if self.recompute_granularity == "selective":
            _require(
                self.recompute_method is None,
                "--recompute-method applies to --recompute-granularity full only",
            )
        if self.recompute_granularity == "full":
            _require(
                self.recompute_method is not None and self.recompute_num_layers is not None,
                "--recompute-granularity full needs --recompute-method (uniform or block) and "
                "--recompute-num-layers",
            )
        _require(
            not self.distribute_saved_activations or self.recompute_granularity == "full",
            "--distribute-saved-activations splits what full recomputation saves: add "
            "--recompute-granularity full (with --recompute-method and --recompute-num-layers)",
        )
        if self.recompute_granularity is None:
            # Megatron-LM takes them and megatron-core reads them only with a granularity
            # (its rerun functional tests pass --recompute-num-layers alone): said, and dropped.
            given = [f for f, v in (("--recompute-method", self.recompute_method),
                                    ("--recompute-num-layers", self.recompute_num_layers)) if v is not None]  # fmt: skip
            if given:
                warnings.warn(f"{' / '.join(given)} without --recompute-granularity: nothing "
                              "is recomputed, ignored (as megatron-core ignores it)", stacklevel=3)  # fmt: skip
                self.recompute_method = self.recompute_num_layers = None
        if self.recompute_num_layers is not None:
            _require(self.recompute_num_layers >= 1, "--recompute-num-layers must be >= 1")
        self._check_activation_offload()
        if self.recompute_modules is not None:
            known = {"core_attn", "moe_act", "layernorm", "mla_up_proj", "mlp", "moe",
                     "shared_experts"}  # fmt: skip
            bad = sorted(set(self.recompute_modules) - known)
            _require(not bad, f"--recompute-modules: unknown {bad}; choose from {sorted(known)}")

    def _check_activation_offload(self) -> None:
        """megatron-core's rules for --fine-grained-activation-offloading (its
        TransformerConfig asserts them), stated as flags."""
        if not self.fine_grained_activation_offloading:
            given = [flag for flag, value in (
                ("--offload-modules", self.offload_modules),
                ("--min-offloaded-tensor-size", self.min_offloaded_tensor_size != 1024 * 1024),
            ) if value]  # fmt: skip
            if given:
                warnings.warn(f"{' / '.join(given)}: no effect without "
                              "--fine-grained-activation-offloading", stacklevel=4)  # fmt: skip
            return
        known = ["attn_norm", "qkv_linear", "core_attn", "attn_proj", "mlp_norm", "expert_fc1",
                 "moe_act"]  # fmt: skip
        _require(
            bool(self.offload_modules),
            f"--fine-grained-activation-offloading needs --offload-modules (some of {known})",
        )
        bad = sorted(set(self.offload_modules) - set(known))
        _require(not bad, f"--offload-modules: unknown {bad}; choose from {known}")
        _require(
            "attn_proj" not in self.offload_modules or "core_attn" in self.offload_modules,
            "--offload-modules attn_proj needs core_attn too: the projection's input is the "
            "core attention's output, which core_attn's backward needs (megatron-core's rule)",
        )
        _require(self.min_offloaded_tensor_size >= 0, "--min-offloaded-tensor-size must be >= 0")
        _require(
            self.recompute_granularity != "full",
            "--fine-grained-activation-offloading with --recompute-granularity full: full "
            "recomputation keeps only each recomputed block's input, so there is nothing "
            "inside it to offload, and the two together crash megatron-core 0.16.1 (a "
            "segmentation fault in the first step, seen here): drop one (selective "
            "recomputation works with it)",
        )


_SUFFIXES = {"K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}


def _schedule_number(text: str, schedule: str) -> int:
    text = text.strip().upper()
    scale = _SUFFIXES.get(text[-1:], 1)
    try:
        value = float(text[:-1] if scale > 1 else text)
    except ValueError:
        raise ConfigError(f"--step-batch-size-schedule {schedule!r}: {text!r} is not a number "
                          "(a count with an optional K, M, B or T suffix)") from None  # fmt: skip
    return int(value * scale)


def step_batch_schedule(schedule: str, seq_length: int) -> tuple[tuple[int, int], ...]:
    """--step-batch-size-schedule as ((threshold in samples, global batch), ...): the
    thresholds are tokens, divided by ``seq_length`` (Megatron-LM 0.19's reading); the first
    is 0 and they rise; each batch holds from its threshold on."""
    entries = []
    for entry in schedule.replace(",", " ").split():
        threshold, colon, batch = entry.partition(":")
        _require(bool(colon), f"--step-batch-size-schedule {schedule!r}: entry {entry!r} is "
                 "not THRESHOLD:BATCH (e.g. '0:256 100B:512')")  # fmt: skip
        entries.append((_schedule_number(threshold, schedule) // seq_length,
                        _schedule_number(batch, schedule)))  # fmt: skip
    entries.sort()
    _require(bool(entries) and entries[0][0] == 0, f"--step-batch-size-schedule {schedule!r}: "
             "the first threshold must be 0 (the batch a run starts with)")  # fmt: skip
    for (before, _), (after, _) in zip(entries, entries[1:], strict=False):
        _require(after > before, f"--step-batch-size-schedule {schedule!r}: two thresholds "
                 f"fall on the same sample ({before} samples of {seq_length} tokens; the "
                 "thresholds count tokens)")  # fmt: skip
    for _, batch in entries:
        _require(batch >= 1, f"--step-batch-size-schedule {schedule!r}: batch sizes must be "
                 ">= 1")  # fmt: skip
    return tuple(entries)


# Megatron-LM's other --optimizer values (0.16.1's Muon; 0.19's Lion, SOAP, adaptive Muon):
# refused in one line naming why (rather than argparse's bare "invalid choice").
_MUON = ("the Muon optimizer is not supported yet (it needs NVIDIA's emerging_optimizers, "
         "Python >= 3.12)")  # fmt: skip
_LATER_OPTIMIZERS = {
    "muon": _MUON,
    "dist_muon": _MUON,
    "adaptive_muon": _MUON,
    "lion": "Lion is built on a newer megatron-core than the 0.16.1 this trainer runs on (its "
    "distributed optimizer's checkpoints hold Adam's two moments)",
    "soap": "SOAP is built on a newer megatron-core than the 0.16.1 this trainer runs on",
}


@dataclass
class TrainingConfig:
    """Batch, length of the run, optimizer, learning-rate schedule and precision.

    The run's length is --train-iters, or --train-samples (Megatron-LM's sample-based
    training); warm-up and decay lengths are then given in the same unit. As in Megatron-LM,
    the LR scheduler counts samples, so a batch-size ramp-up moves it by the samples read.
    """

    micro_batch_size: int | None = _f(None, "Samples per micro-batch per data-parallel rank.")
    global_batch_size: int | None = _f(None, "Samples per optimizer step (default micro x DP).")
    decrease_batch_size_if_needed: bool = _f(
        False, "Train the largest multiple of micro-batch x DP up to --global-batch-size when "
        "the batch does not divide (e.g. a resume at another data-parallel size); the rest are "
        "counted as skipped samples (Megatron-LM's rule).",
    )  # fmt: skip
    rampup_batch_size: list[int] | None = _f(
        None,
        "Batch-size ramp-up: START INCREMENT SAMPLES grows the global batch from START by "
        "INCREMENT over SAMPLES samples (sample-based training).",
        nargs=3,
        type=int,
        metavar=("START", "INCREMENT", "SAMPLES"),
    )
    step_batch_size_schedule: str | None = _f(
        None,
        "Global batch by data consumed (Megatron-LM 0.19's): 'THRESHOLD:BATCH ...', the first "
        "threshold 0, rising; a batch holds from its threshold on. Thresholds count tokens "
        "(K, M, B, T suffixes: 1e3 .. 1e12) of --seq-length positions per sample, i.e. samples "
        "x --seq-length (in the superposition phase, not its raw tokens); the last batch is "
        "the global batch. Sample-based training only; not with --global-batch-size.",
    )
    train_iters: int | None = _f(None, "Optimizer steps in the whole run (both phases).")
    train_samples: int | None = _f(None, "Samples in the whole run (instead of --train-iters).")
    optimizer: str = _f(
        "adam",
        "Optimizer (AdamW-style decoupled weight decay). Megatron-LM's others are refused "
        "naming why.",
        choices=["adam", "sgd", *_LATER_OPTIMIZERS],
    )
    lr: float | None = _f(None, "Peak learning rate (required).")
    min_lr: float = _f(0.0, "Final learning rate.")
    decoupled_lr: float | None = _f(None, "Separate learning rate of the input and output layers.")
    decoupled_min_lr: float | None = _f(None, "Final learning rate of the input and output layers.")
    lr_decay_style: str = _f(
        "linear",
        "LR decay after warm-up; one schedule spans both phases.",
        choices=["constant", "linear", "cosine", "inverse-square-root", "WSD", "wsd"],
    )
    lr_decay_iters: int | None = _f(None, "Steps the LR decays over (default --train-iters).")
    lr_decay_samples: int | None = _f(
        None, "Samples the LR decays over (sample-based; default --train-samples)."
    )
    lr_warmup_fraction: float | None = _f(
        None, "Warm-up as a share of the decay length (instead of --lr-warmup-iters/samples)."
    )
    lr_warmup_iters: int = _f(0, "Linear warm-up steps.")
    lr_warmup_samples: int = _f(0, "Linear warm-up samples (sample-based).")
    lr_warmup_init: float = _f(0.0, "Learning rate at the start of warm-up.")
    lr_wsd_decay_style: str = _f(
        "exponential",
        "Shape of a WSD schedule's final decay.",
        choices=["exponential", "linear", "cosine", "minus_sqrt"],
    )
    lr_wsd_decay_iters: int | None = _f(
        None, "Decay steps at the end of a WSD schedule (default 10%% of the run)."
    )
    lr_wsd_decay_samples: int | None = _f(
        None, "Decay samples at the end of a WSD schedule (sample-based)."
    )
    weight_decay: float = _f(0.01, "Weight decay (decoupled, AdamW).")
    apply_wd_to_qk_layernorm: bool = _f(
        False,
        "Decay the query / key LayerNorm weights too (Qwen3-Next); other 1-D parameters and "
        "biases never decay.",
    )
    no_weight_decay_cond_type: str | None = _f(
        None, "Deprecated in Megatron-LM: apply_wd_to_qk_layernorm is --apply-wd-to-qk-layernorm.",
        choices=["apply_wd_to_qk_layernorm"],
    )  # fmt: skip
    start_weight_decay: float | None = _f(
        None, "Weight decay at the start (default --weight-decay)."
    )
    end_weight_decay: float | None = _f(None, "Weight decay at the end (default --weight-decay).")
    weight_decay_incr_style: str = _f(
        "constant",
        "How weight decay moves from start to end.",
        choices=["constant", "linear", "cosine"],
    )
    adam_beta1: float = _f(0.9, "Adam beta1.")
    adam_beta2: float = _f(0.999, "Adam beta2.")
    adam_eps: float = _f(1e-8, "Adam epsilon.")
    sgd_momentum: float = _f(0.9, "SGD momentum.")
    clip_grad: float = _f(1.0, "Gradient-norm clipping (0 = off).")
    seed: int = _f(1234, "Random seed (weights, data order, dropout).")
    init_model_with_meta_device: bool = _f(
        False, "Build the model on the meta device (no memory, none of megatron-core's "
        "initialisation), then allocate it on the device, where this trainer's "
        "layout-independent initialisation draws every weight, as it always does.",
    )  # fmt: skip
    disable_jit_fuser: bool = _f(
        False, "Run megatron-core's fused elementwise functions (bias-SwiGLU, bias-GELU, "
        "router steps, ...) as plain PyTorch, not torch.compile'd (never compiled on CPU).",
    )  # fmt: skip
    data_parallel_random_init: bool = _f(
        False, "Each data-parallel rank its own random stream (dropout masks, MoE input "
        "jitter); the weights start and stay the same on every replica (Megatron-LM draws "
        "them per rank and broadcasts the first's).",
    )  # fmt: skip
    bf16: bool = _f(False, "bf16 parameters and compute (fp32 master weights).")
    fp16: bool = _f(False, "fp16 parameters and compute with loss scaling (fp32 master weights).")
    dump_param_to_param_group_map: str | None = _f(
        None, "Write which optimizer parameter group each parameter is in (megatron-core's "
        "dump: a torch.distributed.checkpoint directory of {parameter name: group index}).",
        metavar="DIR",
    )  # fmt: skip
    check_weight_hash_across_dp_replicas_interval: int | None = _f(
        None,
        "Every N steps, check that every data-parallel replica holds the same weights (a hash "
        "per parameter); a difference stops the run naming the parameters and ranks.",
    )
    test_mode: bool = _f(
        False, "megatron-core's real-time test: every forward of a --qk-layernorm attention "
        "checks that its q / k LayerNorm weights and biases are the same on every data- and "
        "tensor-parallel rank (catches silent hardware corruption); a difference stops the run.",
    )  # fmt: skip
    deterministic_mode: bool = _f(
        False,
        "Deterministic kernels only (torch.use_deterministic_algorithms; megatron-core's "
        "deterministic_mode): slower, bit-for-bit repeatable. On CUDA it needs NCCL_ALGO set "
        "to Tree, Ring, CollnetDirect, CollnetChain or ^NVLS, as in Megatron-LM.",
    )
    disable_bf16_reduced_precision_matmul: bool = _f(
        False,
        "Accumulate bf16 GEMMs in full precision on CUDA (torch.backends.cuda.matmul."
        "allow_bf16_reduced_precision_reduction = False).",
    )
    loss_scale: float | None = _f(None, "Static loss scale for fp16 (default: dynamic scaling).")
    initial_loss_scale: float = _f(2.0**32, "Initial dynamic loss scale (fp16).")
    min_loss_scale: float = _f(1.0, "Minimum dynamic loss scale (fp16).")
    loss_scale_window: float = _f(1000, "Steps without overflow before the scale grows (fp16).")
    hysteresis: int = _f(2, "Overflows tolerated before the scale shrinks (fp16).")
    use_precision_aware_optimizer: bool = _f(
        False, "Transformer Engine's FusedAdam with low-precision optimizer state (CUDA + TE); "
        "with --optimizer-cpu-offload, megatron-core's hybrid CPU / GPU optimizer instead.",
    )  # fmt: skip
    optimizer_cpu_offload: bool = _f(
        False, "Keep the optimizer's state (fp32 main weights, Adam's moments) in host memory "
        "and step it there (megatron-core's HybridDeviceOptimizer, torch's AdamW on the CPU): "
        "frees 12 bytes a parameter of GPU memory for host memory and a copy of gradients "
        "and weights each step. Needs --use-distributed-optimizer and "
        "--use-precision-aware-optimizer, as in Megatron-LM.",
    )  # fmt: skip
    optimizer_offload_fraction: float = _f(
        1.0, "With --optimizer-cpu-offload: the share of the parameters (by count, in the "
        "optimizer's order) whose optimizer step runs on the CPU; the rest step on the GPU.",
    )  # fmt: skip
    use_torch_optimizer_for_cpu_offload: bool = _f(
        False, "With --optimizer-cpu-offload: accepted for Megatron-LM's scripts; megatron-core "
        "0.16.1 steps the part left on the GPU with its fused Adam (TE / Apex) whatever this says.",
    )  # fmt: skip
    overlap_cpu_optimizer_d2h_h2d: bool = _f(
        False, "With --optimizer-cpu-offload: one CPU optimizer per parameter, its gradient's "
        "copy to host and its weight's copy back on side CUDA streams.",
    )  # fmt: skip
    pin_cpu_grads: bool = _f(
        True, "With --optimizer-cpu-offload: do not pin the host copies of the gradients.",
        flag="--no-pin-cpu-grads",
    )  # fmt: skip
    pin_cpu_params: bool = _f(
        True, "With --optimizer-cpu-offload: do not pin the host copies of the weights.",
        flag="--no-pin-cpu-params",
    )  # fmt: skip
    fp8_format: str | None = _f(None, "FP8 through Transformer Engine.", choices=["e4m3", "hybrid"])
    fp8_recipe: str = _f(
        "delayed",
        "Transformer Engine FP8 recipe.",
        choices=["delayed", "tensorwise", "mxfp8", "blockwise"],
    )
    fp8_margin: int = _f(0, "FP8 scaling margin.")
    fp8_amax_history_len: int = _f(1, "FP8 amax history length (delayed scaling).")
    fp8_amax_compute_algo: str = _f(
        "most_recent", "FP8 amax from the history.", choices=["most_recent", "max"]
    )
    fp8_param_gather: bool = _f(False, "Keep parameters in FP8 and gather them in FP8.")
    fp8_wgrad: bool = _f(
        True, "Compute weight gradients in higher precision under FP8.", flag="--no-fp8-wgrad"
    )
    first_last_layers_bf16: bool = _f(False, "Keep the first and last layers in bf16 under FP8.")
    num_layers_at_start_in_bf16: int = _f(
        1, "With --first-last-layers-bf16: the first N transformer layers stay in bf16."
    )
    num_layers_at_end_in_bf16: int = _f(
        1, "With --first-last-layers-bf16: the last N transformer layers stay in bf16."
    )
    main_grads_dtype: str = _f("fp32", "Main gradients' dtype (precision-aware optimizer).",
                               choices=["fp32", "bf16"])  # fmt: skip
    main_params_dtype: str = _f("fp32", "Main parameters' dtype (precision-aware optimizer).",
                                choices=["fp32", "fp16"])  # fmt: skip
    exp_avg_dtype: str = _f("fp32", "Adam first moment's dtype (precision-aware optimizer).",
                            choices=["fp32", "fp16", "bf16", "fp8"])  # fmt: skip
    exp_avg_sq_dtype: str = _f("fp32", "Adam second moment's dtype (precision-aware optimizer).",
                               choices=["fp32", "fp16", "bf16", "fp8"])  # fmt: skip
    empty_unused_memory_level: int = _f(
        0, "Return cached CUDA memory: 1 after each optimizer step, 2 also after each "
        "forward-backward (less fragmentation, some speed).", choices=[0, 1, 2],
    )  # fmt: skip
    train_sync_interval: int | None = _f(
        None, "Wait for the GPU every N steps, so the host never runs far ahead of it (on CPU "
        "every step already waits)."
    )  # fmt: skip
    max_skipped_steps: int = _f(5, "Consecutive non-finite steps before the run stops.")

    def __post_init__(self):
        _require(self.optimizer not in _LATER_OPTIMIZERS,
                 f"--optimizer {self.optimizer}: {_LATER_OPTIMIZERS.get(self.optimizer)}: use "
                 "--optimizer adam or sgd")  # fmt: skip
        _require(self.micro_batch_size is not None, "--micro-batch-size is required")
        low_precision_state = any(
            value != "fp32" for value in (self.main_grads_dtype, self.main_params_dtype,
                                          self.exp_avg_dtype, self.exp_avg_sq_dtype)
        )  # fmt: skip
        _require(
            not low_precision_state or self.use_precision_aware_optimizer,
            "--main-grads-dtype / --main-params-dtype / --exp-avg-dtype / --exp-avg-sq-dtype "
            "other than fp32 need --use-precision-aware-optimizer",
        )
        _require(self.micro_batch_size >= 1, "--micro-batch-size must be >= 1")
        _require(
            self.check_weight_hash_across_dp_replicas_interval is None
            or self.check_weight_hash_across_dp_replicas_interval >= 1,
            "--check-weight-hash-across-dp-replicas-interval must be >= 1 (omit it to turn it off)",
        )
        _require(self.lr is not None, "--lr is required (the peak learning rate)")
        _require(
            (self.train_iters is None) != (self.train_samples is None),
            "give --train-iters (iteration-based) or --train-samples (sample-based), one of them",
        )
        if self.lr_decay_style == "wsd":
            self.lr_decay_style = "WSD"
        if self.train_iters is not None:
            _require(self.train_iters >= 1, "--train-iters must be >= 1")
            for flag, value in (("--lr-decay-samples", self.lr_decay_samples),
                                ("--lr-wsd-decay-samples", self.lr_wsd_decay_samples),
                                ("--rampup-batch-size", self.rampup_batch_size),
                                ("--step-batch-size-schedule", self.step_batch_size_schedule)):  # fmt: skip
                _require(value is None, f"{flag} needs sample-based training (--train-samples)")
            _require(self.lr_warmup_samples == 0,
                     "--lr-warmup-samples needs sample-based training (--train-samples)")  # fmt: skip
        else:
            _require(self.train_samples >= 1, "--train-samples must be >= 1")
            for flag, value in (("--lr-decay-iters", self.lr_decay_iters),
                                ("--lr-wsd-decay-iters", self.lr_wsd_decay_iters)):  # fmt: skip
                _require(value is None, f"{flag} needs iteration-based training (--train-iters)")
            _require(self.lr_warmup_iters == 0,
                     "--lr-warmup-iters needs iteration-based training (--train-iters)")  # fmt: skip
        if self.lr_warmup_fraction is not None:
            _require(0 <= self.lr_warmup_fraction <= 1, "--lr-warmup-fraction must be in [0, 1]")
            _require(
                self.lr_warmup_iters == 0 and self.lr_warmup_samples == 0,
                "give --lr-warmup-fraction or --lr-warmup-iters/--lr-warmup-samples, not both",
            )
        _require(
            all(math.isfinite(v) for v in (self.lr, self.min_lr, self.lr_warmup_init)),
            "--lr, --min-lr and --lr-warmup-init must be finite numbers",
        )
        _require(
            self.lr > 0 and self.min_lr >= 0 and self.min_lr <= self.lr,
            "need --lr > 0 and 0 <= --min-lr <= --lr",
        )
        _require(self.lr_warmup_iters >= 0 and self.lr_warmup_samples >= 0,
                 "--lr-warmup-iters / --lr-warmup-samples must be >= 0")  # fmt: skip
        if self.train_iters is not None:
            _require(
                self.lr_warmup_iters <= self.train_iters,
                "--lr-warmup-iters must be between 0 and --train-iters",
            )
        for flag, value in (("--lr-decay-iters", self.lr_decay_iters),
                            ("--lr-decay-samples", self.lr_decay_samples),
                            ("--lr-wsd-decay-iters", self.lr_wsd_decay_iters),
                            ("--lr-wsd-decay-samples", self.lr_wsd_decay_samples)):  # fmt: skip
            _require(value is None or value >= 1, f"{flag} must be >= 1")
        if self.step_batch_size_schedule is not None:
            _require(self.global_batch_size is None, "give --step-batch-size-schedule or "
                     "--global-batch-size, not both (its last batch is the global batch; "
                     "Megatron-LM's rule)")  # fmt: skip
            _require(self.rampup_batch_size is None, "give --step-batch-size-schedule or "
                     "--rampup-batch-size, not both")  # fmt: skip
            _require(not self.decrease_batch_size_if_needed, "--step-batch-size-schedule does "
                     "not take --decrease-batch-size-if-needed (Megatron-LM's rule)")  # fmt: skip
            step_batch_schedule(self.step_batch_size_schedule, 1)  # checked at parse time
        if self.rampup_batch_size is not None:
            start, increment, samples = self.rampup_batch_size
            _require(start >= 1 and increment >= 1 and samples >= 0,
                     "--rampup-batch-size START INCREMENT SAMPLES: START and INCREMENT >= 1, "
                     "SAMPLES >= 0")  # fmt: skip
        _require(
            math.isfinite(self.clip_grad) and self.clip_grad >= 0,
            f"--clip-grad must be >= 0 (0 turns clipping off), got {self.clip_grad}",
        )
        _require(self.weight_decay >= 0, "--weight-decay must be >= 0")
        _require(0 <= self.seed < 2**63, f"--seed must be between 0 and 2**63 - 1, got {self.seed}")
        _require(not (self.bf16 and self.fp16), "give --bf16 or --fp16, not both")
        _require(self.loss_scale is None or self.loss_scale > 0, "--loss-scale must be > 0")
        _require(self.hysteresis >= 1, "--hysteresis must be >= 1")
        _require(self.max_skipped_steps >= 1, "--max-skipped-steps must be >= 1")
        _require(
            self.train_sync_interval is None or self.train_sync_interval >= 1,
            "--train-sync-interval must be >= 1 (steps between waits for the GPU)",
        )
        if self.start_weight_decay is None:
            self.start_weight_decay = self.weight_decay
        if self.end_weight_decay is None:
            self.end_weight_decay = self.weight_decay

    @property
    def sample_based(self) -> bool:
        return self.train_samples is not None


@dataclass
class DataArgs:
    data_path: list[str] = _f(
        [],
        "Dataset prefixes, optionally weighted: "
        "'0.7 corpusA_text_document 0.3 corpusB_text_document'.",
    )
    split: str | None = _f(
        None, "Train/valid/test split of each prefix, e.g. 98,2,0 (default 969,30,1)."
    )
    mock_data: bool = _f(
        False,
        "Synthetic data (no --data-path needed): megatron-core's mock documents (8,192 here).",
    )
    eod_mask_loss: bool = _f(
        False,
        "Never train on the token after an end-of-document token (the first token of the "
        "next document), in training and evaluation; Megatron-LM's rule (the loss where the "
        "input is EOD is masked). In a bag target only that token's slot goes.",
    )
    reset_position_ids: bool = _f(
        False,
        "Count positions from 0 again after each end-of-document token (Megatron-LM's rule; "
        "in a bag phase from the bag after the one holding the EOD). The position ids reach "
        "learned absolute position embeddings only: megatron-core's rotary embeddings follow "
        "the place in the row, with or without it, as in Megatron-LM.",
    )
    reset_attention_mask: bool = _f(
        False,
        "No attention across documents: a position attends to earlier positions of its own "
        "document only, a document starting after each end-of-document token (in a bag "
        "phase, after each bag holding one). The mask is [micro-batch, 1, L, L] booleans per "
        "micro-batch, and attention takes it as an arbitrary mask (no causal-only kernel).",
    )
    tokenizer_type: str | None = _f(
        None,
        "Tokenizer (default: GPT2BPETokenizer when --vocab-file and --merge-file are given, "
        "as Megatron-LM's GPT example assumes; NullTokenizer with --mock-data).",
        choices=TOKENIZER_TYPES,
    )
    tokenizer_model: str | None = _f(
        None, "Tokenizer model file (.model / tokenizer.json, or the Hugging Face folder "
        "holding tokenizer.json); read from disk, never downloaded.",
    )  # fmt: skip
    vocab_file: str | None = _f(None, "GPT-2 BPE vocab.json.")
    merge_file: str | None = _f(None, "GPT-2 BPE merges.txt.")
    vocab_size: int | None = _f(None, "Vocabulary size (default: the tokenizer's).")
    tiktoken_pattern: str | None = _f(
        None,
        "TikTokenizer's pre-tokenizer regex (Megatron-LM's v1 or v2).",
        choices=sorted(TIKTOKEN_PATTERNS),
    )
    tiktoken_num_special_tokens: int = _f(
        TIKTOKEN_NUM_SPECIAL,
        "TikTokenizer: ids 0..N-1 are special tokens, the vocabulary's ranks follow.",
    )
    tokenizer_special_tokens: list[str] | None = _f(
        None, "TikTokenizer's special tokens, from id 0 (default <unk> <s> </s>; must hold "
        "those three; <SPECIAL_k> fill up to --tiktoken-num-special-tokens).",
    )  # fmt: skip
    legacy_tokenizer: bool = _f(
        False, "Megatron-LM's legacy tokenizer system. Its training takes the vocabulary "
        "size from the legacy tokenizer either way and only the EOD id from the one chosen; "
        "here every type but SentencePieceTokenizer (refused with it) has the same size and "
        "EOD in both systems, so it changes nothing.",
    )  # fmt: skip
    make_vocab_size_divisible_by: int = _f(
        128,
        "Pad the vocabulary to a multiple of this value x TP (even shards, aligned GEMMs). "
        "A checkpoint resumes at another TP only if the padded size stays the same.",
    )
    pad_vocab_size: bool = _f(
        True,
        "Without padding (Megatron-LM 0.19's flag): the model's vocabulary is the tokenizer's "
        "size as it is (it must divide by TP), unless --padded-vocab-size gives one.",
        flag="--no-pad-vocab-size",
    )
    padded_vocab_size: int | None = _f(
        None,
        "The model's vocabulary size, as given (Megatron-LM's flag): no padding by "
        "--make-vocab-size-divisible-by; must hold the tokenizer's ids and divide by TP. "
        "Default: the tokenizer's size padded to --make-vocab-size-divisible-by x TP.",
    )
    data_cache_path: str | None = _f(None, "Where dataset sample indices are cached.")
    dataloader_fast_cache_load: bool = _f(
        False, "Take the sample indices from the cache without reading the prefixes' document "
        "indices or building on rank 0 first (per-split blends; every cache built by a run "
        "without it).",
    )  # fmt: skip
    dataloader_defer_npy_index_mmap: bool = _f(
        False, "Map each dataset's cached indices at its first sample, not at start (every "
        "cache built by a run without it).",
    )  # fmt: skip
    per_dataset_sequences_path: str | None = _f(
        None, "A JSON file of each prefix's sequence and document counts "
        "(tools/build_sequences_per_dataset.py, Megatron-LM's format); each prefix's index is "
        "checked against it at start.",
    )  # fmt: skip
    train_data_path: list[str] | None = _f(
        None, "Training blend, its prefixes read whole (instead of --data-path and --split)."
    )
    valid_data_path: list[str] | None = _f(
        None, "Validation blend (none: no evaluation); with --train-data-path."
    )
    test_data_path: list[str] | None = _f(None, "Test blend; with --train-data-path.")
    data_args_path: str | None = _f(
        None, "A file holding the --data-path value (for blends too long for a command line)."
    )
    per_split_data_args_path: str | None = _f(
        None, 'A JSON file {"train": [...], "valid": [...], "test": [...]} of per-split blends.'
    )
    mmap_bin_files: bool = _f(
        True, "Read .bin files with read() instead of mmap.", flag="--no-mmap-bin-files"
    )
    mid_level_dataset_surplus: float = _f(
        0.005,
        "Extra samples each dataset of a weighted blend builds beyond its share, so that the "
        "blend's rounding never runs one dry (megatron-core's default 0.5%%).",
    )
    num_workers: int = _f(
        2,
        "Loader worker processes reading the coming micro-batches ahead (0: read in the "
        "training process when needed); the batches are the same either way.",
    )
    dataloader_type: str = _f(
        "single", "Sample order: single (each sample once per epoch).", choices=["single", "cyclic"]
    )
    pad_documents_to_bag: bool = _f(
        False,
        "Pad each document with EOD to a multiple of the bag "
        "size so bags never straddle documents.",
    )

    def __post_init__(self):
        per_split = self.train_data_path or self.valid_data_path or self.test_data_path
        sources = [bool(self.data_path), bool(self.data_args_path),
                   bool(self.per_split_data_args_path), bool(per_split)]  # fmt: skip
        _require(
            self.mock_data or any(sources),
            "give --data-path PREFIX [...] (or --train-data-path / --data-args-path / "
            "--per-split-data-args-path, or --mock-data for synthetic data)",
        )
        _require(
            sum(sources) <= 1,
            "give one of --data-path, --data-args-path, --per-split-data-args-path and "
            "--train/valid/test-data-path",
        )
        _require(
            not (self.mock_data and any(sources)),
            "--mock-data reads no files: drop it or the data path flags",
        )
        if self.mock_data and self.split is not None:
            # Megatron-LM passes it on and megatron-core replaces it (every split of synthetic
            # data is drawn); GPT-OSS's example script passes one.
            warnings.warn(f"--split {self.split} has no effect with --mock-data (every split of "
                          "synthetic data is drawn, as in Megatron-LM): ignoring it",
                          stacklevel=3)  # fmt: skip
            self.split = None
        if self.tokenizer_type is None:
            if self.vocab_file and self.merge_file:
                self.tokenizer_type = "GPT2BPETokenizer"
            elif self.mock_data or self.vocab_size:
                self.tokenizer_type = "NullTokenizer"
            else:
                raise ConfigError(
                    "give --tokenizer-type (e.g. HuggingFaceTokenizer --tokenizer-model PATH, "
                    "or NullTokenizer --vocab-size N)"
                )
        tiktoken = {"--tiktoken-pattern": self.tiktoken_pattern is not None,
                    "--tiktoken-num-special-tokens": self.tiktoken_num_special_tokens != TIKTOKEN_NUM_SPECIAL,
                    "--tokenizer-special-tokens": self.tokenizer_special_tokens is not None}  # fmt: skip
        ignored = [flag for flag, given in tiktoken.items() if given]
        if ignored and self.tokenizer_type != "TikTokenizer":
            warnings.warn(f"{', '.join(ignored)}: only TikTokenizer reads them (as in "
                          f"Megatron-LM); ignored with {self.tokenizer_type}", stacklevel=2)  # fmt: skip
        _require(
            not (self.legacy_tokenizer and self.tokenizer_type == "SentencePieceTokenizer"),
            LEGACY_SENTENCEPIECE_REFUSED,
        )
        _require(self.num_workers >= 0, "--num-workers must be >= 0 (0: no worker processes)")
        _require(
            self.mid_level_dataset_surplus >= 0,
            f"--mid-level-dataset-surplus must be >= 0, got {self.mid_level_dataset_surplus}",
        )
        _require(
            self.dataloader_type == "single",
            "--dataloader-type cyclic is not supported: samples are read in one pass per epoch "
            "(single), which the resumable data position relies on",
        )
        if self.mock_data:
            if self.per_dataset_sequences_path:
                warnings.warn("--per-dataset-sequences-path counts the prefixes' sequences: "
                              "--mock-data reads none, ignoring it", stacklevel=3)  # fmt: skip
                self.per_dataset_sequences_path = None
            return
        if self.per_split_data_args_path or per_split:
            if self.split is not None:  # Megatron-LM's dataset config refuses the two together
                warnings.warn(
                    f"--split {self.split} has no effect with per-split data paths (each split "
                    "reads its own prefixes whole): ignored",
                    stacklevel=2,
                )
            self.split = None
            return
        # A shell quirk some launch scripts have: --split "'99,1,0'" (Megatron-LM takes it).
        self.split = (self.split or "969,30,1").strip("'\" ")
        try:
            weights = [float(w) for w in self.split.replace("/", ",").split(",")]
        except ValueError:
            weights = []
        _require(
            1 <= len(weights) <= 3
            and all(math.isfinite(w) and w >= 0 for w in weights)
            and sum(weights) > 0,
            f"--split {self.split}: give up to three weights >= 0 with a positive sum, such as "
            "98,2,0 (train, valid, test)",
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
        "Sample layout and MCE batch average. full: bag*(L+1) tokens, every position has a "
        "full target bag; the loss is each position's mean over its slots, then the mean over "
        "positions. paper: the paper's bag*L+1 tokens (one target at the last position) and "
        "its loss: each slot's CE averaged over the positions where it is valid, then the "
        "(weighted) mean over slots, over the global batch. Under --tst-mode output-only "
        "(whose last positions lack slots in either layout) it picks only the loss form.",
        choices=["full", "paper"],
    )
    tst_schedule: str | None = _f(
        None,
        "Multi-stage bag schedule: BAG:FRACTION stages, then 1 (the next-token recovery phase, "
        'taking the rest), e.g. "8:0.1,4:0.2,1". Fractions in (0, 1) summing below 1; '
        'replaces --tst-bag-size / --tst-fraction / --tst-iters ("B:f,1" is --tst-bag-size B '
        "--tst-fraction f). --tst-mode, --tst-loss, --tst-layout and --tst-slot-weights apply "
        "to every bag stage; the *-at-switch controls act at the switch to the recovery phase.",
        metavar="STAGES",
    )
    tst_reinit_embeddings_at_switch: bool = _f(
        False,
        "Control (the paper's ablation): re-initialise the input embeddings and the output "
        "layer to their initial values at the switch to the recovery phase.",
    )
    tst_reinit_input_embedding_at_switch: bool = _f(
        False,
        "Control: re-initialise only the input embeddings at the switch to the recovery phase "
        "(needs --untie-embeddings-and-output-weights).",
    )
    tst_reinit_output_layer_at_switch: bool = _f(
        False,
        "Control: re-initialise only the output layer at the switch to the recovery phase "
        "(needs --untie-embeddings-and-output-weights).",
    )
    tst_reset_optimizer_at_switch: bool = _f(
        False,
        "Control: zero Adam's moments and step count at the switch to the recovery phase.",
    )
    tst_restart_schedule_at_switch: bool = _f(
        False,
        "Start the recovery phase afresh, as patch-level training (Shao et al.) does: zero "
        "Adam's state and restart the LR schedule at the switch to it (warm-up of "
        "--lr-warmup-iters, then the same decay style to --min-lr over the recovery steps).",
    )

    def __post_init__(self):
        _require(1 <= self.tst_bag_size <= 64, "--tst-bag-size must be between 1 and 64")
        if self.tst_schedule is not None:
            parse_schedule(self.tst_schedule)  # refuses a malformed one, naming the flag
            given = [flag for flag, value in (("--tst-bag-size", self.tst_bag_size != 1),
                     ("--tst-fraction", self.tst_fraction is not None),
                     ("--tst-iters", self.tst_iters is not None)) if value]  # fmt: skip
            _require(
                not given,
                f"--tst-schedule sets every stage's bag size and length: drop {', '.join(given)}"
                ' (a two-stage "B:f,1" is --tst-bag-size B --tst-fraction f)',
            )
        controls = (
            self.tst_reinit_embeddings_at_switch
            or self.tst_reinit_input_embedding_at_switch
            or self.tst_reinit_output_layer_at_switch
            or self.tst_reset_optimizer_at_switch
            or self.tst_restart_schedule_at_switch
        )
        _require(
            self.tst_bag_size > 1 or self.tst_schedule is not None or not controls,
            "--tst-reinit-*-at-switch, --tst-reset-optimizer-at-switch and "
            "--tst-restart-schedule-at-switch need --tst-bag-size > 1 or a --tst-schedule "
            "(with bag size 1 there is no switch)",
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
    """Checkpoints, resume, and when the run stops."""

    save: str | None = _f(None, "Checkpoint directory.")
    load: str | None = _f(
        None,
        "Resume from the latest complete checkpoint here; a directory with no checkpoint at "
        "all starts from scratch (so --save X --load X serves the first launch and every restart).",
    )
    pretrained_checkpoint: str | None = _f(
        None,
        "Start from the weights of this checkpoint when --load holds none (or is not given), "
        "as --finetune does (iteration, optimizer, LR schedule and data position fresh); once "
        "--load has a checkpoint, the run resumes from that instead.",
    )
    save_interval: int | None = _f(None, "Save every N steps (and at the end).")
    save_wgrads_interval: int | None = _f(
        None, "Every N steps, write the step's reduced weight gradients under SAVE/wgrads "
        "(Megatron-LM's layout; for debugging).",
    )  # fmt: skip
    save_dgrads_interval: int | None = _f(
        None, "Every N steps, write the gradients into and out of every linear layer of the "
        "step's last micro-batch under SAVE/dgrads (Megatron-LM's layout; for debugging).",
    )  # fmt: skip
    save_params_interval: int | None = _f(
        None, "Every N steps, write the weights after the step's optimizer step under "
        "SAVE/params (Megatron-LM 0.19's layout; for debugging).",
    )  # fmt: skip
    save_activations_interval: int | None = _f(
        None, "Every N steps, write the inputs, keyword arguments and outputs of every linear "
        "layer and router of the step's last micro-batch under SAVE/activations (Megatron-LM "
        "0.19's layout; for debugging).",
    )  # fmt: skip
    save_tokens_per_expert_interval: int | None = _f(
        None, "Every N steps, append each MoE layer's tokens per local expert, per "
        "micro-batch, to SAVE/tokens_per_expert/rank<R>.jsonl (Megatron-LM 0.19's format).",
    )  # fmt: skip
    save_retain_interval: int | None = _f(
        None,
        "Keep only the checkpoints whose iteration is a multiple of N, and the latest: each "
        "earlier one is deleted once the next is complete (a multiple of --save-interval).",
    )
    non_persistent_save_interval: int | None = _f(
        None,
        "Also save a non-persistent checkpoint every N steps (--non-persistent-ckpt-type "
        "global): only the newest is kept, each earlier one deleted once the next is complete; "
        "a step that makes a --save-interval checkpoint makes no non-persistent one.",
    )
    non_persistent_ckpt_type: str | None = _f(
        None,
        "Kind of non-persistent checkpoints (Megatron-LM's choices): global, a torch_dist "
        "checkpoint under --non-persistent-global-ckpt-dir; with it a --load resumes from the "
        "newer of the persistent and the non-persistent checkpoint. local and in_memory "
        "(NVIDIA's resiliency extension) are not supported.",
        choices=["global", "local", "in_memory"],
    )
    non_persistent_global_ckpt_dir: str | None = _f(
        None,
        "Where global non-persistent checkpoints go and are resumed from (default: the "
        "non_persistent folder inside --save for saving, inside --load for resuming).",
    )
    finetune: bool = _f(
        False,
        "Load only the weights from --load: iteration, optimizer, LR schedule and data "
        "position start fresh.",
    )
    use_checkpoint_args: bool = _f(
        False,
        "Take the model flags from the checkpoint of --pretrained-checkpoint / --load "
        "(Megatron-LM's list: the sizes where not given, the layer kinds always); a --load "
        "with no checkpoint yet keeps the command line's.",
    )
    use_mp_args_from_checkpoint_args: bool = _f(
        False, "With --use-checkpoint-args: the TP / PP / virtual-stage / EP sizes too."
    )
    use_tokenizer_model_from_checkpoint_args: bool = _f(
        True,
        "With --use-checkpoint-args: keep the command line's tokenizer (the checkpoint's "
        "--tokenizer-type / --tokenizer-model by default).",
        flag="--no-use-tokenizer-model-from-checkpoint-args",
    )
    no_load_optim: bool = _f(False, "Do not load the optimizer state from --load.")
    ckpt_step: int | None = _f(
        None,
        "With --load: resume from this iteration's checkpoint instead of the latest (it must be "
        "complete); the tracker file is left as it is.",
    )
    skip_train: bool = _f(
        False,
        "No training step: evaluate the validation and test splits at the loaded (or initial) "
        "weights, then exit (needs --eval-iters > 0).",
    )
    exit_on_missing_checkpoint: bool = _f(
        False,
        "With --load: stop with an error when the directory holds no checkpoint (a mistyped "
        "path) instead of starting from scratch.",
    )
    no_save_optim: bool = _f(
        False, "Save checkpoints without the optimizer state (resume them with --no-load-optim)."
    )
    ckpt_convert_format: str | None = _f(
        None, "Save the --load checkpoint again, at its iteration, into "
        "CKPT_CONVERT_SAVE/<format>, then stop (no step). Checkpoints here are torch_dist, the "
        "one format; with --no-save-optim the copy holds the weights only.",
        choices=["torch_dist"],
    )  # fmt: skip
    ckpt_convert_save: str | None = _f(None, "Where --ckpt-convert-format writes its copy.")
    ckpt_format: str = _f(
        "torch_dist",
        "Format of saved checkpoints: torch_dist (megatron-core dist_checkpointing); torch "
        "(Megatron-LM's legacy one) saves torch_dist too, with a warning. Legacy checkpoints "
        "are read whatever the value (their weights: --finetune).",
        choices=["torch_dist", "torch", "zarr", "fsdp_dtensor"],
    )
    async_save: bool = _f(
        False,
        "Write checkpoints in the background while training goes on (megatron-core's "
        "asynchronous torch_dist save: a forked writer per rank, from the state at the save "
        "step). A checkpoint becomes the latest only once every rank has written it; a kill "
        "before that leaves the previous one the latest.",
    )
    async_strategy: str | None = _f(
        None,
        "Megatron-LM 0.19's choice of async checkpoint writer. mcore: megatron-core's forked "
        "writer, which --async-save runs here; nvrx (Megatron-LM 0.19's default): NVIDIA's "
        "resiliency-extension writer, which is not wired here: given with --async-save it "
        "warns and megatron-core's writes (the same torch_dist files).",
        choices=["nvrx", "mcore"],
    )
    verify_integrity: bool = _f(
        False,
        "Hash every file of each saved checkpoint (SHA-256, in its manifest; without the flag "
        "only files up to 64 MiB are hashed, larger ones recorded by size) and, at a load, "
        "check every file against its hash before anything is read: a checkpoint saved "
        "without the flag is refused by a load with it (Megatron-LM 0.19's rule).",
    )
    ckpt_load_validate_sharding_integrity: bool = _f(
        True,
        "At a load, megatron-core checks that every tensor shard is read as the main replica "
        "by exactly one rank; --no-ckpt-load-validate-sharding-integrity skips that check "
        "(faster loads at scale).",
        flag="--no-ckpt-load-validate-sharding-integrity",
    )
    use_persistent_ckpt_worker: bool = _f(
        False,
        "With --async-save: one long-lived writer process per rank (megatron-core's persistent "
        "checkpoint worker, started at the first save) instead of a new one per save.",
    )
    ckpt_fully_parallel_save: bool = _f(
        True,
        "Every data-parallel replica writes only its share of the checkpoint.",
        flag="--no-ckpt-fully-parallel-save",
    )
    ckpt_fully_parallel_load: bool = _f(
        False, "Each data-parallel replica reads a share and exchanges it with the others."
    )
    override_ckpt_iteration: int | None = _f(
        None,
        "Resume the --load checkpoint's weights, optimizer and LR schedule at this iteration "
        "instead of its own, with the data position N steps read (e.g. to replay the data "
        "from an earlier step; Megatron-LM 0.19's). The checkpoint's global batch must be "
        "the run's, and N in the checkpoint's phase / bag stage.",
    )
    ckpt_fully_parallel_load_exchange_algo: str = _f(
        "broadcast",
        "How --ckpt-fully-parallel-load shares what each replica read (megatron-core's "
        "algorithms): broadcast (each tensor from the rank that read it), gather_rounds "
        "(all-gathers in rounds), gather_object (one all-gather of whole state dicts).",
        choices=["broadcast", "gather_rounds", "gather_object"],
    )
    ckpt_assume_constant_structure: bool = _f(
        False,
        "Saves after the first reuse its plan (megatron-core's cached checkpoint structure: "
        "which rank writes what, the global metadata, once two saves agree on them) and skip "
        "the sharding-integrity check, as Megatron-LM does: faster repeated saves of a model "
        "and optimizer whose structure does not change.",
    )
    dist_ckpt_strictness: str = _f(
        "assume_ok_unexpected",
        "What a load does when the model and the checkpoint hold different tensors "
        "(Megatron-LM's choices). Model tensors the checkpoint lacks: refused, named, by "
        "assume_ok_unexpected / raise_*; kept at their initial values by log_* / return_* "
        "(listed) and ignore_all, with --finetune or --no-load-optim. Checkpoint tensors the "
        "model does not use: ignored, except by *_all (listed; refused by raise_all).",
        choices=["assume_ok_unexpected", "log_unexpected", "log_all", "raise_unexpected",
                 "raise_all", "return_unexpected", "return_all", "ignore_all"],
    )  # fmt: skip
    dist_ckpt_optim_fully_reshardable: bool = _f(
        False,
        "Save the distributed optimizer's state gathered into the model's parameter space, so "
        "that it resumes at any TP / PP / DP / EP layout (default: sharded by data-parallel "
        "rank, resumable over data parallelism only; faster to save).",
    )
    distrib_optim_fully_reshardable_mem_efficient: bool = _f(
        False,
        "With --dist-ckpt-optim-fully-reshardable: gather over gloo onto the first "
        "data-parallel rank only (less device memory; that rank writes it all).",
    )
    override_opt_param_scheduler: bool = _f(
        False,
        "On resume, follow this run's LR / weight-decay schedule flags, not the checkpoint's.",
        flag="--override-opt_param-scheduler",
    )
    use_checkpoint_opt_param_scheduler: bool = _f(
        False,
        "On resume, follow the checkpoint's LR / weight-decay schedule, whatever the flags say.",
        flag="--use-checkpoint-opt_param-scheduler",
    )
    exit_interval: int | None = _f(None, "Save and exit when the step is a multiple of N.")
    phase_transition_iterations: str | None = _f(
        None, "Comma-separated steps where a data phase ends (Megatron-LM's data curriculum, "
        "not TST's phases): save and exit there, to be relaunched with the next phase's data. "
        "Needs the same global batch in every phase, no ramp-up.",
        metavar="STEPS",
    )  # fmt: skip
    exit_signal: str = _f(
        "SIGTERM",
        "The signal that saves and exits (Megatron-LM's --exit-signal). Here SIGTERM, SIGUSR1, "
        "SIGUSR2 and SIGINT all do, whichever is named: the flag only checks the name.",
        choices=["SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT"],
    )
    exit_duration_in_mins: float | None = _f(None, "Save and exit after this many minutes.")
    dry_run: bool = _f(
        False,
        "Build the model on the meta device, print the resolved architecture, parameter counts "
        "and the per-rank layout, and exit (reads no data or tokenizer files).",
    )
    dry_run_world_size: int | None = _f(
        None,
        "Processes (GPUs) the --dry-run lays the model out on "
        "(default: the smallest world both grids fit, TP x PP x CP and expert-TP x EP x PP).",
    )
    dry_run_report: str | None = _f(
        None,
        "With --dry-run, also write what it prints as JSON to this file (model and parameter "
        "counts, layout, per-stage memory, phase schedule and token budget), for scripts.",
        metavar="FILE",
    )

    def _dump_intervals(self) -> tuple[tuple[str, int | None], ...]:
        """The debugging dumps' flags and intervals (tst.grad_dumps)."""
        return (("--save-wgrads-interval", self.save_wgrads_interval),
                ("--save-dgrads-interval", self.save_dgrads_interval),
                ("--save-params-interval", self.save_params_interval),
                ("--save-activations-interval", self.save_activations_interval),
                ("--save-tokens-per-expert-interval", self.save_tokens_per_expert_interval))  # fmt: skip

    def transition_iterations(self) -> tuple[int, ...]:
        """--phase-transition-iterations, sorted (Megatron-LM sorts them)."""
        if not self.phase_transition_iterations:
            return ()
        try:
            steps = [int(x.strip()) for x in str(self.phase_transition_iterations).split(",")]
        except ValueError:
            steps = [0]
        _require(
            all(step >= 1 for step in steps),
            f"--phase-transition-iterations {self.phase_transition_iterations}: give "
            "comma-separated steps >= 1, such as 1000,5000",
        )
        return tuple(sorted(steps))

    def __post_init__(self):
        if self.override_ckpt_iteration is not None:
            _require(self.override_ckpt_iteration >= 0, "--override-ckpt-iteration must be >= 0")
            _require(not self.finetune, "--override-ckpt-iteration sets the iteration a resume "
                     "continues at; --finetune starts at 0: give one (Megatron-LM's rule)")  # fmt: skip
        if self.async_save and self.async_strategy == "nvrx":
            warnings.warn("--async-save: --async-strategy nvrx (Megatron-LM 0.19's default, "
                          "NVIDIA's resiliency-extension writer) is not wired here; megatron-"
                          "core's writer (--async-strategy mcore) writes the same torch_dist "
                          "files", stacklevel=2)  # fmt: skip
        if self.ckpt_convert_format is not None:  # Megatron-LM's rules, and what a copy needs
            _require(self.load and self.ckpt_convert_save, "--ckpt-convert-format copies the "
                     "--load checkpoint into --ckpt-convert-save: give both")  # fmt: skip
            _require(not self.finetune, "--ckpt-convert-format keeps the checkpoint's iteration; "
                     "--finetune would start it at 0: drop --finetune")  # fmt: skip
            _require(not self.no_load_optim or self.no_save_optim,
                     "--ckpt-convert-format with --no-load-optim would save a fresh optimizer "
                     "state as the checkpoint's: add --no-save-optim for a weights-only copy, or "
                     "drop --no-load-optim")  # fmt: skip
            self.exit_on_missing_checkpoint = True  # Megatron-LM's rule: nothing to convert
        else:
            _require(self.ckpt_convert_save is None,
                     "--ckpt-convert-save is where --ckpt-convert-format writes: add it")  # fmt: skip
        _require(
            self.dry_run_world_size is None or self.dry_run_world_size >= 1,
            "--dry-run-world-size must be >= 1",
        )
        _require(
            self.dry_run_report is None or self.dry_run,
            "--dry-run-report writes the --dry-run's report: add --dry-run",
        )
        for flag, value in (("--save-interval", self.save_interval),
                            ("--save-retain-interval", self.save_retain_interval),
                            ("--exit-interval", self.exit_interval),
                            *self._dump_intervals()):  # fmt: skip
            _require(value is None or value >= 1, f"{flag} must be >= 1 (omit it to turn it off)")
        for flag, value in self._dump_intervals():
            _require(value is None or self.save is not None,
                     f"{flag} writes under the --save directory: give --save")  # fmt: skip
        self.transition_iterations()  # checks the list
        _require(
            self.save_retain_interval is None
            or not self.save
            or (self.save_interval and self.save_retain_interval % self.save_interval == 0),
            f"--save-retain-interval {self.save_retain_interval} must be a multiple of "
            f"--save-interval ({self.save_interval}): the checkpoints it keeps are among those "
            "saved"
            if self.save_interval
            else "--save-retain-interval needs --save-interval (a divisor of it): only the "
            "checkpoint at the end would be saved",
        )
        _require(
            self.exit_duration_in_mins is None
            or (math.isfinite(self.exit_duration_in_mins) and self.exit_duration_in_mins > 0),
            "--exit-duration-in-mins must be > 0 (omit it for no time limit)",
        )
        _require(
            not (self.override_opt_param_scheduler and self.use_checkpoint_opt_param_scheduler),
            "give --override-opt_param-scheduler or --use-checkpoint-opt_param-scheduler, not both",
        )
        _require(
            self.ckpt_format in ("torch_dist", "torch"),
            f"--ckpt-format {self.ckpt_format} is not supported: checkpoints are megatron-core "
            "dist_checkpointing's torch_dist format (resumable under any TP / PP / DP layout); "
            "drop the flag or use --ckpt-format torch_dist",
        )
        if self.ckpt_format == "torch" and self.save:
            warnings.warn(
                "--ckpt-format torch: checkpoints are saved in torch_dist, megatron-core "
                "dist_checkpointing's format (resumable under any TP / PP / DP layout; "
                "Megatron-LM reads it too), not in the legacy per-rank files; legacy "
                "checkpoints are read wherever given (--load with --finetune, "
                "--pretrained-checkpoint), whatever --ckpt-format says",
                stacklevel=3,
            )
        _require(
            not self.finetune or self.load or self.pretrained_checkpoint,
            "--finetune loads the weights of --load: give --load CHECKPOINT_DIR",
        )
        _require(
            self.ckpt_step is None or self.load,
            "--ckpt-step applies to --load: give --load CHECKPOINT_DIR",
        )
        _require(
            not self.exit_on_missing_checkpoint or self.load or self.pretrained_checkpoint,
            "--exit-on-missing-checkpoint applies to --load: give --load CHECKPOINT_DIR",
        )
        _require(self.ckpt_step is None or self.ckpt_step >= 0, "--ckpt-step must be >= 0")
        self._check_non_persistent()

    def _check_non_persistent(self) -> None:
        """Megatron-LM 0.16.1's non-persistent checkpoints: the global kind is wired; what
        Megatron-LM would fail on later (at the first non-persistent save) is refused here."""
        kind, every = self.non_persistent_ckpt_type, self.non_persistent_save_interval
        _require(
            kind != "local",
            "--non-persistent-ckpt-type local needs NVIDIA's resiliency extension "
            "(nvidia-resiliency-ext's local checkpoint manager), which is not wired here: use "
            "--non-persistent-ckpt-type global (a torch_dist checkpoint under "
            "--non-persistent-global-ckpt-dir, by default SAVE/non_persistent)",
        )
        _require(
            kind != "in_memory",
            "--non-persistent-ckpt-type in_memory is refused by Megatron-LM 0.16.1 too (only "
            "global and local exist yet): use --non-persistent-ckpt-type global",
        )
        _require(
            every is None or every >= 1,
            "--non-persistent-save-interval must be >= 1 (omit it to turn it off)",
        )
        _require(
            every is None or kind is not None,
            "--non-persistent-save-interval needs --non-persistent-ckpt-type (Megatron-LM "
            "stops at the first non-persistent save without one): add "
            "--non-persistent-ckpt-type global",
        )
        if every is not None and not self.save:
            warnings.warn("--non-persistent-save-interval has no effect without --save (as in "
                          "Megatron-LM, nothing is saved)", stacklevel=3)  # fmt: skip
        if self.non_persistent_global_ckpt_dir and kind is None:
            warnings.warn("--non-persistent-global-ckpt-dir has no effect without "
                          "--non-persistent-ckpt-type global", stacklevel=3)  # fmt: skip
        if kind is None:
            return
        for flag, root in (("--save", self.save), ("--load", self.load)):
            if not root:
                continue
            folder = self.non_persistent_dir(root)
            _require(
                os.path.realpath(folder) != os.path.realpath(root),
                f"--non-persistent-global-ckpt-dir {folder} is the {flag} directory: only the "
                "newest non-persistent checkpoint is kept there, so the persistent ones would "
                "be deleted; give it a folder of its own (by default SAVE/non_persistent)",
            )

    def non_persistent_dir(self, root: str) -> str:
        """Where the global non-persistent checkpoints of ``root`` (--save or --load) live."""
        return non_persistent_dir(root, self.non_persistent_global_ckpt_dir)


def non_persistent_dir(root: str, folder: str | None = None) -> str:
    """--non-persistent-global-ckpt-dir, or by default the non_persistent folder of ``root``
    (--save or --load), as Megatron-LM places them."""
    return folder or os.path.join(root, "non_persistent")


@dataclass
class LoggingConfig:
    """Evaluation, logs, metrics, TensorBoard / Weights & Biases, profiling."""

    eval_interval: int = _f(1000, "Evaluate next-token loss every N steps.")
    eval_iters: int = _f(100, "Batches per evaluation (0 = no evaluation).")
    eval_global_batch_size: int | None = _f(
        None,
        "Samples per evaluation batch (default: the training's global batch); a multiple of "
        "--eval-micro-batch-size x data-parallel size.",
    )
    eval_micro_batch_size: int | None = _f(
        None,
        "Samples per micro-batch in evaluations (default --micro-batch-size): a larger one "
        "runs evaluations in fewer, bigger forward passes (memory per device grows with it).",
    )
    start_eval_at_iter: int | None = _f(
        None,
        "Evaluate only from this iteration on (the evaluations every --eval-interval before it "
        "are skipped; the one at the end of training is not).",
    )
    full_validation: bool = _f(
        False,
        "Each evaluation reads the whole validation split once (as many global batches as it "
        "fills); --eval-iters then sizes only the test split's score at the end.",
    )
    multiple_validation_sets: bool = _f(
        False,
        "With --full-validation and several --valid-data-path prefixes: each prefix is a "
        "validation set of its own, scored as val_loss-0, val_loss-1, ... (val_loss: all "
        "together).",
    )
    validation_set_names: list[str] | None = _f(
        None,
        "Names for the --multiple-validation-sets sets, one per --valid-data-path prefix in "
        "order: val_loss-NAME instead of val_loss-0, val_loss-1, ... (Megatron-LM 0.19's).",
        nargs="+",
    )
    log_interval: int = _f(100, "Log every N steps.")
    timing_log_level: int = _f(
        0,
        "megatron-core's timers, logged every --log-interval steps as Megatron-LM logs them: "
        "0 none; 1 forward-backward, gradient all-reduces, the optimizer and its parts; 2 also "
        "the data read and each micro-batch's forward / backward compute and pipeline sends "
        "and receives.",
        choices=[0, 1, 2],
        type=int,
    )
    timing_log_option: str = _f(
        "minmax",
        "What the timer log gives per timer over the ranks: max, (min, max), or all ranks.",
        choices=["max", "minmax", "all"],
    )
    barrier_with_L1_time: bool = _f(  # noqa: N815 (Megatron-LM's name)
        True,
        "Level-1 timers (forward-backward, optimizer) do not start and stop with a barrier "
        "(less exact, no synchronisation).",
        flag="--no-barrier-with-level-1-timing",
    )
    log_timers_to_tensorboard: bool = _f(
        False, "Write the timers (their max over ranks, ms per step) to TensorBoard too."
    )
    tensorboard_dir: str | None = _f(None, "TensorBoard log directory.")
    tensorboard_log_interval: int = _f(1, "Write TensorBoard scalars every N steps.")
    metrics_file: str | None = _f(None, "JSON-lines metrics file.")
    log_memory_to_tensorboard: bool = _f(False, "Write memory use to TensorBoard.")
    log_memory_interval: int | None = _f(
        None,
        "Print the memory use of every rank of the first data-parallel replica every N steps "
        "(a multiple of --log-interval); it is printed at the first logged steps in any case.",
    )
    record_memory_history: bool = _f(
        False, "Record CUDA's allocations from the model's build on (stack traces, the last "
        "100,000), and dump the allocator's snapshot at every log step and at an out-of-memory "
        "error from the last rank (torch.cuda.memory's pickle; a GPU only).",
    )  # fmt: skip
    memory_snapshot_path: str = _f(
        "snapshot.pickle", "Where --record-memory-history dumps the snapshot "
        "(https://pytorch.org/memory_viz reads it).",
    )  # fmt: skip
    log_device_memory_used: bool = _f(
        False, "Add the device's whole used memory to the memory report (every process's, as "
        "nvidia-smi shows it; the host's on CPU).",
    )  # fmt: skip
    log_energy: bool = _f(
        False, "Log each GPU's energy per iteration (J) and power (W), read from NVML's energy "
        "counter (evaluations and checkpoint saves excluded, as Megatron-LM does; a GPU only).",
    )  # fmt: skip
    log_params_norm: bool = _f(False, "Log the parameters' L2 norm.")
    log_num_zeros_in_grad: bool = _f(False, "Log the number of zeros in the gradients.")
    log_validation_ppl_to_tensorboard: bool = _f(False, "Write validation perplexity too.")
    log_loss_scale_to_tensorboard: bool = _f(
        True, "No loss scale in TensorBoard.", flag="--no-log-loss-scale-to-tensorboard"
    )
    wandb_project: str | None = _f(None, "Weights & Biases project (logs the metrics there).")
    wandb_exp_name: str | None = _f(None, "Weights & Biases run name.")
    wandb_save_dir: str | None = _f(None, "Weights & Biases local directory.")
    wandb_entity: str | None = _f(None, "Weights & Biases entity (team or user).")
    logging_level: int | None = _f(None, "Python logging level (e.g. 20 = INFO, 30 = WARNING).")
    profile: bool = _f(False, "Record a torch profiler trace (into --tensorboard-dir).")
    profile_step_start: int = _f(10, "First profiled step.")
    profile_step_end: int = _f(12, "Step after the last profiled one.")
    profile_ranks: list[int] = _f([0], "Ranks that profile.", type=int)
    pytorch_profiler_collect_callstack: bool = _f(
        False, "--profile's trace records each operator's Python call stack (torch profiler's "
        "with_stack; larger traces).",
    )  # fmt: skip
    nvtx_ranges: bool = _f(
        False, "While --profile records, megatron-core's NVTX range markers are on (for "
        "NVIDIA's Nsight Systems; CUDA only).",
    )  # fmt: skip
    pytorch_profiler_collect_chakra: bool = _f(
        False, "--profile also records torch's execution trace (the graph Chakra's tools "
        "read: operators, their inputs and the collectives) as chakra_rank<R>_steps<A>-<B>.json "
        "beside the Chrome trace.",
    )  # fmt: skip
    manual_gc: bool = _f(False, "Disable automatic garbage collection; collect every interval.")
    manual_gc_interval: int = _f(0, "Steps between manual collections (0: only at evaluation).")
    manual_gc_eval: bool = _f(
        True, "No collection around evaluation with --manual-gc.", flag="--no-manual-gc-eval"
    )
    peak_tflops: float | None = _f(
        None,
        "Per-device peak TFLOP/s for MFU (default: 989 on CUDA; on CPU the best fp32 GEMM rate "
        "measured, re-measured whenever a window beats it).",
    )

    def __post_init__(self):
        for name in ("eval_interval", "log_interval", "tensorboard_log_interval"):
            _require(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be >= 1")
        _require(self.eval_iters >= 0, "--eval-iters must be >= 0 (0 = no evaluation)")
        for flag, value in (("--eval-global-batch-size", self.eval_global_batch_size),
                            ("--eval-micro-batch-size", self.eval_micro_batch_size)):  # fmt: skip
            _require(value is None or value >= 1, f"{flag} must be >= 1")
        _require(self.start_eval_at_iter is None or self.start_eval_at_iter >= 0,
                 "--start-eval-at-iter must be >= 0")  # fmt: skip
        _require(self.validation_set_names is None or self.multiple_validation_sets,
                 "--validation-set-names names the sets of --multiple-validation-sets: add it "
                 "(Megatron-LM's rule)")  # fmt: skip
        _require(
            not self.multiple_validation_sets or self.full_validation,
            "--multiple-validation-sets needs --full-validation (as in Megatron-LM): each set "
            "is read whole",
        )
        _require(
            self.log_memory_interval is None
            or (
                self.log_memory_interval >= 1 and self.log_memory_interval % self.log_interval == 0
            ),
            f"--log-memory-interval {self.log_memory_interval} must be a multiple of "
            f"--log-interval ({self.log_interval}): memory is read when a step is logged",
        )
        _require(self.manual_gc_interval >= 0, "--manual-gc-interval must be >= 0")
        _require(
            self.profile_step_end > self.profile_step_start >= 0,
            "--profile-step-end must be after --profile-step-start",
        )


@dataclass
class Config:
    model: ModelConfig
    parallel: ParallelConfig
    training: TrainingConfig
    data: DataArgs
    tst: TSTConfig
    run: RunConfig
    log: LoggingConfig
    moe: MoEConfig
    mla: MLAConfig = dataclasses.field(default_factory=MLAConfig)
    mtp: MTPConfig = dataclasses.field(default_factory=MTPConfig)
    mup: MuPConfig = dataclasses.field(default_factory=MuPConfig)
    rerun: RerunConfig = dataclasses.field(default_factory=RerunConfig)
    fim: FIMConfig = dataclasses.field(default_factory=FIMConfig)
    # Megatron-LM flags given that change nothing here: (flag, why), see tst.megatron_flags.
    accepted_flags: tuple[tuple[str, str], ...] = ()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_SECTIONS = {
    "model": ModelConfig,
    "parallel": ParallelConfig,
    "training": TrainingConfig,
    "data": DataArgs,
    "tst": TSTConfig,
    "run": RunConfig,
    "log": LoggingConfig,
    "moe": MoEConfig,
    "mla": MLAConfig,
    "mtp": MTPConfig,
    "mup": MuPConfig,
    "rerun": RerunConfig,
    "fim": FIMConfig,
}


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (a ValueError the entry point prints), no usage."""

    def error(self, message):
        raise ConfigError(message)


def _add_field(group, section: str, f, kind) -> None:
    meta = f.metadata
    flag = meta["flag"] or "--" + f.name.replace("_", "-")
    args = typing.get_args(kind)
    base = next((a for a in args if a is not type(None)), kind) if args else kind
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    kwargs = dict(dest=f"{section}.{f.name}", help=meta["help"], default=default)
    if base is bool:
        group.add_argument(flag, action="store_false" if default else "store_true", **kwargs)
        return
    if typing.get_origin(kind) is list or typing.get_origin(base) is list:
        kwargs["nargs"] = "+"
        base = str
    if meta["nargs"] is not None:
        kwargs["nargs"] = meta["nargs"]
    if meta["type"] is not None:
        base = meta["type"]
    if meta["choices"]:
        kwargs["choices"] = meta["choices"]
    else:  # a flag-shaped metavar, not the "section.name" destination
        kwargs["metavar"] = meta["metavar"] or f.name.upper()
    group.add_argument(flag, type=base, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    from tst import megatron_flags

    parser = _Parser(
        prog="pretrain_tst.py",
        description="Token Superposition Training of megatron-core GPT / MoE models.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,  # a misspelt flag is an error, never another flag's prefix
    )
    for section, cls in _SECTIONS.items():
        group = parser.add_argument_group(section)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            _add_field(group, section, f, hints[f.name])
    megatron_flags.add_to_parser(parser)
    return parser


@functools.lru_cache(maxsize=1)
def _shared_parser() -> argparse.ArgumentParser:
    """One parser for every :func:`parse_args` of the process (building it costs as much as
    a dry run's model build); nothing mutates it, and the defaults it hands out are copied."""
    return build_parser()


def parse_args(argv=None) -> Config:
    """Parse the command line into a :class:`Config` (field checks run; see tst.plan).

    Unknown flags are reported first, all of them, each with the nearest known flag; then a
    bad value; then Megatron-LM flags that cannot run here, each with the reason and the fix.
    """
    from tst import megatron_flags

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _shared_parser()
    megatron_flags.check_unknown(parser, argv)
    namespace = parser.parse_args(megatron_flags.apply_aliases(argv))
    values: dict[str, dict] = {section: {} for section in _SECTIONS}
    extra: dict[str, object] = {}
    # A default list is the parser's own object: each Config gets a copy of its own.
    for key, value in copy.deepcopy(vars(namespace)).items():
        section, name = key.split(".", 1)
        if section in values:
            values[section][name] = value
        else:
            extra[key] = value
    accepted = megatron_flags.resolve(extra)
    if values["run"]["use_checkpoint_args"]:
        from tst.checkpoint_args import apply_checkpoint_args, given_dests

        apply_checkpoint_args(values, given_dests(parser, megatron_flags.apply_aliases(argv)))
    sections = {section: cls(**values[section]) for section, cls in _SECTIONS.items()}
    # Megatron-LM's rule, on its deprecated flag only: `--attention-backend flash` is taken
    # (megatron-core makes Transformer Engine's attention deterministic or refuses to run).
    _require(
        not (sections["training"].deterministic_mode and "--use-flash-attn" in argv),
        "--deterministic-mode with --use-flash-attn: flash attention cannot be used in "
        "deterministic mode (Megatron-LM's rule): drop one",
    )
    return Config(**sections, accepted_flags=accepted)
