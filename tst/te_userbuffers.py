"""Transformer Engine userbuffers for ``--tp-comm-overlap`` (TP communication overlapped with
the GEMMs), set up as Megatron-LM sets them up: once per run, after the parallel groups and
before the model, for activations of ``[seq_length x micro_batch_size / CP, hidden]``.

One shape serves both TST phases: a bag is one position, so the superposition phase's
activations have the recovery phase's shape. ``--tp-comm-overlap-cfg`` (a YAML file, as in
Megatron-LM) overrides TE's per-GEMM settings; ``--tp-comm-bootstrap-backend`` picks how TE
bootstraps its communicators.
"""

from __future__ import annotations

import inspect

from tst.errors import ConfigError

__all__ = ["destroy", "initialize"]


def _te_base():
    try:
        from transformer_engine.pytorch import module as te_module
    except ImportError as error:
        raise ConfigError(
            f"--tp-comm-overlap needs Transformer Engine ({error}): install transformer-engine "
            "on the GPU host or drop --tp-comm-overlap"
        ) from error
    return te_module.base


def _settings(path: str | None) -> dict:
    if path is None:
        return {}
    from tst.config_fields import read_yaml_mapping

    return read_yaml_mapping(path, "--tp-comm-overlap-cfg", "a mapping of GEMM names to settings")


def initialize(cfg, grid) -> bool:
    """Create TE's userbuffers when ``--tp-comm-overlap`` asks for them; True if it did."""
    p, t = cfg.parallel, cfg.training
    if not p.tp_comm_overlap:
        return False
    base = _te_base()
    params = inspect.signature(base.initialize_ub).parameters
    if "bootstrap_backend" not in params:
        raise ConfigError("--tp-comm-overlap needs Transformer Engine 1.9 or newer (older ones "
                          "bootstrap userbuffers through MPI only): upgrade transformer-engine")  # fmt: skip
    fp8 = t.fp8_format is not None
    kwargs = {
        "shape": [cfg.model.seq_length * t.micro_batch_size // grid.cp, cfg.model.hidden_size],
        "tp_size": grid.tp,
        "ub_cfgs": _settings(p.tp_comm_overlap_cfg),
        "bootstrap_backend": p.tp_comm_bootstrap_backend,
    }
    if "quantization_modes" in params:  # TE 2.7+: one buffer set per precision in use
        mode = base.UserBufferQuantizationMode
        kwargs["quantization_modes"] = [mode.FP8 if fp8 else mode.NONE]
        if fp8 and t.first_last_layers_bf16:  # the bf16 first / last layers need their own
            kwargs["quantization_modes"].append(mode.NONE)
    else:
        kwargs["use_fp8"] = fp8
    base.initialize_ub(**kwargs)
    return True


def destroy() -> None:
    """Free the userbuffers (a later run in the same process makes its own)."""
    base = _te_base()
    if hasattr(base, "destroy_ub"):
        base.destroy_ub()
