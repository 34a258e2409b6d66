"""Memory and latency of every configuration: the paper's Table 1 on any machine, and a memory model that predicts it.

    python tools/bench.py --preset opt-125m --batch 8                  # CPU or GPU, every configuration
    python tools/bench.py --preset llama-7b --configs hydra --precision bf16 --batch 1 --grad-checkpointing  # CUDA's set-up
    python tools/bench.py --preset llama-7b --predict --device cuda --budget-gb 80 --grad-checkpointing \
        --prompt-len 400 --response-len 400                       # the model alone: largest batches, in seconds
    python tools/bench.py --predict --scale --device cuda --batch 8 --grad-checkpointing   # 125M to 70B parameters

Each configuration runs in a fresh subprocess (so one's memory never counts toward another's) through the same
code as a real run (hydra_ppo.setup_ppo, ppo_step), with random-init models built from the
architecture's config (no download) and generation forced to the full response length. Reported per
configuration: the live tensor bytes at the peak of a step (LiveMemory: what a GPU's allocator counts, measured on
any device) by category (frozen and trained weights, LoRA, gradients, optimizer state, activations, KV cache,
logits), the memory model's prediction beside it (predict), the device's own figure (CUDA:
torch.cuda.max_memory_allocated; CPU: the subprocess's peak RSS, which also counts Python, libraries and what
glibc keeps), latency per sample of a whole PPO step split into generate / score / update (median over --steps
steps after one warm-up step; the memory is measured in one more step), and tokens (prompt + response) per second.
`sft` is one full fine-tuning step of the SFT model: the paper's "PPO needs over 3x SFT" baseline. rloo and grpo
(Hydra without a critic) sample --batch responses, 4 to a prompt (2 where --batch is not a multiple of 4).
"""
import argparse
import collections
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import types
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root (harness, hydra_ppo)

CONFIGS = ("sft", "full", "lora", "dlora", "jhydra", "hydra", "rloo", "grpo")
CRITIC_FREE = ("rloo", "grpo")  # Hydra without a critic: --batch responses, 2 or 4 to a prompt


def group_of(name, batch=0):
    """Responses per prompt: 4 for rloo and grpo (2 for a --batch that is even but not a multiple of 4), else 1."""
    return (4 if batch % 4 == 0 else 2) if name in CRITIC_FREE else 1

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
    # Smaller and larger shapes: a tiny Llama for the tests, and the rest of the scale table (Llama-2 13b and 70b).
    "tiny-llama": ("llama", dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=4, vocab_size=1000)),
    "llama-13b": ("llama", dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                num_attention_heads=40, num_key_value_heads=40, vocab_size=32000,
                                max_position_embeddings=4096)),
    "llama-70b": ("llama", dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                num_attention_heads=64, num_key_value_heads=8, vocab_size=32000,
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


# ---- live tensor memory, as a GPU counts it, on any device -------------------------------------------------------
# torch's own MemTracker (torch.distributed._tools) counts parameters, gradients, optimizer state and activations,
# but cannot tell frozen weights from trained ones or LoRA, nor the KV cache and the logits from other activations:
# a small TorchDispatchMode that tags each tensor storage does.

class LiveMemory(TorchDispatchMode):
    """Live tensor bytes by what holds them. Storages that exist when it starts are tagged from the models and the
    optimizer (frozen / trained weights, LoRA, optimizer state); every storage an op creates afterwards counts until
    it is freed (weakref.finalize on the storage), tagged by what made it: a 4-D cat while sampling is the KV cache,
    a last dimension of vocabulary size is logits, a parameter's .grad gradients (its hook re-tags it), anything else
    activations (and temporaries). peaks: {phase: (most bytes live at once, {category: bytes} then)}; the caller
    names the phase, opt.step() is the phase "optimizer"."""

    def __init__(self, models, opt, vocab):
        super().__init__()
        self.vocab, self.phase = vocab, "update"
        self.bytes, self.live, self.total, self.peaks = {}, collections.Counter(), 0, {}
        for model in models:
            for name, p in model.named_parameters():
                self.tag(p, "LoRA" if "lora_" in name else "trained weights" if p.requires_grad else "frozen weights")
                if p.requires_grad:
                    p.register_post_accumulate_grad_hook(lambda p: self.tag(p.grad, "gradients"))
            for b in model.buffers():
                self.tag(b, "frozen weights")
        for t in (t for state in opt.state.values() for t in state.values() if torch.is_tensor(t)):
            self.tag(t, "optimizer state")
        opt.register_step_pre_hook(lambda *a: setattr(self, "phase", "optimizer"))
        opt.register_step_post_hook(lambda *a: setattr(self, "phase", "update"))

    def tag(self, t, category):
        storage = t.untyped_storage()
        key = storage._cdata  # the C++ storage: views and in-place results share it
        if key not in self.bytes:
            self.bytes[key] = (storage.nbytes(), category)
            self.live[category] += storage.nbytes()
            self.total += storage.nbytes()
            weakref.finalize(storage, self.free, key)
        n, old = self.bytes[key]
        self.live[old] -= n
        self.live[category] += n
        self.bytes[key] = (n, category)

    def free(self, key):
        n, category = self.bytes.pop(key)
        self.live[category] -= n
        self.total -= n

    def category(self, func, t):
        if self.phase == "generate" and func is torch.ops.aten.cat.default and t.dim() == 4:
            return "KV cache"  # (B, kv heads, T, head dim): transformers' DynamicCache grows by cat
        return "logits" if t.dim() >= 2 and t.shape[-1] == self.vocab else "activations"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in self.bytes:
                self.tag(t, self.category(func, t))
        if self.total > self.peaks.get(self.phase, (0,))[0]:
            self.peaks[self.phase] = (self.total, {k: v for k, v in self.live.items() if v})
        return out

    def in_phase(self, phase, fn):
        def run(*a, **kw):
            self.phase = phase
            return fn(*a, **kw)
        return run


# ---- one configuration, in its own process ------------------------------------------------------------------------

def child(args):
    import harness
    import hydra_ppo as hp
    from transformers import AutoModelForCausalLM
    run = harness.setup_device(args.device, args.precision)
    device, dtype, autocast = run.device, run.dtype, run.autocast
    config = harness.no_dropout(model_config(args))
    B, P, R = args.batch, args.prompt_len, args.response_len

    def load(which, fp32):  # build_roles' loader: a fresh random-init model
        torch.manual_seed(0 if which == "sft" else 1)
        with torch.device(device):  # initialise on the device: a 7b model on the CPU first would take minutes
            lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32 if fp32 else dtype)
        return hp.HydraModel(lm).requires_grad_(False)

    g = torch.Generator().manual_seed(0)
    p_ids = torch.randint(4, config.vocab_size, (B, P), generator=g).to(device)
    p_mask = torch.ones_like(p_ids)
    micro = args.micro_batch or B
    if args.config == "sft":  # one full fine-tuning step of the SFT model on prompt + response
        model = load("sft", fp32=True).requires_grad_(True)
        if args.grad_checkpointing:
            hp.checkpointing_on(model.lm)
        model.train()
        models, params = [model], list(model.lm.parameters())
        opt = torch.optim.AdamW(params, lr=1e-5)
        r_ids = torch.randint(4, config.vocab_size, (B, R), generator=g).to(device)
        ids, mask = torch.cat([p_ids, r_ids], 1), torch.ones(B, P + R, dtype=torch.long, device=device)

        def step():
            clock = hp.Clock(device)
            for i in range(0, B, micro):
                with autocast():
                    loss, _ = hp.sft_loss(model, ids[i:i + micro], mask[i:i + micro], P, len(ids[i:i + micro]), 1.0, 0.0)
                (loss * len(ids[i:i + micro]) / B).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return dict(time_generate=0.0, time_score=0.0, time_update=clock())
    else:
        cfg = ppo_config(args, B)
        learner = hp.setup_ppo(cfg, load)
        models, opt = hp.models_of(learner.roles), learner.opt
        # EOS: an id past the vocabulary, never sampled, so that every response runs the full R tokens.
        tok = types.SimpleNamespace(**{**token_ids(config), "eos_token_id": config.vocab_size})

        k = hp.group_size(cfg)  # rloo, grpo: B responses to B / k prompts

        def step():
            batch, stats = hp.ppo_step(learner, tok, p_ids[:B // k], p_mask[:B // k], cfg, run)
            assert batch["ids"].shape[1] == P + R, "generation stopped before the full response length"
            return {k: stats[k] for k in ("time_generate", "time_score", "time_update")}
    times, stamps = [], []
    for _ in range(args.steps + 1):
        stamps.append((time.perf_counter(), time.process_time(), machine_busy_s()))
        times.append(step())
    stamps.append((time.perf_counter(), time.process_time(), machine_busy_s()))
    (w0, c0, b0), (w1, c1, b1) = stamps[1], stamps[-1]  # the timed steps (after the warm-up)
    others = max(0.0, ((b1 - b0) - (c1 - c0)) / ((w1 - w0) * os.cpu_count())) if device.type == "cpu" else 0.0
    times = times[1:]  # drop the warm-up step
    med = {k: statistics.median(t[k] for t in times) for k in times[0]}
    step_s = sum(med.values())
    # One more step, untimed (the tracker slows every op), with the optimizer state of a run in progress.
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    phases = dict(generate="generate", score_rollout="score", ppo_update="update")  # ppo_step's phases, by function
    own = {name: getattr(hp, name) for name in phases}
    with LiveMemory(models, opt, config.vocab_size) as live:
        try:
            for name, phase in phases.items():
                setattr(hp, name, live.in_phase(phase, own[name]))
            step()
        finally:
            for name, fn in own.items():
                setattr(hp, name, fn)
    phase = max(live.peaks, key=lambda k: live.peaks[k][0])
    total, predicted_phase, parts = predicted(args, config, model_sizes(config), args.config, B)
    return dict(config=args.config, batch=B, peak_memory_gb=peak_memory_gb(device),
                predicted_gb=total / 2**30, predicted_phase=predicted_phase,
                predicted_live_gb={k: v / 2**30 for k, v in parts.items() if v},
                live_peak_gb=live.peaks[phase][0] / 2**30, peak_phase=phase,
                live_gb={k: v / 2**30 for k, v in live.peaks[phase][1].items()},
                phases_gb={k: {c: n / 2**30 for c, n in v[1].items()} for k, v in live.peaks.items()},
                latency_per_sample_s=step_s / B, **{k.replace("time_", "") + "_per_sample_s": v / B for k, v in med.items()},
                tokens_per_s=B * (P + R) / step_s, steps_timed=len(times), others_cpu_frac=others)


def token_ids(config):
    """-> {pad_token_id, eos_token_id} for sampling from a random-init model of this config. Many real configs have
    no pad id (Llama-3, Qwen2.5, Mistral), some a list of EOS ids or none: any id serves, as generation is forced to
    the full response length; the pad id is the EOS, as hydra_ppo.load_tokenizer makes it."""
    eos = config.eos_token_id
    eos = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
    eos = config.vocab_size - 1 if not isinstance(eos, int) else eos
    pad = config.pad_token_id if isinstance(config.pad_token_id, int) else eos
    return dict(pad_token_id=pad, eos_token_id=eos)


def ppo_config(args, B):
    import harness
    micro = args.micro_batch or B
    return harness.PPOConfig(mode=args.config, batch_size=B, minibatch_size=B, micro_batch_size=micro,
                             group_size=group_of(args.config, B),
                             max_prompt_len=args.prompt_len, max_response_len=args.response_len, lora_r=args.lora_r,
                             lora_alpha=2.0 * args.lora_r, grad_checkpointing=args.grad_checkpointing,
                             fold_lora=args.fold_lora, device=args.device)


# ---- the memory model: the paper's Table 2 as arithmetic -------------------------------------------------------
# Predicted live tensor bytes at the peak of each phase of a PPO step (what LiveMemory measures, by the same
# categories), from the architecture, the batch and lengths, LoRA's rank, checkpointing and precision. Two kinds of
# terms: what a configuration holds all the time (weights, LoRA, AdamW's state: Table 2 times bytes per parameter)
# and what one phase adds on top (the KV cache while sampling; activations and logits while scoring and updating).

def table2(name):
    """-> (trunks, LoRA adapter sets) that configuration `name` holds: hydra_ppo.MODES counted (sft: one model)."""
    import hydra_ppo as hp
    if name == "sft":
        return 1, 0
    roles = [hp.MODES[name][r] for r in hp.ROLES if hp.MODES[name][r]]  # (trunk, adapter); rloo, grpo: no critic
    return len({trunk for trunk, _ in roles}), len({a for _, a in roles if a is not hp.LORA_OFF})

# Bytes the backward keeps per token and decoder layer (no checkpointing): cH * H + cF * F, by family and bytes per
# activation, from a census of saved tensors (torch.autograd.graph.saved_tensors_hooks on one layer, transformers 5,
# sdpa attention). OPT fp32 keeps 8 H-sized tensors (2 layer-norm inputs and outputs, q, k, v, attention output)
# and the ReLU's output; Llama also the MLP's gate, up, SiLU and their product (4 F). In bf16 most are halved, while
# norms and residuals stay fp32. LoRA adds r numbers per target and token (A x; in bf16 also its casts).
ACT_BYTES = {("opt", 4): (32, 4), ("opt", 2): (24.5, 4.5), ("llama", 4): (34, 16), ("llama", 2): (32, 8.75)}
LORA_ACT_BYTES = {4: 4, 2: 14}
LOGIT_BYTES = 16  # per element of a (rows, 16 positions, V) logits chunk: the logits, their fp32 log-softmax, grads


def model_sizes(config):
    """Parameter counts, on the meta device (no memory, no weights): N (all, tied ones once), the linear weights
    (what bf16 autocast copies for a trained fp32 model), the decoder's (the full-mode critic trains it, not the LM
    head), and LoRA's parameters per unit of rank and adapter (r (in + out) on every linear map LoRA targets by
    default: as lora.add_lora, those inside the decoder layers)."""
    from transformers import AutoModelForCausalLM
    from lora import LINEAR_TYPES, decoder_layers
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(config)
    lora = [m for m in decoder_layers(lm).modules() if isinstance(m, LINEAR_TYPES)]
    return types.SimpleNamespace(
        N=sum(p.numel() for p in lm.parameters()), decoder=sum(p.numel() for p in lm.base_model.parameters()),
        linear=sum({id(m.weight): m.weight.numel() for m in lm.modules() if isinstance(m, LINEAR_TYPES)}.values()),
        largest=max(p.numel() for p in lm.parameters()), lora_weights=sum(m.weight.numel() for m in lora),
        lora_per_rank=sum(sum(m.weight.shape) for m in lora), lora_layers=len(lora))


def predict(config, sizes, name, B, args):
    """-> {phase: {category: bytes}} at each phase's peak for batch B and the flags `args` (lengths, LoRA rank,
    micro-batch, checkpointing, --fold-lora, device and precision); the step's peak is the phase with the largest sum."""
    P, R, r, micro, fold = args.prompt_len, args.response_len, args.lora_r, args.micro_batch, args.fold_lora
    cuda, bf16 = resolved(args)
    L, H, V = config.num_hidden_layers, config.hidden_size, config.vocab_size
    F = getattr(config, "ffn_dim", None) or config.intermediate_size
    heads = config.num_attention_heads
    kv_dim = (getattr(config, "num_key_value_heads", None) or heads) * (getattr(config, "head_dim", None) or H // heads)
    a = 2 if bf16 else 4                                # bytes per activation (bf16 autocast: matmul outputs)
    T, b, C = P + R, micro or B, min(16, R)             # sequence, rows per forward pass, positions per logits chunk
    full = name in ("sft", "full")
    w = 4 if full or not bf16 else 2                    # bytes per weight of a trunk: trained weights stay fp32
    # Held all the time (paper, Table 2): the trunks, the LoRA sets, AdamW's two fp32 moments per trained parameter.
    trunks, sets = table2(name)
    if name == "sft":
        trained, held = sizes.N, {"trained weights": 4 * sizes.N}
    elif name == "full":  # actor: the whole LM; critic: its decoder (it never reads the LM head); frozen copies fp32
        trained, held = sizes.N + sizes.decoder, {"trained weights": 2 * 4 * sizes.N, "frozen weights": 2 * 4 * sizes.N}
    else:
        trained, held = sets * r * sizes.lora_per_rank, {"frozen weights": trunks * w * sizes.N}
        held["LoRA"] = 4 * trained
    held["optimizer state"] = 8 * trained
    actor_grads = 4 * (sizes.N if full else r * sizes.lora_per_rank)  # held while the critic's pass runs
    # 1. Sampling (the actor alone): K and V of every layer and token but the last, the last token's logits (their
    #    fp32 copies, probabilities, ...: 6 of them), and with --fold-lora a copy of the targeted weights.
    kv = 2 * L * B * (T - 1) * kv_dim * a
    phases = dict(generate=dict(held, **{"KV cache": kv, "logits": 6 * B * V * 4,
                                        "activations": fold * w * sizes.lora_weights}))
    # 2. Scoring, without gradients: the last hidden states of b rows, and one chunk of logits (with its fp32 copy).
    phases["score"] = dict(held, activations=2 * b * T * H * a, logits=b * C * V * 8)
    # 3. The update: a forward and a backward per trunk and adapter, the actor's first (jhydra: one for both). The
    #    backward keeps every layer's activations (one token, one layer: cH * H + cF * F bytes), or with checkpointing
    #    each layer's input and, while it recomputes one layer, that layer's; also the last hidden state and its
    #    gradient. Its peak: at the LM head (the actor's logits), or in the critic's pass, the actor's gradients held.
    #    bf16 autocast keeps bf16 copies of trained fp32 weights (full fine-tuning) while a pass runs.
    cH, cF = ACT_BYTES["opt" if config.model_type == "opt" else "llama", a]
    per_token = cH * H + cF * F + (0 if full else r * sizes.lora_layers / L * LORA_ACT_BYTES[a])
    kept = (L * b * T * H * w if args.grad_checkpointing else L * b * T * per_token) + 4 * b * T * H * a
    kept += 2 * sizes.linear if full and bf16 else 0
    layer = b * T * per_token if args.grad_checkpointing else 0  # one layer recomputed
    phases["update"] = max(dict(held, activations=kept, logits=b * C * V * LOGIT_BYTES),
                           dict(held, activations=kept + layer,
                                gradients=actor_grads if sets != 1 and name != "sft" else 0),
                           key=lambda p: sum(p.values()))
    # 4. The optimizer step: every gradient, and AdamW's temporaries (CUDA's foreach: one per trained parameter).
    phases["optimizer"] = dict(held, gradients=4 * trained,
                               activations=4 * trained if cuda else 8 * sizes.largest * full)
    return {k: v for k, v in phases.items() if name != "sft" or k in ("update", "optimizer")}  # sft: no sampling


# ---- the parent: one subprocess per configuration (and per batch size tried) -------------------------------------

def child_env(args):
    """--malloc-trim: glibc returns freed heap memory at once (MALLOC_TRIM_THRESHOLD_=0), so peak RSS tracks live
    tensors instead of what the allocator keeps for reuse; slower. Applied to every measured process alike."""
    return dict(os.environ, **({"MALLOC_TRIM_THRESHOLD_": "0"} if args.malloc_trim else {}))


def run_child(args, config, batch, steps):
    argv = [sys.executable, os.path.abspath(__file__), "--child", config, "--batch", str(batch), "--steps", str(steps)]
    for k in ("preset", "model", "prompt_len", "response_len", "lora_r", "device", "precision", "micro_batch"):
        if getattr(args, k) not in (None, ""):
            argv += ["--" + k.replace("_", "-"), str(getattr(args, k))]
    argv += [f for f in ("--grad-checkpointing", "--fold-lora") if getattr(args, f[2:].replace("-", "_"))]
    r = subprocess.run(argv, capture_output=True, text=True, env=child_env(args))
    if r.returncode != 0:
        oom = "out of memory" in r.stderr.lower() or r.returncode == -9
        return dict(config=config, batch=batch, oom=oom, error=r.stderr.strip().splitlines()[-1:] if not oom else None)
    return json.loads(r.stdout.strip().splitlines()[-1])


def largest_batch(fits, max_batch):
    """The largest batch <= max_batch for which fits(batch) holds (memory grows with the batch): double, then bisect."""
    lo, hi = 0, 1
    while hi <= max_batch and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, max_batch + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def measured_fits(args, config):
    """One step per try, in a child: does this batch fit in --budget-gb (peak memory: CUDA allocated, CPU RSS)?"""
    return lambda b: (lambda r: not r.get("oom") and not r.get("error") and r["peak_memory_gb"] <= args.budget_gb)(
        run_child(args, config, b, 1))


def resolved(args):
    """-> (cuda, bf16): the device and precision that hydra_ppo.setup_device gives these flags."""
    cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    return cuda, args.precision == "bf16" or (args.precision == "auto" and cuda)


def predicted(args, config, sizes, name, batch):
    """-> (peak bytes, its phase, {category: bytes} then) by the memory model, for these flags."""
    phases = predict(config, sizes, name, batch, args)
    phase = max(phases, key=lambda k: sum(phases[k].values()))
    return sum(phases[phase].values()), phase, phases[phase]


def heading(args, device_name):
    return (f"{args.model or args.preset}, {args.prompt_len} + {args.response_len} tokens, "
            f"{'bf16' if resolved(args)[1] else 'fp32'}, {device_name}, LoRA r {args.lora_r}"
            + (", gradient checkpointing" if args.grad_checkpointing else "")
            + (", LoRA folded for sampling" if args.fold_lora else "")
            + (", MALLOC_TRIM_THRESHOLD_=0" if args.malloc_trim else ""))


CATEGORIES = ("frozen weights", "trained weights", "LoRA", "gradients", "optimizer state", "activations", "KV cache",
              "logits")


def breakdown(label, gb, phase):
    return f"| {label} | {phase} | " + " | ".join(f"{gb.get(c, 0):.3f}" for c in CATEGORIES) + " |"


def table(rows, args, device_name):
    cuda = resolved(args)[0]
    lines = [f"**{heading(args, device_name)}**", "",
             f"| config | batch | live peak (GB) | predicted (GB) | error | {'max allocated' if cuda else 'peak RSS'} (GB)"
             " | latency / sample (s) | generate | score | update | tokens / s | other load |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    parts = ["", "Live tensors at the peak, measured and predicted (GB):", "",
             "| config | phase | " + " | ".join(CATEGORIES) + " |", "|---|---|" + "---|" * len(CATEGORIES)]
    for r in rows:
        if "peak_memory_gb" not in r:
            lines.append(f"| {r['config']} | {r['batch']} | {'OOM' if r.get('oom') else 'failed'} |" + " |" * 9)
            continue
        lines.append(f"| {r['config']} | {r['batch']} | {r['live_peak_gb']:.3f} | {r['predicted_gb']:.3f} | "
                     f"{r['predicted_gb'] / r['live_peak_gb'] - 1:+.1%} | {r['peak_memory_gb']:.2f} | "
                     f"{r['latency_per_sample_s']:.3f} | {r['generate_per_sample_s']:.3f} | "
                     f"{r['score_per_sample_s']:.3f} | {r['update_per_sample_s']:.3f} | {r['tokens_per_s']:.0f} | "
                     f"{r['others_cpu_frac']:.0%} |")
        parts += [breakdown(f"{r['config']} measured", r["live_gb"], r["peak_phase"]),
                  breakdown(f"{r['config']} predicted", r["predicted_live_gb"], r["predicted_phase"])]
    return "\n".join(lines + parts)


def prediction_table(args, config, sizes, configs):
    """--predict: the memory model alone, no model built. With --budget-gb, each configuration's largest batch.
    -> (markdown, rows)."""
    device = "cuda" if resolved(args)[0] else "cpu"
    lines = [f"**{heading(args, device)}: predicted"
             + (f", largest batch in {args.budget_gb:g} GB" if args.budget_gb else "") + "**", "",
             "| config | batch | predicted peak (GB) | phase | " + " | ".join(CATEGORIES) + " |",
             "|---|---|---|---|" + "---|" * len(CATEGORIES)]
    rows = []
    for name in configs:
        k = group_of(name)  # rloo, grpo: whole groups of 4 only
        fits = lambda b: predicted(args, config, sizes, name, k * b)[0] <= args.budget_gb * 2**30
        batch = k * largest_batch(fits, args.max_batch // k) if args.budget_gb else args.batch
        total, phase, parts = predicted(args, config, sizes, name, max(batch, 1))
        capped = bool(args.budget_gb) and batch == args.max_batch
        shown = f"{batch} (the --max-batch cap)" if capped else batch if batch else "none (batch 1:)"
        lines.append(f"| {name} | {shown} | {total / 2**30:.2f} | {phase} | "
                     + " | ".join(f"{parts.get(c, 0) / 2**30:.2f}" for c in CATEGORIES) + " |")
        rows.append(dict(config=name, batch=batch, max_batch_cap=capped, predicted_gb=total / 2**30,
                         predicted_phase=phase, predicted_live_gb={k: v / 2**30 for k, v in parts.items() if v}))
    return "\n".join(lines), rows


SCALE = ("opt-125m", "opt-350m", "opt-1.3b", "llama-7b", "llama-13b", "llama-70b")


def scale_table(args, configs):
    """--predict --scale: every configuration's predicted peak from 125M to 70B parameters, and the paper's ratios.
    -> (markdown, rows)."""
    lines = [f"**{heading(args, 'cuda' if resolved(args)[0] else 'cpu').split(', ', 1)[1]}, batch {args.batch}: "
             "predicted peak (GB)**", "",
             "| model | parameters | " + " | ".join(configs) + " | full / sft | hydra / sft | hydra / lora |",
             "|---|---|" + "---|" * (len(configs) + 3)]
    rows = []
    for preset in SCALE:
        config = model_config(types.SimpleNamespace(model="", preset=preset))
        sizes = model_sizes(config)
        gb = {c: predicted(args, config, sizes, c, args.batch)[0] / 2**30 for c in set(configs) | {"sft", "full", "lora", "hydra"}}
        lines.append(f"| {preset} | {sizes.N / 1e9:.2f} B | " + " | ".join(f"{gb[c]:.1f}" for c in configs)
                     + f" | {gb['full'] / gb['sft']:.2f} | {gb['hydra'] / gb['sft']:.2f} | {gb['hydra'] / gb['lora']:.2f} |")
        rows.append(dict(model=preset, parameters=sizes.N, batch=args.batch, predicted_gb=gb))
    return "\n".join(lines), rows


def fail(message):
    """Bad input: one line on stderr and exit status 2, before any configuration runs (as hydra_ppo.py does)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def check_args(args):
    """Every flag, and the model they name, before any configuration runs: one line and exit 2 for a bad one.
    -> the model's config."""
    for name, low in (("batch", 1), ("steps", 1), ("max_batch", 1), ("micro_batch", 0), ("prompt_len", 1),
                      ("response_len", 1), ("lora_r", 1), ("rounds", 1), ("budget_gb", 0)):
        if not getattr(args, name) >= low and not (name == "batch" and args.budget_gb):  # --budget-gb: no --batch
            fail(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= {low}")
    try:
        device = torch.device("cpu" if args.device == "auto" else args.device)
    except (RuntimeError, ValueError):
        fail(f"--device {args.device}: not a device; use auto, cpu, cuda or cuda:N")
    if device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index not in (None, 0)):
        fail(f"--device {args.device}: not a device here; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available() and not args.predict:
        fail(f"--device {args.device}: CUDA is not available here")
    folder = os.path.dirname(os.path.abspath(args.json))
    if args.json and (os.path.isdir(args.json) or not os.path.isdir(folder) or not os.access(folder, os.W_OK)):
        fail(f"--json {args.json}: cannot write there (checked now: the results come only after every run)")
    if args.json and os.path.lexists(args.json) and not args.overwrite:
        fail(f"--json {args.json} already exists; choose another file, or --overwrite to replace it")
    if args.model and args.preset:
        fail(f"--model {args.model} and --preset {args.preset}: --model is instead of --preset; give one of them")
    args.preset = args.preset or ("" if args.model else "opt-125m")
    configs = [c for c in args.configs.split(",") if c]
    if any(c not in CONFIGS for c in configs) or not configs:
        fail(f"--configs {args.configs}: choose from {','.join(CONFIGS)}")
    if len(set(configs)) < len(configs):
        fail(f"--configs {args.configs}: names a configuration twice")
    odd = [c for c in configs if c in CRITIC_FREE]
    if odd and args.batch % 2 and not args.budget_gb and not args.predict:
        fail(f"--batch {args.batch}: {', '.join(odd)} sample 2 or more responses to each prompt; give an even --batch")
    if args.scale:
        return None  # the presets of SCALE, at --batch
    config = checked_model(args)
    n = getattr(config, "max_position_embeddings", None)
    if n and args.prompt_len + args.response_len > n:
        fail(f"--prompt-len {args.prompt_len} + --response-len {args.response_len}: more than the model's {n} "
             f"positions")
    return config


def checked_model(args):
    """model_config, or one line saying why --model is not a model's config (a file, a folder without config.json,
    a name neither here nor on the hub, a model type this transformers does not know)."""
    if not args.model:
        return model_config(args)
    if os.path.isfile(args.model):
        fail(f"--model {args.model}: a file; name a model's folder (with its config.json) or a hub name")
    if os.path.isdir(args.model) and not os.path.isfile(os.path.join(args.model, "config.json")):
        fail(f"--model {args.model}: a folder without config.json, not a transformers model")
    try:
        from transformers.utils import logging
        logging.set_verbosity_error()  # its own warnings would come before our one line
        return model_config(args)
    except Exception as e:  # noqa: BLE001 (OSError: not found; ValueError / KeyError: an unknown model type)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        fail(f"--model {args.model}: could not load its config ({first[:200]})")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda message: fail(f"{message} (see --help)")
    p.add_argument("--preset", default="", choices=list(PRESETS), help="architecture (random init); default opt-125m")
    p.add_argument("--model", default="", help="instead of --preset: a local folder or hub name (its config only)")
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ",".join(CONFIGS))
    p.add_argument("--batch", type=int, default=8, help="responses per PPO step (ignored with --budget-gb)")
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
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"), help="auto: bf16 on CUDA, fp32 "
                   "on CPU; bf16: CUDA's set-up on any device (hydra_ppo.py --precision)")
    p.add_argument("--malloc-trim", action="store_true", help="CPU: peak RSS of live tensors, without what glibc "
                   "keeps of freed memory (MALLOC_TRIM_THRESHOLD_=0 for every measured process; slower)")
    p.add_argument("--vs-trl", action="store_true", help="then run the same workload on TRL's PPO (bench_trl.py, "
                   "which installs TRL in its own venv) and print the ratios against our hydra")
    p.add_argument("--rounds", type=int, default=1, help="with --vs-trl: hydra and TRL measured this many times, "
                   "alternating; the ratios' medians over the rounds no other load disturbed are reported")
    p.add_argument("--predict", action="store_true", help="the memory model alone, in seconds, no model built: "
                   "each configuration's predicted peak at --batch, or with --budget-gb its largest batch (--device "
                   "cuda predicts for a GPU from any machine)")
    p.add_argument("--scale", action="store_true", help="with --predict: every configuration from 125M to 70B "
                   "parameters at --batch, with the paper's ratios (full / sft, hydra / sft)")
    p.add_argument("--json", default="", help="also write the results here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.config = args.child
        args.preset = args.preset or "opt-125m"
        print(json.dumps(child(args)))
        return 0
    config = check_args(args)
    configs = [c for c in args.configs.split(",") if c]
    if args.vs_trl and ("hydra" not in configs or args.budget_gb):
        fail("--vs-trl compares against hydra at a fixed --batch: keep hydra in --configs, no --budget-gb")
    if args.scale and not args.predict:
        fail("--scale is a table of predictions: add --predict")
    if args.predict:
        text, rows = scale_table(args, configs) if args.scale else prediction_table(args, config, model_sizes(config),
                                                                                   configs)
        print(text)
        write_results(args, dict(predicted=rows))
        return 0
    cuda = resolved(args)[0]
    device_name = torch.cuda.get_device_name() if cuda else f"cpu ({os.cpu_count()} cores)"
    rows, t0 = [], time.time()
    for name in configs:
        fits, k = measured_fits(args, name), group_of(name)  # rloo, grpo: whole groups of 4 only
        batch = k * largest_batch(lambda b: fits(k * b), args.max_batch // k) if args.budget_gb else args.batch
        row = run_child(args, name, batch, args.steps) if batch else dict(config=name, batch=0, oom=True)
        rows.append(row)
        print(f"{name}: {row}", file=sys.stderr, flush=True)
    print(table(rows, args, device_name))
    capped = [r["config"] for r in rows if args.budget_gb and r["batch"] == args.max_batch]
    if capped:
        print(f"\n{', '.join(capped)}: the search stopped at the --max-batch {args.max_batch} cap, not at the budget; "
              f"raise --max-batch to find the largest batch in {args.budget_gb:g} GB")
    trl = vs_trl(args, rows) if args.vs_trl else None
    write_results(args, dict(rows=rows, trl=trl, device=device_name, time_s=time.time() - t0))
    failed = [r for r in rows if r.get("error")]
    for r in failed:
        print(f"error: {r['config']} at batch {r['batch']} failed: {' '.join(r['error'])}", file=sys.stderr)
    return 1 if failed else 0


def write_results(args, results):
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(results, args=vars(args), torch=torch.__version__, date=time.strftime("%Y-%m-%d")), fh,
                      indent=1)


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
    lines, summary = trl_rounds(hydra, trl)
    print("\n".join(lines))
    return dict(trl=trl, hydra=hydra, **summary)


DISTURBED = 0.1  # others_cpu_frac above this: other processes took enough of the cores to contaminate the timings


def trl_rounds(hydra, trl):
    """Each round's ratios, and their medians over the rounds that no other load disturbed (on neither side); when
    every round was disturbed, the medians of all of them, said so. -> (printed lines, summary)."""
    speed = [t["latency_per_sample_s"] / h["latency_per_sample_s"] for h, t in zip(hydra, trl)]
    memory = [h["peak_memory_gb"] * 1024 / t["peak_rss_mib"] for h, t in zip(hydra, trl)]
    disturbed = [max(h["others_cpu_frac"], t["others_cpu_frac"]) > DISTURBED for h, t in zip(hydra, trl)]
    lines = [f"\nTRL {trl[0]['trl']} PPO (peft LoRA policy, separate reward and value models), same workload:"]
    for i, (h, t) in enumerate(zip(hydra, trl)):
        lines.append(f"round {i + 1}: TRL {t['latency_per_sample_s']:.3f} s/sample, peak RSS "
                     f"{t['peak_rss_mib'] / 1024:.2f} GB (other load {t['others_cpu_frac']:.0%}); hydra "
                     f"{h['latency_per_sample_s']:.3f} s/sample, {h['peak_memory_gb']:.2f} GB (other load "
                     f"{h['others_cpu_frac']:.0%}): {speed[i]:.2f}x faster, {memory[i]:.2f} of the peak RSS"
                     + (f" [disturbed: other load above {DISTURBED:.0%}]" if disturbed[i] else ""))
    quiet = [i for i, d in enumerate(disturbed) if not d]
    counted = quiet or list(range(len(speed)))
    what = (f"median of {len(quiet)} quiet round(s)" + (f", {len(speed) - len(quiet)} disturbed left out"
                                                         if len(quiet) < len(speed) else "") if quiet else
            f"median of all {len(speed)} round(s), EVERY ONE DISTURBED by other load (rerun on a quiet machine)")
    med = lambda xs: statistics.median(xs[i] for i in counted)
    lines.append(f"hydra vs TRL, {what}: {med(speed):.2f}x faster per sample, {med(memory):.2f} of its peak RSS.")
    return lines, dict(speedup=speed, memory_ratio=memory, disturbed=disturbed, rounds_counted=[i + 1 for i in counted],
                       median_speedup=med(speed), median_memory_ratio=med(memory))


if __name__ == "__main__":
    sys.exit(main())
