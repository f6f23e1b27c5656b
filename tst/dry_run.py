"""``--dry-run``: check a configuration and print its size and layout without training.

Parameter counts are computed from the shapes megatron-core's GPT layers have (no model is
built and no memory is used), so a 10B configuration can be checked on a laptop.
"""

from __future__ import annotations

from tst.config import Config, validate
from tst.phases import PhaseSchedule

__all__ = ["parameter_counts", "dry_run"]


def parameter_counts(cfg: Config, vocab_size: int) -> dict[str, int]:
    """Total and per-token-active parameters, with the embedding/output share."""
    m = cfg.model
    h = m.hidden_size
    heads = m.num_attention_heads
    groups = m.num_query_groups or heads
    head_dim = h // heads
    ffn = m.resolved_ffn_hidden_size
    attn = h * head_dim * (heads + 2 * groups) + heads * head_dim * h
    attn += 2 * head_dim if m.qk_layernorm else 0
    glu = 3 if m.swiglu else 2
    norms = 2 * h
    if m.num_experts:
        expert = glu * h * (m.moe_ffn_hidden_size or ffn)
        shared = glu * h * (m.moe_shared_expert_intermediate_size or 0)
        router = h * m.num_experts
        mlp_total = m.num_experts * expert + shared + router
        mlp_active = m.moe_router_topk * expert + shared + router
    else:
        mlp_total = mlp_active = glu * h * ffn
    embedding = vocab_size * h
    output = 0 if not m.untie_embeddings_and_output_weights else vocab_size * h
    if m.position_embedding_type == "learned_absolute":
        embedding += m.max_position_embeddings * h
    layers_total = m.num_layers * (attn + mlp_total + norms) + h
    layers_active = m.num_layers * (attn + mlp_active + norms) + h
    return {
        "total": layers_total + embedding + output,
        "active": layers_active + embedding + output,
        "embedding_and_output": embedding + output,
        "non_embedding_active": layers_active,
    }


def dry_run(cfg: Config, vocab_size: int, world_size: int | None = None) -> int:
    p = cfg.parallel
    world = world_size or max(p.tensor_model_parallel_size * p.pipeline_model_parallel_size, 1)
    derived = validate(cfg, world, vocab_size)
    counts = parameter_counts(cfg, derived["padded_vocab_size"])
    t = cfg.training
    schedule = PhaseSchedule.from_config(cfg)
    print(
        f"parameters: total {counts['total'] / 1e6:.1f}M, active per token "
        f"{counts['active'] / 1e6:.1f}M (embedding + output {counts['embedding_and_output'] / 1e6:.1f}M)"
    )
    print(
        f"layout for a world of {world}: TP={p.tensor_model_parallel_size} "
        f"PP={p.pipeline_model_parallel_size} VPP={derived['vpp']} DP={derived['dp']} "
        f"EP={p.expert_model_parallel_size}; global batch {derived['global_batch_size']} = "
        f"{derived['num_microbatches']} micro-batches x {t.micro_batch_size} x DP"
    )
    per_stage = cfg.model.num_layers // p.pipeline_model_parallel_size
    for stage in range(p.pipeline_model_parallel_size):
        extras = []
        if stage == 0:
            extras.append("bag embedding")
        if stage == p.pipeline_model_parallel_size - 1:
            extras.append("output layer + multi-hot loss")
        print(
            f"  stage {stage}: layers {stage * per_stage}..{(stage + 1) * per_stage - 1}"
            + (f" + {', '.join(extras)}" if extras else "")
        )
    print("phase schedule:\n" + schedule.table())
    return 0
