"""torch.distributed.pipelining peer of gpipe's GPT example, for gpt_vs_pipelining.py.

Why this exists: the GPT example (examples/gpt) should be judged against what
PyTorch ships for the same job. This script trains the same architecture
(token and position embeddings, pre-LN blocks of causal self-attention and
MLP, a last LayerNorm and the output projection) with the same sizes, batch,
micro-batches, schedule and AdamW, one stage per rank on 4 Gloo ranks, and
prints the same JSON line as `gpt --json 1`.

One difference, forced: pipelining runs each stage as its own module and
cannot tie a parameter across stages, so the output projection here has its
own weight (gpipe's ties it to the token embedding, and pays an all-reduce
of that weight's gradient between the first and last rank every step).

    PYTHONPATH=~/.cache/gpipe/torch-2.11.0 OMP_NUM_THREADS=1 \\
        python3 -m torch.distributed.run --standalone --nproc-per-node 4 \\
        benchmarks/pipelining_gpt_peer.py --layers 6 --steps 20 --warmup 3
"""

import argparse
import json
import resource
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

SCHEDULES = {"fill_drain": ScheduleGPipe, "1f1b": Schedule1F1B}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--schedule", choices=sorted(SCHEDULES), default="1f1b")
    p.add_argument("--layers", type=int, default=6, help="transformer blocks")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--vocabulary", type=int, default=62)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--lr", type=float, default=3e-3)
    args = p.parse_args()
    if args.batch % args.microbatches:
        p.error("--batch must be a multiple of --microbatches")
    return args


class Embeddings(nn.Module):
    def __init__(self, vocabulary, context, width):
        super().__init__()
        self.tokens = nn.Embedding(vocabulary, width)
        self.positions = nn.Embedding(context, width)
        nn.init.normal_(self.tokens.weight, 0.0, 0.02)
        nn.init.normal_(self.positions.weight, 0.0, 0.02)
        self.dropout = nn.Dropout(0.0)

    def forward(self, ids):
        where = torch.arange(ids.size(1))
        return self.dropout(self.tokens(ids) + self.positions(where))


class Block(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.project = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)
        self.dropout = nn.Dropout(0.0)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = (
            self.qkv(self.norm1(x))
            .view(b, t, 3, self.heads, c // self.heads)
            .permute(2, 0, 3, 1, 4)
        )
        attended = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.dropout(self.project(attended.transpose(1, 2).reshape(b, t, c)))
        return x + self.dropout(self.down(nn.functional.gelu(self.up(self.norm2(x)))))


class Head(nn.Module):
    """The last LayerNorm and the logits, with a weight of its own (untied)."""

    def __init__(self, vocabulary, width):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.projection = nn.Linear(width, vocabulary, bias=False)

    def forward(self, x):
        return self.projection(self.norm(x))


def stage_layers(args, rank, world):
    """The GPT as a list of layers, cut evenly by count as gpipe's default
    balance cuts it (every rank builds the whole, seeded, and keeps its part)."""
    torch.manual_seed(0)
    layers = [Embeddings(args.vocabulary, args.context, args.width)]
    layers += [Block(args.width, args.heads) for _ in range(args.layers)]
    layers.append(Head(args.vocabulary, args.width))
    base, extra = divmod(len(layers), world)
    sizes = [base + (1 if s < extra else 0) for s in range(world)]
    first = sum(sizes[:rank])
    return nn.Sequential(*layers[first : first + sizes[rank]]), sizes


def main():
    args = parse_args()
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    piece, sizes = stage_layers(args, rank, world)
    mb = args.batch // args.microbatches
    # Every stage's micro-batch shapes, as meta tensors (inferring them would
    # pickle through NumPy, which the gpipe torch cache lacks).
    hidden = torch.empty(mb, args.context, args.width, device="meta")
    ids = torch.empty(mb, args.context, dtype=torch.long, device="meta")
    logits = torch.empty(mb, args.context, args.vocabulary, device="meta")
    stage = PipelineStage(
        piece,
        rank,
        world,
        torch.device("cpu"),
        input_args=ids if rank == 0 else hidden,
        output_args=logits if rank == world - 1 else hidden,
    )

    def loss_fn(out, target):
        return nn.functional.cross_entropy(out.reshape(-1, out.size(-1)), target.reshape(-1))

    schedule = SCHEDULES[args.schedule](stage, n_microbatches=args.microbatches, loss_fn=loss_fn)
    optimizer = torch.optim.AdamW(
        piece.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1
    )
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, args.vocabulary, (args.batch, args.context), generator=gen)
    y = torch.randint(0, args.vocabulary, (args.batch, args.context), generator=gen)

    def step():
        optimizer.zero_grad(set_to_none=True)
        if rank == 0:
            schedule.step(x)
        elif rank == world - 1:
            schedule.step(target=y, losses=[])
        else:
            schedule.step()
        optimizer.step()

    for _ in range(args.warmup):
        step()
    dist.barrier()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    rss = torch.zeros(world, dtype=torch.int64)
    rss[rank] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    dist.all_reduce(rss)
    if rank == 0:
        print(
            json.dumps(
                {
                    "impl": "pipelining",
                    "model": "gpt",
                    "schedule": args.schedule,
                    "layers": args.layers,
                    "balance": sizes,
                    "step_ms_median": round(1e3 * statistics.median(times), 3),
                    "peak_rss_mb": [round(kb / 1024, 1) for kb in rss.tolist()],
                },
                separators=(",", ":"),
            ),
            flush=True,
        )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
