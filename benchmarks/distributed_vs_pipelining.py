"""gpipe's multi-process pipeline against torch.distributed.pipelining.

Why this exists: PyTorch ships its own pipeline parallelism
(torch.distributed.pipelining, with ScheduleGPipe and Schedule1F1B). A
multi-process gpipe is only worth using if it keeps up with it, so this
driver runs both on the same model, schedule and microbatching, one stage
per process on 4 CPU processes over Gloo/loopback, and tabulates step time
and peak RSS side by side.

The gpipe side is a C++ program (--gpipe-binary) and the PyTorch side is
pipelining_peer.py next to this file. gpipe runs three times: as it ships
(on CPUs its messages go over the pipe's own sockets, one write per
message), over Gloo (--backend gloo: a rendezvous of three writes per
message, as before), and with --match-by-order 1 (over Gloo, matched by
order in coalesced batches, the rules its NCCL path follows), so the table
also shows what NCCL's ordering costs on Gloo. All take the same flags

    --schedule gpipe|1f1b --layers L --width W --batch B --microbatches M
    --steps N --warmup K

and print, on rank 0, one JSON line with step_ms_median and peak_rss_mb (one
entry per rank). Each is launched with

    python3 -m torch.distributed.run --standalone --nproc-per-node 4 \\
        [--no-python BINARY | pipelining_peer.py] FLAGS

with OMP_NUM_THREADS=1 and PYTHONPATH pointing at the torch wheel. For every
configuration the implementations alternate for --rounds rounds (gpipe,
gpipe by order, pipelining, gpipe, ...) so slow drift of the machine hits both
alike; the table keeps the fastest round's median step time (min over rounds)
and the largest peak RSS over rounds and ranks.

    python3 benchmarks/distributed_vs_pipelining.py --gpipe-binary PATH/TO/GPIPE_PEER
    python3 benchmarks/distributed_vs_pipelining.py --only pipelining --quick
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PEER = os.path.join(HERE, "pipelining_peer.py")
NPROC = 4
IMPLS = ("gpipe", "gpipe_gloo", "gpipe_by_order", "pipelining")
GPIPE_FLAGS = {
    "gpipe": [],
    "gpipe_gloo": ["--backend", "gloo"],
    "gpipe_by_order": ["--match-by-order", "1"],
}
SCHEDULES = ("gpipe", "1f1b")

# The small model is all per-step overhead (messages, scheduling, Python);
# the large one is compute-bound: on 2 cores one step of it takes about
# 150-200 ms with torch.distributed.pipelining.
# The zero-cost model (one Linear(1, 1) + ReLU per stage, one sample per
# micro-batch) is the floor: its step is all messages and bookkeeping, and
# gpipe's launches also measure one message's one-way latency in C++
# (--ping-pong) and the step's critical path in messages, whose product is
# the least a step can cost.
CONFIGS = [
    ("zero-cost", dict(layers=4, width=1, batch=8, microbatches=8)),
    ("small", dict(layers=8, width=64, batch=32, microbatches=8)),
    ("large", dict(layers=8, width=1024, batch=64, microbatches=8)),
]
# (steps, warmup) per configuration. Each launch also pays a few seconds of
# process start-up and `import torch`, which is not measured.
STEPS = {"zero-cost": (200, 10), "small": (100, 10), "large": (30, 3)}
QUICK_STEPS = {"zero-cost": (30, 3), "small": (20, 3), "large": (6, 2)}


def parse_args():
    p = argparse.ArgumentParser(
        description="gpipe multi-process pipeline vs torch.distributed.pipelining"
    )
    p.add_argument("--gpipe-binary", help="the C++ gpipe peer (run with --no-python)")
    p.add_argument(
        "--torch-path",
        default=os.path.expanduser("~/.cache/gpipe/torch-2.11.0"),
        help="directory holding the torch package (goes on PYTHONPATH)",
    )
    p.add_argument("--quick", action="store_true", help="fewer steps per launch")
    p.add_argument("--rounds", type=int, default=3, help="launches per implementation")
    p.add_argument(
        "--only", choices=IMPLS, help="run one implementation alone (e.g. to test)"
    )
    p.add_argument(
        "--timeout", type=float, default=600, help="seconds before a launch is killed"
    )
    p.add_argument("--output", help="also write every launch's JSON here")
    p.add_argument(
        "--spin-one-core",
        action="store_true",
        help="run everything beside a process that keeps one core busy "
        "(how each runtime degrades under CPU contention)",
    )
    p.add_argument(
        "--configs",
        default=",".join(name for name, _ in CONFIGS),
        help="comma-separated configurations to run (default: all)",
    )
    args = p.parse_args()
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    args.impls = (args.only,) if args.only else IMPLS
    args.configs = args.configs.split(",")
    unknown = set(args.configs) - {name for name, _ in CONFIGS}
    if unknown:
        p.error(f"unknown --configs {sorted(unknown)}")
    if any(impl in GPIPE_FLAGS for impl in args.impls):
        if not args.gpipe_binary:
            p.error("--gpipe-binary is required (or --only pipelining)")
        args.gpipe_binary = os.path.abspath(args.gpipe_binary)
        if not os.access(args.gpipe_binary, os.X_OK):
            p.error(
                f"--gpipe-binary {args.gpipe_binary} is not an executable file "
                "(use --only pipelining to run the PyTorch side alone)"
            )
    if not os.path.isdir(os.path.join(args.torch_path, "torch")):
        p.error(f"--torch-path {args.torch_path} holds no torch package")
    return args


def launch_env(torch_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        x for x in (torch_path, env.get("PYTHONPATH")) if x
    )
    env["OMP_NUM_THREADS"] = "1"
    return env


def tail(text, lines=40):
    return "\n".join(text.rstrip().splitlines()[-lines:])


def stderr_tail(err, lines=40):
    """The tail of a failed launch's stderr, without torchrun's own traceback
    and failure report (which would push the workers' messages out of the
    tail); of the report, only each rank's exit code is kept."""
    text = err.rstrip().splitlines()
    # Worker lines carry a "[rankN]:" prefix or none; torchrun's traceback is
    # the last one at column 0 and ends in ChildFailedError.
    starts = [i for i, l in enumerate(text) if l.startswith("Traceback (most recent")]
    if starts and any("ChildFailedError" in l for l in text[starts[-1] :]):
        report = [
            l.strip()
            for l in text[starts[-1] :]
            if l.strip().startswith(("rank ", "exitcode "))
        ]
        return "\n".join(text[: starts[-1]][-lines:] + ["--- torchrun ---"] + report)
    return tail(err, lines)


class LaunchError(RuntimeError):
    pass


def _signal_group(pgid, sig):
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:  # already gone
        pass


def run_one(impl, schedule, config, steps, warmup, args, env):
    """Launches one implementation under torchrun; returns its JSON result."""
    # "--flag value", the form both peers are specified to take.
    flags = ["--schedule", schedule]
    for key, value in [*config.items(), ("steps", steps), ("warmup", warmup)]:
        flags += [f"--{key}", str(value)]
    is_gpipe = impl in GPIPE_FLAGS
    program = ["--no-python", args.gpipe_binary] if is_gpipe else [PEER]
    if is_gpipe:
        flags += GPIPE_FLAGS[impl]
        # distributed_mlp checks its first step against plain training by
        # default, which holds a whole reference model on every rank: not
        # what is measured here (the peer keeps only its stage either).
        flags += ["--check", "0"]
        # Nor is drawing the last step's schedule (an SVG in the current
        # folder).
        flags += ["--picture", "none"]
        if config["width"] == 1:  # the zero-cost model: measure the floor
            flags += ["--ping-pong", "200"]
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--standalone", "--nproc-per-node", str(NPROC),
        *program, *flags,
    ]  # fmt: skip
    # torchrun gets a session of its own, so that a hang can be ended without
    # touching anything else. It starts each worker in a further session of
    # its own, so a hang is ended by SIGTERM to torchrun, which then stops its
    # workers itself (SIGTERM, then SIGKILL); SIGKILL is the last resort.
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        raise LaunchError(
            f"timed out after {args.timeout:.0f} s: {' '.join(cmd)}\n"
            f"--- stderr tail ---\n{stderr_tail(err)}"
        )
    if proc.returncode != 0:
        raise LaunchError(
            f"exit status {proc.returncode}: {' '.join(cmd)}\n"
            f"--- stdout tail ---\n{tail(out, 10)}\n"
            f"--- stderr tail ---\n{stderr_tail(err)}"
        )
    # The result is the last stdout line that parses as this run's JSON; other
    # lines (warnings, logs) are ignored.
    for line in reversed(out.splitlines()):
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            result = json.loads(line)
        except json.JSONDecodeError:
            continue
        printed = "gpipe" if is_gpipe else impl  # both gpipe runs print "gpipe"
        if result.get("impl") == printed and result.get("schedule") == schedule:
            missing = {"step_ms_median", "peak_rss_mb"} - result.keys()
            if missing or len(result["peak_rss_mb"]) != NPROC:
                raise LaunchError(f"incomplete result {line!r} from {' '.join(cmd)}")
            return result
    raise LaunchError(
        f"no JSON line with impl={impl!r} in the output of {' '.join(cmd)}\n"
        f"--- stdout tail ---\n{tail(out, 10)}\n"
        f"--- stderr tail ---\n{stderr_tail(err)}"
    )


def fmt(x, spec):
    return "—" if x is None else format(x, spec)


def ratio(a, b):
    return a / b if a is not None and b is not None and b > 0 else None


def main():
    args = parse_args()
    env = launch_env(args.torch_path)
    steps_table = QUICK_STEPS if args.quick else STEPS
    rows, raw, floors = [], [], []
    spinner = None
    if args.spin_one_core:
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        return run_all(args, env, steps_table, rows, raw, floors)
    finally:
        if spinner:
            spinner.kill()
            spinner.wait()


def run_all(args, env, steps_table, rows, raw, floors):
    for name, config in CONFIGS:
        if name not in args.configs:
            continue
        steps, warmup = steps_table[name]
        for schedule in SCHEDULES:
            best = {impl: None for impl in args.impls}  # min step_ms_median
            # Per gpipe transport: min over launches of latency x messages,
            # and the same with every rank messaging at once.
            floor, busy_floor = {}, {}
            rss = {impl: None for impl in args.impls}  # max peak RSS, any rank
            for r in range(args.rounds):
                for impl in args.impls:
                    t0 = time.monotonic()
                    try:
                        res = run_one(impl, schedule, config, steps, warmup, args, env)
                    except LaunchError as e:
                        print(f"launch failed ({name}, {schedule}, {impl}): {e}",
                              file=sys.stderr)  # fmt: skip
                        return 1
                    raw.append(dict(res, configuration=name, round=r))
                    ms, mb = res["step_ms_median"], max(res["peak_rss_mb"])
                    if res.get("critical_path_messages"):
                        n = res["critical_path_messages"] / 1e3
                        f, b = res["one_way_us"] * n, res["one_way_busy_us"] * n
                        floor[impl] = min(floor.get(impl, f), f)
                        busy_floor[impl] = min(busy_floor.get(impl, b), b)
                    best[impl] = ms if best[impl] is None else min(best[impl], ms)
                    rss[impl] = mb if rss[impl] is None else max(rss[impl], mb)
                    print(
                        f"[{name} {schedule} round {r + 1}/{args.rounds}] {impl}: "
                        f"{ms:.2f} ms/step, peak RSS {mb:.0f} MB "
                        f"(launch {time.monotonic() - t0:.0f} s)",
                        file=sys.stderr, flush=True,
                    )  # fmt: skip
            label = (
                f"{name} (L={config['layers']} W={config['width']} "
                f"B={config['batch']} M={config['microbatches']})"
            )
            for impl in floor:
                floors.append((schedule, impl, floor[impl], busy_floor[impl],
                               best.get(impl), best.get("pipelining")))  # fmt: skip
            rows.append((label, schedule, best.get("gpipe"),
                         best.get("gpipe_gloo"),
                         best.get("gpipe_by_order"), best.get("pipelining"),
                         rss.get("gpipe"), rss.get("pipelining")))  # fmt: skip

    print(
        f"\ngpipe vs torch.distributed.pipelining, {NPROC} CPU processes on "
        f"127.0.0.1, OMP_NUM_THREADS=1; min over {args.rounds} round(s) of the median "
        "step time, max peak RSS over rounds and ranks"
        + ("; beside a process spinning one core" if args.spin_one_core else "")
        + "\n"
    )
    print("| configuration | schedule | gpipe ms | pipelining ms | gpipe/pipelining "
          "| gpipe over Gloo ms | over Gloo/pipelining "
          "| gpipe by order ms | by order/pipelining "
          "| gpipe RSS MB | pipelining RSS MB | RSS ratio |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, schedule, g_ms, gloo_ms, o_ms, p_ms, g_mb, p_mb in rows:
        print(
            f"| {label} | {schedule} | {fmt(g_ms, '.2f')} | {fmt(p_ms, '.2f')} "
            f"| {fmt(ratio(g_ms, p_ms), '.2f')} | {fmt(gloo_ms, '.2f')} "
            f"| {fmt(ratio(gloo_ms, p_ms), '.2f')} | {fmt(o_ms, '.2f')} "
            f"| {fmt(ratio(o_ms, p_ms), '.2f')} | {fmt(g_mb, '.0f')} "
            f"| {fmt(p_mb, '.0f')} | {fmt(ratio(g_mb, p_mb), '.2f')} |"
        )

    if floors:
        print(
            "\nthe floor: zero-cost stages; floor = the step's critical path in "
            "messages x one message's one-way latency over that launch's "
            "transport (two ranks bouncing it alone; 'busy': every pair of ranks "
            "at once), measured by gpipe in the same launches\n"
        )
        print("| schedule | gpipe run | floor ms | busy floor ms | gpipe ms "
              "| gpipe/floor | gpipe/busy floor | pipelining ms "
              "| pipelining/floor |")  # fmt: skip
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for schedule, impl, f, b, g_ms, p_ms in floors:
            print(
                f"| {schedule} | {impl} | {f:.2f} | {b:.2f} | {fmt(g_ms, '.2f')} "
                f"| {fmt(ratio(g_ms, f), '.2f')} | {fmt(ratio(g_ms, b), '.2f')} "
                f"| {fmt(p_ms, '.2f')} | {fmt(ratio(p_ms, f), '.2f')} |"
            )

    if args.output:
        with open(args.output, "w") as f:
            json.dump(raw, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
