"""Bit-for-bit check of two versions of hydra-ppo: the same commands, run with each, must write the same results.

    python tools/same_results.py OLD_DIR [NEW_DIR]      # NEW_DIR: this checkout

OLD_DIR is another checkout (e.g. `git worktree add /tmp/old COMMIT`). On the tiny model, on the CPU, it runs with
each version: Hydra-SFT and the sft / rm tasks; PPO in all five modes (hydra also with more epochs and minibatches,
off the one-pass fast path, and resumed); generate; export (merged and peft). Then it compares every metrics line
(the wall-clock fields aside), every summary (time aside), every tensor of every checkpoint, the generated text and
every exported file. Exit 0 when all are the same, 1 with the differences listed.
"""
import json
import os
import subprocess
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SFT = "--steps 20 --batch-size 8 --micro-batch-size 4 --max-prompt-len 16 --max-response-len 8 --device cpu"
PPO = ("--steps 3 --batch-size 4 --minibatch-size 4 --micro-batch-size 4 --lora-r 4 --lora-alpha 8 "
       "--max-prompt-len 16 --max-response-len 8 --eval-prompts 8 --device cpu")


def commands():
    """-> [(name, argv)] in the order they run; {out} is the version's scratch folder."""
    cmds = [(f"sft-{t}", ["sft", "--task", t, "--out", "{out}/sft-" + t, *SFT.split()]) for t in ("hydra", "sft", "rm")]
    for mode in ("hydra", "jhydra", "dlora", "lora", "full"):
        sft = "{out}/sft-hydra" if mode in ("hydra", "jhydra") else "{out}/sft-sft"
        rm = [] if mode in ("hydra", "jhydra") else ["--rm", "{out}/sft-rm"]
        cmds.append((f"ppo-{mode}", ["ppo", "--mode", mode, "--sft", sft, *rm, "--out", "{out}/ppo-" + mode,
                                     *PPO.split()]))
    cmds += [("ppo-epochs", ["ppo", "--sft", "{out}/sft-hydra", "--out", "{out}/ppo-epochs", *PPO.split(),
                             "--ppo-epochs", "2", "--minibatch-size", "2", "--micro-batch-size", "1",
                             "--target-kl", "1", "--save-every", "2"]),
             ("ppo-resume", ["ppo", "--resume", "{out}/ppo-epochs", "--steps", "5"]),
             ("generate", ["generate", "--run", "{out}/ppo-hydra", "--num-samples", "4", "--device", "cpu"]),
             ("export-merged", ["export", "--run", "{out}/ppo-hydra", "--out", "{out}/export-merged"]),
             ("export-peft", ["export", "--run", "{out}/ppo-dlora", "--format", "peft", "--out", "{out}/export-peft"])]
    return cmds


def run_all(code, out):
    """Every command with the version in `code`. -> {name: stdout} (what generate prints is a result)."""
    printed = {}
    env = dict(os.environ, PYTHONHASHSEED="0", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    for name, argv in commands():
        argv = [a.replace("{out}", out) for a in argv]
        r = subprocess.run([sys.executable, os.path.join(code, "hydra_ppo.py"), *argv], capture_output=True,
                           text=True, env=env, cwd=code)
        if r.returncode:
            sys.exit(f"{code}: `{' '.join(argv)}` failed:\n{r.stderr[-2000:]}")
        printed[name] = r.stdout
        print(f"  {name}: done", flush=True)
    return printed


ADDED = {"group_size"}  # settings added since the old version, whose default there changes nothing (PPO: k = 1)


def without_added(d):
    return {k: without_added(v) for k, v in d.items() if k not in ADDED} if isinstance(d, dict) else d


def comparable(path, root, code):
    """A file's content with what may differ between two equal runs taken out: wall-clock times, the scratch root,
    the checkout's own folder (the default --data is a path inside it), settings only the new version has (ADDED)."""
    name = os.path.basename(path)
    if name.endswith((".pt", ".bin")):
        return torch.load(path, map_location="cpu", weights_only=False)
    if name.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    text = open(path, "rb").read()
    try:
        text = text.decode().replace(root, "ROOT").replace(code, "CODE")
    except UnicodeDecodeError:
        return text
    if name.endswith(".jsonl"):
        return [{k: v for k, v in json.loads(l).items() if not k.startswith("time")} for l in text.splitlines()]
    if name.endswith(".json"):
        d = json.loads(text)
        return without_added({k: v for k, v in d.items() if k != "time_s"}) if isinstance(d, dict) else d
    return text


def same(a, b):
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and \
            a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b or (a != a and b != b)  # NaN equals NaN here


def main(old, new=HERE):
    roots, printed, codes = {}, {}, dict(old=os.path.abspath(old), new=os.path.abspath(new))
    for which, code in (("old", old), ("new", new)):
        print(f"{which}: {code}", flush=True)
        roots[which] = tempfile.mkdtemp(prefix=f"same-{which}-")
        printed[which] = run_all(os.path.abspath(code), roots[which])
    differ = [] if printed["old"]["generate"] == printed["new"]["generate"] else ["the text generate printed"]
    print(f"generate printed (the same in both: {not differ}):\n{printed['new']['generate']}")
    files = {w: sorted(os.path.relpath(os.path.join(d, f), roots[w]) for d, _, fs in os.walk(roots[w]) for f in fs)
             for w in roots}
    if files["old"] != files["new"]:
        differ.append(f"the files written: {sorted(set(files['old']) ^ set(files['new']))}")
    checked = 0
    for rel in files["old"]:
        if rel not in files["new"] or rel.endswith(".lock"):
            continue
        checked += 1
        if not same(*(comparable(os.path.join(roots[w], rel), roots[w], codes[w]) for w in ("old", "new"))):
            differ.append(rel)
    print(f"compared {checked} files and the generated text of {len(commands())} commands")
    for d in differ:
        print(f"DIFFERENT: {d}")
    print("the same, bit for bit" if not differ else f"{len(differ)} differences")
    return 1 if differ else 0


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    sys.exit(main(*sys.argv[1:]))
