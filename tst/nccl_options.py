"""NCCL communicator options per process group: ``--nccl-communicator-config-path`` and
``--high-priority-stream-groups`` (Megatron-LM's flags, read by megatron-core's
``initialize_model_parallel``).

The YAML file maps a process group's name to NCCL settings for its communicators::

    dp: {cga_cluster_size: 4, max_ctas: 32, min_ctas: 32}
    tp: {net_name: IB}
    ep_dp: {is_high_priority_stream: true}

megatron-core reads the names below (its group names, 0.16.1) and ignores any other, so a
misspelt name (or key) would be dropped without a word; here the file is checked before any
process group starts and a name or key it does not know is refused, naming the file, the
entry and the names it takes. ``--high-priority-stream-groups dp_cp ep_dp`` sets
``is_high_priority_stream`` for those groups (checked the same way). Both are NCCL's: over
gloo (a machine without GPUs) they cannot apply, and the run says so and goes on; so do
``--use-sharp`` / ``--sharp-enabled-group`` (InfiniBand SHARP through NCCL's CollNet) and
``--pipeline-model-parallel-comm-backend`` (NCCL or UCC for the pipeline's p2p), which
megatron-core's ``initialize_model_parallel`` takes too.
"""

from __future__ import annotations

from tst.errors import ConfigError

__all__ = ["GROUPS", "check_nccl_options", "group_options", "read_nccl_communicator_config"]

# The names megatron-core 0.16.1's initialize_model_parallel looks up (get_nccl_options).
GROUPS = (
    "cp", "dp", "dp_cp", "embd", "ep", "ep_dp", "ep_tp", "hcp", "inter_ep_dp",
    "intra_dist_opt_instance", "intra_dp_cp", "intra_ep_dp", "mp", "pos_embd", "pp", "tp",
    "tp_cp", "tp_dp", "tp_dp_cp", "tp_ep_mp", "tp_ep_pp",
)  # fmt: skip
_KEYS = {"cga_cluster_size": int, "max_ctas": int, "min_ctas": int, "net_name": str,
         "is_high_priority_stream": bool}  # fmt: skip


def read_nccl_communicator_config(path: str) -> dict:
    """The checked ``{group: {key: value}}`` of ``--nccl-communicator-config-path``."""
    from tst.config_fields import read_yaml_mapping

    flag = "--nccl-communicator-config-path"
    content = read_yaml_mapping(path, flag, "a mapping of process-group names to NCCL settings")
    for group, settings in content.items():
        if group not in GROUPS:
            raise ConfigError(f"{flag} {path}: no process group is named {group!r} (megatron-"
                              f"core would ignore it); the names are {', '.join(GROUPS)}")  # fmt: skip
        if not isinstance(settings, dict):
            raise ConfigError(f"{flag} {path}: {group!r} must map to settings such as "
                              "{max_ctas: 32}, got " + repr(settings))  # fmt: skip
        for key, value in settings.items():
            kind = _KEYS.get(key)
            if kind is None:
                raise ConfigError(f"{flag} {path}: {group}.{key} is not an NCCL setting "
                                  f"megatron-core applies; the settings are {', '.join(_KEYS)}")  # fmt: skip
            if type(value) is not kind or (kind is int and value < 1):
                want = "a positive integer" if kind is int else kind.__name__
                raise ConfigError(f"{flag} {path}: {group}.{key} must be {want}, got {value!r}")
            if key == "net_name" and value.lower() not in ("ib", "socket"):
                raise ConfigError(f"{flag} {path}: {group}.net_name must be IB or socket, got "
                                  f"{value!r}")  # fmt: skip
    return content


def check_nccl_options(p) -> None:
    """The NCCL group flags' input, checked before any process group starts."""
    if p.nccl_communicator_config_path:
        read_nccl_communicator_config(p.nccl_communicator_config_path)
    for group in p.high_priority_stream_groups or ():
        if group not in GROUPS:
            raise ConfigError(f"--high-priority-stream-groups: no process group is named "
                              f"{group!r}; the names are {', '.join(GROUPS)}")  # fmt: skip
    if p.sharp_enabled_group is not None and not p.use_sharp:
        raise ConfigError("--sharp-enabled-group chooses the group --use-sharp serves: add "
                          "--use-sharp (megatron-core's rule)")  # fmt: skip
    if p.sharp_enabled_group == "dp_replica" and p.num_distributed_optimizer_instances < 2:
        raise ConfigError("--sharp-enabled-group dp_replica is the group across distributed-"
                          "optimizer instances: it needs --num-distributed-optimizer-instances "
                          "> 1 (megatron-core's rule)")  # fmt: skip


def group_options(p) -> dict:
    """The ``initialize_model_parallel`` arguments the parallel flags give beyond the layout
    (for NCCL groups; empty when none is given)."""
    given = {
        "nccl_communicator_config_path": p.nccl_communicator_config_path,
        "high_priority_stream_groups": p.high_priority_stream_groups,
        "use_sharp": p.use_sharp,
        "sharp_enabled_group": p.sharp_enabled_group,
        "pipeline_model_parallel_comm_backend": p.pipeline_model_parallel_comm_backend,
    }
    return {name: value for name, value in given.items() if value}
