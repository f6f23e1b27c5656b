"""Multi-latent attention (MLA, DeepSeek-V2/V3) flags: Megatron-LM's names and defaults.

With ``--multi-latent-attention`` each layer's attention is megatron-core's
``MLASelfAttention`` (built from its layer spec, configured by ``MLATransformerConfig``):
queries through an optional low-rank ``--q-lora-rank`` bottleneck, keys and values through a
shared ``--kv-lora-rank`` latent, each head's query/key split into a ``--qk-head-dim`` part
without positions and a ``--qk-pos-emb-head-dim`` part rotated by RoPE (YaRN by default), and
``--v-head-dim`` values. Only attention changes: the bag embedding and the multi-hot loss
see the same ``[L, b, h]`` hidden states as with ordinary attention.

Megatron-LM 0.16.1 has no flags for YaRN's original context length or beta_fast / beta_slow:
megatron-core's ``MLATransformerConfig`` defaults apply (4096, 32, 1), as in Megatron-LM.
"""

from __future__ import annotations

from dataclasses import dataclass

from tst.config_fields import _f, _require

__all__ = ["MLAConfig"]


@dataclass
class MLAConfig:
    multi_latent_attention: bool = _f(
        False, "Multi-latent attention (DeepSeek-V2/V3) instead of multi-head attention."
    )
    q_lora_rank: int | None = _f(
        None, "Rank of the queries' low-rank projection (none: a full query projection)."
    )
    kv_lora_rank: int = _f(32, "Rank of the keys' and values' shared low-rank latent.")
    qk_head_dim: int = _f(128, "Query/key head dimension without position embedding.")
    qk_pos_emb_head_dim: int = _f(64, "Query/key head dimension rotated by RoPE.")
    v_head_dim: int = _f(128, "Value head dimension.")
    rotary_scaling_factor: float = _f(
        1.0, "YaRN RoPE scaling factor (MLA, or --position-embedding-type yarn)."
    )
    mscale: float = _f(1.0, "YaRN mscale (MLA, or --position-embedding-type yarn).")
    mscale_all_dim: float = _f(
        0.0, "YaRN mscale of all dimensions: the attention factor is --mscale's over this "
        "one's (MLA also scales its softmax by it).",
    )  # fmt: skip
    rope_type: str | None = _f(
        None,
        "RoPE of MLA's position dimensions: yarn (MLA's default) or rope; ordinary attention "
        "takes rope only.",
        choices=["rope", "yarn"],
    )

    def __post_init__(self):
        for name in ("kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim"):
            value = getattr(self, name)
            _require(value >= 1, f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.q_lora_rank is not None:
            _require(self.q_lora_rank >= 1, f"--q-lora-rank must be >= 1, got {self.q_lora_rank}")
        _require(
            self.rotary_scaling_factor > 0,
            f"--rotary-scaling-factor must be > 0, got {self.rotary_scaling_factor}",
        )
        _require(
            self.multi_latent_attention or self.rope_type in (None, "rope"),
            "--rope-type yarn needs --multi-latent-attention (ordinary attention takes rope "
            "only, as in Megatron-LM): drop --rope-type",
        )

    def check_model(self, model) -> None:
        """Checks against the rest of the model (a :class:`tst.config.ModelConfig`)."""
        if not self.multi_latent_attention:
            return
        _require(
            model.position_embedding_type != "yarn",
            "--position-embedding-type yarn with --multi-latent-attention: MLA applies its own "
            "RoPE (--rope-type, yarn by default, with --rotary-scaling-factor / --mscale); "
            "use --position-embedding-type rope (Megatron-LM fails on the two together)",
        )
        _require(
            not model.group_query_attention,
            "--group-query-attention and --multi-latent-attention exclude each other (as in "
            "Megatron-LM): drop --group-query-attention",
        )

    @property
    def resolved_rope_type(self) -> str:
        return self.rope_type or "yarn"

    def transformer_config_fields(self) -> dict:
        """The megatron-core ``MLATransformerConfig`` fields this section sets (names equal);
        empty without ``--multi-latent-attention``."""
        if not self.multi_latent_attention:
            return {}
        return dict(
            multi_latent_attention=True,
            q_lora_rank=self.q_lora_rank,
            kv_lora_rank=self.kv_lora_rank,
            qk_head_dim=self.qk_head_dim,
            qk_pos_emb_head_dim=self.qk_pos_emb_head_dim,
            v_head_dim=self.v_head_dim,
            rotary_scaling_factor=self.rotary_scaling_factor,
            mscale=self.mscale,
            mscale_all_dim=self.mscale_all_dim,
            rope_type=self.resolved_rope_type,
        )
