"""Benchmark TRL's PPO (trl 1.12.0, `trl.experimental.ppo.PPOTrainer`) on a fixed CPU workload.

TRL is NOT a dependency of this project. Run normally, this script creates `.bench_venv/` next to itself (a venv that
sees the running interpreter's packages, so its torch and transformers are reused unchanged: see make_venv),
pip-installs pinned trl/peft/accelerate/datasets into it (torch is pinned to the running interpreter's version so
nothing can replace it), then re-runs
itself inside that venv with `--inner` to measure. Our own implementation runs the same workload for comparison.

Workload (every value below is fixed on purpose, so both sides do the same arithmetic):
  * Model: OPT-125m *shape* (`OPTConfig`: hidden 768, ffn 3072, 12 layers, 12 heads, vocab 50272, 2048 positions,
    word_embed_proj_dim 768), random init after torch.manual_seed(0). No download is possible here, and timing/memory
    do not depend on the weights' values. All dropouts (dropout, attention_dropout, activation_dropout, layerdrop) 0.
  * fp32 on CPU: bf16=False (TRL defaults it to True when fp16 is off), use_cpu=True.
  * Tokenizer: a tiny in-memory WordLevel one with OPT's special ids (pad=1, bos=eos=2); prompts are given as ids.
  * Policy: the OPT causal LM + peft LoRA (r=16, alpha=2r=32, dropout 0, on q/k/v/out_proj and fc1/fc2).
    ref_model=None, so TRL uses the policy with the adapter disabled as the reference (no extra copy).
  * Reward model and value model: two separate full `AutoModelForSequenceClassification` OPT copies (num_labels=1),
    random init; this is how TRL's PPO is built (value model fully trained, reward model frozen).
  * Batch: 8 prompts per PPO step, 32 prompt tokens (random ids in [4, vocab), no padding) + 32 response tokens.
    Generation is forced to the full 32 tokens: stop_token/stop_token_id are None (TRL then sets the policy's
    generation_config.eos_token_id=None and never truncates), and the policy's generation_config gets
    suppress_tokens=[pad, eos], which transformers merges into the GenerationConfig TRL builds in train(), so neither
    a stop nor a pad id (which TRL would treat as padding) can be sampled. Sampling: temperature 1, top_k 0 (off),
    top_p 1 (TRL's own fixed settings besides temperature).
  * PPO: 1 epoch, 1 minibatch (all 8), gradient_accumulation_steps=1, local_rollout_forward_batch_size=8,
    gradient_checkpointing=False, no eval / sample generations / saving / reporting (report_to=[]).
  * Timing: total_episodes = batch * (steps + 1). A callback stamps on_train_begin and every on_step_end (called once
    per PPO step at the end of TRL's rollout + optimisation loop); step i's time is the gap between stamps. The first
    (warm-up) step is dropped; latency_per_sample_s = median(timed steps) / batch. others_cpu_frac is the share of
    the cores other processes used meanwhile (from /proc/stat); above ~0.1 the timings are contaminated.
  * Memory: peak RSS of the measuring process (getrusage ru_maxrss, KiB -> MiB), so it includes the interpreter,
    the imports (TRL pulls in datasets/pandas/pyarrow), the three models, optimizer state and activations.
"""
import argparse, json, os, subprocess, sys

HERE = os.path.dirname(os.path.abspath(__file__))
VENV = os.path.join(HERE, ".bench_venv")
PINS = ["trl==1.12.0", "peft==0.21.2", "accelerate==1.15.0", "datasets==5.2.0"]
PAD, EOS = 1, 2


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--response-len", type=int, default=32)
    p.add_argument("--steps", type=int, default=4, help="timed PPO steps (one warm-up step is added)")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--json", default=None, help="write the result JSON here")
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def make_venv(venv, pip=True):
    """A venv that sees the running interpreter's packages (torch, transformers), whether that interpreter is the
    system's or itself a venv: `--system-site-packages` alone would give the *base* interpreter's packages. A .pth
    file adds this interpreter's site directories after the venv's own, so what pip installs there comes first.
    -> the venv's python."""
    import site
    py = os.path.join(venv, "bin", "python")
    if not os.path.exists(py):
        subprocess.check_call([sys.executable, "-m", "venv", "--system-site-packages", venv]
                              + ([] if pip else ["--without-pip"]))
    ours = site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
    inner = subprocess.check_output([py, "-c", "import site; print(site.getsitepackages()[0])"], text=True).strip()
    with open(os.path.join(inner, "_running_interpreter.pth"), "w") as f:  # rewritten: the caller may have changed
        f.write(f"import site; list(map(site.addsitedir, {ours!r}))\n")  # addsitedir: their .pth files count too
    return py


def ensure_venv_and_rerun():
    """Outer process: stdlib only. Make the venv, install the pins if missing, run the measurement inside it."""
    py = make_venv(VENV)
    check = ("import importlib.metadata as m, sys\n"
             "sys.exit(any(m.version(n) != v for n, v in (p.split('==') for p in sys.argv[1:])))")
    if subprocess.run([py, "-c", check, *PINS], capture_output=True).returncode != 0:  # missing or other version
        # Pin torch to the version already installed system-wide: pip then fails rather than pull another torch.
        torch_v = subprocess.check_output([py, "-c", "import importlib.metadata as m; print(m.version('torch'))"],
                                          text=True).strip()
        subprocess.check_call([py, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                               *PINS, f"torch=={torch_v}"])
    return subprocess.call([py, os.path.abspath(__file__), "--inner", *sys.argv[1:]])


def machine_busy_s():
    """CPU seconds all processes on this machine (including other users') have been busy, from /proc/stat."""
    with open("/proc/stat") as f:
        t = [int(x) for x in f.readline().split()[1:]]
    return (sum(t[:8]) - t[3] - t[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait; guest is inside user


def rss_mib(field):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) / 1024 for l in f if l.startswith(field + ":"))


def measure(a):
    os.environ.update(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false",
                      TRL_EXPERIMENTAL_SILENCE="1", WANDB_DISABLED="true")
    import resource, statistics, tempfile, time, shutil
    import torch, transformers, trl, peft
    from datasets import Dataset
    from peft import LoraConfig
    from tokenizers import Tokenizer, models
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, OPTConfig,
                              PreTrainedTokenizerFast, TrainerCallback)
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    rss_imports = rss_mib("VmRSS")

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<s>": 0, "<pad>": PAD, "</s>": EOS, "<unk>": 3}, unk_token="<unk>")),
        bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (PAD, EOS, EOS)

    cfg = OPTConfig(hidden_size=768, ffn_dim=3072, num_hidden_layers=12, num_attention_heads=12, vocab_size=50272,
                    max_position_embeddings=2048, word_embed_proj_dim=768, dropout=0.0, attention_dropout=0.0,
                    activation_dropout=0.0, layerdrop=0.0, pad_token_id=PAD, bos_token_id=EOS, eos_token_id=EOS,
                    num_labels=1)
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_config(cfg, dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_config(cfg, dtype=torch.float32)
    policy.generation_config.suppress_tokens = [PAD, EOS]  # force full-length responses (see docstring)

    n_steps = a.steps + 1  # + warm-up
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(4, cfg.vocab_size, (a.batch * n_steps, a.prompt_len), generator=g)
    dataset = Dataset.from_dict({"input_ids": prompts.tolist()})

    out_dir = tempfile.mkdtemp(prefix="bench_trl_")
    args = PPOConfig(
        output_dir=out_dir, report_to=[], save_strategy="no", eval_strategy="no", logging_steps=1,
        disable_tqdm=True, use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False, seed=0,
        per_device_train_batch_size=a.batch, gradient_accumulation_steps=1, num_mini_batches=1, num_ppo_epochs=1,
        local_rollout_forward_batch_size=a.batch, total_episodes=a.batch * n_steps, num_sample_generations=0,
        response_length=a.response_len, temperature=1.0, stop_token=None, stop_token_id=None,
        missing_eos_penalty=None, dataloader_num_workers=0)
    peft_cfg = LoraConfig(r=a.lora_r, lora_alpha=2 * a.lora_r, lora_dropout=0.0, task_type="CAUSAL_LM",
                          target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])

    class Timer(TrainerCallback):  # stamps: (wall, this process's CPU, whole machine's busy CPU) seconds
        stamps, logs = [], []
        def on_train_begin(self, *_, **__): self.stamps.append((time.perf_counter(), time.process_time(), machine_busy_s()))
        def on_step_end(self, *_, **__):
            self.stamps.append((time.perf_counter(), time.process_time(), machine_busy_s()))
            (w0, c0, _), (w1, c1, _) = self.stamps[-2:]
            print(f"  step {len(self.stamps) - 1}: {w1 - w0:.2f} s wall, {c1 - c0:.2f} s CPU", file=sys.stderr)
        def on_log(self, _a, _s, _c, logs=None, **__): self.logs.append(dict(logs or {}))

    timer = Timer()
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=None, reward_model=reward,
                         train_dataset=dataset, value_model=value, peft_config=peft_cfg, callbacks=[timer])
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    trainer.train()
    shutil.rmtree(out_dir, ignore_errors=True)

    step_times = [t1[0] - t0[0] for t0, t1 in zip(timer.stamps, timer.stamps[1:])]
    # Share of the machine's cores busy with OTHER processes while the timed steps ran: the machine is shared, and
    # with 2 cores any concurrent job (oversubscribed OpenMP threads) can slow a step down many times over.
    (w0, c0, b0), (w1, c1, b1) = timer.stamps[1], timer.stamps[-1]
    others = max(0.0, ((b1 - b0) - (c1 - c0)) / ((w1 - w0) * os.cpu_count()))
    assert len(step_times) == n_steps, step_times
    eos_seen = sum(l.get("val/num_eos_tokens", 0) for l in timer.logs)
    assert eos_seen == 0, f"EOS was generated ({eos_seen} tokens): responses were not full length"
    timed = step_times[1:]
    res = {
        "impl": f"trl-{trl.__version__}", "batch": a.batch, "prompt_len": a.prompt_len,
        "response_len": a.response_len, "lora_r": a.lora_r, "steps_timed": len(timed),
        "warmup_step_s": round(step_times[0], 4), "step_times_s": [round(t, 4) for t in timed],
        "latency_per_sample_s": round(statistics.median(timed) / a.batch, 5),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_after_imports_mib": round(rss_imports, 1), "torch_threads": torch.get_num_threads(),
        "others_cpu_frac": round(others, 3),
        "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
        "peft": peft.__version__,
    }
    print(f"{res['impl']}: batch {a.batch}, {a.prompt_len}+{a.response_len} tokens, median "
          f"{statistics.median(timed):.2f} s/step over {len(timed)} steps -> {res['latency_per_sample_s']:.4f} "
          f"s/sample, peak RSS {res['peak_rss_mib']:.0f} MiB, other load {others:.0%} of the cores")
    if others > 0.1:
        print(f"WARNING: other processes kept {others:.0%} of the CPU busy during the timed steps; "
              "the timings are not clean, rerun on a quiet machine", file=sys.stderr)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    cli = parse_args(sys.argv[1:])
    sys.exit(measure(cli) if cli.inner else ensure_venv_and_rerun())
