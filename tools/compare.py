"""The paper's five PPO configurations side by side, under one budget, plus the ablation of its open question 1 and
Hydra without a critic (RLOO, GRPO).

    python tools/compare.py --model M --data D --out DIR --seed S [--ppo-steps N ...]

From one data split and seed: Hydra-SFT, and separately SFT and a reward model (same steps and learning rate); then
PPO in each configuration of Table 2 with the same prompts, steps, batch, learning-rate rule (hydra_ppo.MODES), LoRA
rank, seed and evaluation prompts; and LoRA-PPO once more with Hydra-SFT's reward head as its reward model (the
paper's open question 1: is it the better reward model or the shared model?); then Hydra with RLOO and with GRPO
(one trunk, one LoRA set, no critic). Every row samples --batch-size responses per step (the critic-free ones 4 to a
prompt, --group-size). Every policy is judged against its own SFT policy and against one common baseline, the plain
SFT model. Prints a markdown table, writes DIR/compare.json.
"""
import json
import os
import sys
from dataclasses import asdict, dataclass, fields, replace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import harness  # noqa: E402
import hydra_ppo as hp
from harness import LR_WHY, arg

# One row per configuration: key (its folder DIR/ppo-KEY), name, --mode, the --sft and --rm it starts from (DIR/hydra-sft,
# DIR/sft, DIR/rm), and the paper's average GPT-4 win-rate in % on Llama-7b (arXiv 2309.00754; None: not published).
ROWS = [("hydra", "Hydra-PPO", "hydra", "hydra-sft", "", 55.52),
        ("jhydra", "J-Hydra-PPO", "jhydra", "hydra-sft", "", 46.50),
        ("dlora", "LoRA-PPO, dynamic LoRA", "dlora", "sft", "rm", None),
        ("lora", "LoRA-PPO", "lora", "sft", "rm", 50.68),
        ("lora-hydra-rm", "LoRA-PPO + Hydra-SFT's RM", "lora", "sft", "hydra-sft", None),
        ("full", "PPO (full fine-tuning)", "full", "sft", "rm", None),
        ("rloo", "Hydra-RLOO (no critic)", "rloo", "hydra-sft", "", None),
        ("grpo", "Hydra-GRPO (no critic)", "grpo", "hydra-sft", "", None)]
PAPER_BASELINES = "SFT 48.55, Hydra-SFT 48.50"
CRITIC_FREE = [mode for mode, row in hp.MODES.items() if row["critic"] is hp.NO_CRITIC]
SFT_TASKS = {"hydra-sft": "hydra", "sft": "sft", "rm": "rm"}  # folder -> sft --task
AUTO = ("max_prompt_len", "max_response_len", "sft_steps", "sft_lr", "lora_r", "lora_alpha", "kl_coef",
        "eval_samples")


@dataclass
class CompareConfig(harness.Budget):
    """All five PPO configurations of the paper (Table 2), the open question 1 ablation and Hydra without a critic
    (rloo, grpo), under one budget. Flags whose default is 0 ("auto") take their value from
    hydra_ppo.PIPELINE_SETTINGS by model size, except the PPO learning rates: 0 there is each mode's own default
    (hydra_ppo.MODES), the paper's rule."""
    out: str = arg("out/compare", "output folder: DIR/hydra-sft, DIR/sft, DIR/rm, DIR/ppo-MODE, compare.json")
    actor_lr: float = arg(0.0, "PPO actor learning rate for every mode (0: each mode's default, MODES)", ge=0, le=1,
                          why=LR_WHY)
    critic_lr: float = arg(0.0, "PPO critic learning rate for every mode (0: each mode's default, MODES)", ge=0, le=1,
                           why=LR_WHY)
    resume: bool = arg(False, "go on with the comparison in --out, started with the same flags: the stages it "
                              "finished are kept, an unfinished one starts again")


def stage_configs(cfg):
    """-> ({folder: SFTConfig}, {row key: PPOConfig}): everything but the task, the mode and the checkpoints shared."""
    common = {f.name: getattr(cfg, f.name) for f in fields(harness.Common)}
    path = lambda folder: os.path.join(cfg.out, folder)
    sfts = {folder: harness.SFTConfig(**{**common, "out": path(folder)}, model=cfg.model, task=task, steps=cfg.sft_steps,
                                 batch_size=cfg.sft_batch_size, lr=cfg.sft_lr,
                                 micro_batch_size=min(cfg.sft_batch_size, cfg.micro_batch_size))
            for folder, task in SFT_TASKS.items()}
    ppos = {key: harness.PPOConfig(**{**common, "out": path("ppo-" + key)}, mode=mode, sft=path(sft),
                              rm=path(rm) if rm else "", steps=cfg.ppo_steps, batch_size=cfg.batch_size,
                              minibatch_size=cfg.minibatch_size, micro_batch_size=cfg.micro_batch_size,
                              lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha, actor_lr=cfg.actor_lr,
                              critic_lr=0.0 if mode in CRITIC_FREE else cfg.critic_lr,
                              group_size=cfg.group_size if mode in CRITIC_FREE else 0,
                              kl_coef=cfg.kl_coef, reward_norm=cfg.reward_norm,
                              eval_prompts=cfg.eval_prompts,
                              eval_samples=cfg.eval_samples)
            for key, _, mode, sft, rm, _ in ROWS}
    return sfts, ppos


RUN_FILE = "compare-run.json"  # the flags the comparison in DIR started with (--resume needs the same)


def precheck(cfg, sfts, ppos):
    """Every check the stages would make later, made now, before the first one runs, naming compare.py's own flag:
    the batches against the data, the evaluation prompts, the judge, the lengths and LoRA targets against the model.
    -> the judge (None: the reward model)."""
    judge = harness.pick_judge(cfg)
    train, held_out = harness.split_pairs(harness.load_pairs(cfg.data), cfg.eval_frac, cfg.seed)
    for flag, n in (("--sft-batch-size", cfg.sft_batch_size), ("--batch-size", cfg.batch_size)):
        hp.check(n <= len(train), f"{flag} {n}: more than the {len(train)} training pairs in {cfg.data}")
    if cfg.eval_prompts > len(held_out):
        hp.check("eval_prompts" not in getattr(cfg, "given", ()), f"--eval-prompts {cfg.eval_prompts}: more than the "
                 f"{len(held_out)} held-out prompts (--eval-frac {cfg.eval_frac:g}); ask for at most {len(held_out)}")
        print(f"evaluating on all {len(held_out)} held-out prompts (fewer than --eval-prompts {cfg.eval_prompts})")
    if cfg.model in ("tiny", "tiny-opt"):  # a few thousand parameters: built for real
        texts = [p[k] if isinstance(p[k], str) else harness.hh_text(p[k]) for p in train for k in ("prompt", "chosen")]
        lm = harness.build_tiny(cfg.model, texts, cfg.seed, "cpu")[0]
    else:  # the architecture alone, on the meta device: no weights read
        from transformers import AutoConfig, AutoModelForCausalLM
        try:
            config = AutoConfig.from_pretrained(cfg.model)
        except Exception as e:  # noqa: BLE001 (not found, not a model, a model type this transformers lacks)
            raise hp.UserError(f"--model {cfg.model}: could not load its config "
                               f"({(str(e).strip().splitlines() or [''])[0][:150]})") from None
        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(config)
    harness.check_positions(lm, cfg.max_prompt_len, cfg.max_response_len, "--max-prompt-len + --max-response-len")
    hp.add_adapter(lm, next(iter(ppos.values())))  # --lora-targets: every run adds the same adapters
    return judge


def finished(c):
    """A stage is finished when its summary.json is written (its last act)."""
    path = os.path.join(c.out, "summary.json")
    return harness.read_file(path, harness.read_json) if os.path.isfile(path) else None


def stage(c, run_stage, done):
    """Run one stage (harness.sft or harness.ppo); Ctrl-C says which stage it stopped in, what is kept, and how to go on."""
    try:
        return run_stage(c)
    except harness.Interrupted:
        raise harness.Interrupted(f"interrupted in the stage writing {c.out}; finished and kept: "
                             f"{', '.join(done) or 'none yet'}; go on with the same command and --resume (an "
                             f"unfinished stage starts again)") from None


def training_stats(run_dir, last=5):
    """From the run's metrics.jsonl: seconds per PPO step (generate + score + update; evaluation left out), and how
    stable training was: the largest KL to the reference of any step, and the critic's explained variance and
    value loss averaged over the last steps (the paper found J-Hydra-PPO unstable)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        lines = [json.loads(line) for line in fh]
    mean = lambda key, rows: sum(r[key] for r in rows) / len(rows) if key in rows[0] else None  # None: no critic
    return dict(s_per_step=sum(r["time_generate"] + r["time_score"] + r["time_update"] for r in lines) / len(lines),
                max_kl=max(r["kl"] for r in lines), explained_var=mean("explained_var", lines[-last:]),
                vf_loss=mean("vf_loss", lines[-last:]))


def against_baseline(c, prompts, baseline, rm, judge, run, seed):
    """The policy of run c against the plain SFT model on the same held-out prompts, k x k per prompt, by the
    judge or else the separate reward model: harness.evaluate with the baseline as the reference. The baseline is
    resampled for each row (it samples both sides); the interval over prompts covers that noise."""
    actor, tok, _ = harness.load_policy(c.out, run.device, run.dtype)
    roles = dict(actor=actor, ref=hp.Role(baseline, hp.LORA_OFF, "lm"), rm=hp.Role(rm, hp.LORA_OFF, "reward"))
    torch.manual_seed(seed)
    return harness.evaluate(roles, tok, prompts, c, run, judge)[0]


def plan(cfg):
    """What makes two comparisons the same: every setting but --resume and --overwrite."""
    return {k: v for k, v in asdict(cfg).items() if k not in ("resume", "overwrite")}


def check_resume(cfg):
    """--resume: --out holds a comparison started with these very settings (else its stages would not compare)."""
    if not cfg.resume:
        return
    path = os.path.join(cfg.out, RUN_FILE)
    hp.check(os.path.isfile(path), f"--resume: {cfg.out} holds no comparison to go on with (no {RUN_FILE})")
    saved, now = harness.read_file(path, harness.read_json), plan(cfg)
    saved.setdefault("group_size", 0)  # a comparison from before --group-size: the default
    differ = [f"--{k.replace('_', '-')} {saved.get(k)} then, {now[k]} now" for k in now if saved.get(k) != now[k]]
    hp.check(not differ, f"--resume: {cfg.out} was started with other settings ({'; '.join(differ[:3])}); give "
                         f"the same flags")


def ci(r, k):
    """A win-rate and its 95% interval: r[k], r[k + "_ci"]."""
    return f"{r[k]:.3f} [{r[k + '_ci'][0]:.3f}, {r[k + '_ci'][1]:.3f}]"


def dash(x, f):
    """x formatted, or a dash where the row has no such number (no critic, no GPU, no paper figure)."""
    return "–" if x is None else format(x, f)


def table(result):
    """The markdown table: one row per configuration."""
    lines = ["| configuration | win-rate vs own SFT [95%] | win-rate vs SFT [95%] | KL | length | max KL | "
             "explained var. | value loss | s / step | peak GPU GB | paper: GPT-4 win-rate % |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {ci(r, 'win_rate')} | {ci(r, 'vs_sft')} | {r['kl']:.2f} | {r['length']:.1f} | "
              f"{r['max_kl']:.1f} | {dash(r['explained_var'], '.2f')} | {dash(r['vf_loss'], '.3f')} | {r['s_per_step']:.2f} | "
              f"{dash(r['peak_gb'], '.1f')} | {dash(r['paper'], '.2f')} |" for r in result["rows"]]
    return "\n".join(lines)


def compare(cfg: CompareConfig):
    """The three SFT stages, the eight PPO runs, the evaluation against the common baseline, the table."""
    harness.validate(cfg)
    given = getattr(cfg, "given", set())
    cfg = harness.pipeline_settings(cfg, only=AUTO)
    cfg.given = given
    check_resume(cfg)
    sft_micro = min(cfg.sft_batch_size, cfg.micro_batch_size)  # what each SFT stage runs with
    hp.check(cfg.sft_batch_size % sft_micro == 0, f"--sft-batch-size {cfg.sft_batch_size} must be a multiple of "
                                                  f"--micro-batch-size {cfg.micro_batch_size}")
    sfts, ppos = stage_configs(cfg)
    for c in (*sfts.values(), *ppos.values()):  # every stage's flags before the first one runs
        harness.validate(c)
    for c in ppos.values():
        harness.check_group(c)
    harness.claim_out(cfg.out, cfg.overwrite or cfg.resume, stale=() if cfg.resume else ("compare.json", RUN_FILE),
                 inputs=harness.local_inputs(cfg))
    judge = precheck(cfg, sfts, ppos)  # None: the separate reward model judges
    run = harness.setup_device(cfg.device, cfg.precision)
    cuda = run.device.type == "cuda"
    os.makedirs(cfg.out, exist_ok=True)
    harness.write_json(os.path.join(cfg.out, RUN_FILE), plan(cfg))
    sft, ppo, done = {}, {}, []
    for folder, c in sfts.items():
        sft[folder] = finished(c) if cfg.resume else None
        print(f"\n== SFT --task {c.task}: {c.out}" + (" (finished: kept)" if sft[folder] else ""))
        sft[folder] = sft[folder] or stage(replace(c, overwrite=c.overwrite or cfg.resume), harness.sft, done)
        done.append(folder)
    for key, name, *_ in ROWS:
        c = ppos[key]
        ppo[key] = finished(c) if cfg.resume and "peak_gb" in (finished(c) or {}) else None
        print(f"\n== {name}: --mode {c.mode} --sft {c.sft}" + (f" --rm {c.rm}" if c.rm else "")
              + (" (finished: kept)" if ppo[key] else ""))
        if not ppo[key]:
            if cuda:
                torch.cuda.reset_peak_memory_stats(run.device)
            ppo[key] = stage(replace(c, overwrite=c.overwrite or cfg.resume), lambda c: harness.ppo(c, judge=judge), done)
            # CPU: no per-run peak in one process (max RSS only grows); bench.py measures memory per configuration.
            ppo[key]["peak_gb"] = torch.cuda.max_memory_allocated(run.device) / 2**30 if cuda else None
            harness.write_json(os.path.join(c.out, "summary.json"), ppo[key])  # with its peak: finished
        done.append("ppo-" + key)
    print("\n== every policy against the plain SFT model (the common baseline)")
    baseline = harness.load_checkpoint(sfts["sft"].out, run.device, run.dtype, dropout=False)[0]
    rm = harness.load_checkpoint(sfts["rm"].out, run.device, run.dtype, dropout=False)[0]
    held_out = harness.split_pairs(harness.load_pairs(cfg.data), cfg.eval_frac, cfg.seed)[1]
    prompts = [p["prompt"] for p in held_out][:cfg.eval_prompts]  # the prompts every `ppo` evaluated on
    rows = []
    for key, name, mode, *_, paper in ROWS:
        s, c = ppo[key], ppos[key]
        base = against_baseline(c, prompts, baseline, rm, judge, run, cfg.seed)
        rows.append(dict(key=key, name=name, mode=mode, sft=c.sft, rm=c.rm, win_rate=s["win_rate"],
                         win_rate_ci=s["win_rate_ci"], vs_sft=base["win_rate"], vs_sft_ci=base["win_rate_ci"],
                         kl=s["policy_kl"], length=s["policy_len"], **training_stats(c.out), peak_gb=s["peak_gb"],
                         paper=paper))
    result = dict(judge="gold" if judge else "reward_model", eval_prompts=len(prompts), eval_samples=cfg.eval_samples,
                  rm_accuracy=dict(hydra_sft=sft["hydra-sft"]["held_out_rm_acc"], rm=sft["rm"]["held_out_rm_acc"]),
                  rows=rows, paper_baselines=PAPER_BASELINES, config=asdict(cfg))
    harness.write_json(os.path.join(cfg.out, "compare.json"), result)
    acc = result["rm_accuracy"]
    print(f"\nheld-out reward-model accuracy ({sft['rm']['held_out_pairs']} pairs): Hydra-SFT's reward head "
          f"{acc['hydra_sft']:.3f}, the separate RM {acc['rm']:.3f}\n\n{table(result)}\n")
    print(f"{len(prompts)} held-out prompts x {cfg.eval_samples} responses, bootstrap intervals over prompts; judge: "
          + ("the gold rule" if judge else "each run's own RM (vs own SFT), the separate RM (vs SFT)") + f". The "
          f"paper's column: Llama-7b judged by GPT-4, a different judge and model ({PAPER_BASELINES}). In {cfg.out}/")
    return result


def main(argv=None):
    """`python compare.py [--flags]`: a bad flag or input is one error line and exit 2."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        compare(harness.parse_config(CompareConfig, argv, prog="compare.py"))
    except hp.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside a stage: nothing of a stage is lost
        print("error: interrupted (compare.py), between stages; go on with the same command and --resume",
              file=sys.stderr)
        return 2
    finally:
        harness.release_folders()
    return 0


if __name__ == "__main__":
    sys.exit(main())
