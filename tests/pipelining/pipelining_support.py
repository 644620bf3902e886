"""What csv_interop.py and conformance.py share: pipelining's schedules built
without processes, their actions as text, and gpipe_program_tool run on many
requests at once.

pipelining's schedule classes read four things of a stage when they build
their order (stage_index, group_size, group_rank, num_stages), as its own
tests' mock stages show, so a plain object with those builds every rank's
order in one process. The import of torch is the slow part (seconds): each
script imports it once, and exits 77 (skipped) where it cannot.
"""

import csv
import os
import re
import subprocess
import sys

try:
    from torch.distributed.pipelining import schedules
    from torch.distributed.pipelining._utils import generate_rank_to_stage_mapping
except (ImportError, OSError) as error:
    print(f"SKIP: cannot import torch.distributed.pipelining ({error})")
    sys.exit(77)


class MockStage:
    """The stage fields a schedule's constructor reads. submod is None, so
    the torch.compile check has no module to look into."""

    def __init__(self, index, ranks, stages):
        self.stage_index = index
        self.group_size = ranks
        self.group_rank = 0
        self.num_stages = stages
        self.submod = None
        self.is_first = index == 0
        self.is_last = index == stages - 1


# pipelining's schedule classes: the class, the stages per rank it takes and
# how it places stages on ranks (generate_stage_to_rank_mapping's style:
# loop, stage s on rank s mod L; v, stage s and 2L - 1 - s on rank s).
CLASSES = {
    "GPipe": (schedules.ScheduleGPipe, (1,), "loop"),
    "1F1B": (schedules.Schedule1F1B, (1,), "loop"),
    "LoopedBFS": (schedules.ScheduleLoopedBFS, (1, 2), "loop"),
    "Interleaved1F1B": (schedules.ScheduleInterleaved1F1B, (1, 2), "loop"),
    "InterleavedZeroBubble": (schedules.ScheduleInterleavedZeroBubble, (1, 2), "loop"),
    "ZBVZeroBubble": (schedules.ScheduleZBVZeroBubble, (2,), "v"),
    "DualPipeV": (schedules.ScheduleDualPipeV, (2,), "v"),
}

# pipelining's actions that order no computation in gpipe (program_csv.h).
FSDP_OPS = ("UNSHARD", "RESHARD", "REDUCE_GRAD")


def build(name, ranks, per_rank, m):
    """Rank 0's schedule object of class `name` (its pipeline_order holds
    every rank's), or raises what the class raises for a size it refuses."""
    cls, _, style = CLASSES[name]
    n = ranks * per_rank
    local = generate_rank_to_stage_mapping(ranks, n, style)[0]
    stages = [MockStage(s, ranks, n) for s in local]
    loss = lambda output, target: output  # with a loss, a schedule has backwards
    if issubclass(cls, schedules.PipelineScheduleSingle):
        return cls(stages[0], m, loss_fn=loss)
    return cls(stages, m, loss_fn=loss)


def runtime(ranks, per_rank, m, style):
    """A _PipelineScheduleRuntime to _load_csv into: rank 0's stages of the
    placement; loading replaces the order and the stage-to-rank mapping."""
    n = ranks * per_rank
    local = generate_rank_to_stage_mapping(ranks, n, style)[0]
    stages = [MockStage(s, ranks, n) for s in local]
    return schedules._PipelineScheduleRuntime(
        stages, m, loss_fn=lambda output, target: output
    )


def write_rows(path, order):
    """`order` (rank: list of actions or None) as pipelining's _dump_csv
    writes it: csv.writer, one row a rank. (The single-stage classes,
    ScheduleGPipe and Schedule1F1B, have no _dump_csv of their own.)"""
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        for rank in order:
            writer.writerow(order[rank])


def leaf_texts(action):
    """An action's strings, an OVERLAP_F_B's sub-actions in order; none for
    an idle step (None)."""
    if action is None:
        return []
    if action.sub_actions is not None:
        return [str(a) for a in action.sub_actions]
    return [str(action)]


def is_fsdp(text):
    return any(text.endswith(op) for op in FSDP_OPS)


COMPUTE = re.compile(r"^\d+[FBIW]\d+$")


def compute_only(texts):
    return [t for t in texts if COMPUTE.match(t)]


def pipelining_actions(order, compute=True):
    """Per rank, pipelining's actions as gpipe reads them: no idle steps, no
    FSDP actions, OVERLAP_F_B's sub-actions in order; compute actions only
    unless compute is False."""
    per_rank = []
    for rank in sorted(order):
        texts = [t for a in order[rank] for t in leaf_texts(a) if not is_fsdp(t)]
        per_rank.append(compute_only(texts) if compute else texts)
    return per_rank


def lanes_of(text):
    """gpipe's text form ("lane 0: 0F0 0B0") as a list of lanes of action
    strings."""
    lanes = {}
    for line in text.splitlines():
        if line.startswith("lane "):
            label, _, actions = line.partition(":")
            lanes[int(label.split()[1])] = actions.split()
    return [lanes[l] for l in sorted(lanes)]


def without_fsdp(order):
    """A copy of a pipeline_order without idle steps and FSDP actions, for
    pipelining's _simulate_comms_compute, which rejects UNSHARD, RESHARD and
    REDUCE_GRAD (those its own lowering adds too)."""
    return {
        rank: [a for a in actions if a is not None and a.computation_type.value not in FSDP_OPS]
        for rank, actions in order.items()
    }


class Tool:
    """gpipe_program_tool, fed many command lines in one process (`batch`)."""

    def __init__(self, path):
        self.path = path

    def run(self, commands):
        """[(exit code, output)] of each command (a list of words, no
        spaces inside a word)."""
        if not commands:
            return []
        lines = "".join(" ".join(words) + "\n" for words in commands)
        done = subprocess.run(
            [self.path, "batch"], input=lines.encode(), capture_output=True, check=False
        )
        # Bytes, decoded without newline translation: a CSV's rows end "\r\n".
        stdout = done.stdout.decode()
        if done.returncode != 0:
            raise RuntimeError(f"gpipe_program_tool batch failed: {stdout}{done.stderr.decode()}")
        results = []
        output = []
        for line in stdout.splitlines(keepends=True):
            if line.startswith("--- exit "):
                results.append((int(line.split()[2]), "".join(output)))
                output = []
            else:
                output.append(line)
        if len(results) != len(commands):
            raise RuntimeError(
                f"gpipe_program_tool batch answered {len(results)} of {len(commands)} commands"
            )
        return results

    def schedules(self):
        code, output = self.run([["schedules"]])[0]
        if code != 0:
            raise RuntimeError(output)
        return output.split()


def first_line(text):
    return text.strip().splitlines()[0] if text.strip() else "(no output)"


def finish(script, failures):
    """Prints the failures and the verdict; the script's exit code."""
    for failure in failures:
        print("FAIL: " + failure)
    print(f"{script}: " + ("FAIL" if failures else "OK"))
    return 1 if failures else 0


def tool_from_argv():
    if len(sys.argv) != 2 or not os.access(sys.argv[1], os.X_OK):
        print(f"usage: {sys.argv[0]} <path of gpipe_program_tool>")
        sys.exit(2)
    return Tool(sys.argv[1])
