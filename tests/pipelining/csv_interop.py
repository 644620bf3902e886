"""Interop with torch.distributed.pipelining's CSV schedule files, both ways.

pipelining -> gpipe: every pipelining schedule class, on 2 and 4 ranks, with
the stages per rank it takes, for 4 and 8 micro-batches, dumps its
compute-only file and (the multi-stage classes, which lower their order) its
compute+comms file; gpipe_program_tool reads each, validates it with
simulate and prints the program, which must hold pipelining's actions rank by
rank: the compute actions for the compute-only file, every action for the
compute+comms one (FSDP's UNSHARD, RESHARD and REDUCE_GRAD dropped and
OVERLAP_F_B's two actions in order, as program_csv.h reads them). Where
pipelining's own validator (_validate_schedule) rejects an order, gpipe must
reject the file too, with a "gpipe:" message.

gpipe -> pipelining: every gpipe schedule on the same sizes, on the loop
placement and (two stages per lane) the V one, wherever build_program takes
it, is written in both CSV formats; pipelining's _load_csv loads each into a
_PipelineScheduleRuntime (compute_only: its lowering adds the sends and
receives; compute_comms: as written), keeps gpipe's actions, and its
simulator (_simulate_comms_compute) runs the result to the end.

Usage: csv_interop.py <gpipe_program_tool>; exits 0, 1 on a mismatch, 77
where torch cannot be imported.
"""

import os
import sys
import tempfile

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pipelining_support as support  # noqa: E402 (after the path)
from pipelining_support import schedules  # noqa: E402

RANKS = (2, 4)
MICROBATCHES = (4, 8)


def pipelining_validator(order, ranks, stages, m):
    """None where pipelining's _validate_schedule accepts `order`, else its
    message's first line."""
    try:
        schedules._validate_schedule(order, ranks, stages, m)
        return None
    except AssertionError as error:
        return support.first_line(str(error))


def pipelining_files(folder):
    """[(label, tool command, expected per rank, what pipelining's
    validator says, compute only?)] for every class and size."""
    cases = []
    for name, (_, per_ranks, _) in support.CLASSES.items():
        for ranks in RANKS:
            for per_rank in per_ranks:
                for m in MICROBATCHES:
                    label = f"{name} ranks {ranks} V {per_rank} M {m}"
                    try:
                        schedule = support.build(name, ranks, per_rank, m)
                    except (ValueError, RuntimeError, AssertionError) as error:
                        print(f"  {label}: pipelining refuses ({error})")
                        continue
                    verdict = pipelining_validator(schedule.pipeline_order, ranks, ranks * per_rank, m)
                    stem = os.path.join(folder, f"{name}-{ranks}-{per_rank}-{m}")
                    lowered = hasattr(schedule, "pipeline_order_with_comms")
                    if lowered:
                        schedule._dump_csv(stem + "-compute.csv", format="compute_only")
                    else:
                        support.write_rows(stem + "-compute.csv", schedule.pipeline_order)
                    cases.append(
                        (
                            label + " compute_only",
                            ["read", stem + "-compute.csv", "--format", "csv-compute"],
                            support.pipelining_actions(schedule.pipeline_order),
                            verdict,
                            True,
                        )
                    )
                    if lowered:
                        schedule._dump_csv(stem + "-comms.csv", format="compute_comms")
                        cases.append(
                            (
                                label + " compute_comms",
                                ["read", stem + "-comms.csv", "--format", "csv-comms"],
                                support.pipelining_actions(
                                    schedule.pipeline_order_with_comms, compute=False
                                ),
                                verdict,
                                False,
                            )
                        )
    return cases


def check_pipelining_files(tool, folder):
    failures = []
    cases = pipelining_files(folder)
    results = tool.run([case[1] for case in cases])
    both_reject = []
    for (label, _, expected, verdict, compute), (code, output) in zip(cases, results):
        if verdict is not None:
            if code == 0:
                failures.append(f"{label}: gpipe reads an order pipelining rejects ({verdict})")
            elif not output.startswith("gpipe:"):
                failures.append(f"{label}: gpipe's error is not a 'gpipe:' message: {output}")
            else:
                both_reject.append(f"{label}: both reject; {support.first_line(output)}")
            continue
        if code != 0:
            failures.append(f"{label}: gpipe rejects it: {output}")
            continue
        lanes = support.lanes_of(output)
        actual = [support.compute_only(lane) for lane in lanes] if compute else lanes
        if actual != expected:
            failures.append(f"{label}: gpipe read\n{output}but pipelining has {expected}")
    print(f"pipelining -> gpipe: {len(cases)} files, {len(both_reject)} rejected by both")
    for line in both_reject:
        print("  " + line)
    return failures


def load(path, ranks, per_rank, m, style, file_format):
    """pipelining's runtime with the file loaded, and its simulation."""
    schedule = support.runtime(ranks, per_rank, m, style)
    schedule._load_csv(path, format=file_format)
    mapping = schedule.stage_index_to_group_rank
    schedules._simulate_comms_compute(
        support.without_fsdp(schedule.pipeline_order_with_comms),
        lambda s: mapping[s],
        ranks * per_rank,
    )
    return schedule


def check_gpipe_files(tool, folder):
    failures = []
    requests = []
    for name in tool.schedules():
        for ranks in RANKS:
            for per_rank in (1, 2):
                for m in MICROBATCHES:
                    for style in ("loop",) if per_rank == 1 else ("loop", "v"):
                        requests.append((name, ranks, per_rank, m, style))
    commands = []
    for name, ranks, per_rank, m, style in requests:
        for file_format in ("csv-compute", "csv-comms"):
            commands.append(
                ["schedule", name, "--lanes", str(ranks), "--stages-per-lane", str(per_rank),
                 "--microbatches", str(m), "--placement", style, "--format", file_format]
            )
    results = tool.run(commands)
    loaded = 0
    refused = []
    for k, (name, ranks, per_rank, m, style) in enumerate(requests):
        label = f"{name} ranks {ranks} V {per_rank} M {m} {style}"
        (code, compute_text), (_, comms_text) = results[2 * k], results[2 * k + 1]
        if code != 0:
            refused.append(f"{label}: {support.first_line(compute_text)}")
            continue
        for text, file_format in ((compute_text, "compute_only"), (comms_text, "compute_comms")):
            path = os.path.join(folder, f"gpipe-{name}-{ranks}-{per_rank}-{m}-{style}-{file_format}.csv")
            with open(path, "w", newline="") as file:
                file.write(text)
            rows = [
                [cell for cell in line.split(",") if cell and not support.is_fsdp(cell)]
                for line in text.split("\r\n")[:-1]
            ]
            try:
                schedule = load(path, ranks, per_rank, m, style, file_format)
            except Exception as error:  # what pipelining raises is the finding
                failures.append(f"{label} {file_format}: pipelining cannot load or simulate it: {error!r}\n{text}")
                continue
            order = (
                schedule.pipeline_order
                if file_format == "compute_only"
                else schedule.pipeline_order_with_comms
            )
            kept = support.pipelining_actions(order, compute=file_format == "compute_only")
            if kept != rows:
                failures.append(f"{label} {file_format}: pipelining loaded {kept}, gpipe wrote {rows}")
            loaded += 1
    print(f"gpipe -> pipelining: {loaded} files loaded and simulated; build_program refuses {len(refused)} placements:")
    for line in refused:
        print("  " + line)
    return failures


def main():
    tool = support.tool_from_argv()
    with tempfile.TemporaryDirectory() as folder:
        failures = check_pipelining_files(tool, folder) + check_gpipe_files(tool, folder)
    return support.finish("csv_interop", failures)


if __name__ == "__main__":
    sys.exit(main())
