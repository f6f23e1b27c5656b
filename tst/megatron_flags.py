"""Megatron-LM flags beyond the ones the config implements: accepted, aliased or refused.

A Megatron-LM launch script must run unchanged. Every flag it can pass is one of:

1. implemented: a field of a :mod:`tst.config` dataclass (forwarded to megatron-core or done
   here);
2. an alias of an implemented flag (Megatron-LM's deprecated spellings, e.g.
   ``--use-flash-attn`` is ``--attention-backend flash``);
3. accepted because its value changes nothing here (``ACCEPTED``, with the reason, which the
   dry run prints);
4. refused with one line naming the flag, why, and what to do (``REFUSED``).

Anything else is an unknown flag: all of them are reported at once, each with the nearest
known flag, before any value is checked.
"""

from __future__ import annotations

import argparse
import difflib
from typing import NamedTuple

from tst.errors import ConfigError
from tst.megatron_flags_later import LATER_ACCEPTED, LATER_ALIASES, LATER_REFUSED
from tst.megatron_flags_upstream import UPSTREAM_ACCEPTED, UPSTREAM_ALIASES, UPSTREAM_REFUSED

__all__ = ["ACCEPTED", "ALIASES", "REFUSED", "add_to_parser", "apply_aliases", "check_unknown",
           "resolve"]  # fmt: skip


class Flag(NamedTuple):
    nargs: int | str  # 0 (a switch), 1, or "+"
    reason: str


# Deprecated Megatron-LM spellings of implemented flags: replaced before parsing.
ALIASES: dict[str, list[str]] = {
    "--use-flash-attn": ["--attention-backend", "flash"],
    # Megatron-LM forks' spellings (e.g. the Swallow project's Llama-3 scripts).
    "--rope-theta": ["--rotary-base"],
    "--wandb-name": ["--wandb-exp-name"],
    "--use-rotary-position-embeddings": ["--position-embedding-type", "rope"],
    "--recompute-activations": ["--recompute-granularity", "selective"],
    # Megatron-LM takes both spellings of these two.
    "--override-opt-param-scheduler": ["--override-opt_param-scheduler"],
    "--use-checkpoint-opt-param-scheduler": ["--use-checkpoint-opt_param-scheduler"],
}

_SAME = "Megatron-LM's behaviour here too"

ACCEPTED: dict[str, Flag] = {
    "--use-mcore-models": Flag(0, "megatron-core models are the only models built here"),
    "--use-dist-ckpt": Flag(0, "checkpoints are always megatron-core dist_checkpointing"),
    "--ckpt-fully-parallel-save": Flag(0, "fully parallel saving is the default already"),
    "--exit-signal-handler": Flag(
        0, "SIGTERM / SIGUSR1 / SIGUSR2 (and Ctrl-C) always save at the next step and exit"
    ),
    "--no-async-tensor-model-parallel-allreduce": Flag(
        0, "deprecated in Megatron-LM; megatron-core overlaps TP all-reduces by itself"
    ),
    "--async-tensor-model-parallel-allreduce": Flag(
        0, "deprecated in Megatron-LM; megatron-core overlaps TP all-reduces by itself"
    ),
    "--distributed-backend": Flag(1, "NCCL on CUDA and gloo on CPU, chosen by the device"),
    "--no-create-attention-mask-in-dataloader": Flag(
        0, "no attention mask is built by the loader: attention is causal inside the model"
    ),
    "--calculate-per-token-loss": Flag(
        0, "losses are always normalised per token over the global batch, in both phases"
    ),
    "--ddp-average-in-collective": Flag(
        0,
        "gradients are reduced unscaled (summed) and divided by the global batch's loss "
        "tokens after the reduction (per-token losses), never pre-divided by the data-parallel "
        "size: the averaging is already done after the collective",
    ),
    "--num-dataset-builder-threads": Flag(
        1, "sample indices are built once per rank and cached; the count changes no sample"
    ),
    "--check-for-nan-in-loss-and-grad": Flag(
        0,
        "the default (older Megatron-LM's spelling): the rerun engine validates losses and "
        "gradient norms for NaN / Inf; without the engine a non-finite step is skipped",
    ),
    "--log-progress": Flag(0, "progress is in the log and the metrics file already"),
    "--log-world-size-to-tensorboard": Flag(0, "the layout is printed and in run_manifest.json"),
    "--auto-detect-ckpt-format": Flag(
        0,
        "a checkpoint's format is always detected (torch_dist, "
        "or the legacy torch format's weights)",
    ),
    "--enable-experimental": Flag(0, "megatron-core's experimental features are not gated here"),
    "--tensorboard-queue-size": Flag(1, "TensorBoard events are flushed at every log line"),
    "--log-throughput": Flag(0, "TFLOP/s per device and MFU are always logged"),
    "--no-load-rng": Flag(
        0,
        "no RNG state is saved: dropout streams are reseeded from (--seed, iteration) each "
        "step, so a resumed run draws what the unbroken one drew",
    ),
    "--local-rank": Flag(
        1,
        "each process is placed by the launcher's LOCAL_RANK (torch.distributed.launch "
        "passes the flag as well)",
    ),
    "--use-cpu-initialization": Flag(
        0,
        "weights are always drawn on the host, the same at every layout, then copied to the device",
    ),
    "--no-save-rng": Flag(
        0,
        "no RNG state is saved: dropout streams are reseeded from (--seed, iteration) each step",
    ),
    "--openai-gelu": Flag(
        0,
        "Megatron-LM's legacy models only; its megatron-core models, like these, use torch's GELU",
    ),
    "--moe-per-layer-logging": Flag(
        0,
        "routing statistics and balancing losses are always logged per MoE layer (metrics "
        "file, TensorBoard, W&B)",
    ),
    "--enable-gpt-oss": Flag(
        0,
        "Megatron-LM reads it only in ModelOpt's model builder (GPT-OSS's YaRN defaults); a "
        "pretraining run's positions follow --position-embedding-type, as there (default "
        "learned_absolute; Megatron-LM's GPT-OSS example passes rope)",
    ),
    "--export-force-local-attention": Flag(
        0, "a ModelOpt export setting; the attention here follows --transformer-impl"
    ),
}

REFUSED: dict[str, Flag] = {
    "--use-legacy-models": Flag(
        0, "legacy (non-megatron-core) models are not built here: drop the flag"
    ),
    "--use-megatron-fsdp": Flag(
        0,
        "Megatron FSDP is not supported: use --use-torch-fsdp2 (PyTorch FSDP2, ZeRO-3; no "
        "PP or EP) or --use-distributed-optimizer (ZeRO-1)",
    ),
    "--yaml-cfg": Flag(1, "YAML configs are not read: pass the flags on the command line"),
    "--spec": Flag("+", "custom layer specs are not loaded: the layer spec follows the flags"),
    "--enable-cuda-graph": Flag(0, "CUDA graphs are not supported yet: drop the flag"),
    "--cuda-graph-impl": Flag(1, "CUDA graphs are not supported yet: drop the flag"),
    "--vocab-extra-ids": Flag(1, "T5-style extra ids are not added: drop the flag"),
    "--fp16-lm-cross-entropy": Flag(
        0, "the TST losses always compute in fp32 (exact multi-hot targets): drop the flag"
    ),
    "--use-mpi": Flag(
        0, "a Megatron-LM fork's flag: ranks come from torchrun / srun's environment; drop it"
    ),
    "--use-z-loss": Flag(
        0, "a Megatron-LM fork's output-layer z-loss is not implemented here: drop it"
    ),
    "--dataset": Flag(1, "a Pai-Megatron-Patch flag (its own pretrain script): drop it"),
    "--train-mode": Flag(1, "a Pai-Megatron-Patch flag (its own pretrain script): drop it"),
    "--max-padding-length": Flag(1, "a Pai-Megatron-Patch flag (fine-tuning padding): drop it"),
    "--patch-tokenizer-type": Flag(
        1,
        "a Pai-Megatron-Patch flag: use --tokenizer-type HuggingFaceTokenizer "
        "--tokenizer-model PATH",
    ),
    "--cache-mla-latents": Flag(
        0, "MLA latent caching is for inference (megatron-core refuses it in training): drop it"
    ),
}

# Megatron-LM 0.16.1's other flags (tst.megatron_flags_upstream): the whole flag set is known.
ALIASES.update(UPSTREAM_ALIASES)
ACCEPTED.update({flag: Flag(*entry) for flag, entry in UPSTREAM_ACCEPTED.items()})
REFUSED.update({flag: Flag(*entry) for flag, entry in UPSTREAM_REFUSED.items()})
# The flags Megatron-LM 0.17 to 0.19 added (tst.megatron_flags_later): their scripts run too.
ALIASES.update(LATER_ALIASES)
ACCEPTED.update({flag: Flag(*entry) for flag, entry in LATER_ACCEPTED.items()})
REFUSED.update({flag: Flag(*entry) for flag, entry in LATER_REFUSED.items()})


def _dest(flag: str) -> str:
    return "megatron." + flag[2:].replace("-", "_")


def add_to_parser(parser: argparse.ArgumentParser) -> None:
    """Register the accepted and refused flags (no default: absent ones stay absent)."""
    for title, table in (("Megatron-LM flags accepted with no effect here", ACCEPTED),
                         ("Megatron-LM flags refused here", REFUSED)):  # fmt: skip
        group = parser.add_argument_group(title)
        for flag, entry in table.items():
            kwargs = dict(dest=_dest(flag), default=argparse.SUPPRESS, help=entry.reason)
            if entry.nargs == 0:
                group.add_argument(flag, action="store_true", **kwargs)
            else:
                nargs = None if entry.nargs == 1 else entry.nargs
                group.add_argument(flag, nargs=nargs, metavar="VALUE", **kwargs)
    group = parser.add_argument_group("Megatron-LM spellings of the flags above")
    for flag, target in ALIASES.items():
        group.add_argument(flag, action="store_true", default=argparse.SUPPRESS,
                           dest=_dest(flag), help=f"same as {' '.join(target)}")  # fmt: skip


def apply_aliases(argv: list[str]) -> list[str]:
    """Replace each alias by what it stands for; ``--alias=value`` too, where the alias
    stands for one flag."""
    out = []
    for arg in argv:
        flag, eq, value = arg.partition("=")
        target = ALIASES.get(flag) if flag.startswith("--") else None
        if eq and target is not None and len(target) == 1:
            out.append(f"{target[0]}={value}")
        else:
            out.extend(ALIASES.get(arg, [arg]))
    return out


def check_unknown(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Report every flag nobody knows, each with its nearest known flag, in one line; then
    every refused flag with its reason (both before any value is checked)."""
    known = set(parser._option_string_actions)
    unknown = []
    for arg in argv:
        if not arg.startswith("--") or arg == "--":
            continue
        flag = arg.split("=", 1)[0]
        if flag not in known and flag not in unknown:
            unknown.append(flag)
    refused = [f"{flag}: {REFUSED[flag].reason}" for flag in dict.fromkeys(
        arg.split("=", 1)[0] for arg in argv) if flag in REFUSED]  # fmt: skip
    if not unknown and refused:  # before any value is parsed: the first thing to fix
        raise ConfigError("not supported here: " + "; ".join(refused))
    if not unknown:
        return
    longs = sorted(f for f in known if f.startswith("--"))
    parts = []
    for flag in unknown:
        near = difflib.get_close_matches(flag, longs, n=1, cutoff=0.6)
        parts.append(f"{flag} (did you mean {near[0]}?)" if near else flag)
    raise ConfigError(
        f"unknown flag{'s' if len(parts) > 1 else ''}: "
        + ", ".join(parts)
        + " (pretrain_tst.py --help lists every flag)"
    )


def resolve(given: dict[str, object]) -> tuple[tuple[str, str], ...]:
    """Refuse the refused flags given (all at once); return the accepted ones with reasons."""
    flags = {"--" + key.split(".", 1)[1].replace("_", "-"): value for key, value in given.items()}
    refused = [f"{flag}: {REFUSED[flag].reason}" for flag in flags if flag in REFUSED]
    if refused:
        raise ConfigError("not supported here: " + "; ".join(refused))
    return tuple((flag, ACCEPTED[flag].reason) for flag in flags if flag in ACCEPTED)


def classify(parser: argparse.ArgumentParser, flag: str) -> tuple[str, str]:
    """(``implemented`` | ``alias`` | ``accepted`` | ``refused`` | ``unknown``, why / what)."""
    if flag in ALIASES:
        return "alias", "same as " + " ".join(ALIASES[flag])
    if flag in ACCEPTED:
        return "accepted", ACCEPTED[flag].reason
    if flag in REFUSED:
        return "refused", REFUSED[flag].reason
    action = parser._option_string_actions.get(flag)
    if action is None:
        return "unknown", ""
    return "implemented", (action.help or "").replace("%%", "%")
