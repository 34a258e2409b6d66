"""RESULTS.md's tables for several seeds of one comparison, from their compare.json files.

    python tools/compare_tables.py out/cmp-review-s0 out/cmp-review-s1 out/cmp-review-s2

Each folder is one `compare.py` run with the same flags but --seed and --out (anything else differing is refused: a
table mixes only runs under one budget). Prints, in markdown: the gold (or reward-model) win-rates with their 95%
intervals, against each run's own SFT policy and against the common SFT baseline, one column per seed; how each run
trained (KL, length, the largest KL of a step, the critic's explained variance and value loss, seconds per step);
and the counts the findings quote: each row's place per seed, the seeds whose interval lies above / below 0.5, the
paper's ordering (Hydra-PPO > LoRA-PPO > J-Hydra-PPO) per seed, and how many row pairs that one seed separates
(intervals apart) swap order in another.
"""
import itertools
import json
import os
import sys

from compare import ci, dash  # tools/compare.py: how its table writes a win-rate and a missing number

SAME = ("seed", "out", "resume", "overwrite")  # what seeds of one table may differ in (how a run went on aside)


def fail(msg):
    """Bad input: one error line and exit 2, as every command of hydra-ppo."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def load(folders):
    """-> [compare.json of each folder], checked to be seeds of one comparison."""
    runs = []
    for folder in folders:
        path = os.path.join(folder, "compare.json")
        if not os.path.isfile(path):
            fail(f"{folder}: no compare.json (a compare.py run writes it when it finishes)")
        with open(path) as fh:
            runs.append(json.load(fh))
    first = runs[0]
    for folder, run in zip(folders[1:], runs[1:]):
        if [r["key"] for r in run["rows"]] != [r["key"] for r in first["rows"]]:
            fail(f"{folder}: other rows than {folders[0]}")
        differ = [k for k in first["config"] if k not in SAME and run["config"].get(k) != first["config"][k]]
        if differ:
            k = differ[0]
            fail(f"{folder}: --{k.replace('_', '-')} {run['config'].get(k)}, but {first['config'][k]} in "
                 f"{folders[0]}: seeds of one table differ in --seed and --out only")
    return runs


def seed_list(seeds):
    return "seeds " + ", ".join(map(str, seeds)) if seeds else "no seed"


def tables(runs):
    seeds = [run["config"]["seed"] for run in runs]
    rows = [[run["rows"][i] for run in runs] for i in range(len(runs[0]["rows"]))]  # rows[row][seed]
    s = " / ".join(str(x) for x in seeds)
    out = [f"Seeds {', '.join(map(str, seeds))}; judge: {runs[0]['judge']}; {runs[0]['eval_prompts']} held-out prompts "
           f"x {runs[0]['eval_samples']} responses. Held-out reward-model accuracy, Hydra-SFT's reward head / the "
           "separate RM: " + ", ".join(f"seed {sd} {run['rm_accuracy']['hydra_sft']:.3f} / {run['rm_accuracy']['rm']:.3f}"
                                       for sd, run in zip(seeds, runs)) + ".", ""]
    head = " | ".join(f"seed {sd}" for sd in seeds)
    out += [f"| configuration | paper: GPT-4 % | vs own SFT: {head} | vs SFT: {head} |",
            "|---|---|" + "---|" * 2 * len(seeds)]
    out += [f"| {r[0]['name']} | {dash(r[0]['paper'], '.2f')} | " + " | ".join(ci(x, "win_rate") for x in r) + " | "
            + " | ".join(ci(x, "vs_sft") for x in r) + " |" for r in rows]
    out += ["", f"How each run trained (seeds {s}):", "",
            "| configuration | KL | length | largest KL of a step | explained var. (last 5) | value loss (last 5) | "
            "s / step |", "|---|---|---|---|---|---|---|"]
    cols = (("kl", ".1f"), ("length", ".1f"), ("max_kl", ".1f"), ("explained_var", ".2f"), ("vf_loss", ".2f"),
            ("s_per_step", ".1f"))
    out += [f"| {r[0]['name']} | " + " | ".join(" / ".join(dash(x[k], f) for x in r) for k, f in cols) + " |"
            for r in rows]
    out += ["", "Against the common SFT:", ""]
    for sd, run in zip(seeds, runs):
        order = sorted(run["rows"], key=lambda r: -r["vs_sft"])
        out.append(f"- seed {sd}, best first: " + ", ".join(f"{r['name']} {r['vs_sft']:.3f}" for r in order))
    for r in rows:
        above = [sd for sd, x in zip(seeds, r) if x["vs_sft_ci"][0] > 0.5]
        below = [sd for sd, x in zip(seeds, r) if x["vs_sft_ci"][1] < 0.5]
        out.append(f"- {r[0]['name']}: mean {sum(x['vs_sft'] for x in r) / len(r):.3f}; interval above 0.5 in "
                   f"{seed_list(above)}, below in {seed_list(below)}")
    by_key = [{r["key"]: r for r in run["rows"]} for run in runs]
    if all(k in by_key[0] for k in ("hydra", "lora", "jhydra")):
        holds = [sd for sd, b in zip(seeds, by_key)
                 if b["hydra"]["vs_sft"] > b["lora"]["vs_sft"] > b["jhydra"]["vs_sft"]]
        out.append(f"- the paper's ordering Hydra-PPO > LoRA-PPO > J-Hydra-PPO (point estimates) holds in "
                   f"{seed_list(holds)}")
    apart = swapped = 0
    for (a, b) in itertools.combinations(range(len(rows)), 2):
        for i in range(len(runs)):
            x, y = rows[a][i], rows[b][i]
            if x["vs_sft_ci"][0] > y["vs_sft_ci"][1] or y["vs_sft_ci"][0] > x["vs_sft_ci"][1]:
                apart += 1
                sign = x["vs_sft"] > y["vs_sft"]
                swapped += any((rows[a][j]["vs_sft"] > rows[b][j]["vs_sft"]) != sign
                               for j in range(len(runs)) if j != i)
    out.append(f"- row pairs whose intervals lie apart in a seed: {apart} (pair x seed); of them, {swapped} are in "
               "the other order in another seed")
    return "\n".join(out)


def main(argv):
    if not argv or any(a.startswith("-") for a in argv):
        sys.exit(__doc__)
    print(tables(load(argv)))


if __name__ == "__main__":
    main(sys.argv[1:])
