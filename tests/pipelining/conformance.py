"""Conformance with torch.distributed.pipelining, the anchor: for every
schedule both libraries have (PAIRS), on 2 and 4 ranks, with the stages per
rank the pipelining class takes, for 4, 8 and 16 micro-batches, pipelining's
pipeline_order and gpipe's program (build_program on pipelining's placement)
must run the same compute actions rank by rank, in the same order.

What is compared: pipelining's compute actions per rank with its idle steps
(None) and FSDP actions (UNSHARD, RESHARD, REDUCE_GRAD) left out and each
OVERLAP_F_B counted as its two actions in order (program_csv.h reads a file
so), against gpipe's F, B, I and W per lane.

Where they differ, both run in gpipe's simulator with the same costs (F = I =
W = 1, B = I + W = 2, messages free): pipelining's order through its
compute-only CSV file, lowered by gpipe, and gpipe's own program. The test
fails unless gpipe's makespan is no longer. It also fails where gpipe cannot
build a size pipelining can, and where pipelining's order is invalid, except
for the orders KNOWN_INVALID names. A gpipe name that parse_schedule does
not know yet is a "not in gpipe yet" line, not a failure.

Usage: conformance.py <gpipe_program_tool>; exits 0, 1 on a failure, 77
where torch cannot be imported.
"""

import os
import sys
import tempfile

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pipelining_support as support  # noqa: E402 (after the path)

# gpipe's schedule name, pipelining's class (pipelining_support.CLASSES says
# the stages per rank each takes and its placement, loop or v).
PAIRS = [
    ("fill_drain", "GPipe"),
    ("1f1b", "1F1B"),
    ("interleaved_1f1b", "Interleaved1F1B"),
    ("looped_bfs", "LoopedBFS"),
    ("zero_bubble_v", "ZBVZeroBubble"),
    ("interleaved_zero_bubble", "InterleavedZeroBubble"),
    ("dual_pipe_v", "DualPipeV"),
]

# pipelining classes whose pipeline_order is wrong, and why. Their rows say
# so; gpipe's makespan is still printed.
KNOWN_INVALID = {
    "1F1B": "Schedule1F1B._get_pipeline_order numbers the last rank's forwards from 1 "
    "(F1..FM, no F0); the order its _step_microbatches runs is right",
}

RANKS = (2, 4)
MICROBATCHES = (4, 8, 16)
COSTS = ["--F", "1", "--I", "1", "--W", "1", "--B", "2", "--comm", "0"]


def cases(known):
    """[(gpipe name, class, ranks, V, M, schedule or the refusal)], after a
    line for each pair gpipe does not have yet."""
    found = []
    for gpipe_name, class_name in PAIRS:
        if gpipe_name not in known:
            print(f"{gpipe_name} <-> {class_name}: not in gpipe yet (parse_schedule does not know it); skipped")
            continue
        _, per_ranks, _ = support.CLASSES[class_name]
        for ranks in RANKS:
            for per_rank in per_ranks:
                for m in MICROBATCHES:
                    try:
                        schedule = support.build(class_name, ranks, per_rank, m)
                    except (ValueError, RuntimeError, AssertionError) as error:
                        schedule = error
                    found.append((gpipe_name, class_name, ranks, per_rank, m, schedule))
    return found


def main():
    tool = support.tool_from_argv()
    rows = cases(set(tool.schedules()))
    commands = []
    for gpipe_name, class_name, ranks, per_rank, m, _ in rows:
        commands.append(
            ["schedule", gpipe_name, "--lanes", str(ranks), "--stages-per-lane", str(per_rank),
             "--microbatches", str(m), "--placement", support.CLASSES[class_name][2]]
        )
    built = tool.run(commands)

    failures = []
    lines = []
    makespans = []
    with tempfile.TemporaryDirectory() as folder:
        for k, ((gpipe_name, class_name, ranks, per_rank, m, schedule), (code, text)) in enumerate(
            zip(rows, built)
        ):
            head = (gpipe_name, class_name, ranks, per_rank, m)
            if isinstance(schedule, Exception):
                lines.append(head + (f"pipelining refuses ({support.first_line(str(schedule))})",))
                continue
            if code != 0:
                lines.append(head + ("FAIL",))
                failures.append(f"{head}: gpipe cannot build it: {support.first_line(text)}")
                continue
            theirs = support.pipelining_actions(schedule.pipeline_order)
            ours = [support.compute_only(lane) for lane in support.lanes_of(text)]
            if theirs == ours:
                lines.append(head + ("equal",))
                continue
            apart = [r for r in range(max(len(theirs), len(ours))) if theirs[r:r + 1] != ours[r:r + 1]]
            head = head + (",".join(map(str, apart)),)
            stem = os.path.join(folder, f"{k}")
            support.write_rows(stem + "-pipelining.csv", schedule.pipeline_order)
            with open(stem + "-gpipe.txt", "w") as file:
                file.write(text)
            makespans.append((len(lines), head, stem))
            lines.append(head)
        timed = tool.run(
            [
                command
                for _, _, stem in makespans
                for command in (
                    ["makespan", stem + "-pipelining.csv", "--format", "csv-compute"] + COSTS,
                    ["makespan", stem + "-gpipe.txt", "--format", "text"] + COSTS,
                )
            ]
        )
    for j, (at, (*head, apart), _) in enumerate(makespans):
        head = tuple(head)
        (their_code, their_text), (our_code, our_text) = timed[2 * j], timed[2 * j + 1]
        if our_code != 0:
            lines[at] = head + ("FAIL",)
            failures.append(f"{head}: gpipe's program does not simulate: {support.first_line(our_text)}")
            continue
        ours = float(our_text)
        if their_code != 0:
            known = KNOWN_INVALID.get(head[1])
            lines[at] = head + (f"differs on ranks {apart}; pipelining's order is invalid; gpipe {ours:g}",)
            if known is None:
                failures.append(f"{head}: pipelining's order is invalid: {support.first_line(their_text)}")
            continue
        theirs = float(their_text)
        verdict = "gpipe no worse" if ours <= theirs else "FAIL: gpipe slower"
        lines[at] = head + (
            f"differs on ranks {apart}; makespan pipelining {theirs:g}, gpipe {ours:g} ({verdict})",
        )
        if ours > theirs:
            failures.append(f"{head}: gpipe's makespan {ours:g} is longer than pipelining's {theirs:g}")

    print(f"{'gpipe':<24} {'pipelining':<22} {'ranks':>5} {'V':>2} {'M':>3}  result")
    for gpipe_name, class_name, ranks, per_rank, m, result in lines:
        print(f"{gpipe_name:<24} {class_name:<22} {ranks:>5} {per_rank:>2} {m:>3}  {result}")
    for name, why in KNOWN_INVALID.items():
        print(f"known: {name}: {why}")
    return support.finish("conformance", failures)


if __name__ == "__main__":
    sys.exit(main())
