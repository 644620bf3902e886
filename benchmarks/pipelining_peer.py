"""torch.distributed.pipelining peer of gpipe's multi-process benchmark.

Why this exists: gpipe's multi-process pipeline should be judged against what
PyTorch ships for the same job, not only against plain single-process
training. This script trains the same model, with the same flags and the same
JSON output line, as the C++ gpipe binary that distributed_vs_pipelining.py
launches next to it, so the two can be compared per step time and peak RSS.

Run it under torchrun with 4 ranks (Gloo on the CPU), one pipeline stage per
rank:

    PYTHONPATH=~/.cache/gpipe/torch-2.11.0 OMP_NUM_THREADS=1 \\
        python3 -m torch.distributed.run --standalone --nproc-per-node 4 \\
        benchmarks/pipelining_peer.py --schedule gpipe --layers 8 --width 64 \\
        --batch 32 --microbatches 8 --steps 20 --warmup 3

Model: nn.Sequential of --layers blocks Linear(W, W) + ReLU, split into 4
equal contiguous pieces; loss MSELoss (mean) on the last stage; no optimizer.
Rank 0 prints one JSON line on stdout; the last rank prints the last step's
loss on stderr.
"""

import argparse
import json
import resource
import statistics
import sys
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

NUM_STAGES = 4

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--schedule", choices=sorted(SCHEDULES), default="gpipe")
    p.add_argument("--layers", type=int, default=8, help="Linear+ReLU blocks")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--microbatches", type=int, default=8)
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    args = p.parse_args()
    if args.layers % NUM_STAGES:
        p.error(f"--layers must be a multiple of {NUM_STAGES}")
    # Equal microbatches: every stage is given one fixed microbatch shape
    # below (tensor_split would otherwise give ragged ones).
    if args.batch % args.microbatches:
        p.error("--batch must be a multiple of --microbatches")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args


def build_piece(layers, width, rank, world):
    """The whole model, seeded identically on every rank, cut to this rank's
    contiguous share of blocks, so the weights match a single-process model
    (and gpipe's) whatever the rank."""
    torch.manual_seed(0)
    modules = []
    for _ in range(layers):
        modules += [nn.Linear(width, width), nn.ReLU()]
    full = nn.Sequential(*modules)
    per_stage = len(full) // world  # 2 * layers / world modules
    return full[rank * per_stage : (rank + 1) * per_stage]


def main():
    args = parse_args()
    # One intra-op and one inter-op thread per rank: 4 ranks share 2 cores.
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != NUM_STAGES:
        raise SystemExit(f"expected {NUM_STAGES} ranks, got {world}")
    device = torch.device("cpu")

    piece = build_piece(args.layers, args.width, rank, world)
    # Give every stage its microbatch input and output shapes (meta tensors).
    # Without them, PipelineStage infers shapes on the first step by sending
    # metadata down the chain with send/recv_object_list, which unpickles
    # through tensor.numpy() and so fails where NumPy is not installed (it is
    # not in the gpipe torch cache). Shapes and dtypes are all that is checked.
    mb_meta = torch.empty(
        args.batch // args.microbatches, args.width, device="meta"
    )
    stage = PipelineStage(
        piece, rank, world, device, input_args=mb_meta, output_args=mb_meta
    )
    # MSELoss is a mean per microbatch; with scale_grads=True (the default)
    # the schedule divides the accumulated gradients by M, so they equal the
    # gradients of the full-batch mean loss.
    schedule = SCHEDULES[args.schedule](
        stage, n_microbatches=args.microbatches, loss_fn=nn.MSELoss()
    )

    # Identical data on every rank (only rank 0 uses x, only the last rank y).
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, args.width, generator=gen)
    y = torch.randn(args.batch, args.width, generator=gen)
    is_first, is_last = rank == 0, rank == world - 1
    losses = []

    def step():
        piece.zero_grad(set_to_none=True)
        if is_first:
            # Rank 0 alone takes the input; step() splits it into microbatches.
            schedule.step(x)
        elif is_last:
            # The last stage takes the whole-batch target (split the same way)
            # and fills `losses` with one loss tensor per microbatch.
            schedule.step(target=y, losses=losses)
        else:
            # Middle stages get their inputs from the previous rank.
            schedule.step()

    for _ in range(args.warmup):
        step()

    dist.barrier()
    starts = [time.perf_counter()]
    for _ in range(args.steps):
        step()
        starts.append(time.perf_counter())  # the next step's start
    per_step = [b - a for a, b in zip(starts, starts[1:])]

    # Peak RSS in KB (Linux). Gathered as a tensor: all_gather_object would
    # need NumPy too, like the shape inference above.
    rss_kb = torch.tensor(
        [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss], dtype=torch.int64
    )
    all_rss_kb = [torch.zeros_like(rss_kb) for _ in range(world)]
    dist.all_gather(all_rss_kb, rss_kb)

    if is_last:
        # The mean of the M microbatch losses is the full-batch MSE here.
        last = torch.stack([l.detach() for l in losses]).mean().item()
        print(f"[pipelining rank {rank}] last step loss {last:.6f}", file=sys.stderr)
    if is_first:
        result = {
            "impl": "pipelining",
            "schedule": args.schedule,
            "layers": args.layers,
            "width": args.width,
            "batch": args.batch,
            "microbatches": args.microbatches,
            "steps": args.steps,
            "step_ms_mean": round(1e3 * (starts[-1] - starts[0]) / args.steps, 3),
            "step_ms_median": round(1e3 * statistics.median(per_step), 3),
            "peak_rss_mb": [round(kb.item() / 1024, 1) for kb in all_rss_kb],
        }
        print(json.dumps(result, separators=(",", ":")), flush=True)

    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
