#!/usr/bin/env python3
"""Two builds of pipeline_benchmark, before and after a change, side by side.

Runs the two binaries alternately (before, after, before, after, ...) so that
whatever the machine does meanwhile falls on both, and prints, per row, the
median over rounds of each build's time ratio (gpipe against its baseline in
that same run) with the spread (min-max), and after/before of the medians.
Each binary already pairs gpipe with its baseline inside one run; this adds
the pairing across builds.

  benchmarks/compare_builds.py BEFORE AFTER [--rounds 5] [-- BENCHMARK FLAGS]

e.g. benchmarks/compare_builds.py /tmp/base/pipeline_benchmark \\
         build/benchmarks/pipeline_benchmark --rounds 5 -- --device cpu
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile


def run(binary, flags, output):
    subprocess.run([binary, *flags, "--output", output], check=True,
                   stdout=subprocess.DEVNULL)
    with open(output) as f:
        return json.load(f)


def main():
    argv = sys.argv[1:]
    extra = []
    if "--" in argv:
        extra = argv[argv.index("--") + 1:]
        argv = argv[:argv.index("--")]
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    ratios = {"before": {}, "after": {}}
    order = []
    with tempfile.TemporaryDirectory() as folder:
        for r in range(args.rounds):
            for which in ("before", "after"):
                binary = getattr(args, which)
                data = run(binary, extra, os.path.join(folder, f"{which}{r}.json"))
                rows = data["results"] + [
                    dict(row, name="split: " + row["name"]) for row in data.get("backward_split", [])]
                for row in rows:
                    ratio = row.get("time_ratio", row.get("ratio"))
                    if ratio is None:
                        continue
                    if row["name"] not in order:
                        order.append(row["name"])
                    ratios[which].setdefault(row["name"], []).append(ratio)
            print(f"round {r + 1} of {args.rounds} done", file=sys.stderr)
    width = max(len(name) for name in order)
    print(f"{'row':{width}}  {'before: median (min-max)':>26}  {'after: median (min-max)':>26}  after/before")
    for name in order:
        b = ratios["before"].get(name, [])
        a = ratios["after"].get(name, [])
        if not a or not b:
            continue
        mb, ma = statistics.median(b), statistics.median(a)
        print(f"{name:{width}}  {mb:8.3f} ({min(b):.3f}-{max(b):.3f})      "
              f"{ma:8.3f} ({min(a):.3f}-{max(a):.3f})      {ma / mb:6.3f}")


if __name__ == "__main__":
    main()
