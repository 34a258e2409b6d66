"""hydra-ppo: Hydra-RLHF (Santacroce et al. 2023, "Efficient RLHF: Reducing the Memory Usage of PPO",
arXiv 2309.00754) in one file of plain PyTorch + transformers.

    python hydra_ppo.py sft --model M --data D --out DIR    # Hydra-SFT: one model, an LM head and a reward head
    python hydra_ppo.py SUBCOMMAND --help                     # every flag with its default

Read top to bottom: configuration, the two-head model, data, Hydra-SFT, command line.
"""
import argparse
import json
import math
import os
import random
import sys
import time
import typing
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from lora import add_lora, merge_lora


# ----------------------------------------------------------------------------------------------------------------
# Configuration: one dataclass per stage; every field is a --kebab-case flag with the help text written beside it.

def arg(default, help, **kw):
    return field(default=default, metadata=dict(help=help, **kw))


@dataclass
class Common:
    data: str = arg("data/demo.jsonl", "preference pairs, JSONL: {prompt, chosen, rejected} or Anthropic HH {chosen, rejected}")
    out: str = arg("out/run", "output folder: checkpoint, metrics.jsonl, summary.json")
    seed: int = arg(0, "random seed (data split, init, sampling)")
    device: str = arg("auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    max_prompt_len: int = arg(64, "prompt tokens kept (truncated from the left)")
    max_response_len: int = arg(32, "response tokens kept (SFT) / generated (PPO), EOS included")
    eval_frac: float = arg(0.1, "fraction of pairs held out for evaluation (deterministic with --seed)")
    eval_batch_size: int = arg(32, "batch size for evaluation")
    log_every: int = arg(10, "write a metrics line every N optimizer steps")
    grad_checkpointing: bool = arg(False, "recompute activations in the backward pass (less memory, ~30%% slower)")


@dataclass
class SFTConfig(Common):
    model: str = arg("tiny", "hub name or local folder of a causal LM; 'tiny' / 'tiny-opt': a small random-init "
                             "Llama / OPT with a word-level tokenizer built from --data")
    out: str = arg("out/sft", "output folder: checkpoint, metrics.jsonl, summary.json")
    task: str = arg("hydra", "hydra: LM + reward head jointly (Hydra-SFT); sft: LM loss only; rm: reward loss only",
                    choices=("hydra", "sft", "rm"))
    epochs: float = arg(1.0, "passes over the training pairs (ignored when --steps is set)")
    steps: int = arg(0, "optimizer steps; 0: as many as --epochs gives")
    batch_size: int = arg(16, "preference pairs per optimizer step")
    micro_batch_size: int = arg(16, "pairs per forward pass; batch_size / micro_batch_size = gradient accumulation")
    lr: float = arg(0.0, "AdamW learning rate; 0: 1e-3 for a tiny model, 1e-5 otherwise (paper, full FT: "
                         "5e-7 SFT, 1e-6 RM)")
    weight_decay: float = arg(0.1, "AdamW weight decay (paper: 0.1)")
    max_grad_norm: float = arg(1.0, "gradient clipping")
    lm_coef: float = arg(1.0, "weight of the causal-LM loss on chosen responses (Hydra-SFT; not published)")
    rm_coef: float = arg(1.0, "weight of the pairwise loss -log sigmoid(r_chosen - r_rejected) (not published)")
    lora_r: int = arg(0, "0: full fine-tuning; >0: train LoRA of this rank (+ heads) and merge it at the end")
    lora_alpha: float = arg(16.0, "LoRA alpha (scaling = alpha / r), with --lora-r")


def _flag_type(f):
    t = f.type
    args = [a for a in typing.get_args(t) if a is not type(None)]  # `str | None` -> str
    return args[0] if args else t


def parse_config(cls, argv, prog):
    p = argparse.ArgumentParser(prog=prog, description=cls.__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(cls):
        flag, meta = "--" + f.name.replace("_", "-"), f.metadata
        if f.type is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=meta["help"])
        else:
            p.add_argument(flag, type=_flag_type(f), default=f.default, help=meta["help"], choices=meta.get("choices"))
    return cls(**vars(p.parse_args(argv)))


def check(cond, msg):
    """A user-facing check: a one-line error instead of a traceback (main() prints it and exits 2)."""
    if not cond:
        raise UserError(msg)


class UserError(Exception):
    pass


# ----------------------------------------------------------------------------------------------------------------
# Device and precision (nanoGPT style): bf16 weights + autocast on CUDA, fp32 on CPU. Heads always compute in fp32.

def setup_device(name):
    device = torch.device("cuda" if name == "auto" and torch.cuda.is_available() else
                          "cpu" if name == "auto" else name)
    check(device.type != "cuda" or torch.cuda.is_available(), f"--device {name}: CUDA is not available here")
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else nullcontext
    return device, dtype, autocast


# ----------------------------------------------------------------------------------------------------------------
# The two-head model: one decoder, an LM head (the causal LM's own), a reward head and a value head.

class HydraModel(nn.Module):
    """Wraps any AutoModelForCausalLM. Call it for the decoder's hidden states (one pass), then read any heads:

        h = model(ids, mask)                    # (B, T, H)
        model.logprobs(h, ids, P)               # (B, T-P) log p(ids[:, t] | ids[:, <t]) for t >= P only
        model.values(h, P)                      # (B, T-P) value head, same positions as logprobs
        model.score(h, mask)                    # (B,)     reward head at the last real token
    """

    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        H = lm.get_output_embeddings().in_features  # what the LM head reads (OPT-350m projects 1024 -> 512)
        device = lm.get_output_embeddings().weight.device
        self.reward_head = nn.Linear(H, 1, device=device)  # fp32, whatever the trunk's dtype
        self.value_head = nn.Linear(H, 1, device=device)   # own parameters; PPO copies the reward head into it
        for head in (self.reward_head, self.value_head):   # lm-human-preferences: std 1/sqrt(H+1), bias 0
            nn.init.normal_(head.weight, std=1 / math.sqrt(H + 1))
            nn.init.zeros_(head.bias)

    def forward(self, input_ids, attention_mask):
        # Positions count real tokens only, so a left-padded prompt starts at position 0 like an unpadded one.
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        out = self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 use_cache=False)
        return out.last_hidden_state  # (B, T, H)

    def logprobs(self, hidden, input_ids, start, entropy=False):
        """Log-probs of tokens input_ids[:, start:] (needs start >= 1). Only those positions go through the
        LM head: no (B, T, V) logits for the prompt."""
        h = hidden[:, start - 1:-1]           # (B, R, H): the state at t-1 predicts token t
        labels = input_ids[:, start:]         # (B, R)
        logits = self.lm.get_output_embeddings()(h).float()  # (B, R, V)
        logp = logits.log_softmax(-1)
        lp = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # (B, R)
        if entropy:
            return lp, -(logp.exp() * logp).sum(-1)  # H = -sum_v p log p, (B, R)
        return lp

    def values(self, hidden, start):
        """V(s_t) for each response token t >= start, read at the same positions as logprobs."""
        with torch.autocast(hidden.device.type, enabled=False):
            return self.value_head(hidden[:, start - 1:-1].float()).squeeze(-1)  # (B, R)

    def score(self, hidden, attention_mask):
        """Reward-model score: the reward head at the last real token (works for left and right padding)."""
        T = attention_mask.shape[1]
        last = T - 1 - attention_mask.flip(-1).argmax(-1)  # (B,) index of the last 1 in each row
        h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, H)
        with torch.autocast(hidden.device.type, enabled=False):
            return self.reward_head(h.float()).squeeze(-1)  # (B,)


# ----------------------------------------------------------------------------------------------------------------
# Tokens and padding. One layout everywhere (SFT, rollout, scoring): prompts LEFT-padded to P columns, responses
# RIGHT-padded after them, so every response starts at column P:   [pad pad p p p | r r r EOS pad]

def pad(seqs, pad_id, side):
    """list of token lists -> ids (B, L), mask (B, L); `side` is where the padding goes."""
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(L - len(s), L) if side == "left" else slice(0, len(s))
        ids[i, sl], mask[i, sl] = torch.tensor(s, dtype=torch.long), 1
    return ids, mask


def collate(prompts, responses, pad_id):
    """-> ids (B, P+R), mask (B, P+R), P. Responses (with their EOS) start at column P in every row."""
    p_ids, p_mask = pad(prompts, pad_id, "left")
    r_ids, r_mask = pad(responses, pad_id, "right")
    return torch.cat([p_ids, r_ids], 1), torch.cat([p_mask, r_mask], 1), p_ids.shape[1]


def encode_prompt(tok, text, max_len):
    ids = tok(text)["input_ids"]  # with the tokenizer's BOS, if it adds one
    return ids[-max_len:]         # keep the end of a long prompt: it is what the response answers


def encode_response(tok, text, max_len):
    return tok(text, add_special_tokens=False)["input_ids"][:max_len - 1] + [tok.eos_token_id]


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


# ----------------------------------------------------------------------------------------------------------------
# Preference data: JSONL, one pair per line.

HH_MARKER = "\n\nAssistant:"


def load_pairs(path):
    """-> list of {prompt, chosen, rejected}. Accepts {prompt, chosen, rejected} or Anthropic HH {chosen, rejected}
    (whole transcripts; split at the last "\\n\\nAssistant:", which stays in the prompt)."""
    check(os.path.isfile(path), f"{path}: no such file")
    pairs = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: invalid JSON ({e.msg})") from None
            check(isinstance(row, dict), f"{where}: expected a JSON object, got {type(row).__name__}")
            keys = ("prompt", "chosen", "rejected") if "prompt" in row else ("chosen", "rejected")
            for k in keys:
                check(k in row, f"{where}: missing field {k!r}")
                check(isinstance(row[k], str) and row[k].strip(), f"{where}: field {k!r} is empty or not a string")
            if "prompt" not in row:  # Anthropic HH: the shared transcript up to the last assistant turn is the prompt
                cut = row["chosen"].rfind(HH_MARKER)
                check(cut >= 0, f"{where}: no {HH_MARKER!r} turn in 'chosen' (HH format) and no 'prompt' field")
                prompt = row["chosen"][:cut + len(HH_MARKER)]
                check(row["rejected"].startswith(prompt), f"{where}: 'chosen' and 'rejected' differ before the last "
                                                          f"assistant turn (HH format needs a shared prompt)")
                row = dict(prompt=prompt, chosen=row["chosen"][len(prompt):], rejected=row["rejected"][len(prompt):])
                check(row["chosen"].strip() and row["rejected"].strip(), f"{where}: empty last assistant turn")
            pairs.append(dict(prompt=row["prompt"], chosen=row["chosen"], rejected=row["rejected"]))
    check(pairs, f"{path}: no preference pairs (empty file)")
    return pairs


# The built-in task (data/demo.jsonl): short reviews. The "gold" rule stands in for the human labeller (the paper
# used GPT-4 as judge): gold(review) = #positive words - #negative words. Pairs are two random reviews, the
# higher-gold one marked chosen. The models never see the rule, only the pairs; SFT on the chosen reviews learns
# "somewhat positive", so PPO against the learned reward model has room to do better.
POSITIVE = "good great fine nice lovely superb happy wonderful".split()
NEGATIVE = "bad awful poor boring ugly terrible sad dull".split()
NEUTRAL = "the it was is and very quite so a rather".split()
TOPICS = "film book song meal game hotel phone show album play".split()


def gold_score(text):
    words = text.split()
    return sum(w in POSITIVE for w in words) - sum(w in NEGATIVE for w in words)


def make_demo_pairs(n, seed=0):
    rng = random.Random(seed)

    def review():
        k = rng.randint(4, 10)
        return " ".join(rng.choice(rng.choices([POSITIVE, NEGATIVE, NEUTRAL], weights=[3, 3, 4])[0])
                        for _ in range(k))
    pairs = []
    while len(pairs) < n:
        prompt, a, b = f"review of the {rng.choice(TOPICS)} :", review(), review()
        if gold_score(a) != gold_score(b):  # ties carry no preference
            chosen, rejected = (a, b) if gold_score(a) > gold_score(b) else (b, a)
            pairs.append(dict(prompt=prompt, chosen=chosen, rejected=rejected))
    return pairs


def split_pairs(pairs, eval_frac, seed):
    """Deterministic (train, held_out) split; at least one pair on each side."""
    check(0 < eval_frac < 1, f"--eval-frac must be in (0, 1), got {eval_frac}")
    check(len(pairs) >= 2, f"need at least 2 preference pairs to hold one out, got {len(pairs)}")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_eval = min(max(1, round(len(pairs) * eval_frac)), len(pairs) - 1)
    return [pairs[i] for i in order[n_eval:]], [pairs[i] for i in order[:n_eval]]


# ----------------------------------------------------------------------------------------------------------------
# Models: load a real one, build a tiny one, save and load the checkpoints the stages hand to each other.

def no_dropout(config):
    """Zero every dropout rate in a transformers config (PPO needs deterministic log-probs: ratio 1 at the start)."""
    for k, v in vars(config).items():
        if "dropout" in k and isinstance(v, float):
            setattr(config, k, 0.0)
    return config


def load_lm(name, device, dtype, dropout=True):
    """A causal LM and its tokenizer from a hub name or a local folder."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    try:
        config = AutoConfig.from_pretrained(name)
        tok = AutoTokenizer.from_pretrained(name)
    except OSError as e:
        raise UserError(f"--model {name}: not a local model folder, and it could not be loaded from the hub "
                        f"({str(e).splitlines()[0]})") from None
    if not dropout:
        no_dropout(config)
    lm = AutoModelForCausalLM.from_pretrained(name, config=config, dtype=dtype).to(device)
    if tok.pad_token is None:  # Llama & co. ship none; our masks never rely on the pad id, so EOS is safe
        tok.pad_token = tok.eos_token
    return lm, tok


def build_tiny(name, texts, seed, device):
    """A small random-init model ('tiny': Llama family, 'tiny-opt': OPT family) and a word-level tokenizer
    trained in memory on `texts`. No download: the demo and the tests run offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig, PreTrainedTokenizerFast
    wl = Tokenizer(models.WordLevel(unk_token="<unk>"))
    wl.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    wl.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["<pad>", "<s>", "</s>", "<unk>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=wl, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    ids = dict(vocab_size=len(tok), pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if name == "tiny":
        config = LlamaConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=True, **ids)
    else:
        config = OPTConfig(hidden_size=64, ffn_dim=256, num_hidden_layers=2, num_attention_heads=4,
                           word_embed_proj_dim=64, max_position_embeddings=512, **ids)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).to(device), tok


HEADS_FILE, META_FILE = "heads.pt", "hydra.json"


def save_checkpoint(path, model, tok, meta):
    """A transformers folder (save_pretrained: the LM and tokenizer) plus our heads and what trained them."""
    os.makedirs(path, exist_ok=True)
    model.lm.save_pretrained(path)
    tok.save_pretrained(path)
    heads = {k: v.cpu() for k, v in model.state_dict().items() if k.startswith(("reward_head.", "value_head."))}
    torch.save(heads, os.path.join(path, HEADS_FILE))
    with open(os.path.join(path, META_FILE), "w") as fh:
        json.dump(meta, fh, indent=1)


def load_checkpoint(path, device, dtype, dropout=True):
    """-> (HydraModel, tokenizer, meta) from a folder written by save_checkpoint."""
    check(os.path.isfile(os.path.join(path, META_FILE)), f"{path}: not a hydra-ppo checkpoint (no {META_FILE}); "
                                                         f"make one with `python hydra_ppo.py sft`")
    lm, tok = load_lm(path, device, dtype, dropout)
    model = HydraModel(lm)
    model.load_state_dict(torch.load(os.path.join(path, HEADS_FILE), map_location=device, weights_only=True),
                          strict=False)
    with open(os.path.join(path, META_FILE)) as fh:
        return model, tok, json.load(fh)


def log_line(fh, record):
    fh.write(json.dumps(record) + "\n")
    fh.flush()  # a crash loses nothing already logged


# ----------------------------------------------------------------------------------------------------------------
# Hydra-SFT: one decoder pass over [prompt+chosen ; prompt+rejected] feeds both heads.
#   loss = lm_coef * CE(chosen response tokens) + rm_coef * -log sigmoid(r_chosen - r_rejected)

def sft_batch(tok, pairs, cfg, with_rejected):
    """Rows [0, n): prompt + chosen; rows [n, 2n): prompt + rejected (when with_rejected)."""
    prompts = [encode_prompt(tok, p["prompt"], cfg.max_prompt_len) for p in pairs]
    responses = [encode_response(tok, p["chosen"], cfg.max_response_len) for p in pairs]
    if with_rejected:
        prompts = prompts + prompts
        responses = responses + [encode_response(tok, p["rejected"], cfg.max_response_len) for p in pairs]
    return collate(prompts, responses, tok.pad_token_id)


def sft_loss(model, ids, mask, P, n, lm_coef, rm_coef):
    """-> (loss, stats). n = number of pairs; rows beyond n are the rejected responses."""
    h = model(ids, mask)                                   # (n or 2n, T, H): the only decoder pass
    loss, stats = 0.0, {}
    if lm_coef:
        lm_loss = -masked_mean(model.logprobs(h[:n], ids[:n], P), mask[:n, P:])  # mean CE over chosen tokens
        loss, stats["lm_loss"] = loss + lm_coef * lm_loss, lm_loss.item()
    if rm_coef:
        r = model.score(h, mask)                           # (2n,)
        rm_loss = -F.logsigmoid(r[:n] - r[n:]).mean()      # Bradley-Terry pairwise loss
        loss, stats["rm_loss"] = loss + rm_coef * rm_loss, rm_loss.item()
        stats["rm_acc"] = (r[:n] > r[n:]).float().mean().item()
    return loss, stats


@torch.no_grad()
def evaluate_sft(model, tok, pairs, cfg, device, autocast):
    """Held-out LM loss (token-weighted) on chosen responses and reward-model pairwise accuracy."""
    model.eval()
    lm_sum = lm_tokens = correct = 0.0
    for i in range(0, len(pairs), cfg.eval_batch_size):
        chunk = pairs[i:i + cfg.eval_batch_size]
        ids, mask, P = (t.to(device) if torch.is_tensor(t) else t for t in sft_batch(tok, chunk, cfg, True))
        n = len(chunk)
        with autocast():
            h = model(ids, mask)
            lp = model.logprobs(h[:n], ids[:n], P)
            r = model.score(h, mask)
        lm_sum += -(lp * mask[:n, P:]).sum().item()
        lm_tokens += mask[:n, P:].sum().item()
        correct += (r[:n] > r[n:]).sum().item()
    return dict(lm_loss=lm_sum / lm_tokens, rm_acc=correct / len(pairs))


def sft(cfg: SFTConfig):
    device, dtype, autocast = setup_device(cfg.device)
    check(cfg.batch_size % cfg.micro_batch_size == 0,
          f"--batch-size {cfg.batch_size} must be a multiple of --micro-batch-size {cfg.micro_batch_size}")
    check(cfg.max_prompt_len > 0 and cfg.max_response_len > 1, "--max-prompt-len must be > 0, --max-response-len > 1")
    pairs = load_pairs(cfg.data)
    train, held_out = split_pairs(pairs, cfg.eval_frac, cfg.seed)
    torch.manual_seed(cfg.seed)
    tiny = cfg.model in ("tiny", "tiny-opt")
    if tiny:
        texts = [p[k] for p in pairs for k in ("prompt", "chosen", "rejected")]
        lm, tok = build_tiny(cfg.model, texts, cfg.seed, device)
    else:  # full fine-tuning keeps fp32 master weights (bf16 autocast does the math); LoRA trains on a bf16 trunk
        lm, tok = load_lm(cfg.model, device, dtype if cfg.lora_r else torch.float32)
    model = HydraModel(lm)
    lm_coef = 0.0 if cfg.task == "rm" else cfg.lm_coef
    rm_coef = 0.0 if cfg.task == "sft" else cfg.rm_coef
    if cfg.lora_r:
        add_lora(model.lm, r=cfg.lora_r, alpha=cfg.lora_alpha)  # freezes everything else in the LM
    if not rm_coef:
        model.reward_head.requires_grad_(False)
    model.value_head.requires_grad_(False)  # PPO's head; SFT leaves it alone
    if cfg.grad_checkpointing:
        model.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in model.parameters() if p.requires_grad]
    lr = cfg.lr or (1e-3 if tiny else 1e-5)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    steps = cfg.steps or max(1, math.ceil(cfg.epochs * len(train) / cfg.batch_size))
    os.makedirs(cfg.out, exist_ok=True)

    rng = random.Random(cfg.seed)
    order = []
    t0 = time.time()
    model.train()
    with open(os.path.join(cfg.out, "metrics.jsonl"), "w") as log, \
            tqdm(range(1, steps + 1), desc=f"sft ({cfg.task})", dynamic_ncols=True) as bar:
        for step in bar:
            stats = {}
            for _ in range(cfg.batch_size // cfg.micro_batch_size):  # gradient accumulation
                while len(order) < cfg.micro_batch_size:  # an endless shuffled stream over the training pairs
                    order += rng.sample(range(len(train)), len(train))
                chunk, order = [train[i] for i in order[:cfg.micro_batch_size]], order[cfg.micro_batch_size:]
                ids, mask, P = sft_batch(tok, chunk, cfg, with_rejected=bool(rm_coef))
                with autocast():
                    loss, s = sft_loss(model, ids.to(device), mask.to(device), P, len(chunk), lm_coef, rm_coef)
                (loss * cfg.micro_batch_size / cfg.batch_size).backward()
                for k, v in s.items():
                    stats[k] = stats.get(k, 0.0) + v * cfg.micro_batch_size / cfg.batch_size
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm).item()
            opt.step()
            opt.zero_grad(set_to_none=True)
            bar.set_postfix({k: f"{v:.3f}" for k, v in stats.items()}, refresh=False)
            if step % cfg.log_every == 0 or step == steps:
                log_line(log, dict(step=step, **stats, grad_norm=grad_norm, lr=lr, time=time.time() - t0))

    metrics = evaluate_sft(model, tok, held_out, cfg, device, autocast)
    print(f"held-out ({len(held_out)} pairs): LM loss {metrics['lm_loss']:.3f}"
          + (f", reward-model pairwise accuracy {metrics['rm_acc']:.3f}" if rm_coef else ""))
    if cfg.lora_r:
        merge_lora(model.lm, "default")  # the checkpoint is a plain transformers model again
    if cfg.grad_checkpointing:
        model.lm.gradient_checkpointing_disable()
    save_checkpoint(cfg.out, model, tok, dict(task=cfg.task, base_model=cfg.model))
    summary = dict(stage="sft", task=cfg.task, steps=steps, train_pairs=len(train), held_out_pairs=len(held_out),
                   **{"held_out_" + k: v for k, v in metrics.items()}, time_s=time.time() - t0, config=asdict(cfg))
    with open(os.path.join(cfg.out, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=1)
    print(f"saved checkpoint to {cfg.out}")
    return summary


# ----------------------------------------------------------------------------------------------------------------
# Command line

SUBCOMMANDS = {"sft": (SFTConfig, sft)}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in SUBCOMMANDS:
        print(f"usage: python hydra_ppo.py {{{','.join(SUBCOMMANDS)}}} [--help]", file=sys.stderr)
        return 2
    cls, run = SUBCOMMANDS[argv[0]]
    try:
        cfg = parse_config(cls, argv[1:], prog=f"hydra_ppo.py {argv[0]}")
        run(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
