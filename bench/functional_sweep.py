#!/usr/bin/env python
"""Train Megatron-LM's own functional-test configurations for a few TST steps on CPU.

    python bench/functional_sweep.py [--only SUBSTRING ...] [--limit N] [--out DIR]
                                     [--data tests/data/megatron_lm_functional_tests_0.19.0.json]

tests/tools/test_megatron_functional_configs.py lays each of the 165 configurations in
tests/data/megatron_lm_functional_tests.json out with ``--dry-run``; this trains them. Each
one is shrunk to CPU size and kept as it is otherwise: widths (hidden 64, FFN 128, 8 heads,
sequence 64, the experts' and MLA's widths), mock data with a 1,024-token NullTokenizer, 4
steps with the switch from bags of 2 to next-token training at step 2, an evaluation and a
checkpoint at step 2; its layers, experts, parallel layout (TP / PP / virtual stages / EP /
expert-TP), precision, recomputation, overlap, routing and checkpoint flags are its own
(``--transformer-impl transformer_engine`` becomes ``local`` where Transformer Engine is
not installed). A
configuration whose name says ``resume`` stops at step 2 and is resumed from its checkpoint
to step 4, as Megatron-LM's test runner does. All of them run in one spawned world of 8
gloo ranks (the functional tests' node): data parallelism takes the ranks the model layout
leaves, and the few layouts larger than 8 ranks have their data and then expert
parallelism cut down to fit (said in the table).

A flag refused as GPU-only (CUDA, Transformer Engine, FP8) is dropped and the rest of the
configuration trained (the table says which were dropped; ``--no-drop-gpu-only`` stops
there instead). Each configuration ends as ``trained`` (the steps ran; the last loss is
shown), ``rerun-exit`` (a configuration that injects errors for the rerun engine, which
stopped the run with its exit code 16 or 17, as asked), ``refused``
(a one-line error from the trainer naming a flag or rule: a GPU-only feature on this CPU,
or one of the functional-test refusals), or ``FAILED`` (anything else: a traceback, a hang
past the timeout, ranks that disagree). The per-rank logs are under ``--out`` (with a
failed world's whole message, a hung rank's Python stacks included, in the configuration's
``error.txt``); the table and a JSON summary are printed and written there.

It takes about 37 minutes with the machine to itself (8 processes on 2 cores); ``--only``
picks configurations by a part of their name. ``--exact`` trains each ``resume`` case once
more without the stop and requires the stopped-and-resumed losses to be that run's
(``--only resume --exact``: 64 configurations, about 13 minutes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests", "helpers")]

DATA = os.path.join(ROOT, "tests", "data", "megatron_lm_functional_tests.json")
WORLD = 8
STEPS, SWITCH = 4, 2
# Width flags and the CPU-sized value each is given.
WIDTHS = {
    "--hidden-size": "64", "--ffn-hidden-size": "128", "--num-attention-heads": "8",
    "--kv-channels": "8", "--seq-length": "64", "--max-position-embeddings": "64",
    "--moe-ffn-hidden-size": "32", "--moe-shared-expert-intermediate-size": "32",
    "--q-lora-rank": "32", "--kv-lora-rank": "16", "--qk-head-dim": "8",
    "--qk-pos-emb-head-dim": "8", "--v-head-dim": "8", "--micro-batch-size": "1",
}  # fmt: skip
# Flags replaced by the sweep's own (data, paths, lengths, logging) or meaningless here
# (no network for W&B; FIM needs a real tokenizer). Value: how many words follow the flag
# ("+": every word up to the next flag).
DROPPED = {
    "--data-path": "+", "--vocab-file": 1, "--merge-file": 1, "--tokenizer-model": 1,
    "--tokenizer-type": 1, "--legacy-tokenizer": 0, "--split": 1, "--data-cache-path": 1,
    "--mock-data": 0, "--vocab-size": 1, "--save": 1, "--load": 1, "--tensorboard-dir": 1,
    "--wandb-project": 1, "--wandb-exp-name": 1, "--wandb-save-dir": 1, "--wandb-entity": 1,
    "--train-iters": 1, "--train-samples": 1, "--exit-interval": 1,
    "--exit-duration-in-mins": 1, "--eval-interval": 1, "--eval-iters": 1,
    "--save-interval": 1, "--save-retain-interval": 1, "--log-interval": 1,
    "--lr-decay-iters": 1, "--lr-decay-samples": 1, "--lr-warmup-samples": 1,
    "--lr-warmup-iters": 1, "--lr-warmup-fraction": 1, "--rampup-batch-size": 3,
    "--global-batch-size": 1, "--fim-data": 0, "--fim-rate": 1, "--fim-spm-rate": 1,
    "--num-workers": 1, "--distributed-timeout-minutes": 1,
    # Megatron-LM 0.19's batch flags: sized for the configurations' own batches and
    # (the schedule) for sample-based training; the sweep trains a few steps of its own.
    "--step-batch-size-schedule": 1, "--eval-global-batch-size": 1,
    "--eval-micro-batch-size": 1, "--start-eval-at-iter": 1,
}  # fmt: skip

# Flags that mean nothing once a GPU-only flag they serve is dropped.
GOES_WITH = {
    "--moe-token-dispatcher-type": ("--moe-enable-deepep", "--moe-flex-dispatcher-backend"),
    "--fp8-format": ("--fp8-recipe", "--fp8-amax-history-len", "--fp8-amax-compute-algo",
                     "--fp8-param-gather", "--first-last-layers-bf16"),
    "--tp-comm-overlap": ("--tp-comm-overlap-cfg",),
    # (Context parallelism runs on the local spec too; where it is refused, its sub-grid and
    # rank order go with it.)
    "--context-parallel-size": ("--hierarchical-context-parallel-sizes", "--cp-comm-type",
                                "--use-tp-pp-dp-mapping"),
}  # fmt: skip


def _value(argv: list[str], flag: str, default=None):
    return argv[argv.index(flag) + 1] if flag in argv else default


def _without(argv: list[str], drop: dict) -> list[str]:
    out, i = [], 0
    while i < len(argv):
        word = argv[i]
        if word in drop:
            n = drop[word]
            i += 1
            if n == "+":
                while i < len(argv) and not argv[i].startswith("--"):
                    i += 1
            else:
                i += n
            continue
        out.append(word)
        i += 1
    return out


def _te_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("transformer_engine") is not None


def shrink(name: str, case: dict, work: str) -> tuple[list[str], list[str], str]:
    """The CPU-sized argv of one configuration: (first run, resume run or [], note)."""
    argv = list(case["argv"])
    if "--transformer-impl" in argv and not _te_importable():
        argv[argv.index("--transformer-impl") + 1] = "local"
    for flag, value in WIDTHS.items():
        if flag in argv:
            argv[argv.index(flag) + 1] = value
    if "--num-query-groups" in argv:
        groups = int(_value(argv, "--num-query-groups"))
        argv[argv.index("--num-query-groups") + 1] = str(min(groups, 8))
    note = ""
    tp = int(_value(argv, "--tensor-model-parallel-size", 1))
    pp = int(_value(argv, "--pipeline-model-parallel-size", 1))
    cp = int(_value(argv, "--context-parallel-size", 1))
    if tp * pp * cp > WORLD:
        return [], [], f"needs {tp * pp * cp} ranks for TP x PP x CP"
    dp = WORLD // (tp * pp * cp)
    if case["world"] != WORLD:
        note = "; ".join([note] * bool(note) + [f"world {case['world']} -> {WORLD}"])
    # The expert grid (expert-TP x EP per pipeline stage) must fit the ranks a stage has.
    ep = int(_value(argv, "--expert-model-parallel-size", 1))
    etp = int(_value(argv, "--expert-tensor-parallel-size", tp))
    fit = max(1, (tp * cp * dp) // etp)
    if ep > fit:
        argv[argv.index("--expert-model-parallel-size") + 1] = str(fit)
        note = "; ".join([note] * bool(note) + [f"EP {ep} -> {fit}"])
    micro = max(2, pp)
    group = _value(argv, "--microbatch-group-size-per-virtual-pipeline-stage")
    if group is not None:
        micro = max(micro, int(group))
    folder = os.path.join(work, name.replace("/", "__"))
    ckpt = os.path.join(folder, "ckpt")
    argv = _without(argv, DROPPED) + [
        "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "1024",
        "--global-batch-size", str(micro * dp), "--train-iters", str(STEPS),
        "--tst-bag-size", "2", "--tst-iters", str(SWITCH), "--eval-interval", str(SWITCH),
        "--eval-iters", "1", "--log-interval", "1", "--save-interval", str(SWITCH),
        "--save", ckpt, "--load", ckpt, "--tensorboard-dir", os.path.join(folder, "tb"),
        "--num-workers", "0", "--distributed-timeout-minutes", "3",
    ]  # fmt: skip
    if "resume" in name:
        return argv + ["--exit-interval", str(SWITCH)], argv, note
    return argv, [], note


def _gpu_only(refusal: str) -> str | None:
    """The flag a refusal names when what it refuses is for GPUs only, else None."""
    message = re.sub(r"^\w+(Error|Exception): ", "", refusal)  # the type _run_on_rank adds
    gpu = ("no GPU", "CUDA", "Transformer Engine", "a GPU", "FP8")
    if not any(g in message for g in gpu):
        return None
    named = re.search(r"\bdrop (--[a-z0-9-]+)", message)
    if named:
        return named.group(1)
    first = message.split()[0] if message.split() else ""
    return first.rstrip(":,") if first.startswith("--") else None


def _without_flag(argv: list[str], flag: str) -> list[str]:
    """``argv`` without ``flag`` and its values (the words up to the next flag)."""
    return _without(argv, {flag: "+"}) if argv else argv


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]


def _is_refusal(error: BaseException) -> bool:
    """A one-line refusal of the trainer's (a TSTError, or a ValueError raised by the
    trainer's own code), not an error from inside torch or megatron-core (a ValueError from
    torch's optimizer on resume is a finding, not a refusal)."""
    from tst.errors import TSTError

    if isinstance(error, TSTError):
        return True
    if not isinstance(error, ValueError) or error.__traceback__ is None:
        return False
    where = os.path.abspath(traceback.extract_tb(error.__traceback__)[-1].filename)
    return where.startswith(os.path.join(ROOT, "tst") + os.sep) or where == os.path.join(
        ROOT, "pretrain_tst.py"
    )


def _run_on_rank(argv: list[str], log_path: str) -> dict:
    """pretrain_tst.main on this rank; never raises (a raise would end the world)."""
    import torch.distributed as dist

    import pretrain_tst

    rank = dist.get_rank()
    metrics = log_path + ".metrics.jsonl"
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    result: dict = {"rank": rank}
    with open(f"{log_path}.rank{rank}", "w") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):  # fmt: skip
        try:
            rc = pretrain_tst.main(argv + ["--metrics-file", metrics])
            result["rc"] = rc
        except BaseException as error:  # noqa: BLE001 - all but a refusal is a finding
            refused = _is_refusal(error)  # the trainer's one-line refusals
            result["refused" if refused else "failed"] = (
                f"{type(error).__name__}: {_first_line(error)}"
            )
            if not refused:
                traceback.print_exc(file=log)
    if rank == 0 and os.path.exists(metrics):
        with open(metrics) as f:
            records = [json.loads(line) for line in f]
        losses = [(r["iteration"], r["loss"]) for r in records if r.get("loss") is not None]
        result["losses"] = losses
    return result


# Flags under which a resumed run is not the unbroken one by design.
NOT_EXACT = {
    "--finetune": "--finetune starts the iterations and the optimizer again",
    "--no-load-optim": "--no-load-optim starts the optimizer again",
    "--no-load-rng": "--no-load-rng starts the random state again",
}


def _not_exact(argv: list[str]) -> str:
    return "; ".join(why for flag, why in NOT_EXACT.items() if flag in argv)


def _unbroken(argv: list[str], log: str) -> list[str]:
    """``argv`` (a resume case's second run) with its checkpoints and TensorBoard folder in a
    folder of their own: trained from scratch to the end without the stop."""
    folder = os.path.join(os.path.dirname(log), "unbroken")
    out = list(argv)
    for flag, path in (("--save", "ckpt"), ("--load", "ckpt"), ("--tensorboard-dir", "tb")):
        if flag in out:
            out[out.index(flag) + 1] = os.path.join(folder, path)
    return out


def _compare_resume(resumed: list, unbroken: list, rel: float = 1e-6) -> tuple[str, str]:
    """``trained`` when the stopped-and-resumed run logged the unbroken run's losses (within
    ``rel``: gloo's reductions repeat their order, so the two agree to the last bit here),
    else ``FAILED`` naming the first step that differs."""
    if [i for i, _ in resumed] != [i for i, _ in unbroken]:
        return "FAILED", (f"resumed run logged steps {[i for i, _ in resumed]}, the unbroken "
                          f"run {[i for i, _ in unbroken]}")  # fmt: skip
    for (step, got), (_, want) in zip(resumed, unbroken, strict=True):
        if not abs(got - want) <= rel * abs(want):
            return "FAILED", (f"the resumed run differs from the unbroken run at step {step}: "
                              f"{got!r} vs {want!r}")  # fmt: skip
    return "trained", "resumed = unbroken run"


def _outcome(per_rank: list[dict], injected: bool = False) -> tuple[str, str, list]:
    failed = [r["failed"] for r in per_rank if "failed" in r]
    refused = {r["refused"] for r in per_rank if "refused" in r}
    if failed:
        return "FAILED", failed[0], []
    if refused and len(refused) == 1 and all("refused" in r for r in per_rank):
        return "refused", refused.pop(), []
    if refused:
        return "FAILED", f"ranks disagree: {sorted(refused)[0]}", []
    codes = {r.get("rc") for r in per_rank}
    if injected and len(codes) == 1 and codes <= {16, 17}:
        # --error-injection-*: the rerun engine stops the run with its exit code, as asked.
        return "rerun-exit", f"the rerun engine's exit {codes.pop()} (errors injected)", []
    if codes != {0}:
        return "FAILED", f"exit codes {[r.get('rc') for r in per_rank]}", []
    return "trained", "", per_rank[0].get("losses", [])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--only", nargs="+", default=None, help="name substrings to select")
    parser.add_argument("--limit", type=int, default=None, help="at most N configurations")
    parser.add_argument("--out", default=os.path.join(ROOT, "runs", "functional_sweep"))
    parser.add_argument("--timeout-s", type=float, default=600.0, help="per run")
    parser.add_argument("--data", default=DATA, help="the configurations (default Megatron-LM "
                        "0.16.1's; tests/data/megatron_lm_functional_tests_0.19.0.json: "
                        "0.19.0's)")  # fmt: skip
    parser.add_argument(
        "--exact", action="store_true",
        help="train each resume case once more without the stop and require the same losses "
        "(except where a flag restarts something by design: --finetune, --no-load-optim, "
        "--no-load-rng)",
    )  # fmt: skip
    parser.add_argument(
        "--no-drop-gpu-only", dest="drop_gpu_only", action="store_false",
        help="stop at a GPU-only flag's refusal (default: train the configuration without "
        "it, and say so)",
    )  # fmt: skip
    args = parser.parse_args(argv)

    from distributed import ProcessWorld, RankFailure

    with open(args.data) as f:
        configs = json.load(f)["configs"]
    names = [n for n in configs if not args.only or any(s in n for s in args.only)]
    names = names[: args.limit] if args.limit else names
    os.makedirs(args.out, exist_ok=True)
    world, rows = None, []
    started = time.time()
    for name in names:
        first, again, note = shrink(name, configs[name], args.out)
        if not first:
            rows.append({"name": name, "outcome": "skipped", "detail": note})
            print(f"skipped  {name}: {note}", flush=True)
            continue
        t0 = time.time()
        log = os.path.join(args.out, name.replace("/", "__"), "run")
        # A checkpoint left by an earlier sweep into --out would be resumed: start clean.
        shutil.rmtree(os.path.dirname(log), ignore_errors=True)
        dropped: list[str] = []
        refusals: list[str] = []

        def attempt(run: list[str], tag: str, log: str = log) -> tuple[str, str, list]:
            nonlocal world
            if world is None or world.closed:
                world = ProcessWorld(WORLD, timeout_s=args.timeout_s)
            try:
                per_rank = world.run(_run_on_rank, run, f"{log}{tag}")
            except (TimeoutError, RankFailure) as error:
                # The whole message (the ranks' tracebacks, a hung rank's stacks) is kept.
                os.makedirs(os.path.dirname(log), exist_ok=True)  # made by the ranks
                with open(os.path.join(os.path.dirname(log), "error.txt"), "w") as f:
                    f.write(str(error))
                return "FAILED", _first_line(error) + " (see error.txt)", []
            return _outcome(per_rank, "--error-injection-rate" in run)

        while True:
            outcome, detail, losses = "trained", "", []
            for i, run in enumerate([first, again] if again else [first]):
                outcome, detail, part = attempt(run, f"{len(dropped)}.{i}")
                losses += part
                if outcome != "trained":
                    break
            flag = _gpu_only(detail) if outcome == "refused" and args.drop_gpu_only else None
            if flag is None or flag in dropped:
                break
            dropped.append(flag)  # train the rest of the configuration without it
            refusals.append(detail)
            for gone in [flag, *GOES_WITH.get(flag, ())]:
                first, again = _without_flag(first, gone), _without_flag(again, gone)
        if dropped:
            note = "; ".join([note] * bool(note) + ["without " + " ".join(dropped)])
        # --finetune loads the weights and starts the iterations again at 1.
        steps = list(range(1, SWITCH + 1)) * bool(again and "--finetune" in again)
        steps += list(range(1, STEPS + 1))
        if outcome == "trained" and [i for i, _ in losses] != steps:
            outcome, detail = "FAILED", f"logged steps {[i for i, _ in losses]}"
        if args.exact and outcome == "trained" and again:
            why_not = _not_exact(again)
            if why_not:
                note = "; ".join([note] * bool(note) + [f"resume not compared ({why_not})"])
            else:  # the same configuration trained without the stop, in a folder of its own
                outcome, detail, unbroken = attempt(_unbroken(again, log), f"{len(dropped)}.u")
                if outcome == "trained":
                    outcome, detail = _compare_resume(losses, unbroken)
        row = {"name": name, "outcome": outcome, "detail": detail, "note": note,
               "dropped_because": refusals, "losses": losses,
               "seconds": round(time.time() - t0, 1)}  # fmt: skip
        rows.append(row)
        shown = detail
        if outcome == "trained" and losses:
            shown = "; ".join([f"loss {losses[-1][1]:.4f}"] + [detail] * bool(detail))
        print(f"{outcome:8s} {name} ({row['seconds']:.0f} s){' [' + note + ']' if note else ''}:"
              f" {shown}", flush=True)  # fmt: skip
    if world is not None:
        world.close()
    counts = {k: sum(r["outcome"] == k for r in rows) for k in
              ("trained", "rerun-exit", "refused", "FAILED", "skipped")}  # fmt: skip
    print(f"{len(rows)} configurations in {time.time() - started:.0f} s: "
          + ", ".join(f"{v} {k}" for k, v in counts.items()))  # fmt: skip
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump({"counts": counts, "rows": rows}, f, indent=1)
    return 1 if counts["FAILED"] else 0


if __name__ == "__main__":
    sys.exit(main())
