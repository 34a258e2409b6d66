"""Speed of two versions of hydra-ppo, side by side: bench.py of each, alternating, on the same machine.

    python tools/speed_ab.py OLD_DIR [--rounds 5] [bench.py flags ...]

OLD_DIR is another checkout (its bench.py at the top or in tools/). Each round runs the old version's bench.py and
this one's with the same flags (default: --preset opt-125m --configs hydra,jhydra,dlora --batch 8 --steps 3), the
order swapped every round so that a host whose speed drifts favours neither. Prints each configuration's per-round
latency per sample and the median ratio new / old; the memory must be the same.
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT = "--preset opt-125m --configs hydra,jhydra,dlora --batch 8 --steps 3".split()


def bench_of(root):
    for path in (os.path.join(root, "tools", "bench.py"), os.path.join(root, "bench.py")):
        if os.path.isfile(path):
            return path
    sys.exit(f"{root}: no bench.py")


def main(argv):
    if not argv or argv[0].startswith("-"):
        sys.exit(__doc__)
    old, argv = argv[0], argv[1:]
    rounds = 5
    if argv[:1] == ["--rounds"]:
        rounds, argv = int(argv[1]), argv[2:]
    flags = argv or DEFAULT
    benches = dict(old=bench_of(old), new=bench_of(os.path.dirname(HERE)))
    runs = {"old": [], "new": []}
    for i in range(rounds):
        order = ("old", "new") if i % 2 == 0 else ("new", "old")  # ABBA: a drifting host favours neither
        for who in order:
            bench = benches[who]
            out = os.path.join(tempfile.mkdtemp(), "b.json")
            subprocess.run([sys.executable, bench, *flags, "--json", out], check=True, capture_output=True)
            runs[who].append({r["config"]: r for r in json.load(open(out))["rows"]})
            print(f"round {i + 1} {who}: " + ", ".join(f"{c} {r['latency_per_sample_s']:.3f} s/sample"
                                                       for c, r in runs[who][-1].items()), flush=True)
    print("\n| config | old: median s / sample | new | new / old | live peak old / new (GB) |\n|---|---|---|---|---|")
    for c in runs["old"][0]:
        med = {w: statistics.median(r[c]["latency_per_sample_s"] for r in runs[w]) for w in runs}
        ratio = statistics.median(n[c]["latency_per_sample_s"] / o[c]["latency_per_sample_s"]
                                  for o, n in zip(runs["old"], runs["new"]))
        peak = [runs[w][0][c].get("peak_memory_gb", float("nan")) for w in runs]
        print(f"| {c} | {med['old']:.3f} | {med['new']:.3f} | {ratio:.3f} | {peak[0]:.3f} / {peak[1]:.3f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
