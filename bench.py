"""Memory and latency of every configuration: the paper's Table 1 on any machine.

    python bench.py --preset opt-125m --batch 8                  # CPU or GPU, every configuration
    python bench.py --preset llama-7b --budget-gb 80 --grad-checkpointing --prompt-len 400 --response-len 400

Each configuration runs in a fresh subprocess (so one's memory never counts toward another's) through the same
code as a real run (hydra_ppo.setup_ppo, ppo_step), with random-init models built from the
architecture's config (no download) and generation forced to the full response length. Reported per
configuration: peak memory (CUDA: torch.cuda.max_memory_allocated; CPU: the subprocess's peak RSS, which includes
the ~0.5 GB of Python + torch + transformers), latency per sample of a whole PPO step split into generate / score /
update (median over --steps steps after one warm-up step), and tokens (prompt + response) per second.
`sft` is one full fine-tuning step of the SFT model: the paper's "PPO needs over 3x SFT" baseline.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import types

import torch

CONFIGS = ("sft", "full", "lora", "dlora", "jhydra", "hydra")

# The real architectures' sizes; weights are random (latency and memory do not depend on their values).
PRESETS = {
    "tiny": ("opt", dict(hidden_size=64, ffn_dim=256, num_hidden_layers=2, num_attention_heads=4, vocab_size=1000)),
    "opt-125m": ("opt", dict(hidden_size=768, ffn_dim=3072, num_hidden_layers=12, num_attention_heads=12)),
    "opt-350m": ("opt", dict(hidden_size=1024, ffn_dim=4096, num_hidden_layers=24, num_attention_heads=16,
                             word_embed_proj_dim=512, do_layer_norm_before=False)),
    "opt-1.3b": ("opt", dict(hidden_size=2048, ffn_dim=8192, num_hidden_layers=24, num_attention_heads=32)),
    "llama-7b": ("llama", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                               num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                               max_position_embeddings=4096)),
}


def model_config(args):
    from transformers import AutoConfig, LlamaConfig, OPTConfig
    if args.model:  # any local or hub model: its architecture, random weights
        return AutoConfig.from_pretrained(args.model)
    family, kw = PRESETS[args.preset]
    if family == "opt":
        kw = dict(dict(vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=kw["hidden_size"],
                       pad_token_id=1, bos_token_id=2, eos_token_id=2), **kw)
        return OPTConfig(**kw)
    return LlamaConfig(**kw, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def machine_busy_s():
    """CPU seconds every process on this machine has been busy (from /proc/stat): with own CPU time it tells how much
    of the cores other processes took while we measured. Above ~0.1 the timings are contaminated."""
    with open("/proc/stat") as f:
        t = [int(x) for x in f.readline().split()[1:]]
    return (sum(t[:8]) - t[3] - t[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# ---- one configuration, in its own process ------------------------------------------------------------------------

def child(args):
    import hydra_ppo as hp
    from transformers import AutoModelForCausalLM
    device, dtype, autocast = hp.setup_device(args.device)
    config = hp.no_dropout(model_config(args))
    B, P, R = args.batch, args.prompt_len, args.response_len

    def load(which, trained):  # build_roles' loader: a fresh random-init model, fp32 where it is fully trained
        torch.manual_seed(0 if which == "sft" else 1)  # (and in full mode everywhere, as hp.checkpoint_loader)
        fp32 = trained or args.config == "full"
        with torch.device(device):  # initialise on the device: a 7b model on the CPU first would take minutes
            lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32 if fp32 else dtype)
        return hp.HydraModel(lm).requires_grad_(False)

    g = torch.Generator().manual_seed(0)
    p_ids = torch.randint(4, config.vocab_size, (B, P), generator=g).to(device)
    p_mask = torch.ones_like(p_ids)
    micro = args.micro_batch or B
    times, stamps = [], []
    if args.config == "sft":  # one full fine-tuning step of the SFT model on prompt + response
        model = load("sft", trained=True).requires_grad_(True)
        if args.grad_checkpointing:
            hp.checkpointing_on(model.lm)
        model.train()
        params = list(model.lm.parameters())
        opt = torch.optim.AdamW(params, lr=1e-5)
        r_ids = torch.randint(4, config.vocab_size, (B, R), generator=g).to(device)
        ids, mask = torch.cat([p_ids, r_ids], 1), torch.ones(B, P + R, dtype=torch.long, device=device)
        for _ in range(args.steps + 1):
            stamps.append((time.perf_counter(), time.process_time(), machine_busy_s()))
            clock = hp.Clock(device)
            for i in range(0, B, micro):
                with autocast():
                    loss, _ = hp.sft_loss(model, ids[i:i + micro], mask[i:i + micro], P, len(ids[i:i + micro]), 1.0, 0.0)
                (loss * len(ids[i:i + micro]) / B).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(dict(time_generate=0.0, time_score=0.0, time_update=clock()))
    else:
        cfg = hp.PPOConfig(mode=args.config, batch_size=B, minibatch_size=B, micro_batch_size=micro,
                           max_prompt_len=P, max_response_len=R, lora_r=args.lora_r, lora_alpha=2.0 * args.lora_r,
                           grad_checkpointing=args.grad_checkpointing, fold_lora=args.fold_lora, device=args.device)
        roles, opt, params = hp.setup_ppo(cfg, load)
        tok = types.SimpleNamespace(pad_token_id=config.pad_token_id, eos_token_id=config.eos_token_id)
        for _ in range(args.steps + 1):
            stamps.append((time.perf_counter(), time.process_time(), machine_busy_s()))
            batch, stats = hp.ppo_step(roles, opt, params, tok, p_ids, p_mask, cfg, autocast, cfg.kl_coef,
                                       torch.Generator().manual_seed(0), min_new_tokens=R)
            assert batch["ids"].shape[1] == P + R, "generation stopped before the full response length"
            times.append({k: stats[k] for k in ("time_generate", "time_score", "time_update")})
    stamps.append((time.perf_counter(), time.process_time(), machine_busy_s()))
    (w0, c0, b0), (w1, c1, b1) = stamps[1], stamps[-1]  # the timed steps (after the warm-up)
    others = max(0.0, ((b1 - b0) - (c1 - c0)) / ((w1 - w0) * os.cpu_count())) if device.type == "cpu" else 0.0
    times = times[1:]  # drop the warm-up step
    med = {k: statistics.median(t[k] for t in times) for k in times[0]}
    step = sum(med.values())
    return dict(config=args.config, batch=B, peak_memory_gb=peak_memory_gb(device),
                latency_per_sample_s=step / B, **{k.replace("time_", "") + "_per_sample_s": v / B for k, v in med.items()},
                tokens_per_s=B * (P + R) / step, steps_timed=len(times), others_cpu_frac=others)


# ---- the parent: one subprocess per configuration (and per batch size tried) -------------------------------------

def child_env(args):
    """--malloc-trim: glibc returns freed heap memory at once (MALLOC_TRIM_THRESHOLD_=0), so peak RSS tracks live
    tensors instead of what the allocator keeps for reuse; slower. Applied to every measured process alike."""
    return dict(os.environ, **({"MALLOC_TRIM_THRESHOLD_": "0"} if args.malloc_trim else {}))


def run_child(args, config, batch, steps):
    argv = [sys.executable, os.path.abspath(__file__), "--child", config, "--batch", str(batch), "--steps", str(steps)]
    for k in ("preset", "model", "prompt_len", "response_len", "lora_r", "device", "micro_batch"):
        if getattr(args, k) not in (None, ""):
            argv += ["--" + k.replace("_", "-"), str(getattr(args, k))]
    argv += [f for f in ("--grad-checkpointing", "--fold-lora") if getattr(args, f[2:].replace("-", "_"))]
    r = subprocess.run(argv, capture_output=True, text=True, env=child_env(args))
    if r.returncode != 0:
        oom = "out of memory" in r.stderr.lower() or r.returncode == -9
        return dict(config=config, batch=batch, oom=oom, error=r.stderr.strip().splitlines()[-1:] if not oom else None)
    return json.loads(r.stdout.strip().splitlines()[-1])


def largest_batch(args, config):
    """Double the batch until it no longer fits in --budget-gb, then bisect. One step per try."""
    fits = lambda b: (lambda r: not r.get("oom") and not r.get("error") and r["peak_memory_gb"] <= args.budget_gb)(
        run_child(args, config, b, 1))
    lo, hi = 0, 1
    while hi <= args.max_batch and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, args.max_batch + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def table(rows, args, device_name):
    head = (f"{args.model or args.preset}, {args.prompt_len} + {args.response_len} tokens, "
            f"{'bf16' if device_name.startswith('cuda') else 'fp32'}, {device_name}"
            + (", gradient checkpointing" if args.grad_checkpointing else "")
            + (", LoRA folded for sampling" if args.fold_lora else "")
            + (", MALLOC_TRIM_THRESHOLD_=0" if args.malloc_trim else ""))
    lines = [f"**{head}**", "",
             "| config | batch | peak memory (GB) | latency / sample (s) | generate | score | update | tokens / s |"
             " other load |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "peak_memory_gb" not in r:
            lines.append(f"| {r['config']} | {r['batch']} | {'OOM' if r.get('oom') else 'failed'} | | | | | | |")
            continue
        lines.append(f"| {r['config']} | {r['batch']} | {r['peak_memory_gb']:.2f} | {r['latency_per_sample_s']:.3f} | "
                     f"{r['generate_per_sample_s']:.3f} | {r['score_per_sample_s']:.3f} | "
                     f"{r['update_per_sample_s']:.3f} | {r['tokens_per_s']:.0f} | {r['others_cpu_frac']:.0%} |")
    return "\n".join(lines)


def fail(message):
    """Bad input: one line on stderr and exit status 2, before any configuration runs (as hydra_ppo.py does)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def check_args(args):
    for name, low in (("batch", 1), ("steps", 1), ("max_batch", 1), ("micro_batch", 0), ("prompt_len", 1),
                      ("response_len", 1), ("lora_r", 1), ("rounds", 1), ("budget_gb", 0)):
        if not getattr(args, name) >= low and not (name == "batch" and args.budget_gb):  # --budget-gb: no --batch
            fail(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= {low}")
    try:
        device = torch.device("cpu" if args.device == "auto" else args.device)
    except (RuntimeError, ValueError):
        fail(f"--device {args.device}: not a device; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {args.device}: CUDA is not available here")
    folder = os.path.dirname(os.path.abspath(args.json))
    if args.json and (os.path.isdir(args.json) or not os.path.isdir(folder) or not os.access(folder, os.W_OK)):
        fail(f"--json {args.json}: cannot write there (checked now: the results come only after every run)")
    if args.json and os.path.lexists(args.json) and not args.overwrite:
        fail(f"--json {args.json} already exists; choose another file, or --overwrite to replace it")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda message: fail(f"{message} (see --help)")
    p.add_argument("--preset", default="opt-125m", choices=list(PRESETS), help="architecture (random init)")
    p.add_argument("--model", default="", help="instead of --preset: a local folder or hub name (its config only)")
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ",".join(CONFIGS))
    p.add_argument("--batch", type=int, default=8, help="prompts per PPO step (ignored with --budget-gb)")
    p.add_argument("--budget-gb", type=float, default=0.0, help="> 0: each configuration's largest batch within it")
    p.add_argument("--max-batch", type=int, default=256, help="upper bound of the --budget-gb search")
    p.add_argument("--micro-batch", type=int, default=0, help="rows per forward pass in score/update (0: = batch)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--response-len", type=int, default=32)
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank (alpha = 2r)")
    p.add_argument("--steps", type=int, default=3, help="timed PPO steps per configuration, after one warm-up")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--fold-lora", action="store_true", help="sample with the actor adapter folded into a copy of "
                   "the weights (hydra_ppo.py ppo --fold-lora)")
    p.add_argument("--device", default="auto")
    p.add_argument("--malloc-trim", action="store_true", help="CPU: peak RSS of live tensors, without what glibc "
                   "keeps of freed memory (MALLOC_TRIM_THRESHOLD_=0 for every measured process; slower)")
    p.add_argument("--vs-trl", action="store_true", help="then run the same workload on TRL's PPO (bench_trl.py, "
                   "which installs TRL in its own venv) and print the ratios against our hydra")
    p.add_argument("--rounds", type=int, default=1, help="with --vs-trl: hydra and TRL measured this many times, "
                   "alternating; the ratios' medians are reported")
    p.add_argument("--json", default="", help="also write the results here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.config = args.child
        print(json.dumps(child(args)))
        return
    check_args(args)
    configs = [c for c in args.configs.split(",") if c]
    bad = [c for c in configs if c not in CONFIGS]
    if bad or not configs:
        fail(f"--configs {args.configs}: choose from {','.join(CONFIGS)}")
    if args.vs_trl and ("hydra" not in configs or args.budget_gb):
        fail("--vs-trl compares against hydra at a fixed --batch: keep hydra in --configs, no --budget-gb")
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device_name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    if device == "cpu" or device == "auto":
        device_name = f"cpu ({os.cpu_count()} cores)"
    rows, t0 = [], time.time()
    for config in configs:
        batch = largest_batch(args, config) if args.budget_gb else args.batch
        row = run_child(args, config, batch, args.steps) if batch else dict(config=config, batch=0, oom=True)
        rows.append(row)
        print(f"{config}: {row}", file=sys.stderr, flush=True)
    print(table(rows, args, device_name))
    trl = vs_trl(args, rows) if args.vs_trl else None
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(rows=rows, trl=trl, args=vars(args), device=device_name, torch=torch.__version__,
                           time_s=time.time() - t0, date=time.strftime("%Y-%m-%d")), fh, indent=1)


def vs_trl(args, rows):
    """The same workload on TRL's PPO, right after ours on the same machine, --rounds times (hydra and TRL
    alternating, so drifting machine load hits both alike); prints each round's ratios and their medians."""
    import tempfile
    hydra, trl = [next(r for r in rows if r["config"] == "hydra")], []
    for i in range(args.rounds):
        if i:
            hydra.append(run_child(args, "hydra", args.batch, args.steps))
        out = os.path.join(tempfile.mkdtemp(), "trl.json")
        subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_trl.py"),
                        "--batch", str(args.batch), "--prompt-len", str(args.prompt_len), "--response-len",
                        str(args.response_len), "--lora-r", str(args.lora_r), "--steps", str(args.steps), "--json",
                        out], check=True, env=child_env(args))
        with open(out) as fh:
            trl.append(json.load(fh))
    if any("latency_per_sample_s" not in h for h in hydra):
        print(f"\nhydra did not run ({[h.get('error') or 'out of memory' for h in hydra]}): no comparison")
        return dict(trl=trl, hydra=hydra)
    speed = [t["latency_per_sample_s"] / h["latency_per_sample_s"] for h, t in zip(hydra, trl)]
    memory = [h["peak_memory_gb"] * 1024 / t["peak_rss_mib"] for h, t in zip(hydra, trl)]
    print(f"\nTRL {trl[0]['trl']} PPO (peft LoRA policy, separate reward and value models), same workload:")
    for i, (h, t) in enumerate(zip(hydra, trl)):
        print(f"round {i + 1}: TRL {t['latency_per_sample_s']:.3f} s/sample, peak RSS {t['peak_rss_mib'] / 1024:.2f} GB "
              f"(other load {t['others_cpu_frac']:.0%}); hydra {h['latency_per_sample_s']:.3f} s/sample, "
              f"{h['peak_memory_gb']:.2f} GB (other load {h['others_cpu_frac']:.0%}): {speed[i]:.2f}x faster, "
              f"{memory[i]:.2f} of the peak RSS")
    print(f"hydra vs TRL, median of {len(speed)} round(s): {statistics.median(speed):.2f}x faster per sample, "
          f"{statistics.median(memory):.2f} of its peak RSS.")
    return dict(trl=trl, hydra=hydra, speedup=speed, memory_ratio=memory)


if __name__ == "__main__":
    main()
