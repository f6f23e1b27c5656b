"""Every flag combination pretrain_tst.py refuses, with the message a user sees.

The README's troubleshooting table lists these same messages; each row here checks one.
``world`` is the world size the layout is validated against (no processes are started).
"""

from __future__ import annotations

import os

import pytest
from flags import SMALL_GPT

import pretrain_tst
from tst.config import parse_args
from tst.plan import validate

BASE = [
    "--mock-data", "--vocab-size", "512", "--num-layers", "4", "--hidden-size", "32",
    "--num-attention-heads", "4", "--seq-length", "8", "--micro-batch-size", "2",
    "--train-iters", "10", "--lr", "1e-3", *SMALL_GPT,
]  # fmt: skip

# (extra flags, world size, message regex): parse-time field checks and layout checks.
REFUSED = [
    (["--num-layers", "0"], 1, r"--num-layers must be >= 1"),
    (["--hidden-size", "30"], 1, r"--hidden-size 30 must be divisible by --num-attention-heads 4"),
    (["--group-query-attention", "--num-query-groups", "3"], 1, r"--num-attention-heads must be divisible by --num-query-groups"),  # noqa: E501
    (["--max-position-embeddings", "4"], 1, r"--max-position-embeddings must be >= --seq-length"),
    (["--num-experts", "-1"], 1, r"--num-experts must be >= 1"),
    (["--num-experts", "2", "--moe-router-topk", "3"], 1, r"--moe-router-topk must be between 1 and --num-experts"),  # noqa: E501
    (["--tensor-model-parallel-size", "0"], 1, r"--tensor-model-parallel-size must be >= 1"),
    (["--micro-batch-size", "0"], 1, r"--micro-batch-size must be >= 1"),
    (["--train-iters", "0"], 1, r"--train-iters must be >= 1"),
    (["--lr", "0"], 1, r"need --lr > 0 and 0 <= --min-lr <= --lr"),
    (["--lr", "1e-3", "--min-lr", "1e-2"], 1, r"need --lr > 0 and 0 <= --min-lr <= --lr"),
    (["--lr-warmup-iters", "11"], 1, r"--lr-warmup-iters must be between 0 and --train-iters"),
    (["--tst-bag-size", "0"], 1, r"--tst-bag-size must be between 1 and 64"),
    (["--tst-bag-size", "65"], 1, r"--tst-bag-size must be between 1 and 64"),
    (["--tst-fraction", "0.3", "--tst-iters", "3"], 1, r"give --tst-fraction or --tst-iters, not both"),  # noqa: E501
    (["--tst-fraction", "1.0"], 1, r"--tst-fraction must be in \[0, 1\).*no recovery phase"),
    (["--tst-iters", "-1"], 1, r"--tst-iters must be >= 0"),
    (["--tst-iters", "11"], 1, r"--tst-iters must be <= --train-iters"),
    (["--exit-duration-in-mins", "-1"], 1, r"--exit-duration-in-mins must be > 0"),
    (["--clip-grad", "-1"], 1, r"--clip-grad must be >= 0 \(0 turns clipping off\)"),
    (["--save-interval", "0"], 1, r"--save-interval must be >= 1 \(omit it to turn it off\)"),
    (["--save", "c", "--save-interval", "2", "--save-retain-interval", "3"], 1, r"--save-retain-interval 3 must be a multiple of --save-interval \(2\)"),  # noqa: E501
    (["--save", "c", "--save-retain-interval", "4"], 1, r"--save-retain-interval needs --save-interval"),  # noqa: E501
    (["--save-retain-interval", "0"], 1, r"--save-retain-interval must be >= 1"),
    (["--load-main-params-from-ckpt"], 1, r"--load-main-params-from-ckpt must be used with --no-load-optim"),  # noqa: E501
    (["--fine-grained-activation-offloading"], 1, r"--fine-grained-activation-offloading needs --offload-modules"),  # noqa: E501
    (["--fine-grained-activation-offloading", "--offload-modules", "mlp"], 1, r"--offload-modules: unknown \['mlp'\]"),  # noqa: E501
    (["--fine-grained-activation-offloading", "--offload-modules", "attn_proj"], 1, r"--offload-modules attn_proj needs core_attn too"),  # noqa: E501
    (["--fine-grained-activation-offloading", "--offload-modules", "core_attn", "--min-offloaded-tensor-size", "-1"], 1, r"--min-offloaded-tensor-size must be >= 0"),  # noqa: E501
    (["--fine-grained-activation-offloading", "--offload-modules", "core_attn", "--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"], 1, r"--fine-grained-activation-offloading with --recompute-granularity full"),  # noqa: E501
    (["--check-weight-hash-across-dp-replicas-interval", "0"], 1, r"--check-weight-hash-across-dp-replicas-interval must be >= 1"),  # noqa: E501
    (["--log-interval", "2", "--log-memory-interval", "3"], 1, r"--log-memory-interval 3 must be a multiple of --log-interval \(2\)"),  # noqa: E501
    (["--seed", "-1"], 1, r"--seed must be between 0 and 2\*\*63 - 1, got -1"),
    (["--init-method-std", "nan"], 1, r"--init-method-std must be a positive number, got nan"),
    (["--hidden-dropout", "1.5"], 1, r"--hidden-dropout must be in \[0, 1\)"),
    (["--rampup-batch-size", "2", "2", "100"], 1, r"--rampup-batch-size needs sample-based"),
    (["--finetune"], 1, r"--finetune loads the weights of --load"),
    (["--multiple-validation-sets"], 1, r"--multiple-validation-sets needs --full-validation"),
    (["--mid-level-dataset-surplus", "-0.1"], 1, r"--mid-level-dataset-surplus must be >= 0"),
    (["--train-sync-interval", "0"], 1, r"--train-sync-interval must be >= 1"),
    (["--ep-overlap-early-attn-memory-release"], 1,
     r"--ep-overlap-early-attn-memory-release reorders --overlap-moe-expert-parallel-comm"),
    (["--use-distributed-optimizer", "--dist-ckpt-optim-fully-reshardable",
      "--distrib-optim-fully-reshardable-mem-efficient", "--disable-gloo-process-groups"], 1,
     r"--distrib-optim-fully-reshardable-mem-efficient gathers the optimizer state over "
     r"megatron-core's gloo groups"),
    (["--num-distributed-optimizer-instances", "0"], 1, r"--num-distributed-optimizer-instances must be >= 1"),  # noqa: E501
    (["--num-distributed-optimizer-instances", "2"], 2, r"--num-distributed-optimizer-instances 2 needs --use-distributed-optimizer"),  # noqa: E501
    (["--use-distributed-optimizer", "--num-distributed-optimizer-instances", "2"], 3, r"--num-distributed-optimizer-instances 2: the data-parallel size x CP \(3 x 1\) is not divisible by it"),  # noqa: E501
    (["--use-distributed-optimizer", "--num-distributed-optimizer-instances", "2", "--ddp-reduce-scatter-with-fp32-accumulation"], 2, r"--num-distributed-optimizer-instances 2 with --ddp-reduce-scatter-with-fp32-accumulation"),  # noqa: E501
    (["--use-distributed-optimizer", "--num-distributed-optimizer-instances", "2", "--num-experts", "4", "--expert-model-parallel-size", "2"], 2, r"the experts' data-parallel size 1 is not divisible by it"),  # noqa: E501
    (["--use-tp-pp-dp-mapping", "--context-parallel-size", "2", "--pipeline-model-parallel-size", "2"], 4, r"--use-tp-pp-dp-mapping with PP 2 needs the same data-parallel size for the attention \(1\) and the experts \(2\)"),  # noqa: E501
    (["--use-tp-pp-dp-mapping", "--num-experts", "4", "--expert-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"], 4, r"--use-tp-pp-dp-mapping with PP 2 needs the same data-parallel size for the attention \(2\) and the experts \(1\)"),  # noqa: E501
    (["--distributed-timeout-seconds-after-init", "0"], 1, r"--distributed-timeout-seconds-after-init must be >= 1"),  # noqa: E501
    (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1", "--no-overlap-p2p-communication"], 2, r"--no-overlap-p2p-communication with an interleaved schedule needs PP > 2 \(got 2\)"),  # noqa: E501
    (["--pipeline-model-parallel-size", "2", "--overlap-p2p-communication-warmup-flush"], 2, r"--overlap-p2p-communication-warmup-flush overlaps an interleaved schedule's warm-up and flush sends: it needs virtual pipeline stages"),  # noqa: E501
    (["--use-checkpoint-args"], 1, r"--use-checkpoint-args reads the model flags from a checkpoint: give --load \(or --pretrained-checkpoint\)"),  # noqa: E501
    (["--ckpt-step", "2"], 1, r"--ckpt-step applies to --load: give --load CHECKPOINT_DIR"),
    (["--save-wgrads-interval", "2"], 1, r"--save-wgrads-interval writes under the --save directory: give --save"),  # noqa: E501
    (["--save-dgrads-interval", "0", "--save", "s"], 1, r"--save-dgrads-interval must be >= 1"),
    (["--moe-use-upcycling"], 1, r"--moe-use-upcycling turns a dense checkpoint into an MoE model: give --num-experts"),  # noqa: E501
    (["--num-experts", "4", "--moe-use-upcycling", "--save", "s"], 1, r"--moe-use-upcycling reads the dense checkpoint from --load"),  # noqa: E501
    (["--num-experts", "4", "--moe-use-upcycling", "--load", "d"], 1, r"--moe-use-upcycling saves the upcycled model to --save at once"),  # noqa: E501
    (["--num-experts", "4", "--moe-use-upcycling", "--load", "d", "--save", "s", "--moe-layer-freq", "2"], 1, r"--moe-use-upcycling makes every MLP an MoE layer"),  # noqa: E501
    (["--num-experts", "4", "--moe-use-upcycling", "--load", "d", "--save", "s", "--tensor-model-parallel-size", "2", "--expert-tensor-parallel-size", "1"], 2, r"--moe-use-upcycling copies each dense MLP shard into the experts: run it at --expert-tensor-parallel-size equal to TP"),  # noqa: E501
    (["--num-experts", "6", "--moe-use-upcycling", "--load", "d", "--save", "s", "--moe-upcycling-granularity", "4"], 1, r"--num-experts 6 must be a multiple of --moe-upcycling-granularity 4"),  # noqa: E501
    (["--num-experts", "4", "--moe-use-upcycling", "--load", "d", "--save", "s", "--moe-shared-expert-intermediate-size", "16"], 1, r"--moe-use-upcycling copies the dense MLP into routed experts only"),  # noqa: E501
    (["--num-experts", "4", "--moe-use-upcycling", "--load", "d", "--save", "s", "--finetune"], 1, r"--moe-use-upcycling loads the dense weights itself"),  # noqa: E501
    (["--skip-train", "--eval-iters", "0"], 1, r"--skip-train only evaluates: give --eval-iters > 0"),
    (["--exit-on-missing-checkpoint"], 1, r"--exit-on-missing-checkpoint applies to --load"),
    (["--ckpt-format", "zarr"], 1, r"--ckpt-format zarr is not supported"),
    (["--overlap-param-gather"], 1, r"--overlap-param-gather needs --use-distributed-optimizer"),
    (["--recompute-granularity", "full"], 1, r"--recompute-granularity full needs --recompute-method"),  # noqa: E501
    (["--recompute-granularity", "selective", "--recompute-modules", "attn"], 1, r"--recompute-modules: unknown \['attn'\]"),  # noqa: E501
    (["--fp16", "--bf16"], 1, r"give --bf16 or --fp16, not both"),
    (["--exp-avg-dtype", "bf16"], 1, r"need --use-precision-aware-optimizer"),
    (["--tensor-model-parallel-size", "2", "--tp-comm-overlap"], 2, r"--tp-comm-overlap needs --sequence-parallel"),  # noqa: E501
    (["--distribute-saved-activations"], 1, r"--distribute-saved-activations splits what full recomputation saves: add --recompute-granularity full"),  # noqa: E501
    (["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1", "--distribute-saved-activations"], 1, r"--distribute-saved-activations .* needs --tensor-model-parallel-size > 1"),  # noqa: E501
    (["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1", "--distribute-saved-activations", "--tensor-model-parallel-size", "2", "--sequence-parallel"], 2, r"--distribute-saved-activations with --sequence-parallel"),  # noqa: E501
    (["--num-experts", "4", "--moe-layer-freq", "[1]*3"], 1, r"--moe-layer-freq \[1\]\*3: the list must hold one 0"),  # noqa: E501
    (["--num-experts", "4", "--moe-layer-freq", "os.system('x')"], 1, r"--moe-layer-freq os.system\('x'\): give an int N or a list"),  # noqa: E501
    (["--num-experts", "4", "--moe-pad-expert-input-to-capacity"], 1, r"needs --moe-expert-capacity-factor"),  # noqa: E501
    (["--num-experts", "4", "--moe-router-num-groups", "2"], 1, r"give --moe-router-num-groups and --moe-router-group-topk together"),  # noqa: E501
    # Group-limited routing that megatron-core would fail on at the first forward, or route
    # wrong with (experts masked out of every group picked).
    (["--num-experts", "6", "--moe-router-topk", "2", "--moe-router-num-groups", "4", "--moe-router-group-topk", "2"], 1, r"--moe-router-group-topk 2: the experts must split into equal groups"),  # noqa: E501
    (["--num-experts", "8", "--moe-router-topk", "8", "--moe-router-num-groups", "4", "--moe-router-group-topk", "5"], 1, r"--moe-router-group-topk must be between 1 and --moe-router-num-groups"),  # noqa: E501
    (["--num-experts", "8", "--moe-router-topk", "2", "--moe-router-num-groups", "4", "--moe-router-group-topk", "3"], 1, r"none here: give --moe-router-group-topk <= --moe-router-topk"),  # noqa: E501
    (["--num-experts", "8", "--moe-router-topk", "8", "--moe-router-num-groups", "4", "--moe-router-group-topk", "2"], 1, r"each group is scored by its top 4 experts but holds 2"),  # noqa: E501
    (["--num-experts", "8", "--moe-router-topk", "5", "--moe-router-num-groups", "4", "--moe-router-group-topk", "2"], 1, r"a token picks 5 experts from its 2 groups of 2"),  # noqa: E501
    (["--multi-latent-attention", "--group-query-attention"], 1, r"--group-query-attention and --multi-latent-attention exclude each other"),  # noqa: E501
    (["--pipeline-model-parallel-size", "2", "--pipeline-model-parallel-layout", "Et|tL"], 2,
     r"--pipeline-model-parallel-layout Et\|tL places 2 layers \(t\) but --num-layers is 4"),
    (["--mtp-num-layers", "0"], 1, r"--mtp-num-layers must be >= 1"),
    (["--eval-iters", "-1"], 1, r"--eval-iters must be >= 0 \(0 = no evaluation\)"),
    (["--log-interval", "0"], 1, r"--log-interval must be >= 1"),
    (["--tensor-model-parallel-size", "3"], 4, r"world size 4 is not divisible by TP x PP x CP = 3"),
    (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1", "--global-batch-size", "12", "--microbatch-group-size-per-virtual-pipeline-stage", "5"], 2, r"--microbatch-group-size-per-virtual-pipeline-stage 5 leaves a last group of 1 of the 6 micro-batches per step, fewer than PP=2"),  # noqa: E501
    (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1", "--global-batch-size", "12", "--microbatch-group-size-per-virtual-pipeline-stage", "8"], 2, r"--microbatch-group-size-per-virtual-pipeline-stage 8 must be between PP=2 and the micro-batches per step \(6\)"),  # noqa: E501
    (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1", "--global-batch-size", "12", "--microbatch-group-size-per-virtual-pipeline-stage", "1"], 2, r"--microbatch-group-size-per-virtual-pipeline-stage 1 must be between PP=2"),  # noqa: E501
    (["--num-attention-heads", "2", "--tensor-model-parallel-size", "4"], 4,
     r"--num-attention-heads 2 is not divisible by --tensor-model-parallel-size 4"),
    (["--group-query-attention", "--num-query-groups", "1", "--tensor-model-parallel-size", "2"], 2,
     r"--num-query-groups 1 is not divisible by TP=2"),
    (["--num-layers", "3", "--pipeline-model-parallel-size", "2"], 2,
     r"--num-layers 3 is not divisible by --pipeline-model-parallel-size 2"),
    (["--num-layers-per-virtual-pipeline-stage", "1"], 1,
     r"virtual pipeline stages need --pipeline-model-parallel-size > 1"),
    (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "3"], 2,
     r"--num-layers \d+ / PP = \d+ is not divisible by --num-layers-per-virtual-pipeline-stage 3"),
    (["--sequence-parallel", "--tensor-model-parallel-size", "2", "--seq-length", "9",
      "--max-position-embeddings", "9"], 2, r"--seq-length must be divisible by TP"),
    (["--num-experts", "3", "--expert-model-parallel-size", "2"], 2,
     r"--num-experts 3 is not divisible by --expert-model-parallel-size 2"),
    (["--num-experts", "4", "--expert-model-parallel-size", "4"], 2,
     r"world size 2 is not divisible by ETP x EP x PP = 4"),
    (["--expert-model-parallel-size", "2"], 2, r"--expert-model-parallel-size > 1 needs --num-experts"),  # noqa: E501
    (["--global-batch-size", "6"], 2, r"--global-batch-size 6 is not divisible by --micro-batch-size 2 x data-parallel size 2"),  # noqa: E501
    (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1",
      "--global-batch-size", "6"], 2, r"interleaved pipelining needs the number of micro-batches \(3\) to be a multiple of PP=2"),  # noqa: E501
    (["--fp8-format", "hybrid", "--transformer-impl", "local"], 1, r"FP8 needs Transformer Engine"),
    (["--make-vocab-size-divisible-by", "0"], 1, r"--make-vocab-size-divisible-by must be >= 1"),
    (["--dataloader-type", "cyclic"], 1, r"--dataloader-type cyclic is not supported: samples are read in one pass per epoch"),  # noqa: E501
    (["--reset-attention-mask", "--context-parallel-size", "2", "--transformer-impl", "transformer_engine"], 2, r"--reset-attention-mask with context parallelism \(CP 2\) under Transformer Engine: its CP attention takes no arbitrary mask; drop one, or use the local spec"),  # noqa: E501
    (["--reset-attention-mask", "--no-create-attention-mask-in-dataloader"], 1, r"--reset-attention-mask with --no-create-attention-mask-in-dataloader"),  # noqa: E501
]  # fmt: skip


_FSDP2 = ["--use-torch-fsdp2", "--untie-embeddings-and-output-weights",
          "--no-gradient-accumulation-fusion"]  # fmt: skip
# (flags added, flags of _FSDP2 dropped, message): one of Megatron-LM's rules broken each.
REFUSED_FSDP2 = [
    (["--pipeline-model-parallel-size", "2"], [], r"is not supported with pipeline parallelism \(PP 2"),  # noqa: E501
    (["--num-experts", "4", "--expert-model-parallel-size", "2"], [], r"is not supported with expert parallelism \(EP 2"),  # noqa: E501
    (["--use-distributed-optimizer"], [], r"shards the optimizer state itself: drop --use-distributed-optimizer"),  # noqa: E501
    ([], ["--no-gradient-accumulation-fusion"], r"add --no-gradient-accumulation-fusion"),
    ([], ["--untie-embeddings-and-output-weights"], r"add --untie-embeddings-and-output-weights"),
    (["--fp16"], [], r"with --fp16 is not supported .*: use --bf16"),
    (["--ckpt-format", "torch"], [], r"--ckpt-format torch is not supported with it"),
    (["--check-weight-hash-across-dp-replicas-interval", "2"], [], r"no replicas to compare"),
]  # fmt: skip


@pytest.mark.parametrize("add,drop,message", REFUSED_FSDP2, ids=[m for *_, m in REFUSED_FSDP2])
def test_torch_fsdp2_rules_are_megatron_lms(add, drop, message):
    """Megatron-LM's rules for --use-torch-fsdp2 (its arguments.py), one line each."""
    argv = [a for a in BASE + _FSDP2 if a not in drop] + add
    with pytest.raises(ValueError, match="--use-torch-fsdp2 .*" + message):
        validate(parse_args(argv), 2, 512)
    validate(parse_args(BASE + _FSDP2), 2, 512)


def test_torch_fsdp2_with_cuda_device_max_connections_1_is_refused(monkeypatch):
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    with pytest.raises(ValueError, match="unset CUDA_DEVICE_MAX_CONNECTIONS=1"):
        validate(parse_args(BASE + _FSDP2), 2, 512)


def test_torch_fsdp2_options_warn_where_they_change_nothing():
    with pytest.warns(UserWarning, match="--overlap-grad-reduce with --use-torch-fsdp2"):
        validate(parse_args(BASE + _FSDP2 + ["--overlap-grad-reduce"]), 2, 512)
    with pytest.warns(UserWarning, match="--torch-fsdp2-no-reshard-after-forward applies to"):
        validate(parse_args(BASE + ["--torch-fsdp2-no-reshard-after-forward"]), 2, 512)


_OFFLOAD = ["--use-distributed-optimizer", "--use-precision-aware-optimizer",
            "--optimizer-cpu-offload"]  # fmt: skip
# (flags added, flags of _OFFLOAD dropped, message): Megatron-LM's and megatron-core's rules.
REFUSED_OFFLOAD = [
    ([], ["--use-precision-aware-optimizer"], r"--optimizer-cpu-offload needs --use-precision-aware-optimizer: .*add it"),  # noqa: E501
    ([], ["--use-distributed-optimizer"], r"--use-precision-aware-optimizer works inside the distributed optimizer .*: add --use-distributed-optimizer"),  # noqa: E501
    (["--optimizer", "sgd"], [], r"--use-precision-aware-optimizer is for Adam only"),
    (["--optimizer-offload-fraction", "1.5"], [], r"--optimizer-offload-fraction 1.5 must be between 0 and 1"),  # noqa: E501
    (["--optimizer-offload-fraction", "-0.1"], [], r"--optimizer-offload-fraction -0.1 must be between 0 and 1"),  # noqa: E501
    (["--bf16", "--fp8-format", "hybrid", "--fp8-recipe", "tensorwise", "--fp8-param-gather"], [], r"--optimizer-cpu-offload with --fp8-param-gather needs --fp8-recipe delayed"),  # noqa: E501
    (["--bf16", "--main-grads-dtype", "bf16", "--accumulate-allreduce-grads-in-fp32"], [], r"--main-grads-dtype can only be fp32 when --accumulate-allreduce-grads-in-fp32 is set"),  # noqa: E501
]  # fmt: skip


@pytest.mark.parametrize("add,drop,message", REFUSED_OFFLOAD,
                         ids=[m[:40] for *_, m in REFUSED_OFFLOAD])  # fmt: skip
def test_optimizer_cpu_offload_rules(add, drop, message):
    argv = [a for a in BASE + _OFFLOAD if a not in drop] + add
    with pytest.raises(ValueError, match=message):
        validate(parse_args(argv), 2, 512)
    validate(parse_args(BASE + _OFFLOAD), 2, 512)


def test_activation_offload_options_warn_without_it():
    with pytest.warns(UserWarning, match="--offload-modules / --min-offloaded-tensor-size: no "
                      "effect without --fine-grained-activation-offloading"):  # fmt: skip
        parse_args(BASE + ["--offload-modules", "core_attn", "--min-offloaded-tensor-size", "8"])


def test_optimizer_cpu_offload_options_warn_where_they_change_nothing():
    import warnings

    with pytest.warns(UserWarning, match="--optimizer-offload-fraction, --overlap-cpu-optimizer-"
                      "d2h-h2d, --no-pin-cpu-grads: no effect without --optimizer-cpu-offload"):  # fmt: skip
        validate(parse_args(BASE + ["--optimizer-offload-fraction", "0.5", "--no-pin-cpu-grads",
                                    "--overlap-cpu-optimizer-d2h-h2d"]), 2, 512)  # fmt: skip
    with pytest.warns(UserWarning, match="--use-torch-optimizer-for-cpu-offload changes nothing"):
        validate(parse_args(BASE + _OFFLOAD + ["--use-torch-optimizer-for-cpu-offload"]), 2, 512)
    with pytest.warns(UserWarning, match="--exp-avg-dtype bf16: with --optimizer-cpu-offload "
                      "megatron-core 0.16.1's hybrid optimizer keeps its state in fp32"):  # fmt: skip
        validate(parse_args(BASE + _OFFLOAD + ["--exp-avg-dtype", "bf16"]), 2, 512)
    # Megatron-LM's rule: bf16 main gradients are reduced in bf16, not accumulated in fp32.
    cfg = parse_args(BASE + _OFFLOAD + ["--bf16", "--main-grads-dtype", "bf16"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate(cfg, 2, 512)
    assert not cfg.parallel.accumulate_allreduce_grads_in_fp32
    cfg = parse_args(BASE + _OFFLOAD + ["--bf16"])
    validate(cfg, 2, 512)
    assert cfg.parallel.accumulate_allreduce_grads_in_fp32


def test_moe_biases_need_expert_tp_1():
    """megatron-core builds expert biases only at expert-TP 1: refused up front, not by its
    assertion inside the model build. Megatron-LM's default keeps biases on."""
    biased = [a for a in BASE if a != "--disable-bias-linear"]
    moe = ["--num-experts", "4", "--tensor-model-parallel-size", "2", "--sequence-parallel"]
    with pytest.raises(
        ValueError,
        match=r"MoE experts with linear biases .* need expert-TP 1, "
        r"got 2 .* --expert-tensor-parallel-size 1 or --disable-bias-linear",
    ):
        validate(parse_args(biased + moe), 2, 512)
    validate(parse_args(biased + moe + ["--expert-tensor-parallel-size", "1"]), 2, 512)
    validate(parse_args(BASE + moe), 2, 512)  # no biases: expert-TP = TP is fine


_OVERLAP = ["--num-experts", "4", "--expert-model-parallel-size", "2", "--bf16",
            "--overlap-moe-expert-parallel-comm"]  # fmt: skip
REFUSED_OVERLAP = [
    (["--expert-model-parallel-size", "1"], r"needs --expert-model-parallel-size > 1"),
    (["--moe-token-dispatcher-type", "allgather"], r"needs --moe-token-dispatcher-type alltoall"),
    ([], r"runs in bf16 or fp16 only"),  # --bf16 taken out below
    (["--recompute-granularity", "full", "--recompute-method", "uniform",
      "--recompute-num-layers", "1"],
     r"excludes full recomputation"),
    (["--moe-shared-expert-intermediate-size", "16", "--moe-shared-expert-overlap"],
     r"excludes --moe-shared-expert-overlap"),
    (["--mtp-num-layers", "2"], r"takes at most --mtp-num-layers 1"),
    (["--mtp-num-layers", "1"], r"with --mtp-num-layers 1 needs --pipeline-model-parallel-size > 1"),
]  # fmt: skip


@pytest.mark.parametrize("extra,message", REFUSED_OVERLAP, ids=[m for _, m in REFUSED_OVERLAP])
def test_expert_comm_overlap_rules_are_checked_up_front(extra, message):
    """megatron-core's rules for its combined 1F1B schedule, one line each (its own checks
    are assertions inside the model build)."""
    argv = BASE + _OVERLAP + extra
    if "bf16" in message:
        argv.remove("--bf16")
    with pytest.raises(ValueError, match="--overlap-moe-expert-parallel-comm " + message):
        validate(parse_args(argv), 2, 512)
    validate(parse_args(BASE + _OVERLAP), 2, 512)


def test_expert_comm_overlap_under_pipeline_parallelism_needs_virtual_stages():
    """megatron-core asserts virtual pipeline stages for its combined 1F1B schedule at
    PP > 1 (inside the model config): one line here; with them (by flag or by a layout of
    several stages per rank) it passes."""
    argv = BASE + _OVERLAP + ["--pipeline-model-parallel-size", "2", "--global-batch-size", "8"]
    with pytest.raises(
        ValueError,
        match=r"--overlap-moe-expert-parallel-comm with "
        r"--pipeline-model-parallel-size > 1 needs virtual pipeline stages",
    ):
        validate(parse_args(argv), 4, 512)
    validate(parse_args(argv + ["--num-virtual-stages-per-pipeline-rank", "2"]), 4, 512)
    validate(parse_args(argv + ["--pipeline-model-parallel-layout", "Et|t|t|tL"]), 4, 512)


@pytest.mark.parametrize("extra,world,message", REFUSED, ids=[m for _, _, m in REFUSED])
def test_refused_with_a_message_naming_the_flag(extra, world, message):
    with pytest.raises(ValueError, match=message):
        validate(parse_args(BASE + extra), world, 512)


@pytest.mark.parametrize(
    "vocab, divisible_by, tp, padded",
    [(512, 128, 1, 512), (300, 128, 1, 384), (300, 128, 2, 512), (300, 192, 2, 384),
     (300, 1, 1, 300), (301, 1, 2, 302)],
)  # fmt: skip
def test_vocabulary_padding(vocab, divisible_by, tp, padded):
    """Megatron's rule: the next multiple of --make-vocab-size-divisible-by x TP."""
    argv = BASE + ["--make-vocab-size-divisible-by", str(divisible_by),
                   "--tensor-model-parallel-size", str(tp)]  # fmt: skip
    assert validate(parse_args(argv), tp, vocab).padded_vocab_size == padded


@pytest.mark.parametrize("vocab, given, tp", [(300, 300, 1), (300, 333, 1), (300, 334, 2)])
def test_padded_vocabulary_as_given(vocab, given, tp):
    """--padded-vocab-size: taken as given (Megatron-LM's rule), whatever
    --make-vocab-size-divisible-by says; it must hold the tokenizer's ids and divide by TP."""
    argv = BASE + ["--padded-vocab-size", str(given), "--tensor-model-parallel-size", str(tp)]
    assert validate(parse_args(argv), tp, vocab).padded_vocab_size == given
    with pytest.raises(ValueError, match=rf"--padded-vocab-size {given} is smaller than the "
                       rf"tokenizer's vocabulary \({given + 1} ids\).*give at least {given + 1}"):  # fmt: skip
        validate(parse_args(argv), tp, given + 1)
    argv = BASE + ["--padded-vocab-size", str(given + 1), "--tensor-model-parallel-size", "2"]
    if (given + 1) % 2:
        with pytest.raises(ValueError, match=rf"--padded-vocab-size {given + 1} does not divide "
                           rf"by TP=2 .*give {given + 2}"):  # fmt: skip
            validate(parse_args(argv), 2, vocab)


@pytest.mark.parametrize(
    "split", ["0,0,0", "a,b", "1,2,3,4", "nan,1,0"]
)  # fmt: skip
def test_bad_splits_are_refused(split):
    argv = [a for a in BASE if a != "--mock-data"] + ["--data-path", "x", "--split", split]
    with pytest.raises(ValueError, match=r"--split .*: give up to three weights >= 0"):
        parse_args(argv)


def test_split_with_mock_data_is_ignored_with_a_warning():
    """Megatron-LM passes --split on with --mock-data and megatron-core draws every split of
    synthetic data anyway (GPT-OSS's example passes one, quotes and all): a warning, not a
    refusal, and the split is not used."""
    with pytest.warns(UserWarning, match=r"--split '99,1,0' has no effect with --mock-data"):
        cfg = parse_args([*BASE, "--split", "'99,1,0'"])
    assert cfg.data.split is None


def test_nan_blend_weight_is_refused():
    from tst.data.datasets import parse_blend

    with pytest.raises(ValueError, match=r"--data-path weights must be finite numbers"):
        parse_blend(["nan", "a", "1", "b"])


def test_read_only_save_is_refused_at_start(tmp_path):
    from tst.checkpointing import CheckpointError

    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o500)
    try:
        if os.access(read_only, os.W_OK):  # root ignores permissions: make it a file instead
            read_only.chmod(0o700)
            read_only.rmdir()
            read_only.write_text("")
        with pytest.raises(CheckpointError, match=r"--save .* is not writable"):
            pretrain_tst.main(BASE + ["--save", str(read_only / "ckpt")])
    finally:
        if read_only.is_dir():
            read_only.chmod(0o700)


@pytest.mark.parametrize(
    "flag",
    [["--pipeline-model-parallel-size", "2", "--position-embedding-type", "learned_absolute",
      "--mtp-num-layers", "1"]],
)  # fmt: skip
def test_launch_refuses_what_only_a_dry_run_can_lay_out(flag):
    from tst.plan import check_launchable

    with pytest.raises(ValueError, match=r"is not supported yet: .*--dry-run lays such a run out"):
        check_launchable(parse_args(BASE + flag))


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="refused without a GPU")
def test_memory_history_is_refused_without_a_gpu():
    with pytest.raises(ValueError, match=r"--record-memory-history records CUDA's caching "
                       r"allocator, and this machine has no GPU: drop it"):  # fmt: skip
        pretrain_tst.main(BASE + ["--record-memory-history", "--memory-snapshot-path", "s.pkl"])


def test_flex_dispatcher_is_refused_without_deepep():
    argv = BASE + ["--num-experts", "4", "--moe-token-dispatcher-type", "flex"]
    with pytest.raises(ValueError, match=r"flex needs DeepEP on a CUDA GPU; this run is on cpu"):
        pretrain_tst.main(argv)


def test_missing_data_is_refused():
    argv = [a for a in BASE if a != "--mock-data"]
    with pytest.raises(ValueError, match=r"give --data-path PREFIX"):
        parse_args(argv)


def test_unknown_choice_is_one_line():
    with pytest.raises(ValueError, match=r"argument --tst-mode: invalid choice: 'sideways'"):
        parse_args(BASE + ["--tst-mode", "sideways"])


def test_unknown_flags_are_listed_with_the_nearest_known_one(capsys):
    """Every unknown flag at once, each with a suggestion, before a bad choice value."""
    argv = BASE + ["--hidden-sze", "64", "--tst-mode", "sideways", "--lr-decay-stlye", "cosine",
                   "--no-such-thing-at-all"]  # fmt: skip
    with pytest.raises(ValueError) as error:
        parse_args(argv)
    assert str(error.value) == (
        "unknown flags: --hidden-sze (did you mean --hidden-size?), --lr-decay-stlye (did you "
        "mean --lr-decay-style?), --no-such-thing-at-all (pretrain_tst.py --help lists every "
        "flag)"
    )
    assert capsys.readouterr().err == ""  # no usage dump


def test_sequence_parallel_is_turned_off_with_tp1_as_megatron_does():
    cfg = parse_args(BASE + ["--sequence-parallel"])
    with pytest.warns(UserWarning, match="Disabling sequence parallelism"):
        validate(cfg, 1, 512)
    assert cfg.parallel.sequence_parallel is False


@pytest.mark.parametrize(
    "flag, message",
    [("--use-legacy-models", "legacy"), ("--use-megatron-fsdp", "Megatron FSDP is not supported: use --use-torch-fsdp2"),
     ("--vocab-extra-ids", "T5-style extra ids are not added")],
)  # fmt: skip
def test_refused_megatron_flags_name_the_reason(flag, message):
    with pytest.raises(ValueError, match=rf"not supported here: {flag}: .*{message}"):
        parse_args(BASE + [flag])


def test_accepted_megatron_flags_are_recorded_with_their_reason():
    cfg = parse_args(BASE + ["--use-mcore-models", "--distributed-backend", "nccl"])
    assert [flag for flag, _ in cfg.accepted_flags] == [
        "--use-mcore-models",
        "--distributed-backend",
    ]
    aliased = parse_args(BASE + ["--use-flash-attn", "--recompute-activations"])
    assert aliased.model.attention_backend == "flash"
    assert aliased.parallel.recompute_granularity == "selective"


def test_fp8_on_cpu_is_refused_at_start():
    with pytest.raises(ValueError, match=r"--fp8-format needs a CUDA GPU"):
        pretrain_tst.main(BASE + ["--fp8-format", "hybrid"])


def test_tokenizer_and_vocabulary_mismatch_is_refused():
    argv = [a for a in BASE]
    argv[argv.index("--vocab-size") + 1] = "100"
    with pytest.raises(ValueError, match=r"NullTokenizer needs --vocab-size >= 257"):
        pretrain_tst.main(argv)


def test_help_prints_every_flag(capsys):
    """`pretrain_tst.py --help` works (argparse formats every help text with %: a bare % in
    one broke the whole page) and lists every flag."""
    from tst.config import build_parser

    with pytest.raises(SystemExit) as exit_info:
        pretrain_tst.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    flags = {s for a in build_parser()._actions for s in a.option_strings if s.startswith("--")}
    assert len(flags) > 500 and not [f for f in sorted(flags) if f not in out]


@pytest.mark.parametrize("vocab, tp", [(300, 1), (300, 2), (301, 1)])
def test_no_pad_vocab_size(vocab, tp):
    """--no-pad-vocab-size (Megatron-LM 0.19): the tokenizer's size as it is; one that does
    not divide by TP is refused naming the --padded-vocab-size to give; --padded-vocab-size
    still wins."""
    argv = BASE + ["--no-pad-vocab-size", "--tensor-model-parallel-size", str(tp)]
    assert validate(parse_args(argv), tp, vocab).padded_vocab_size == vocab
    assert (
        validate(parse_args(argv + ["--padded-vocab-size", "400"]), tp, vocab).padded_vocab_size
        == 400
    )
    argv = BASE + ["--no-pad-vocab-size", "--tensor-model-parallel-size", "2"]
    with pytest.raises(ValueError, match=r"--no-pad-vocab-size: the tokenizer's 301 ids do not "
                       r"divide by TP=2 .*give --padded-vocab-size 302"):  # fmt: skip
        validate(parse_args(argv), 2, 301)


@pytest.mark.parametrize("name, why", [
    ("muon", "the Muon optimizer is not supported yet"),
    ("dist_muon", "the Muon optimizer is not supported yet"),
    ("adaptive_muon", "the Muon optimizer is not supported yet"),
    ("lion", "Lion is built on a newer megatron-core"),
    ("soap", "SOAP is built on a newer megatron-core"),
])  # fmt: skip
def test_megatron_lms_other_optimizers_are_refused_naming_why(name, why):
    """Megatron-LM's --optimizer values beyond adam / sgd: one line naming why and the fix,
    not argparse's bare "invalid choice"."""
    with pytest.raises(
        ValueError, match=rf"--optimizer {name}: {why}.*use --optimizer adam or sgd"
    ):
        parse_args(BASE + ["--optimizer", name])
