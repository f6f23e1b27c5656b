"""MoE routing and expert flags (Megatron-LM's names and defaults), forwarded to megatron-core.

The experts' shape (``--num-experts``, ``--moe-router-topk``, ``--moe-ffn-hidden-size``, ...)
lives with the model in :class:`tst.config.ModelConfig`; this section is how tokens are routed
to them, how balance is kept, and how they are computed. Every field is a megatron-core
``TransformerConfig`` field of the same name.
"""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass

from tst.config_fields import _f, _require
from tst.errors import ConfigError

__all__ = ["MoEConfig", "moe_layers", "parse_layer_freq"]


def parse_layer_freq(text: str | int, num_layers: int, flag: str = "--moe-layer-freq",
                     ones: str = "MoE", zeros: str = "dense") -> int | list[int]:  # fmt: skip
    """``--moe-layer-freq`` (or another per-layer pattern ``flag``): an int N, or a Python
    list expression of 0/1 per layer such as ``([0]*3+[1]*58)`` (Megatron-LM's form),
    evaluated safely."""
    if isinstance(text, int):
        return text
    text = str(text).strip()
    if text.lstrip("-").isdigit():
        return int(text)

    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.List):
            return [value(e) for e in node.elts]
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = value(node.left), value(node.right)
            return left + right if isinstance(node.op, ast.Add) else left * right
        raise ValueError

    try:
        freq = value(ast.parse(text, mode="eval").body)
    except (SyntaxError, ValueError, TypeError):
        raise ConfigError(
            f"{flag} {text}: give an int N or a list of 0/1 per layer such as '([0]*3+[1]*58)'"
        ) from None
    _require(
        isinstance(freq, list) and len(freq) == num_layers and set(freq) <= {0, 1},
        f"{flag} {text}: the list must hold one 0 ({zeros}) or 1 ({ones}) per layer "
        f"({num_layers} layers)",
    )
    return freq


def moe_layers(freq: int | list[int], num_layers: int) -> list[int]:
    """Per layer, 1 where it is an MoE layer: an int N makes every N-th layer MoE, starting
    with the first (Megatron-LM's rule); a list is already the pattern."""
    if isinstance(freq, int):
        return [int(i % freq == 0) for i in range(num_layers)]
    return list(freq)


@dataclass
class MoEConfig:
    moe_router_score_function: str = _f(
        "softmax", "Router scores: softmax, or sigmoid (DeepSeek-V3).",
        choices=["softmax", "sigmoid"],
    )  # fmt: skip
    moe_router_pre_softmax: bool = _f(
        False, "Softmax before the top-k (the top-k weights are then not renormalised)."
    )
    moe_router_topk_scaling_factor: float | None = _f(
        None, "Scale of the routing weights (DeepSeek-V3: 2.5)."
    )
    moe_router_num_groups: int | None = _f(
        None, "Expert groups for device-limited routing (top groups, then top-k inside)."
    )
    moe_router_group_topk: int | None = _f(None, "Groups each token may route to.")
    moe_router_enable_expert_bias: bool = _f(
        False, "Aux-loss-free balancing: a per-expert bias on the routing scores (state)."
    )
    moe_router_bias_update_rate: float = _f(1e-3, "Step of the expert-bias update.")
    moe_router_dtype: str | None = _f(
        None, "Router computation dtype (default the model's).", choices=["fp32", "fp64"]
    )
    moe_router_force_load_balancing: bool = _f(
        False, "Random routing (benchmarking only: the model learns nothing useful)."
    )
    moe_router_padding_for_fp8: bool = _f(
        False, "Pad routing maps for FP8 grouped GEMMs (Transformer Engine)."
    )
    moe_z_loss_coeff: float | None = _f(None, "Router z-loss coefficient.")
    moe_expert_capacity_factor: float | None = _f(
        None, "Expert capacity as a multiple of the even share; tokens over it are dropped."
    )
    moe_pad_expert_input_to_capacity: bool = _f(
        False, "Pad each expert's input to its capacity (needs --moe-expert-capacity-factor)."
    )
    moe_token_drop_policy: str = _f(
        "probs", "Which tokens an over-capacity expert drops.", choices=["probs", "position"]
    )
    moe_layer_freq: str = _f(
        "1", "Which layers are MoE: every N-th (an int) or a 0/1 list such as ([0]*3+[1]*58)."
    )
    moe_shared_expert_gate: bool = _f(
        False, "A learned sigmoid gate on the shared expert's output (Qwen2-MoE style)."
    )
    moe_input_jitter_eps: float | None = _f(
        None, "Multiply the router's input by uniform noise in [1 - eps, 1 + eps] while training."
    )
    moe_apply_probs_on_input: bool = _f(
        False, "Scale each expert's input by its routing probability instead of its output "
        "(needs --moe-router-topk 1).",
    )  # fmt: skip
    moe_shared_expert_overlap: bool = _f(
        False, "Overlap the shared expert with the token dispatch (alltoall / flex)."
    )
    moe_permute_fusion: bool = _f(False, "Fused token permutation (CUDA + Transformer Engine).")
    moe_router_fusion: bool = _f(False, "Fused router top-k (CUDA + Transformer Engine).")
    use_fused_weighted_squared_relu: bool = _f(
        False, "Fuse the experts' squared ReLU with the routing-weight product (--squared-relu; "
        "takes effect in Transformer Engine's grouped-GEMM experts, same math; needs "
        "--disable-bias-linear).",
    )  # fmt: skip
    moe_enable_deepep: bool = _f(False, "DeepEP for the flex dispatcher (needs DeepEP, CUDA).")
    moe_flex_dispatcher_backend: str = _f(
        "deepep", "Backend of the flex dispatcher.", choices=["deepep", "hybridep"]
    )
    moe_deepep_num_sms: int = _f(20, "Streaming multiprocessors DeepEP's kernels use.")
    moe_hybridep_num_sms: int = _f(16, "Streaming multiprocessors HybridEP's kernels use.")
    overlap_moe_expert_parallel_comm: bool = _f(
        False, "Overlap expert-parallel all-to-all with computation (batch-level schedule)."
    )
    ep_overlap_early_attn_memory_release: bool = _f(
        False,
        "With --overlap-moe-expert-parallel-comm: run the attention's backward before the "
        "overlapped micro-batch's expert computation, freeing its activations earlier (lower "
        "peak memory).",
    )

    def __post_init__(self):
        _require(
            not self.ep_overlap_early_attn_memory_release or self.overlap_moe_expert_parallel_comm,
            "--ep-overlap-early-attn-memory-release reorders --overlap-moe-expert-parallel-comm's "
            "schedule: add that flag (megatron-core's rule)",
        )
        for flag, sms in (("--moe-deepep-num-sms", self.moe_deepep_num_sms),
                          ("--moe-hybridep-num-sms", self.moe_hybridep_num_sms)):  # fmt: skip
            _require(sms >= 1, f"{flag} must be >= 1, got {sms}")
        _require(
            self.moe_router_bias_update_rate >= 0
            and math.isfinite(self.moe_router_bias_update_rate),
            "--moe-router-bias-update-rate must be >= 0",
        )
        if self.moe_expert_capacity_factor is not None:
            _require(
                self.moe_expert_capacity_factor > 0, "--moe-expert-capacity-factor must be > 0"
            )
        _require(
            not self.moe_pad_expert_input_to_capacity or self.moe_expert_capacity_factor,
            "--moe-pad-expert-input-to-capacity needs --moe-expert-capacity-factor",
        )
        if self.moe_input_jitter_eps is not None:
            _require(
                0 < self.moe_input_jitter_eps < 1,
                f"--moe-input-jitter-eps must be in (0, 1), got {self.moe_input_jitter_eps}",
            )
        _require(
            (self.moe_router_num_groups is None) == (self.moe_router_group_topk is None),
            "give --moe-router-num-groups and --moe-router-group-topk together",
        )

    def transformer_config_fields(self, num_layers: int) -> dict:
        """The megatron-core ``TransformerConfig`` fields this section sets (names equal)."""
        fields = {
            name: getattr(self, name)
            for name in (
                "moe_router_score_function", "moe_router_pre_softmax",
                "moe_router_topk_scaling_factor", "moe_router_num_groups",
                "moe_router_group_topk", "moe_router_enable_expert_bias",
                "moe_router_bias_update_rate", "moe_router_dtype",
                "moe_router_force_load_balancing", "moe_z_loss_coeff",
                "moe_expert_capacity_factor", "moe_pad_expert_input_to_capacity",
                "moe_token_drop_policy", "moe_shared_expert_overlap", "moe_input_jitter_eps",
                "moe_apply_probs_on_input", "moe_shared_expert_gate", "moe_deepep_num_sms",
                "moe_hybridep_num_sms", "use_fused_weighted_squared_relu",
            )
        }  # fmt: skip
        fields["moe_layer_freq"] = parse_layer_freq(self.moe_layer_freq, num_layers)
        fields["moe_router_padding_for_quantization"] = self.moe_router_padding_for_fp8
        return fields
