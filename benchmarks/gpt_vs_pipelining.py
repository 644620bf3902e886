"""The GPT example across processes against torch.distributed.pipelining.

Why this exists: issue 22 asks whether gpipe trains a GPT across processes
faster than the runtime PyTorch ships. This driver runs the GPT example
(examples/gpt, `--distributed 1 --stages 4`, its tied head, AdamW, no
clipping, no plain reference) and pipelining_gpt_peer.py (the same
architecture and sizes, untied: pipelining cannot tie across stages) on 4
Gloo ranks on this host, alternating launches for --rounds rounds, and
prints each schedule's fastest median step, the median over rounds of the
ratio of adjacent launches (this host's speed drifts by a third between
launches minutes apart; a pair shares the drift), and the largest peak RSS
per rank.

    python3 benchmarks/gpt_vs_pipelining.py --gpt-binary build/examples/gpt
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import distributed_vs_pipelining as shared  # noqa: E402  (its launch helpers)

PEER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pipelining_gpt_peer.py")
SIZES = {"layers": 6, "width": 64, "heads": 4, "context": 64, "batch": 16, "microbatches": 4}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpt-binary", required=True, help="build/examples/gpt")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=30, help="timed steps per launch")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--schedules", default="fill_drain,1f1b")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument(
        "--torch-path",
        default=os.path.expanduser("~/.cache/gpipe/torch-2.11.0"),
        help="the folder holding the torch package (PYTHONPATH)",
    )
    return p.parse_args()


def launch(impl, schedule, args, env):
    sizes = [f"--{k}={v}" for k, v in SIZES.items()]
    if impl == "gpipe":
        program = ["--no-python", args.gpt_binary]
        flags = sizes + [
            "--distributed=1", "--stages=4", f"--schedule={schedule}",
            f"--steps={args.steps + args.warmup}", f"--untimed={args.warmup}",
            "--compare=0", "--clip=0", "--sample=0", "--every=1000", "--json=1",
            "--checkpoint=never",  # pipelining keeps every activation too
            "--checkpoint-dir=/tmp/gpt_vs_pipelining", "--output=/tmp/gpt_vs_pipelining",
        ]  # fmt: skip
    else:
        program = [PEER]
        flags = sizes + [
            f"--schedule={schedule}", f"--steps={args.steps}", f"--warmup={args.warmup}",
        ]  # fmt: skip
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc-per-node", "4", *program, *flags,
    ]  # fmt: skip
    out = subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=args.timeout
    )
    if out.returncode != 0:
        raise shared.LaunchError(
            f"exit status {out.returncode}: {' '.join(cmd)}\n"
            f"{shared.stderr_tail(out.stderr)}"
        )
    for line in reversed(out.stdout.splitlines()):
        if line.startswith("{") and f'"impl":"{impl}"' in line:
            return json.loads(line)
    raise shared.LaunchError(f"no JSON line from {' '.join(cmd)}\n{shared.tail(out.stdout)}")


def main():
    args = parse_args()
    env = shared.launch_env(args.torch_path)
    print(f"GPT {SIZES}, 4 Gloo ranks, {args.steps} timed steps after {args.warmup}, "
          f"{args.rounds} rounds alternating")  # fmt: skip
    print("| schedule | gpipe ms | pipelining ms | gpipe / pipelining | paired ratio, median (range) "
          "| gpipe RSS MiB (max rank) | pipelining RSS MiB (max rank) |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|")
    for schedule in args.schedules.split(","):
        best = {}
        rss = {}
        paired = []
        for _ in range(args.rounds):
            step = {}
            for impl in ("gpipe", "pipelining"):
                result = launch(impl, schedule, args, env)
                step[impl] = result["step_ms_median"]
                best[impl] = min(best.get(impl, float("inf")), step[impl])
                rss[impl] = max(rss.get(impl, 0), max(result["peak_rss_mb"]))
            paired.append(step["gpipe"] / step["pipelining"])
        print(
            f"| {schedule} | {best['gpipe']:.2f} | {best['pipelining']:.2f} | "
            f"{best['gpipe'] / best['pipelining']:.2f} | "
            f"{statistics.median(paired):.2f} ({min(paired):.2f}-{max(paired):.2f}) | "
            f"{rss['gpipe']:.0f} | {rss['pipelining']:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
