"""The harness: what running hydra_ppo.py's method for real needs, and nothing of the method itself. The flags and
their checks (SFTConfig, PPOConfig, ...), text to tokens (chat templates, truncation), the preference data formats
and the demo task, models and checkpoints, the lock on a run's folder, data parallel (torchrun), the sft and ppo
commands around hydra_ppo's loops (logs, evaluation, resumable checkpoints), generate and export, the pipeline
(`python hydra_ppo.py` with no command) and the command line. Run it through hydra_ppo.py:

    python hydra_ppo.py                                       # the whole method offline: Hydra-SFT, Hydra-PPO, verdict
    python hydra_ppo.py sft --model M --data D --out DIR      # Hydra-SFT: one model, an LM head and a reward head
    python hydra_ppo.py ppo --mode hydra --sft DIR --data D   # PPO in one of the paper's five configurations (or rloo, grpo)
    python hydra_ppo.py SUBCOMMAND --help                     # every flag with its default (also generate, export)
"""
import argparse
import glob
import gzip
import inspect
import io
import json
import math
import operator
import os
import random
import re
import signal
import sys
import time
import zlib
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
try:
    import fcntl  # POSIX: a run's lock on its --out folder
except ImportError:
    fcntl = None

import torch
from tqdm.auto import tqdm

import hydra_ppo as hp
from hydra_ppo import UserError, check
from lora import LoRALinear, describe_lora, load_lora_state_dict, lora_state_dict, merge_lora


class Interrupted(UserError):
    """Ctrl-C during a stage: its one line says where it stopped and what it kept (a caller may say more)."""


# ----------------------------------------------------------------------------------------------------------------
# Configuration: one dataclass per stage; every field is a --kebab-case flag with the help text written beside it.

def arg(default, help, **kw):
    """A field and its flag. kw: choices, and the allowed range that validate() checks before any work:
    ge / gt / le / lt (>=, >, <=, <), divides="other_field" (other_field must be a multiple of this one), why=
    the reason for a bound that is not obvious (said with the error)."""
    return field(default=default, metadata=dict(help=help, **kw))


# Ceilings that no flag's own range gives, with the reason the error states.
LR_WHY = "a step that large moves every weight further than its own size: the run diverges at once"
SEED_WHY = "the range torch's random generators take"
MAX_SAMPLES = 1024
EVAL_SAMPLES_WHY = "each prompt's k x k response pairs are compared; the win-rate's interval is over prompts"
SAMPLES_WHY = "they are sampled as one batch"


@dataclass
class Common:
    data: str = arg(os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "demo.jsonl"),
                    "preference pairs, JSONL: {prompt, chosen, rejected}, Anthropic HH {chosen, rejected} or TRL's "
                    "conversational format; a file (.jsonl or .jsonl.gz), a folder of them, a comma-separated list, "
                    "or hf:OWNER/REPO/path for a file of a dataset on the Hugging Face hub")
    out: str = arg("out/run", "output folder: checkpoint, metrics.jsonl, summary.json")
    seed: int = arg(0, "random seed (data split, init, sampling)", ge=-2**63, lt=2**63, why=SEED_WHY)
    device: str = arg("auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    precision: str = arg("auto", "auto: bf16 on CUDA, fp32 on CPU; bf16: frozen trunks in bf16 under bf16 autocast, "
                                 "trained weights and AdamW state in fp32 (CUDA's set-up, on any device)",
                         choices=("auto", "fp32", "bf16"))
    max_prompt_len: int = arg(64, "prompt tokens kept (truncated from the left)", ge=1)
    max_response_len: int = arg(32, "response tokens kept (SFT) / generated (PPO), EOS included", ge=1)
    eval_frac: float = arg(0.1, "fraction of pairs held out for evaluation (deterministic with --seed)", gt=0, lt=1)
    eval_batch_size: int = arg(32, "batch size for evaluation", ge=1)
    log_every: int = arg(1, "write a metrics line every N steps", ge=1)
    grad_checkpointing: bool = arg(False, "recompute activations in the backward pass (less memory, one more "
                                          "forward per update pass)")
    chat_template: bool = arg(False, "format prompts with the tokenizer's chat template (HH transcripts become "
                                     "user/assistant turns); the SFT checkpoint records it, and ppo refuses a "
                                     "checkpoint trained with the other setting")
    lora_targets: str = arg("", "comma-separated names: only the decoder layers' linear maps named so get LoRA, "
                                "e.g. q_proj,v_proj (default: every linear map inside the decoder layers)")
    overwrite: bool = arg(False, "write into an --out folder that already holds another run (its files are replaced); "
                                 "without it such a run stops before doing anything")


@dataclass
class SFTConfig(Common):
    """Hydra-SFT: train one model with an LM head and a reward head on preference pairs. --task sft or rm trains one
    head only, for the configurations that keep separate models. `ppo --sft` reads the checkpoint it writes."""
    model: str = arg("tiny", "hub name or local folder of a causal LM; 'tiny' / 'tiny-opt': a small random-init "
                             "Llama / OPT with a word-level tokenizer built from --data")
    out: str = arg("out/sft", "output folder: checkpoint, metrics.jsonl, summary.json")
    task: str = arg("hydra", "hydra: LM + reward head jointly (Hydra-SFT); sft: LM loss only; rm: reward loss only",
                    choices=("hydra", "sft", "rm"))
    epochs: float = arg(1.0, "passes over the training pairs (ignored when --steps is set)", gt=0)
    steps: int = arg(0, "optimizer steps; 0: as many as --epochs gives", ge=0)
    batch_size: int = arg(16, "preference pairs per optimizer step", ge=1)
    micro_batch_size: int = arg(16, "pairs per forward pass; batch_size / micro_batch_size = gradient accumulation",
                                ge=1, divides="batch_size")
    lr: float = arg(0.0, "AdamW learning rate; 0: 1e-3 for a tiny model, 1e-5 otherwise (paper, full FT: "
                         "5e-7 SFT, 1e-6 RM)", ge=0, le=1, why=LR_WHY)
    weight_decay: float = arg(0.1, "AdamW weight decay (paper: 0.1)", ge=0)
    max_grad_norm: float = arg(1.0, "gradient clipping", gt=0)
    lm_coef: float = arg(1.0, "weight of the causal-LM loss on chosen responses (Hydra-SFT; not published)", ge=0)
    rm_coef: float = arg(1.0, "weight of the pairwise loss -log sigmoid(r_chosen - r_rejected) (not published)", ge=0)
    lora_r: int = arg(0, "0: full fine-tuning; >0: train LoRA of this rank (+ heads) and merge it at the end", ge=0)
    lora_alpha: float = arg(16.0, "LoRA alpha (scaling = alpha / r), with --lora-r", gt=0)
    save_every: int = arg(0, "also save the checkpoint every N steps, so a long run stopped early keeps its last one "
                             "(0: only at the end; full fine-tuning only: LoRA is merged at the end)", ge=0)


@dataclass
class PPOConfig(Common):
    """PPO with LoRA from an SFT checkpoint, in one of the paper's five configurations or Hydra without a critic
    (--mode). It writes the policy, metrics.jsonl and summary.json (SFT vs PPO on held-out prompts)."""
    mode: str = arg("hydra", "which models PPO holds (paper, Table 2): hydra | jhydra | dlora | lora | full; beyond "
                             "the paper, Hydra without a critic: rloo | grpo (their advantage estimators)",
                    choices=tuple(hp.MODES))
    sft: str = arg("out/sft", "SFT checkpoint (from `sft`): a Hydra-SFT one for hydra/jhydra, else --task sft or hydra")
    rm: str = arg("", "reward-model checkpoint (--task rm or hydra), needed by dlora, lora and full")
    out: str = arg("out/ppo", "output folder: adapters and heads, metrics.jsonl, summary.json")
    steps: int = arg(20, "PPO iterations (each: one rollout batch, then --ppo-epochs over it)", ge=1)
    batch_size: int = arg(16, "responses per rollout (to batch_size / group size prompts)", ge=1)
    group_size: int = arg(0, "k, responses sampled per prompt, compared by rloo and grpo (0: 4 for them, 1 for the "
                             "PPO modes; k > 1 there samples each prompt k times)", ge=0, divides="batch_size")
    minibatch_size: int = arg(8, "rollouts per optimizer step", ge=1, divides="batch_size")
    micro_batch_size: int = arg(8, "rollouts per forward pass; minibatch / micro = gradient accumulation",
                                ge=1, divides="minibatch_size")
    ppo_epochs: int = arg(1, "passes over each rollout batch (paper: 1)", ge=1)
    actor_lr: float = arg(0.0, "actor learning rate; 0: the mode's default (MODES: LoRA 5e-4, full 5e-7)",
                          ge=0, le=1, why=LR_WHY)
    critic_lr: float = arg(0.0, "critic (and value head) learning rate; 0: the mode's default (MODES: LoRA 5e-4, "
                                "the paper's 5e-5; full 1e-6; rloo, grpo: no critic)", ge=0, le=1, why=LR_WHY)
    lora_r: int = arg(128, "LoRA rank of the actor and critic adapters (paper: 128)", ge=1)
    lora_alpha: float = arg(128.0, "LoRA alpha; scaling = alpha / r = 1 as DeepSpeed-Chat's default (not published)",
                            gt=0)
    kl_coef: float = arg(0.02, "beta of the per-token KL penalty -beta * (logp - ref_logp) (paper: 0.02)", ge=0)
    target_kl: float = arg(0.0, "> 0: adapt beta toward this KL per sequence (Ziegler et al. 2019); 0: fixed beta",
                           ge=0)
    kl_horizon: int = arg(10000, "horizon of the adaptive KL controller, in rollouts", ge=1)
    gamma: float = arg(1.0, "discount", ge=0, le=1)
    lam: float = arg(0.95, "GAE lambda (paper: 0.95)", ge=0, le=1)
    cliprange: float = arg(0.2, "PPO ratio clip epsilon", gt=0)
    cliprange_value: float = arg(0.2, "value clip around the rollout's values", gt=0)
    vf_coef: float = arg(0.1, "weight of the value loss", ge=0)
    max_grad_norm: float = arg(1.0, "gradient clipping over the trained parameters", gt=0)
    temperature: float = arg(1.0, "sampling temperature of rollouts", gt=0)
    top_k: int = arg(0, "top-k sampling (0: off)", ge=0)
    top_p: float = arg(1.0, "nucleus sampling (1.0: off)", gt=0, le=1)
    fold_lora: bool = arg(False, "sample with the actor adapter folded into a copy of the targeted weights: one "
                                 "matmul per layer and token instead of three, for the memory of that copy")
    missing_eos_penalty: float = arg(0.0, "subtracted from the score of responses that never emit EOS (0: off; "
                                          "after --reward-norm, so in its units)", ge=0)
    score_clip: float = arg(0.0, "clip reward-model scores to [-c, c] (0: off; after --reward-norm)", ge=0)
    whiten_rewards: bool = arg(False, "whiten the per-token rewards of each batch (without shifting the mean)")
    reward_norm: bool = arg(True, "scores as (score - mean) / std, the mean and std of the reward model on the first "
                                  "rollout (the SFT policy's); the value head starts so normalised too (Ziegler et al. "
                                  "2019; the paper: --no-reward-norm)")
    eval_every: int = arg(0, "evaluate on held-out prompts every N steps (0: only at the end)", ge=0)
    eval_prompts: int = arg(64, "held-out prompts used by each evaluation", ge=1)
    eval_samples: int = arg(1, "responses per held-out prompt from each policy; more narrow the win-rate's interval",
                            ge=1, le=MAX_SAMPLES, why=EVAL_SAMPLES_WHY)
    save_every: int = arg(10, "write a resumable checkpoint (OUT/state.pt) every N steps (0: only at the end)",
                         ge=0)
    resume: str = arg("", "continue the run in this folder from its last checkpoint, with its saved configuration "
                          "(--steps may make it longer; --device, --precision, --actor-lr, --critic-lr, --score-clip, "
                          "--max-grad-norm may change; other flags are refused)")
    max_bad_steps: int = arg(3, "stop after this many steps in a row whose updates all had a non-finite loss or "
                                "gradient", ge=1)


# ----------------------------------------------------------------------------------------------------------------
# Device and precision: --device and --precision -> hp.Run.

def setup_device(name, precision="auto", rank=0, world=1):
    """-> Run. name: auto (cuda if available, else cpu), cpu, cuda, cuda:N."""
    try:
        device = torch.device("cuda" if name == "auto" and torch.cuda.is_available() else
                              "cpu" if name == "auto" else name)
    except (RuntimeError, ValueError):
        device = None
    check(device is not None and device.type in ("cpu", "cuda"), f"--device {name}: not a device; use auto, cpu, "
                                                                  f"cuda or cuda:N")
    check(device.type != "cpu" or device.index in (None, 0), f"--device {name}: no such device; the CPU is one "
                                                             f"device, cpu (its cores are threads, not devices)")
    check(device.type != "cuda" or (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()),
          f"--device {name}: no such CUDA device here ({torch.cuda.device_count()} visible; torchrun: no more ranks "
          f"per node than devices)")
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else nullcontext
    return hp.Run(device, torch.bfloat16 if bf16 else torch.float32, autocast, rank, world)




def check_positions(lm, prompt_len, response_len, where):
    """Prompt and response must fit the positions the model has: past them a learned position table (OPT) fails
    with an index error and rotary models (Llama) read positions they were never trained on."""
    n = getattr(lm.config, "max_position_embeddings", None)
    check(n is None or prompt_len + response_len <= n, f"{where}: {prompt_len} + {response_len} tokens, more than "
                                                       f"the model's {n} positions")




# ----------------------------------------------------------------------------------------------------------------
# Flags: parsed from the config dataclasses, checked against the ranges declared beside each field.

def parse_config(cls, argv, prog, commands=""):
    """-> cls from the command line. --help opens with the class's docstring (then `commands`, the top level's list
    of subcommands), and shows the project's own files by their path in the project (data/demo.jsonl)."""
    project = os.path.dirname(os.path.abspath(__file__))
    shown = lambda v: os.path.relpath(v, project) if isinstance(v, str) and v.startswith(project + os.sep) else v

    def parser(suppress):  # suppress: a flag not given stays out of the result, instead of taking its default
        p = argparse.ArgumentParser(prog=prog, usage="%(prog)s " + ("[COMMAND] " if commands else "") + "[--flags]",
                                    description=inspect.cleandoc(cls.__doc__) + commands, formatter_class=HelpFormatter)

        def error(message):  # argparse prints the usage and the error; one line is enough, --help has the rest
            raise UserError(f"{prog}: {message} (see --help)")
        p.error = error
        for f in fields(cls):
            flag, meta = "--" + f.name.replace("_", "-"), f.metadata
            default = argparse.SUPPRESS if suppress else shown(f.default)
            if f.type is bool:
                p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=meta["help"])
            else:
                p.add_argument(flag, type=f.type, default=default, help=meta["help"], choices=meta.get("choices"))
        return p
    parser(False).parse_args(argv)  # --help, and errors
    given = vars(parser(True).parse_args(argv))
    cfg = cls(**given)  # a flag not given: the field's own default
    cfg.given = set(given)  # not a field; `ppo --resume` reads it (20 given is not the same as 20 by default)
    return cfg


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults beside each flag; the description as written (the list of subcommands keeps its lines)."""


def utf8(text):
    """Whether text can be written out as UTF-8: a lone surrogate (from a JSON "\\ud800" escape, or an argument
    whose bytes are not UTF-8) cannot, and fails later in a tokenizer or a print."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


BOUNDS = {"ge": (">=", operator.ge), "gt": (">", operator.gt), "le": ("<=", operator.le), "lt": ("<", operator.lt)}


def validate(cfg):
    """Every flag of a config against the range declared beside its field, before anything is loaded or written:
    a bad one stops the command with one line naming the flag and what it allows. (Checks that need files, such
    as whether --sft is a checkpoint, come later, still before any training.)"""
    for f in fields(cfg):
        value, flag = getattr(cfg, f.name), "--" + f.name.replace("_", "-")
        why = f" ({f.metadata['why']})" if "why" in f.metadata else ""
        check(not isinstance(value, float) or not math.isnan(value), f"{flag} {value}: not a number")
        for key, (sign, ok) in BOUNDS.items():
            if key in f.metadata:
                check(ok(value, f.metadata[key]), f"{flag} {value}: must be {sign} {f.metadata[key]}{why}")
        check(not isinstance(value, float) or math.isfinite(value), f"{flag} {value}: must be a finite number")
        check(not isinstance(value, int) or abs(value) < 2**63, f"{flag} {value}: more than a 64-bit integer holds")
        check(not isinstance(value, str) or utf8(value), f"{flag} {ascii(value)}: not text (a lone surrogate: on the "
                                                          f"command line, a byte that is not UTF-8)")
        if "divides" in f.metadata and value:  # 0: auto (--group-size), checked where it is resolved
            whole = getattr(cfg, f.metadata["divides"])
            check(whole % value == 0, f"--{f.metadata['divides'].replace('_', '-')} {whole} must be a multiple of "
                                      f"{flag} {value}")
    if hasattr(cfg, "device"):
        setup_device(cfg.device)  # a device that is not one, or not here


# ----------------------------------------------------------------------------------------------------------------
# Text to tokens: prompts (plain, HH transcripts, chat messages) and responses, in hydra_ppo's token layout.

HH_MARKER = "\n\nAssistant:"


def hh_text(messages):
    """Messages as an HH transcript for a model without a chat template: "\n\nHuman: ...\n\nAssistant:"."""
    names = dict(user="Human", assistant="Assistant")
    return "".join(f"\n\n{names.get(m['role'], m['role'].capitalize())}: {m['content']}" for m in messages) + HH_MARKER


def to_messages(prompt):
    """An HH transcript ("\n\nHuman: ...\n\nAssistant: ...\n\nAssistant:") as chat turns; other text: one user turn."""
    parts = re.split(r"\n\n(Human|Assistant):", prompt)  # [before, role, text, role, text, ...]
    if len(parts) < 3:
        return [dict(role="user", content=prompt.strip())]
    turns = [dict(role="user" if r == "Human" else "assistant", content=t.strip())
             for r, t in zip(parts[1::2], parts[2::2])]
    return turns[:-1] if turns[-1] == dict(role="assistant", content="") else turns  # the open turn is generated


def chat_ids(tok, messages):
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]  # the template writes its own BOS


def needs_chat_template(tok):
    check(getattr(tok, "chat_template", None), "--chat-template: this tokenizer has no chat template")


def end_turns_as_the_template(tok):
    """--chat-template: a response must end with the token the template closes an assistant turn with (ChatML's
    <|im_end|>, Llama-3's <|eot_id|>), and the tokenizer's EOS may be another one (Llama-3: <|end_of_text|>). That
    token becomes the EOS that SFT appends and sampling stops at; the SFT checkpoint saves the tokenizer so, and
    ppo and generate read it from there."""
    needs_chat_template(tok)
    mark = "Hydra-PPO reply"
    try:
        text = tok.apply_chat_template([dict(role="user", content="x"), dict(role="assistant", content=mark)],
                                       tokenize=False)
    except Exception:  # noqa: BLE001 (a template that will not end on an assistant turn: keep the tokenizer's EOS)
        return tok
    if mark not in text:  # a template that rewrites the reply: the end of the turn cannot be found
        return tok
    after = tok(text[text.rindex(mark) + len(mark):], add_special_tokens=False)["input_ids"]
    special = [i for i in after if i in tok.added_tokens_decoder and tok.added_tokens_decoder[i].special]
    if special and special[0] != tok.eos_token_id:
        print(f"--chat-template: responses end with {tok.convert_ids_to_tokens(special[0])}, the template's end of an "
              f"assistant turn (the tokenizer's EOS was {tok.eos_token})")
        tok.eos_token = tok.convert_ids_to_tokens(special[0])
    return tok


def encode_chat(tok, messages, max_len):
    """The conversation through the chat template, cut to max_len tokens without cutting the template's own
    tokens (a prompt that lost its <|im_start|> is not one the chat model was trained on): the oldest turns go first
    (a system message stays), then the oldest remaining turn loses text from its start."""
    needs_chat_template(tok)
    n_system = 1 if messages[0]["role"] == "system" else 0
    system, turns = messages[:n_system], messages[n_system:]
    ids = chat_ids(tok, system + turns)
    while len(ids) > max_len and len(turns) > 1:
        turns = turns[1:]
        while len(turns) > 1 and turns[0]["role"] != "user":  # templates expect a user turn first
            turns = turns[1:]
        ids = chat_ids(tok, system + turns)
    if len(ids) <= max_len:
        return ids
    last = turns[0]  # still too long with one turn left: cut its text
    own = len(chat_ids(tok, system + [dict(last, content="")]))  # the template's tokens around the text
    check(own < max_len, f"--max-prompt-len {max_len} is shorter than the chat template's own {own} tokens")
    text = tok(last["content"], add_special_tokens=False)["input_ids"]
    for keep in range(max_len - own, 0, -1):  # decoding and re-encoding can merge tokens differently: re-check
        ids = chat_ids(tok, system + [dict(last, content=tok.decode(text[-keep:]))])
        if len(ids) <= max_len:
            return ids
    raise UserError(f"--max-prompt-len {max_len} leaves no room for the conversation's text")


def encode_prompt(tok, prompt, max_len, chat=False):
    """A prompt (text, or a list of {role, content} messages from conversational data) -> at most max_len ids.
    A long prompt keeps its end: it is what the response answers."""
    if chat:
        ids = encode_chat(tok, prompt if isinstance(prompt, list) else to_messages(prompt), max_len)
    else:
        text = prompt if isinstance(prompt, str) else hh_text(prompt)
        ids = tok(text)["input_ids"][-max_len:]  # with the tokenizer's BOS, if it adds one
    check(ids, f"the prompt {str(prompt)[:50]!r} tokenizes to nothing")
    return ids


def encode_response(tok, text, max_len, chat=False):
    """-> at most max_len ids: the response and its EOS, or, when that does not fit, its first max_len tokens and no
    EOS (an EOS after a cut would teach the model to stop mid-sentence). With a chat template the text loses its
    leading space: HH's "Assistant: text" has one, but after the template's assistant header a chat model writes
    "text", and a response that starts with a space is one it finds unlikely."""
    ids = tok(text.lstrip() if chat else text, add_special_tokens=False)["input_ids"]
    return ids + [tok.eos_token_id] if len(ids) < max_len else ids[:max_len]


def prompt_batch(tok, prompts, cfg, device):
    """Prompt strings -> left-padded ids (B, P) and mask (B, P) on `device`, as generation expects."""
    ids, mask = hp.pad([encode_prompt(tok, p, cfg.max_prompt_len, cfg.chat_template) for p in prompts],
                    tok.pad_token_id, "left")
    return ids.to(device), mask.to(device)


def count_truncated(tok, pairs, cfg):
    """How many prompts and responses (chosen and rejected) of `pairs` encode_prompt / encode_response cut."""
    prompts = sum(len(encode_prompt(tok, p["prompt"], 10 ** 9, cfg.chat_template)) > cfg.max_prompt_len
                  for p in pairs)
    responses = sum(encode_response(tok, p[k], cfg.max_response_len, cfg.chat_template)[-1] != tok.eos_token_id
                    for p in pairs for k in ("chosen", "rejected"))  # a cut response ends without its EOS
    return prompts, responses


# ----------------------------------------------------------------------------------------------------------------
# Preference data: JSONL, one pair per line; the built-in demo task.

def from_conversation(row, where):
    """TRL's conversational preference format -> {prompt: messages, chosen: text, rejected: text}. `chosen` and
    `rejected` are lists of {role, content} messages ending in one assistant message; the prompt is the `prompt`
    list, or, without one, the messages both share. The prompt stays a list of messages (a chat template formats
    it as such; without one, hh_text writes it as an HH transcript); the replies become HH-style " text"."""
    for k in ("chosen", "rejected") + (("prompt",) if "prompt" in row else ()):
        check(k in row, f"{where}: missing field {k!r}")
        check(isinstance(row[k], list) and row[k] and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in row[k]), f"{where}: field {k!r} is not a list of {{role, content}} messages")
    if "prompt" in row:
        prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    else:  # implicit prompt: the messages before the first difference
        n = 0
        while n < min(len(row["chosen"]), len(row["rejected"])) and row["chosen"][n] == row["rejected"][n]:
            n += 1
        check(n > 0, f"{where}: 'chosen' and 'rejected' share no prompt message (and there is no 'prompt' field)")
        prompt, chosen, rejected = row["chosen"][:n], row["chosen"][n:], row["rejected"][n:]
    for k, reply in (("chosen", chosen), ("rejected", rejected)):
        check(len(reply) == 1 and reply[0]["role"] == "assistant" and reply[0]["content"].strip(),
              f"{where}: {k!r} must be one non-empty assistant message after the prompt")
    reply = lambda messages: " " + messages[0]["content"].lstrip()
    return dict(prompt=prompt, chosen=reply(chosen), rejected=reply(rejected))


def data_files(spec):
    """--data -> the files it names: a JSONL file (`.jsonl.gz`: gzip, as HH-RLHF is published), a folder (its
    *.jsonl and *.jsonl.gz, not its subfolders), a comma-separated list of these, or hf:OWNER/REPO/PATH, a file of
    a dataset on the Hugging Face hub (downloaded once into the hub's cache; HF_HUB_OFFLINE=1 reads only the cache)."""
    files = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if part.startswith("hf:"):
            owner, repo, name = (part[3:].split("/", 2) + ["", ""])[:3]
            check(owner and repo and name, f"--data {part}: expected hf:OWNER/REPO/path/in/repo")
            from huggingface_hub import hf_hub_download
            try:
                files.append(hf_hub_download(f"{owner}/{repo}", name, repo_type="dataset"))
            except Exception as e:  # offline, not cached, no such repo or file, gated: whatever the hub says, one line
                raise UserError(f"--data {part}: could not get it from the hub ({type(e).__name__}: "
                                f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
        elif os.path.isdir(part):
            found = sorted(glob.glob(os.path.join(part, "*.jsonl")) + glob.glob(os.path.join(part, "*.jsonl.gz")))
            check(found, f"{part}: a folder with no *.jsonl or *.jsonl.gz file in it")
            files += found
        else:
            files.append(part)
    check(files, f"--data {spec!r}: names no file")
    return files


def open_data(path):
    """A data file as binary lines; a .gz file is decompressed whole first, so that a damaged one is one line."""
    if not path.endswith(".gz"):
        return open(path, "rb")
    try:
        with gzip.open(path, "rb") as fh:
            return io.BytesIO(fh.read())
    except (OSError, EOFError, zlib.error) as e:  # not gzip, or cut short
        raise UserError(f"{path}: not a readable gzip file ({e})") from None


def load_pairs(path):
    """-> list of {prompt, chosen, rejected}. Accepts {prompt, chosen, rejected} or Anthropic HH {chosen, rejected}
    (whole transcripts; split at the last "\\n\\nAssistant:", which stays in the prompt), and TRL's conversational
    format (lists of {role, content} messages, see from_conversation). `path`: whatever data_files accepts."""
    files = data_files(path)
    if files != [path]:  # several files, a folder or the hub: their pairs in order
        return [pair for f in files for pair in load_pairs(f)]
    check(os.path.exists(path), f"{path}: no such file")
    check(os.path.isfile(path), f"{path}: not a regular file (a pipe or a device); save the data to a file")
    pairs = []
    with open_data(path) as fh:  # bytes, so a line that is not UTF-8 can be named
        for n, raw in enumerate(fh, 1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # a byte-order mark may open the file
            except UnicodeDecodeError as e:
                raise UserError(f"{where}: not UTF-8 text (byte {e.start + 1} of the line); save the file as UTF-8")
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: invalid JSON ({e.msg})") from None
            except RecursionError:
                raise UserError(f"{where}: JSON nested too deeply to read") from None
            check(isinstance(row, dict), f"{where}: expected a JSON object, got {type(row).__name__}")
            check("\\u" not in line or utf8(json.dumps(row, ensure_ascii=False)),  # only a \u escape can make one
                  f"{where}: a lone surrogate escape (such as \\ud800): not text a tokenizer can read")
            if isinstance(row.get("chosen"), list):
                pairs.append(from_conversation(row, where))
                continue
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


def split_pairs(pairs, eval_frac, seed):
    """Deterministic (train, held_out) split; at least one pair on each side."""
    check(0 < eval_frac < 1, f"--eval-frac must be in (0, 1), got {eval_frac}")
    check(len(pairs) >= 2, f"need at least 2 preference pairs to hold one out, got {len(pairs)}")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_eval = min(max(1, round(len(pairs) * eval_frac)), len(pairs) - 1)
    return [pairs[i] for i in order[n_eval:]], [pairs[i] for i in order[:n_eval]]


# The built-in task (data/demo.jsonl): short reviews. The "gold" rule stands in for the human labeller (the paper
# used GPT-4 as judge); it scores what a person reading the review would: each distinct positive word +1 (at most
# GOLD_MAX_POSITIVE of them: a longer list stops paying), each distinct negative word -1, and -1 for every repeat of a
# sentiment word ("great great"), every glued word ("finefine", "verygood") and every non-word ("g00d"). Pairs are
# two random reviews, the higher-gold one marked chosen. The models never see the rule, only the pairs; SFT on the
# chosen reviews learns "somewhat positive", so PPO against the learned reward model has room to do better.
POSITIVE = "good great fine nice lovely superb happy wonderful".split()
NEGATIVE = "bad awful poor boring ugly terrible sad dull".split()
NEUTRAL = "the it was is and very quite so a rather".split()
TOPICS = "film book song meal game hotel phone show album play".split()
GOLD_MAX_POSITIVE = 4
GLUED = re.compile("(?:%s){2,}" % "|".join(POSITIVE + NEGATIVE + NEUTRAL))  # two or more task words run together


HH_REQUESTS = ["\n\nHuman: Write a short review of the {}.\n\nAssistant:",
               "\n\nHuman: What did you think of the {}?\n\nAssistant:",
               "\n\nHuman: I tried the new {} yesterday.\n\nAssistant: How was it?\n\nHuman: Write me a short "
               "review of it, please.\n\nAssistant:"]


def gold_score(text):
    """The gold rule on one review: words are runs of letters and digits, case ignored ("Great!" is "great")."""
    seen, penalty = set(), 0
    for w in re.findall(r"[a-z0-9]+", text.lower()):
        if w in POSITIVE or w in NEGATIVE:
            penalty += w in seen
            seen.add(w)
        else:
            penalty += not w.isalpha() or (w not in NEUTRAL and GLUED.fullmatch(w) is not None)
    return min(len(seen & set(POSITIVE)), GOLD_MAX_POSITIVE) - len(seen & set(NEGATIVE)) - penalty


def make_demo_pairs(n, seed=0, hh=False):
    """n labelled pairs of the review task. hh: as Anthropic-HH transcripts instead ({chosen, rejected}, the prompt
    a one- or two-turn request for a review, each response after "Assistant:" with HH's leading space), for
    --chat-template runs (data/hh_reviews.jsonl)."""
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
            if hh:
                prompt = rng.choice(HH_REQUESTS).format(prompt.split()[-2])
                chosen, rejected = prompt + " " + chosen, prompt + " " + rejected
                pairs.append(dict(chosen=chosen, rejected=rejected))
                continue
            pairs.append(dict(prompt=prompt, chosen=chosen, rejected=rejected))
    return pairs


# ----------------------------------------------------------------------------------------------------------------
# Models: load a real one, build a tiny one, save and load the checkpoints the stages hand to each other.

def no_dropout(config):
    """Zero every dropout rate in a transformers config: attention_dropout, GPT-2's resid_pdrop, OPT's layerdrop...
    PPO needs the update's forward in train() to equal the rollout's in eval(): ratio exactly 1 before a step."""
    for k, v in vars(config).items():
        if "drop" in k and isinstance(v, float):
            setattr(config, k, 0.0)
    return config


def load_tokenizer(name):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(name)
    if tok.pad_token is None:  # Llama & co. ship none; our masks never rely on the pad id, so EOS is safe
        tok.pad_token = tok.eos_token
    return tok


def load_lm(name, device, dtype, dropout=True):
    """A causal LM and its tokenizer from a hub name or a local folder."""
    from transformers import AutoConfig, AutoModelForCausalLM
    try:
        config = AutoConfig.from_pretrained(name)
        tok = load_tokenizer(name)
    except (OSError, ValueError, KeyError) as e:  # no such folder or hub name / a model type transformers lacks
        raise UserError(f"--model {name}: could not load its config and tokenizer "
                        f"({str(e).strip().splitlines()[0]})") from None
    if not dropout:
        no_dropout(config)
    try:
        lm = AutoModelForCausalLM.from_pretrained(name, config=config, dtype=dtype)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as e:  # missing or damaged weights: OSError, safetensors' own error, ...
        raise UserError(f"{name}: could not load the model's weights "
                        f"({(str(e).strip().splitlines() or [''])[0][:150]})") from None
    return lm.to(device), tok


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


# ---- files a user keeps: read with a one-line error, write only where asked ----

HEADS_FILE, META_FILE, POLICY_FILE, RUN_FILE, STATE_FILE = "heads.pt", "hydra.json", "policy.pt", "run.json", "state.pt"


def read_file(path, load):
    """load(path), or one line naming the file when it is missing or damaged (truncated, not what it should be)."""
    check(os.path.isfile(path), f"{path}: missing")
    try:
        return load(path)
    except Exception as e:  # torch.load / json / safetensors each fail their own way on a damaged file
        raise UserError(f"{path}: damaged or not what it should be ({type(e).__name__}: "
                        f"{(str(e).strip().splitlines() or [''])[0][:100]})") from None


def read_json(path):
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def write_json(path, obj):
    """Written to a temporary file and renamed: a crash leaves the old file or the new one, never half of one."""
    with open(path + ".tmp", "w") as fh:
        json.dump(obj, fh, indent=1)
    os.replace(path + ".tmp", path)


def log_line(fh, record):
    fh.write(json.dumps(record) + "\n")
    fh.flush()  # a crash loses nothing already logged


OWNED = {}  # (st_dev, st_ino) of each folder this process has locked -> the open descriptor that holds the lock


def lock_holder(st):
    """The process that holds the flock on the file with os.stat result `st`, from Linux's /proc/locks
    ("1: FLOCK ADVISORY WRITE <pid> <major>:<minor>:<inode> 0 EOF"); None where that cannot be read."""
    where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as fh:
            return next((f[4] for f in map(str.split, fh) if f[1:2] == ["FLOCK"] and f[5:6] == [where]), None)
    except OSError:
        return None


def own_folder(path, flag="--out"):
    """An exclusive lock on the folder until the command ends (release_folders), so that two runs never write into
    one folder: flock on the folder itself (no lock file to leave behind; the kernel drops it when the process dies,
    kill -9 included). Taking it again in the same process does nothing."""
    st = os.stat(path)
    if (st.st_dev, st.st_ino) in OWNED or fcntl is None:  # Windows: no flock; runs there are not guarded
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        pid = lock_holder(st)
        raise UserError(f"{flag} {path} is in use by another run{f' (process {pid})' if pid else ''}; wait for it "
                        f"to end, or choose another {flag}") from None
    OWNED[(st.st_dev, st.st_ino)] = fd


def release_folders():
    """Drop every folder lock this process holds, at the end of a command (main): a long-lived process (a notebook,
    the tests) must not keep a finished run's folder locked."""
    for fd in OWNED.values():
        os.close(fd)
    OWNED.clear()


def check_apart(out, inputs):
    """--out must neither be nor hold an input of the same command ({flag: path}): writing there would replace the
    input, or mix the output into it (a PPO run inside the SFT checkpoint that is its own reference)."""
    where = os.path.realpath(out)
    for flag, path in inputs.items():
        if path and not path.startswith("hf:") and os.path.exists(path):
            p = os.path.realpath(path)
            check(p != where and not p.startswith(where + os.sep), f"--out {out} {'is' if p == where else 'holds'} "
                                                                   f"{flag} {path}: choose another --out")


def local_inputs(cfg):
    """{flag: path} of what a command reads from disk: --data's files and folders, --model, --sft, --rm, --run."""
    inputs = {f"--data {p}": p for p in (p.strip() for p in getattr(cfg, "data", "").split(",")) if p}
    return {**inputs, **{f"--{k}": getattr(cfg, k) for k in ("model", "sft", "rm", "run") if getattr(cfg, k, "")}}


def claim_out(path, overwrite, stale=(), inputs=None):
    """Checks an output folder before any work; creates nothing. It must be a folder we can write, be and hold none
    of the command's `inputs` ({flag: path}), and hold no other run's files unless --overwrite, which first deletes
    `stale` (names or glob patterns of files that would pass two runs off as one). A folder that exists is locked
    first (own_folder); a run that creates its folder later calls make_out."""
    check(path, "--out is empty: name an output folder")
    check_apart(path, inputs or {})
    if os.path.islink(path) and not os.path.exists(path):
        raise UserError(f"--out {path}: a broken symbolic link (to {os.readlink(path)}); remove it or name a folder")
    check(not os.path.isfile(path), f"--out {path}: a file, not a folder")
    check(not os.path.exists(path) or os.path.isdir(path), f"--out {path}: not a folder (a pipe or a device)")
    if os.path.isdir(path):
        own_folder(path)
    held = sorted(os.listdir(path)) if os.path.isdir(path) else []
    if held:
        check(overwrite, f"--out {path} already holds another run ({', '.join(held[:3])}{', ...' * (len(held) > 3)});"
                         f" choose another --out, --overwrite to replace it" +
                         (f", or `ppo --resume {path}` to continue it" if RUN_FILE in held else ""))
        for name in stale:
            for f in glob.glob(os.path.join(glob.escape(path), name)):
                if os.path.isfile(f):
                    os.remove(f)
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    check(os.path.isdir(parent) and os.access(parent, os.W_OK), f"--out {path}: cannot write there ({parent} is not "
                                                                 f"a writable folder)")


def make_out(path, overwrite, claim=True):
    """Create the output folder, then (claim) claim_out again now that it exists: locked, and still empty unless
    --overwrite."""
    os.makedirs(path, exist_ok=True)
    if claim:
        claim_out(path, overwrite)


@contextmanager
def on_interrupt(where):
    """Ctrl-C inside the block: one line, `interrupted <where()>` (the step, and what still holds), no traceback."""
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted {where()}") from None


@contextmanager
def uninterrupted():
    """Ctrl-C waits until the block is done, so a checkpoint is never left half written."""
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield  # not the main thread's default handler (a worker thread, a caller's own handler): leave it alone
        return
    pressed = []
    signal.signal(signal.SIGINT, lambda *_: pressed.append(1))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if pressed:
            raise KeyboardInterrupt


def save_checkpoint(path, model, tok, meta):
    """A transformers folder (save_pretrained: the LM and tokenizer) plus our heads and what trained them."""
    os.makedirs(path, exist_ok=True)
    model.lm.save_pretrained(path)
    tok.save_pretrained(path)
    heads = {k: v.cpu() for k, v in model.state_dict().items() if k.startswith(("reward_head.", "value_head."))}
    torch.save(heads, os.path.join(path, HEADS_FILE))
    write_json(os.path.join(path, META_FILE), meta)


def read_meta(path, flag=""):
    """A checkpoint's META_FILE (what trained it), or one line saying that `path` is not a checkpoint."""
    where, meta_file = f"{flag} {path}".strip(), os.path.join(path, META_FILE)
    check(os.path.exists(path), f"{where}: not found")
    check(os.path.isfile(meta_file), f"{where}: not a hydra-ppo checkpoint (no {META_FILE}); make one with "
                                     f"`python hydra_ppo.py sft`")
    return read_file(meta_file, read_json)


def load_checkpoint(path, device, dtype, dropout=True):
    """-> (HydraModel, tokenizer, meta) from a folder written by save_checkpoint."""
    meta = read_meta(path)
    heads = read_file(os.path.join(path, HEADS_FILE), lambda p: torch.load(p, map_location=device, weights_only=True))
    lm, tok = load_lm(path, device, dtype, dropout)
    model = hp.HydraModel(lm)
    check_heads(heads, model, os.path.join(path, HEADS_FILE))
    model.load_state_dict(heads, strict=False)
    return model, tok, meta


def check_heads(heads, model, path):
    """A heads file must hold exactly the model's reward and value heads, in its shapes: a head left out would
    stay randomly initialised, and PPO would train against a random reward without a word."""
    need = {k: v.shape for k, v in model.state_dict().items() if k.startswith(("reward_head.", "value_head."))}
    check(isinstance(heads, dict), f"{path}: holds a {type(heads).__name__}, not the model's heads")
    missing, extra = [k for k in need if k not in heads], [k for k in heads if k not in need]
    check(not missing, f"{path}: no {', '.join(missing)} (holds {len(heads)} entries; damaged?)")
    check(not extra, f"{path}: unexpected {', '.join(map(str, extra[:3]))} (not this model's heads)")
    for k, shape in need.items():
        check(isinstance(heads[k], torch.Tensor), f"{path}: {k} is of type {type(heads[k]).__name__}, not a tensor")
        check(heads[k].shape == shape, f"{path}: {k} has shape {tuple(heads[k].shape)}; this model needs "
                                       f"{tuple(shape)}")


# ----------------------------------------------------------------------------------------------------------------
# Data parallel: `torchrun --nproc_per_node N hydra_ppo.py ...`. Each rank trains on its own shard of every batch
# (prompts for PPO, pairs for SFT); the gradients of the trained parameters are averaged (an all-reduce per trained
# tensor) before every optimizer step; metrics are averaged; only rank 0 prints and writes files. Without torchrun
# (no WORLD_SIZE in the environment) rank = 0, world = 1 and every function below does nothing.

def init_distributed(device):
    """-> (rank, world, device). NCCL on GPUs (one per rank: cuda:LOCAL_RANK), gloo on CPU."""
    import torch.distributed as dist
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if dist.get_rank() > 0:
        sys.stdout = open(os.devnull, "w")  # only rank 0 prints (errors still reach stderr)
    return dist.get_rank(), world, device


def ranks_in_sync(params):
    """True when every rank holds the same trained weights (compares a fingerprint of them across ranks)."""
    import torch.distributed as dist
    if not dist.is_initialized():
        return True
    fp = torch.stack([torch.stack([p.detach().sum(dtype=torch.float64), p.detach().abs().sum(dtype=torch.float64)])
                      for p in params])  # (n_params, 2), one tensor at a time: no copy of all the weights
    fp = fp.cuda() if dist.get_backend() == "nccl" else fp.cpu()
    everyone = [torch.zeros_like(fp) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, fp)
    return all(torch.equal(everyone[0], x) for x in everyone)


def barrier():
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------------------------------------------
# The sft command: the Hydra-SFT loop.

def collate(prompts, responses, pad_id):
    """-> ids (B, P+R), mask (B, P+R), P in hydra_ppo's token layout: responses (with their EOS) start at column P."""
    p_ids, p_mask = hp.pad(prompts, pad_id, "left")
    r_ids, r_mask = hp.pad(responses, pad_id, "right")
    return torch.cat([p_ids, r_ids], 1), torch.cat([p_mask, r_mask], 1), p_ids.shape[1]


def sft_batch(tok, pairs, cfg, with_rejected):
    """Rows [0, n): prompt + chosen; rows [n, 2n): prompt + rejected (when with_rejected)."""
    prompts = [encode_prompt(tok, p["prompt"], cfg.max_prompt_len, cfg.chat_template) for p in pairs]
    responses = [encode_response(tok, p["chosen"], cfg.max_response_len, cfg.chat_template) for p in pairs]
    if with_rejected:
        prompts = prompts + prompts
        responses = responses + [encode_response(tok, p["rejected"], cfg.max_response_len, cfg.chat_template)
                                 for p in pairs]
    return collate(prompts, responses, tok.pad_token_id)


@torch.no_grad()
def evaluate_sft(model, tok, pairs, cfg, run):
    """Held-out LM loss (token-weighted) on chosen responses and reward-model pairwise accuracy; only what cfg.task
    trained (an untrained reward head's accuracy is noise around 0.5, not a result)."""
    model.eval()
    lm_sum = lm_tokens = correct = 0.0
    for i in range(0, len(pairs), cfg.eval_batch_size):
        chunk = pairs[i:i + cfg.eval_batch_size]
        ids, mask, P = (t.to(run.device) if torch.is_tensor(t) else t for t in sft_batch(tok, chunk, cfg, True))
        n = len(chunk)
        with run.autocast():
            h = model(ids, mask)
            lp = model.logprobs(h[:n], ids[:n], P)
            r = model.score(h, mask)
        lm_sum += -(lp * mask[:n, P:]).sum().item()
        lm_tokens += mask[:n, P:].sum().item()
        correct += (r[:n] > r[n:]).sum().item()
    metrics = dict(lm_loss=lm_sum / lm_tokens, rm_acc=correct / len(pairs))
    trained = dict(hydra=("lm_loss", "rm_acc"), sft=("lm_loss",), rm=("rm_acc",))[cfg.task]
    return {k: metrics[k] for k in trained}


def next_shard(items, order, rng, n, rank, world):
    """An endless shuffled stream over `items`: -> (this rank's shard of the next n, the order left after them)."""
    while len(order) < n:
        order += rng.sample(range(len(items)), len(items))
    return [items[i] for i in order[:n]][rank::world], order[n:]


def check_batch(cfg, run, items, what, why, k=1):
    """--batch-size (times the ranks; over k responses per prompt) must not be more than the training items: `why`
    says what would go wrong."""
    check(cfg.batch_size // k * run.world <= len(items), f"--batch-size {cfg.batch_size}"
          f"{f' / --group-size {k}' * (k > 1)}{f' x {run.world} ranks' * (run.world > 1)}: more than the "
          f"{len(items)} {what} in {cfg.data} ({why})")


def start_run(cfg):
    """Data parallel (when started by torchrun), then device and precision. -> Run."""
    rank, world, device_name = init_distributed(cfg.device)
    return setup_device(device_name, cfg.precision, rank, world)


def build_sft_model(cfg, pairs, run):
    """-> (HydraModel with only what cfg.task trains unfrozen, tokenizer, truncation counts)."""
    if cfg.model in ("tiny", "tiny-opt"):
        texts = [p[k] if isinstance(p[k], str) else hh_text(p[k])  # a conversational prompt: messages
                 for p in pairs for k in ("prompt", "chosen", "rejected")]
        lm, tok = build_tiny(cfg.model, texts, cfg.seed, run.device)
    else:  # full fine-tuning keeps fp32 master weights (bf16 autocast does the math); LoRA trains on a bf16 trunk
        lm, tok = load_lm(cfg.model, run.device, run.dtype if cfg.lora_r else torch.float32)
    if cfg.chat_template:
        eos = tok.eos_token_id
        end_turns_as_the_template(tok)
        if tok.eos_token_id != eos:  # a plain transformers generate() (an exported model) stops there too
            lm.generation_config.eos_token_id = [tok.eos_token_id, eos]
    check_positions(lm, cfg.max_prompt_len, cfg.max_response_len, "--max-prompt-len + --max-response-len")
    cut = count_truncated(tok, pairs, cfg)
    print(f"truncated: {cut[0]} of {len(pairs)} prompts (to their last --max-prompt-len {cfg.max_prompt_len} "
          f"tokens), {cut[1]} of {2 * len(pairs)} responses (to --max-response-len {cfg.max_response_len} "
          f"tokens, no EOS)")
    model = hp.HydraModel(lm)
    if cfg.lora_r:
        hp.add_adapter(model.lm, cfg)  # freezes everything else in the LM
        print(describe_lora(model.lm))
    if not hp.loss_weights(cfg)[1]:
        model.reward_head.requires_grad_(False)
    model.value_head.requires_grad_(False)  # PPO's head; SFT leaves it alone
    if cfg.grad_checkpointing:
        hp.checkpointing_on(model.lm)
    return model, tok, cut


def save_sft_checkpoint(cfg, run, model, tok, meta, step):
    """Rank 0 writes the checkpoint; Ctrl-C waits until it is whole. -> step."""
    with uninterrupted():
        if run.rank == 0:
            save_checkpoint(cfg.out, model, tok, meta)
    return step


def finish_sft(cfg, run, model, tok, meta, held_out, summary):
    """Merge LoRA (if any), save, evaluate exactly what is saved, write summary.json (from what the loop knows)."""
    if cfg.lora_r:  # the checkpoint is a plain transformers model again (rounded to the trunk's dtype: bf16 on CUDA)
        merge_lora(model.lm, "default")
    save_sft_checkpoint(cfg, run, model, tok, meta, summary["steps"])  # before evaluating: a failure there loses
    metrics = evaluate_sft(model, tok, held_out, cfg, run)  # no training. Evaluated: exactly the model that is saved
    print(f"held-out ({len(held_out)} pairs): " + ", ".join(
        f"LM loss {v:.3f}" if k == "lm_loss" else f"reward-model pairwise accuracy {v:.3f}" for k, v in metrics.items()))
    summary = dict(stage="sft", task=cfg.task, steps=summary["steps"], train_pairs=summary["train_pairs"],
                   held_out_pairs=len(held_out), **{"held_out_" + k: v for k, v in metrics.items()},
                   truncated_prompts=summary["cut"][0], truncated_responses=summary["cut"][1], world_size=run.world,
                   time_s=time.time() - summary["t0"], config=asdict(cfg))
    if run.rank == 0:
        write_json(os.path.join(cfg.out, "summary.json"), summary)
    barrier()  # the other ranks may load this checkpoint next (the pipeline's PPO stage)
    print(f"saved checkpoint to {cfg.out}")
    return summary


def sft(cfg: SFTConfig):
    """The sft command: the Hydra-SFT loop (sft_step), a checkpoint every --save-every steps and at the end, then the
    held-out evaluation."""
    validate(cfg)
    run = start_run(cfg)
    check(cfg.max_response_len > 1, "--max-response-len must be > 1 for sft (a response token and its EOS)")
    check(not (cfg.save_every and cfg.lora_r), "--save-every saves full fine-tuning checkpoints; with --lora-r the "
                                               "adapter is merged into the model only at the end")
    check(sum(hp.loss_weights(cfg)) > 0, f"--task {cfg.task} with --lm-coef {cfg.lm_coef:g} and --rm-coef "
                                      f"{cfg.rm_coef:g}: nothing to train (every loss it uses is weighted 0)")
    if run.rank == 0:
        claim_out(cfg.out, cfg.overwrite, inputs=local_inputs(cfg))
    pairs = load_pairs(cfg.data)
    train, held_out = split_pairs(pairs, cfg.eval_frac, cfg.seed)
    check_batch(cfg, run, train, "training pairs", "a step would see a pair twice")
    torch.manual_seed(cfg.seed)
    model, tok, cut = build_sft_model(cfg, pairs, run)
    params = [p for p in model.parameters() if p.requires_grad]
    lr = cfg.lr or (1e-3 if cfg.model in ("tiny", "tiny-opt") else 1e-5)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    steps = cfg.steps or max(1, math.ceil(cfg.epochs * len(train) / (cfg.batch_size * run.world)))  # global batch
    make_out(cfg.out, cfg.overwrite, claim=run.rank == 0)
    # The prompt format goes with the checkpoint: ppo refuses to use it with another one.
    meta = dict(task=cfg.task, base_model=cfg.model, chat_template=cfg.chat_template, max_prompt_len=cfg.max_prompt_len,
                max_response_len=cfg.max_response_len)
    rng, order, step, saved, t0 = random.Random(cfg.seed), [], 0, 0, time.time()
    with_rejected = bool(hp.loss_weights(cfg)[1])

    def draw():  # this rank's next micro-batch, from an endless shuffled stream, in the token layout
        nonlocal order
        chunk, order = next_shard(train, order, rng, cfg.micro_batch_size * run.world, run.rank, run.world)
        return (*sft_batch(tok, chunk, cfg, with_rejected), len(chunk))

    def stopped():  # Ctrl-C: where the run was, and what it kept
        return f"at step {step + 1} of {steps}; " + (f"{cfg.out} holds the checkpoint of step {saved}" if saved else
                                                 "nothing saved yet (--save-every N saves a long run every N steps)")
    with on_interrupt(stopped), \
            open(os.path.join(cfg.out, "metrics.jsonl") if run.rank == 0 else os.devnull, "w") as log, \
            tqdm(hp.sft_loop(model, opt, params, draw, cfg, run, steps), total=steps, desc=f"sft ({cfg.task})",
                 dynamic_ncols=True, disable=run.rank > 0) as bar:
        for step, stats, grad_norm in bar:
            check(math.isfinite(grad_norm), f"sft stopped at step {step}: a non-finite loss or gradient (a lower "
                                            f"--lr or loss weight may help); nothing of it saved" +
                                            (f" ({cfg.out} holds the checkpoint of step {saved})" if saved else ""))
            bar.set_postfix({k: f"{v:.3f}" for k, v in stats.items()}, refresh=False)
            if step % cfg.log_every == 0 or step == steps:
                log_line(log, dict(step=step, **stats, grad_norm=grad_norm, lr=lr, time=time.time() - t0))
            if cfg.save_every and step % cfg.save_every == 0 and step < steps:
                saved = save_sft_checkpoint(cfg, run, model, tok, meta, step)
    return finish_sft(cfg, run, model, tok, meta, held_out, dict(steps=steps, train_pairs=len(train), cut=cut, t0=t0))


def evaluate(roles, tok, prompts, cfg, run, judge=None):
    """hp.evaluate_ppo on prompt texts, encoded as the run's prompts are (--chat-template, --max-prompt-len)."""
    return hp.evaluate_ppo(roles, tok, prompts, lambda chunk: prompt_batch(tok, chunk, cfg, run.device), cfg, run,
                           judge)


def print_eval(metrics, samples, n=3):
    print(f"\n{'':24}{'SFT':>10}{'PPO':>10}")
    print(f"{'reward-model score':24}{metrics['sft_score']:10.3f}{metrics['policy_score']:10.3f}")
    if metrics["judge"] != "reward_model":
        print(f"{metrics['judge'] + ' score':24}{metrics['sft_judge']:10.3f}{metrics['policy_judge']:10.3f}")
    print(f"{'KL to reference':24}{0.0:10.3f}{metrics['policy_kl']:10.3f}")
    print(f"{'response length':24}{metrics['sft_len']:10.1f}{metrics['policy_len']:10.1f}")
    lo, hi = metrics["win_rate_ci"]
    print(f"win-rate of PPO over SFT ({metrics['judge']} judge): {metrics['win_rate']:.3f}, 95% interval "
          f"[{lo:.3f}, {hi:.3f}] (bootstrap over {metrics['eval_prompts']} prompts x {metrics['eval_samples']} "
          f"responses): {metrics['verdict']}")
    for s in samples[:n]:
        print(f"\nprompt: {s['prompt']!r}\n  SFT: {s['sft']!r}\n  PPO: {s['policy']!r}")


# ----------------------------------------------------------------------------------------------------------------
# The ppo command: the outer PPO loop, with resumable checkpoints.

def checkpoint_loader(cfg, device, dtype):
    """build_roles' loader for real runs: a frozen HydraModel of --sft or --rm, in fp32 or the run's `dtype`."""
    def load(which, fp32):
        model = load_checkpoint(cfg.sft if which == "sft" else cfg.rm, device, torch.float32 if fp32 else dtype,
                                dropout=False)[0]
        return model.requires_grad_(False)
    return load


def checkpoint_task(path, flag, chat_template):
    """The --task a checkpoint was trained with, from its hydra.json (read once). Its prompt format must be this
    run's: a model trained on chat-formatted prompts sees other prompts wrongly, and the other way round."""
    meta = read_meta(path, flag)
    check(isinstance(meta, dict) and "task" in meta, f"{os.path.join(path, META_FILE)}: no 'task' field (damaged?)")
    chat = meta.get("chat_template")  # None: not recorded (a checkpoint written by hand): not checked
    check(chat is None or chat == chat_template,
          f"{flag} {path} was trained {'with' if chat else 'without'} --chat-template: run ppo "
          f"{'with' if chat else 'without'} it too (prompts must be formatted as in training)")
    return meta["task"]


def check_group(cfg):
    """k responses per prompt (--group-size, or the mode's default) must divide the batch; a critic-free mode
    compares at least 2 and has no critic to set."""
    k = hp.group_size(cfg)
    check(cfg.batch_size % k == 0, f"--batch-size {cfg.batch_size} must be a multiple of the responses per prompt, "
                                   f"{k} (--group-size{' 0: the default of --mode ' + cfg.mode if not cfg.group_size else ''})")
    if hp.MODES[cfg.mode]["advantages"] != "gae":
        check(k >= 2, f"--mode {cfg.mode} compares the responses to one prompt: --group-size 2 or more (0: "
                      f"{hp.GROUP_SIZE})")
        default = PPOConfig()  # the flags of the critic and of GAE, which a critic-free mode would ignore
        unused = ["--" + f.replace("_", "-") for f in ("critic_lr", "whiten_rewards", "vf_coef", "gamma", "lam",
                                                      "cliprange_value") if getattr(cfg, f) != getattr(default, f)]
        check(not unused, f"--mode {cfg.mode} has no critic" + (" and rewards whole responses" if unused != [
            "--critic-lr"] else "") + f": drop {', '.join(unused)}")


def check_ppo_config(cfg):
    """What validate() cannot see from the flags alone: the checkpoints and whether they fit the mode."""
    validate(cfg)  # ranges and divisibility, declared beside each field
    check_group(cfg)
    sft_task = checkpoint_task(cfg.sft, "--sft", cfg.chat_template)
    if all(hp.MODES[cfg.mode][r][0] == "sft" for r in hp.ROLES if hp.MODES[cfg.mode][r]):  # Hydra-SFT's reward head
        check(sft_task == "hydra", f"--mode {cfg.mode} needs a Hydra-SFT checkpoint (sft --task hydra); "
                                   f"--sft {cfg.sft} was trained with --task {sft_task}")
        check(not cfg.rm, f"--mode {cfg.mode} uses the Hydra-SFT model's own reward head; drop --rm")
    else:
        check(sft_task in ("hydra", "sft"), f"--sft {cfg.sft} was trained with --task {sft_task}, not an SFT model")
        check(cfg.rm, f"--mode {cfg.mode} needs a reward-model checkpoint: --rm DIR (sft --task rm, or hydra)")
        rm_task = checkpoint_task(cfg.rm, "--rm", cfg.chat_template)
        check(rm_task in ("hydra", "rm"), f"--rm {cfg.rm} was trained with --task {rm_task}, not a reward model")
        check(load_tokenizer(cfg.sft).get_vocab() == load_tokenizer(cfg.rm).get_vocab(),
              f"--sft {cfg.sft} and --rm {cfg.rm} have different tokenizers: the reward model would score token ids "
              f"it does not know; train both from the same base model")


def absolute_paths(cfg):
    """run.json is read by `generate`, `export` and `--resume`, maybe from another directory: its paths must not
    depend on where the run was started."""
    paths = {k: getattr(cfg, k) for k in ("sft", "rm", "out")}
    data = ",".join(p if p.startswith("hf:") else os.path.abspath(p)  # --data as data_files reads it
                    for p in filter(None, (p.strip() for p in cfg.data.split(","))))
    return replace(cfg, data=data, **{k: os.path.abspath(v) for k, v in paths.items() if v})  # "" (no --rm) stays ""


# ---- checkpoints that a killed run resumes from ----

def save_state(cfg, step, learner, rng, order):
    """Everything a resumed run needs to continue exactly: the learner's trained parameters, optimizer, beta and
    minibatch RNG, the prompt order and every other RNG (and the mode: lora and dlora train tensors of the same
    shapes). Written to a temporary file and renamed, so a kill at any moment leaves the previous checkpoint whole."""
    state = dict(step=step, params=[p.detach().cpu() for p in learner.params], opt=learner.opt.state_dict(),
                 beta=learner.beta, score_norm=learner.score_norm, order=order, python_rng=rng.getstate(),
                 torch_rng=torch.get_rng_state(), generator=learner.generator.get_state(),
                 cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [], mode=cfg.mode)
    path = os.path.join(cfg.out, STATE_FILE)
    with open(path + ".tmp", "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(path + ".tmp", path)  # atomic on POSIX and Windows


def load_state(cfg, learner, rng):
    """save_state's checkpoint in cfg.out back into the learner and rng. -> the saved state."""
    path, params, mode = os.path.join(cfg.out, STATE_FILE), learner.params, cfg.mode
    state = read_file(path, lambda p: torch.load(p, map_location="cpu", weights_only=True))
    keys = ("step", "params", "opt", "beta", "order", "python_rng", "torch_rng", "generator", "cuda_rng")
    check(isinstance(state, dict) and all(k in state for k in keys), f"{path}: not a resumable checkpoint (damaged?)")
    check(state.get("mode", mode) == mode, f"{path} was written by a --mode {state.get('mode')} run; this run's "
                                           f"{RUN_FILE} says --mode {mode}")
    check(len(state["params"]) == len(params) and all(a.shape == b.shape for a, b in zip(state["params"], params)),
          f"{path} does not match this run's trained parameters")
    with torch.no_grad():
        for p, saved in zip(params, state["params"]):
            p.copy_(saved)
    learner.opt.load_state_dict(state["opt"])
    learner.beta, learner.score_norm = state["beta"], state.get("score_norm")
    rng.setstate((state["python_rng"][0], tuple(state["python_rng"][1]), state["python_rng"][2]))
    torch.set_rng_state(state["torch_rng"])
    learner.generator.set_state(state["generator"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state


def keep_log_until(path, step):
    """Drop the metrics lines of steps after `step` (they run again), atomically. A last line cut short by a kill
    is one of them; a damaged line before it stops the resume with its line number."""
    rows = open(path, "rb").readlines() if os.path.isfile(path) else []  # a log that is gone starts again empty
    lines = []
    for n, line in enumerate(rows, 1):
        try:
            keep = json.loads(line)["step"] <= step
        except (ValueError, KeyError, TypeError, RecursionError):  # not a JSON object with a step (ValueError: bad
            # JSON or UTF-8; RecursionError: nested too deeply)
            check(n == len(rows) or not line.strip(), f"{path}:{n}: not a metrics line (damaged?); fix or delete "
                                                      f"that line to resume")
            continue
        if keep:
            lines.append(line)
    with open(path + ".tmp", "wb") as fh:
        fh.writelines(lines)
    os.replace(path + ".tmp", path)


# What `ppo --resume` may change: the run's length, the device, and what helps after non-finite steps (stop_if_bad).
# It would ignore any other flag, so refuses it.
RESUMABLE = ("steps", "device", "precision", "actor_lr", "critic_lr", "score_clip", "max_grad_norm")


def load_run_config(run_dir, flag):
    """The PPOConfig a run saved in RUN_FILE."""
    path = os.path.join(run_dir, RUN_FILE)
    check(os.path.exists(run_dir), f"{flag} {run_dir}: not found")
    check(os.path.isfile(path), f"{flag} {run_dir}: not a PPO output folder (no {RUN_FILE})")
    saved = read_file(path, read_json)
    if isinstance(saved, dict):
        saved.setdefault("group_size", 1)  # a run from before --group-size sampled one response per prompt
    check(isinstance(saved, dict) and set(saved) <= {f.name for f in fields(PPOConfig)},
          f"{path}: not a PPO run's configuration (damaged?)")
    for f in fields(PPOConfig):  # ppo writes every field: one missing or of another type was edited or damaged
        check(f.name in saved, f"{path}: no {f.name!r} (every setting of the run is needed; damaged?)")
        value = saved[f.name]
        check(type(value) is f.type or f.type is float and type(value) is int,
              f"{path}: {f.name!r} is {json.dumps(value)[:40]}, not of type {f.type.__name__} (damaged?)")
    return PPOConfig(**saved)


def resume_config(cfg):
    """--resume DIR: the configuration the run saved when it started, with what the command line gave of RESUMABLE
    (a longer --steps, another --device, new learning rates or clipping)."""
    check(os.path.exists(cfg.resume), f"--resume {cfg.resume}: not found")
    check(os.path.isfile(os.path.join(cfg.resume, STATE_FILE)), f"--resume {cfg.resume}: no checkpoint there "
                                                                 f"({STATE_FILE}) to resume from")
    saved = load_run_config(cfg.resume, "--resume")
    default = PPOConfig()  # a config built in Python, not parsed: a field unlike its default counts as given
    given = getattr(cfg, "given", {f.name for f in fields(cfg) if getattr(cfg, f.name) != getattr(default, f.name)})
    ignored = ["--" + f.name.replace("_", "-") for f in fields(cfg) if f.name in given - {"resume", *RESUMABLE}]
    check(not ignored, f"--resume {cfg.resume} continues the run with its saved configuration: drop "
                       f"{', '.join(ignored)} (only {', '.join('--' + k.replace('_', '-') for k in RESUMABLE)} "
                       f"may change)")
    return replace(saved, **{k: getattr(cfg, k) for k in RESUMABLE if k in given}, resume=cfg.resume, out=cfg.resume)


def save_policy(cfg, roles, tok):
    """LoRA modes: the trained adapters and the value head (the frozen checkpoints stay where they are).
    full: the whole actor as a checkpoint folder."""
    actor, critic = roles["actor"], roles.get("critic")
    if actor.adapter is hp.LORA_OFF:  # full
        save_checkpoint(os.path.join(cfg.out, "actor"), actor.model, tok, dict(task="sft", base_model=cfg.sft,
                                                                                chat_template=cfg.chat_template))
    else:
        torch.save(dict(actor=lora_state_dict(actor.model.lm, actor.adapter), **(dict(
                        critic=lora_state_dict(critic.model.lm, critic.adapter),
                        value_head=critic.model.value_head.state_dict()) if critic else {})),
                   os.path.join(cfg.out, POLICY_FILE))


# ---- the loop ----

def resume_run(cfg, run, learner, rng, log_path):
    """--resume: the checkpoint's weights, optimizer, beta and RNGs back in place; the log cut to its step.
    -> (first step, prompt order, last saved step)."""
    state = load_state(cfg, learner, rng)
    for group, lr in zip(learner.opt.param_groups, hp.learning_rates(cfg)):  # the saved lr, or a new one given with --resume
        group["lr"] = lr
    check(state["step"] <= cfg.steps,
          f"--steps {cfg.steps}: the run in {cfg.out} is already at step {state['step']}")
    barrier()
    if run.rank == 0:
        keep_log_until(log_path, state["step"])  # the steps after the checkpoint are done again
    print(f"resuming {cfg.out} after step {state['step']}")
    return state["step"] + 1, state["order"], state["step"]


def stop_if_bad(cfg, step, bad, saved):
    """A step whose updates all had a non-finite loss or gradient was skipped; --max-bad-steps in a row stop the run."""
    tqdm.write(f"step {step}: non-finite loss or gradient; update skipped ({bad} in a row)")
    check(bad < cfg.max_bad_steps,
          f"stopped at step {step}: {bad} steps in a row had a non-finite loss or gradient. What helps: a lower "
          f"--actor-lr / --critic-lr, --score-clip 5, --max-grad-norm 0.5, " + (
              f"given with: python hydra_ppo.py ppo --resume {cfg.out} (its last good checkpoint, step {saved})"
              if saved else f"in a new run (no checkpoint was saved yet; --overwrite to reuse {cfg.out})"))


def finish_ppo(cfg, run, learner, tok, eval_prompts, judge, t0):
    """Save the policy, check the ranks agree, evaluate PPO against SFT, write summary.json. -> summary."""
    if run.rank == 0:
        save_policy(cfg, learner.roles, tok)
    in_sync = ranks_in_sync(learner.params)
    check(in_sync, f"data parallel: the ranks ended with different trained weights (rank 0's are saved in {cfg.out})")
    metrics, samples = evaluate(learner.roles, tok, eval_prompts, cfg, run, judge)  # on every rank
    print_eval(metrics, samples)
    summary = dict(stage="ppo", mode=cfg.mode, steps=cfg.steps, **metrics, final_beta=learner.beta,
                   world_size=run.world, ranks_in_sync=in_sync, time_s=time.time() - t0, samples=samples[:5],
                   config=asdict(cfg))
    if run.rank == 0:
        write_json(os.path.join(cfg.out, "summary.json"), summary)
    barrier()
    print(f"\nsaved the policy to {cfg.out}; sample from it with: python hydra_ppo.py generate --run {cfg.out}")
    return summary


def ppo(cfg: PPOConfig, judge=None):
    """The ppo command, the outer PPO loop: per step, this rank's shard of the next prompts, ppo_step, a metrics line,
    an evaluation every --eval-every steps, a resumable checkpoint every --save-every steps; at the end the policy,
    the evaluation and summary.json."""
    if cfg.resume:  # the run's own configuration, saved when it started (a flag it may not change is refused first)
        cfg = resume_config(cfg)
    validate(cfg)
    check_ppo_config(cfg)
    run = start_run(cfg)
    if run.rank == 0 and not cfg.resume:
        claim_out(cfg.out, cfg.overwrite, stale=(STATE_FILE, POLICY_FILE, "summary.json"), inputs=local_inputs(cfg))
    elif run.rank == 0:
        own_folder(cfg.out, "--resume")
    train, held_out = split_pairs(load_pairs(cfg.data), cfg.eval_frac, cfg.seed)
    check_batch(cfg, run, train, "training prompts", "a rollout would repeat prompts", hp.group_size(cfg))
    train_prompts, eval_prompts = [p["prompt"] for p in train], [p["prompt"] for p in held_out][:cfg.eval_prompts]
    if len(eval_prompts) < cfg.eval_prompts:
        print(f"--eval-prompts {cfg.eval_prompts}: evaluating on all {len(eval_prompts)} held-out prompts, as many as "
              f"--eval-frac {cfg.eval_frac:g} holds out")
    learner = hp.setup_ppo(cfg, checkpoint_loader(cfg, run.device, run.dtype))
    roles, opt = learner.roles, learner.opt
    check_positions(roles["actor"].model.lm, cfg.max_prompt_len, cfg.max_response_len,
                    "--max-prompt-len + --max-response-len")
    for trunk in dict.fromkeys(r.model for r in roles.values() if r.adapter):  # one line per trunk with adapters
        print(describe_lora(trunk.lm))
    print(f"learning rates: actor {opt.param_groups[0]['lr']:g}, "
          + (f"critic {opt.param_groups[1]['lr']:g}" if len(opt.param_groups) > 1 else "no critic")
          + ("" if cfg.actor_lr and (cfg.critic_lr or len(opt.param_groups) == 1) else
             f" (--mode {cfg.mode} defaults where a flag is 0)")
          + (f"; {hp.group_size(cfg)} responses per prompt" if hp.group_size(cfg) > 1 else ""))
    tok = load_tokenizer(cfg.sft)
    rng = random.Random(cfg.seed)
    make_out(cfg.out, cfg.overwrite, claim=run.rank == 0 and not cfg.resume)
    log_path = os.path.join(cfg.out, "metrics.jsonl")
    first, order, bad, saved, t0 = 1, [], 0, 0, time.time()
    if cfg.resume:
        first, order, saved = resume_run(cfg, run, learner, rng, log_path)
    if run.rank == 0:  # resumed with a longer --steps or a new lr: from now on that is the run's; paths absolute
        write_json(os.path.join(cfg.out, RUN_FILE), asdict(absolute_paths(replace(cfg, resume=""))))
    if run.world > 1:
        torch.manual_seed(cfg.seed + 1000 * run.rank + first)  # data parallel: every rank samples its own responses
    step = first - 1  # the last step done

    def draw():  # this rank's shard of the next prompts, encoded
        nonlocal order
        prompts, order = next_shard(train_prompts, order, rng, cfg.batch_size // hp.group_size(cfg) * run.world,
                                    run.rank, run.world)
        return prompt_batch(tok, prompts, cfg, run.device)

    def stopped():  # Ctrl-C: where the run was, and how to go on
        return f"at step {step + 1}; " + (f"resume with: python hydra_ppo.py ppo --resume {cfg.out}"
                                          if os.path.isfile(os.path.join(cfg.out, STATE_FILE)) else
                                          f"no checkpoint yet (the first comes after step {cfg.save_every or cfg.steps})")
    with on_interrupt(stopped), open(log_path if run.rank == 0 else os.devnull, "a" if cfg.resume else "w") as log, \
            tqdm(hp.ppo_loop(learner, tok, draw, cfg, run, first), desc=f"ppo ({cfg.mode})", dynamic_ncols=True,
                 initial=first - 1, total=cfg.steps, disable=run.rank > 0) as bar:
        for step, stats in bar:
            bad = bad + 1 if stats["skipped"] == 1.0 else 0
            record = dict(step=step, **stats, time=time.time() - t0)
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                metrics, _ = evaluate(learner.roles, tok, eval_prompts, cfg, run, judge)
                record.update({"eval_" + k: v for k, v in metrics.items()})
            if step % cfg.log_every == 0 or step == cfg.steps or "eval_win_rate" in record or bad:
                log_line(log, record)
            bar.set_postfix(score=f"{stats['score']:.3f}", kl=f"{stats['kl']:.3f}", refresh=False)
            if bad:
                stop_if_bad(cfg, step, bad, saved)
            elif (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps:
                if run.rank == 0:
                    save_state(cfg, step, learner, rng, order)
                saved = step
    return finish_ppo(cfg, run, learner, tok, eval_prompts, judge, t0)


# ----------------------------------------------------------------------------------------------------------------
# Generate and export: sample from a finished run, or hand its policy to transformers / peft.

@dataclass
class GenerateConfig:
    """Sample responses to a prompt from the policy of a finished PPO run, and print them under the prompt."""
    run: str = arg("out/ppo", "a PPO output folder")
    prompt: str = arg("review of the film :", "the prompt")
    num_samples: int = arg(1, "responses to sample (one batch)", ge=1, le=MAX_SAMPLES, why=SAMPLES_WHY)
    max_new_tokens: int = arg(0, "0: the run's --max-response-len", ge=0)
    temperature: float = arg(1.0, "sampling temperature", gt=0)
    greedy: bool = arg(False, "greedy decoding instead of sampling")
    seed: int = arg(0, "random seed", ge=-2**63, lt=2**63, why=SEED_WHY)
    device: str = arg("auto", "auto, cpu, cuda, ...")


@dataclass
class ExportConfig:
    """Export the policy of a finished PPO run as a plain transformers checkpoint or a peft adapter."""
    run: str = arg("out/ppo", "a PPO output folder")
    format: str = arg("merged", "merged: a plain transformers checkpoint with the actor adapter folded in; peft: "
                                "adapter_config.json + adapter_model.safetensors for peft's PeftModel.from_pretrained",
                      choices=("merged", "peft"))
    out: str = arg("", "output folder (default: RUN/export-FORMAT)")
    overwrite: bool = arg(False, "write into an --out folder that already holds files")


def load_policy(run_dir, device, dtype):
    """-> (actor Role, tokenizer, PPOConfig of the run) from a PPO output folder."""
    cfg = load_run_config(run_dir, "--run")
    adapter = hp.MODES[cfg.mode]["actor"][1]
    if adapter is hp.LORA_OFF:  # full: the whole actor was saved
        model, tok, _ = load_checkpoint(os.path.join(run_dir, "actor"), device, dtype, dropout=False)
        return hp.Role(model, hp.LORA_OFF, "lm"), tok, cfg
    check(os.path.isfile(os.path.join(run_dir, POLICY_FILE)), f"{run_dir}: no {POLICY_FILE} yet (the run has not "
                                                              f"finished; `ppo --resume {run_dir}` continues it)")
    model, tok, _ = load_checkpoint(cfg.sft, device, dtype, dropout=False)
    hp.add_adapter(model.lm, cfg, adapter)
    path = os.path.join(run_dir, POLICY_FILE)
    state = read_file(path, lambda p: torch.load(p, map_location=device, weights_only=True))
    try:
        load_lora_state_dict(model.lm, state["actor"])
    except (KeyError, TypeError, RuntimeError) as e:  # not our file, or the adapters of another configuration
        first = [l.strip() for l in str(e).splitlines() if l.strip()]  # a shape mismatch lists every layer
        raise UserError(f"{path} does not fit {run_dir}/{RUN_FILE} ({type(e).__name__}: "
                        f"{' '.join(first[:2])[:200]}{' ...' * (len(first) > 2)})") from None
    return hp.Role(model, adapter, "lm"), tok, cfg


def generate_cmd(cfg: GenerateConfig):
    validate(cfg)
    check(cfg.prompt.strip(), f"--prompt {cfg.prompt!r}: empty; give the text to respond to")
    run = setup_device(cfg.device)
    actor, tok, ppo_cfg = load_policy(cfg.run, run.device, run.dtype)
    # the run's prompt format; this command's length and temperature; no top-k, top-p or folding
    sampling = replace(ppo_cfg, max_response_len=cfg.max_new_tokens or ppo_cfg.max_response_len,
                       temperature=cfg.temperature, top_k=0, top_p=1.0, fold_lora=False)
    check_positions(actor.model.lm, sampling.max_prompt_len, sampling.max_response_len,
                    "the run's --max-prompt-len + --max-new-tokens")
    actor.model.eval()
    torch.manual_seed(cfg.seed)
    p_ids, p_mask = prompt_batch(tok, [cfg.prompt] * cfg.num_samples, sampling, run.device)
    with run.autocast():
        ids, mask, _ = hp.generate(actor, p_ids, p_mask, tok, sampling, greedy=cfg.greedy)
    n = len(encode_prompt(tok, cfg.prompt, 10 ** 9, sampling.chat_template))
    if n > sampling.max_prompt_len:  # what the policy reads is the end of it (encode_prompt), as in training
        kept = tok.decode(p_ids[0][p_mask[0] == 1], skip_special_tokens=True)
        print(f"prompt: {n} tokens, more than the run's --max-prompt-len {sampling.max_prompt_len}: the policy reads "
              f"its last {sampling.max_prompt_len}, ...{kept!r}")
    else:
        print(f"prompt: {cfg.prompt!r}")  # repr: an HH prompt's newlines stay visible
    for i, text in enumerate(hp.decode_responses(tok, ids, mask, p_ids.shape[1]), 1):
        print(f"response {i}: {text}")


# What either export format writes (and the tokenizer files save_pretrained may): --overwrite deletes them all first,
# so that a merged model never keeps an earlier export's adapter beside it (from_pretrained would apply it twice).
EXPORT_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "config.json",
                "generation_config.json", "model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
                "tokenizer*", "special_tokens_map.json", "added_tokens.json", "chat_template.*", "vocab.json",
                "merges.txt")


def export(cfg: ExportConfig):
    """merged: the actor as an ordinary transformers checkpoint (from_pretrained loads it; the heads stay behind).
    peft: the actor adapter in peft's format, on top of the SFT checkpoint it was trained from."""
    validate(cfg)
    out = cfg.out or os.path.join(cfg.run, f"export-{cfg.format}")
    ppo_cfg = load_run_config(cfg.run, "--run")  # a run folder, before anything is written beside it
    check_apart(out, {"--run": cfg.run, "the run's --sft": ppo_cfg.sft})
    check(not any(os.path.isfile(os.path.join(out, f)) for f in (META_FILE, RUN_FILE)), f"--out {out} holds a "
          f"hydra-ppo checkpoint or run, which --overwrite would break; export into a folder of its own")
    claim_out(out, cfg.overwrite, stale=EXPORT_FILES)
    actor, tok, ppo_cfg = load_policy(cfg.run, torch.device("cpu"), "auto")  # keep the checkpoint's own dtype
    lm = actor.model.lm
    check(cfg.format == "merged" or actor.adapter, "--format peft needs a LoRA run; a --mode full run has no adapter "
                                                   "(use --format merged)")
    make_out(out, cfg.overwrite)
    if cfg.format == "merged":
        if actor.adapter:
            merge_lora(lm, actor.adapter)  # W0 + (alpha/r) B A, then plain nn.Linear again
        lm.save_pretrained(out)
        tok.save_pretrained(out)
    else:
        from safetensors.torch import save_file
        suffix = f".{actor.adapter}"
        weights = {"base_model.model." + k[:-len(suffix)] + ".weight": v.contiguous()
                   for k, v in lora_state_dict(lm, actor.adapter).items()}  # ...q_proj.lora_A.actor -> .lora_A.weight
        layers = {n.rsplit(".", 1)[-1]: m for n, m in lm.named_modules() if isinstance(m, LoRALinear)}
        save_file(weights, os.path.join(out, "adapter_model.safetensors"))
        write_json(os.path.join(out, "adapter_config.json"), dict(
            peft_type="LORA", task_type="CAUSAL_LM", r=ppo_cfg.lora_r, lora_alpha=ppo_cfg.lora_alpha, lora_dropout=0.0,
            target_modules=sorted(layers), bias="none", inference_mode=True, use_rslora=False,
            fan_in_fan_out=any(m.fan_in_fan_out for m in layers.values()),  # GPT-2's Conv1D: weights (in, out)
            use_dora=False, init_lora_weights=True, modules_to_save=None,
            base_model_name_or_path=os.path.abspath(ppo_cfg.sft)))
    print(f"exported the policy of {cfg.run} ({cfg.format}) to {out}")
    return out


# ----------------------------------------------------------------------------------------------------------------
# The whole method in one command: `python hydra_ppo.py` (no arguments) runs it offline on the built-in task.

@dataclass
class Budget(Common):
    """The flags the pipeline and compare.py share: the model, one SFT and PPO budget, the evaluation and its judge."""
    model: str = arg("tiny", "as in `sft --model`: hub name, local folder, or tiny / tiny-opt")
    max_prompt_len: int = arg(0, "prompt tokens kept (truncated from the left) (0: auto)", ge=0)
    max_response_len: int = arg(0, "response tokens kept (SFT) / generated (PPO), EOS included (0: auto)", ge=0)
    sft_steps: int = arg(0, "SFT optimizer steps (0: auto)", ge=0)
    sft_batch_size: int = arg(32, "SFT preference pairs per step", ge=1)
    sft_lr: float = arg(0.0, "SFT learning rate (0: auto)", ge=0, le=1, why=LR_WHY)
    ppo_steps: int = arg(60, "PPO iterations", ge=1)
    batch_size: int = arg(32, "PPO responses per rollout", ge=1)
    group_size: int = arg(0, "responses per prompt (0: 4 for rloo and grpo, 1 for the PPO modes; compare.py: for its "
                             "rloo and grpo rows only)", ge=0, divides="batch_size")
    minibatch_size: int = arg(16, "PPO rollouts per optimizer step", ge=1, divides="batch_size")
    micro_batch_size: int = arg(16, "rollouts (and SFT pairs) per forward pass", ge=1,
                                divides="minibatch_size")
    lora_r: int = arg(0, "LoRA rank of the PPO adapters (0: auto; the paper's 128 is for 1.3b-7b models)", ge=0)
    lora_alpha: float = arg(0.0, "LoRA alpha (0: auto)", ge=0)
    actor_lr: float = arg(0.0, "PPO actor learning rate (0: auto)", ge=0, le=1, why=LR_WHY)
    critic_lr: float = arg(0.0, "PPO critic learning rate (0: auto)", ge=0, le=1, why=LR_WHY)
    kl_coef: float = arg(0.0, "beta of the KL penalty (0: auto; paper: 0.02)", ge=0)
    reward_norm: bool = arg(True, "PPO rewards (score - mean) / std, from the SFT policy's first rollout "
                                  "(--no-reward-norm: the paper's raw scores)")
    eval_prompts: int = arg(128, "held-out prompts in the final comparison", ge=1)
    eval_samples: int = arg(0, "responses per held-out prompt from each policy (0: auto)", ge=0, le=MAX_SAMPLES,
                            why=EVAL_SAMPLES_WHY)
    judge: str = arg("auto", "who judges PPO against SFT: gold (the review task's rule, for data/demo.jsonl and "
                             "data/hh_reviews.jsonl), rm (the reward model); auto: gold on data/demo.jsonl only",
                     choices=("auto", "gold", "rm"))


@dataclass
class PipelineConfig(Budget):
    """The whole method: Hydra-SFT, then Hydra-PPO, then SFT vs PPO on held-out prompts. With no flags: a tiny model
    on the built-in review task (data/demo.jsonl), judged by its gold rule. Name --model and --data to run it for
    real. Flags whose default is 0 ("auto") take their value from the row of PIPELINE_SETTINGS for the model's size
    (tiny, up to 1B parameters, from 1B); the run prints the row and the values."""
    out: str = arg("out/demo", "output folder; the stages write to OUT/sft and OUT/ppo")
    mode: str = arg("hydra", "PPO configuration that needs only the Hydra-SFT model (rloo, grpo: Hydra without a "
                             "critic)", choices=("hydra", "jhydra", "rloo", "grpo"))


# The pipeline's "auto" settings (its flags that default to 0), in one table; the row goes by the model's size.
# tiny: the demo's in-memory model (the README's demo table). real: a pretrained model under 1B parameters, which
# needs far smaller steps than a random one, a wider adapter, and room for a sentence (the README's SmolLM2-135M
# commands use this row). billion: the paper's OPT-1.3b / Llama-7b settings (arXiv 2309.00754): 400 + 400 tokens,
# LoRA r 128, actor lr 5e-4, critic lr 5e-4 (the paper's 5e-5 starves the critic: see MODES); Hydra-SFT full
# fine-tuning at the paper's reward-model rate 1e-6 (its SFT used 5e-7; one Hydra-SFT rate must also train the new
# reward head) for one epoch (sft_steps 0: the paper publishes no step count); alpha = r (not published;
# DeepSpeed-Chat's scaling 1). Several evaluation samples per prompt narrow the win-rate's interval; at 400 tokens
# one each keeps the evaluation affordable. beta is the paper's 0.02 except on the tiny model: there, at 0.02, PPO
# drifts (KL ~9) into long lists of positive words that its reward model overrates and the gold rule does not (seed 0:
# gold win-rate 0.29); 0.1 keeps it near what the RM has seen.
PIPELINE_SETTINGS = {
    "tiny": dict(max_prompt_len=64, max_response_len=16, sft_steps=300, sft_lr=1e-3, lora_r=8, lora_alpha=16.0,
                 actor_lr=3e-3, critic_lr=3e-3, kl_coef=0.1, eval_samples=4),
    "real": dict(max_prompt_len=64, max_response_len=48, sft_steps=100, sft_lr=2e-5, lora_r=16, lora_alpha=32.0,
                 actor_lr=1e-4, critic_lr=1e-4, kl_coef=0.02, eval_samples=4),
    "billion": dict(max_prompt_len=400, max_response_len=400, sft_steps=0, sft_lr=1e-6, lora_r=128, lora_alpha=128.0,
                    actor_lr=5e-4, critic_lr=5e-4, kl_coef=0.02, eval_samples=1),
}


def count_parameters(name):
    """Parameters of a hub or local model, from its config alone (built on the meta device: no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"--model {name}: could not load its config ({str(e).strip().splitlines()[0]})") from None
    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())


def model_size(n):
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def pipeline_settings(cfg, only=None):
    """-> cfg with its 0 ("auto") fields (those named in `only`, or all) from PIPELINE_SETTINGS' row for this model's
    size; one printed line names the row and the values. Flags given always win (compare.py: only=, see there)."""
    tiny = cfg.model in ("tiny", "tiny-opt")
    n = 0 if tiny else count_parameters(cfg.model)
    row = "tiny" if tiny else "billion" if n >= 1e9 else "real"
    table = {k: v for k, v in PIPELINE_SETTINGS[row].items() if only is None or k in only}
    chosen = {k: getattr(cfg, k) or v for k, v in table.items()}
    given = [k for k in table if getattr(cfg, k)]
    if int(os.environ.get("RANK", "0")) == 0:  # data parallel: rank 0 prints
        what = "the tiny model" if tiny else f"a {model_size(n)} model"
        print(f"settings for {what}, PIPELINE_SETTINGS[{row!r}]: "
              + ", ".join(f"--{k.replace('_', '-')} {v:g}" + (" (one epoch)" if k == "sft_steps" and not v else "")
                          for k, v in chosen.items()) + (f" (given: {', '.join(given)})" if given else ""))
    return replace(cfg, **chosen)


DEMO_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "demo.jsonl")


def gold_judge(prompts, responses):
    return [gold_score(r) for r in responses]


def sparkline(xs, width=60):
    if len(xs) > width:  # average into `width` buckets
        xs = [sum(xs[i * len(xs) // width:(i + 1) * len(xs) // width]) /
              len(xs[i * len(xs) // width:(i + 1) * len(xs) // width]) for i in range(width)]
    lo, hi = min(xs), max(xs)
    return "".join("▁▂▃▄▅▆▇█"[min(7, int(8 * (x - lo) / (hi - lo + 1e-12)))] for x in xs)


def plot_scores(scores, path):
    """A PNG of the reward curve when matplotlib happens to be installed (it is not a requirement)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    plt.figure(figsize=(5, 3))
    plt.plot(range(1, len(scores) + 1), scores)
    plt.xlabel("PPO step")
    plt.ylabel("reward-model score")
    plt.tight_layout()
    plt.savefig(path)
    plt.close()


def review_share(pairs):
    """The share of the words of the chosen responses that are the review task's: the gold rule scores only those."""
    words = [w for p in pairs for w in re.findall(r"[a-z0-9]+", p["chosen"].lower())]
    return sum(w in POSITIVE + NEGATIVE + NEUTRAL for w in words) / max(1, len(words))


def pick_judge(cfg):
    """The gold rule only means something on the review task: demo.jsonl (auto), or hh_reviews.jsonl (--judge gold).
    None: the reward model judges."""
    demo = os.path.realpath(cfg.data) == os.path.realpath(DEMO_DATA)
    if cfg.judge == "gold" and not demo:
        share = review_share(load_pairs(cfg.data))
        check(share >= 0.9, f"--judge gold: the gold rule scores the review task's words, and only {share:.0%} of "
                            f"the words of --data's chosen responses are those; use --judge rm")
    return gold_judge if cfg.judge == "gold" or (cfg.judge == "auto" and demo) else None


def pipeline(cfg: PipelineConfig):
    t0 = time.time()
    validate(cfg)
    given = getattr(cfg, "given", set())
    cfg = pipeline_settings(cfg)
    common = {f.name: getattr(cfg, f.name) for f in fields(Common)}
    judge = pick_judge(cfg)
    demo = judge is gold_judge
    sft_cfg = SFTConfig(**{**common, "out": os.path.join(cfg.out, "sft")}, model=cfg.model, task="hydra",
                        steps=cfg.sft_steps, batch_size=cfg.sft_batch_size, micro_batch_size=min(
                            cfg.sft_batch_size, cfg.micro_batch_size), lr=cfg.sft_lr)
    ppo_cfg = PPOConfig(**{**common, "out": os.path.join(cfg.out, "ppo")}, mode=cfg.mode, sft=sft_cfg.out,
                        steps=cfg.ppo_steps, batch_size=cfg.batch_size, group_size=cfg.group_size,
                        minibatch_size=cfg.minibatch_size, micro_batch_size=cfg.micro_batch_size, lora_r=cfg.lora_r,
                        lora_alpha=cfg.lora_alpha, actor_lr=cfg.actor_lr,
                        critic_lr=cfg.critic_lr if hp.MODES[cfg.mode]["critic"] is not hp.NO_CRITIC or "critic_lr" in
                        given else 0.0,  # not the auto rate, for a critic the mode does not have
                        kl_coef=cfg.kl_coef, reward_norm=cfg.reward_norm, eval_prompts=cfg.eval_prompts,
                        eval_samples=cfg.eval_samples)
    check(cfg.sft_batch_size % sft_cfg.micro_batch_size == 0, f"--sft-batch-size {cfg.sft_batch_size} must be a "
                                                               f"multiple of --micro-batch-size {cfg.micro_batch_size}")
    validate(sft_cfg)  # both stages' flags before the first one runs: a bad PPO flag must not wait for SFT
    validate(ppo_cfg)
    check_group(ppo_cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        claim_out(cfg.out, cfg.overwrite, stale=("summary.json",), inputs=local_inputs(cfg))
    print(f"== 1/2 Hydra-SFT: {cfg.model} on {cfg.data} (LM head + reward head, one model)")
    sft_summary = sft(sft_cfg)
    name = {"hydra": "Hydra-PPO", "jhydra": "J-Hydra-PPO", "rloo": "Hydra-RLOO", "grpo": "Hydra-GRPO"}[cfg.mode]
    print(f"\n== 2/2 {name}: LoRA off = reference and reward model")
    ppo_summary = ppo(ppo_cfg, judge=judge)
    with open(os.path.join(ppo_cfg.out, "metrics.jsonl")) as fh:
        scores = [json.loads(line)["score"] for line in fh]
    print(f"\nreward-model score over training: {scores[0]:.2f} {sparkline(scores)} {scores[-1]:.2f}")
    got = lambda *keys: {k: ppo_summary[k] for k in keys}
    summary = dict(stage="pipeline", rm_accuracy=sft_summary["held_out_rm_acc"],
                   sft_lm_loss=sft_summary["held_out_lm_loss"], judge="gold" if demo else "reward_model",
                   **got("win_rate", "win_rate_ci", "verdict", "eval_prompts", "eval_samples", "sft_score",
                         "policy_score"), sft_gold=ppo_summary["sft_judge"] if demo else None,
                   policy_gold=ppo_summary["policy_judge"] if demo else None, kl=ppo_summary["policy_kl"],
                   **got("sft_len", "policy_len"), time_s=time.time() - t0, config=asdict(cfg))
    if int(os.environ.get("RANK", "0")) == 0:  # data parallel: rank 0 writes
        write_json(os.path.join(cfg.out, "summary.json"), summary)
        plot_scores(scores, os.path.join(cfg.out, "reward.png"))
    lo, hi = summary["win_rate_ci"]
    print(f"\nverdict: {summary['verdict']}. {summary['judge']} win-rate of {name} over Hydra-SFT "
          f"{summary['win_rate']:.2f}, 95% interval [{lo:.2f}, {hi:.2f}] ({summary['eval_prompts']} held-out prompts "
          f"x {summary['eval_samples']} responses); reward-model accuracy {summary['rm_accuracy']:.2f} (held out), "
          f"KL {summary['kl']:.2f}, {summary['time_s']:.0f} s. Everything is in {cfg.out}/")
    return summary


# ----------------------------------------------------------------------------------------------------------------
# Command line

SUBCOMMANDS = {"sft": (SFTConfig, sft), "ppo": (PPOConfig, ppo), "generate": (GenerateConfig, generate_cmd),
               "export": (ExportConfig, export)}


def commands_help():
    """The top-level --help's list of commands: the first sentence of each one's configuration docstring."""
    first = lambda cls: inspect.cleandoc(cls.__doc__).replace("\n", " ").split(". ")[0].rstrip(".") + "."
    rows = [("(none)", PipelineConfig)] + [(name, cls) for name, (cls, _) in SUBCOMMANDS.items()]
    return ("\n\ncommands (python hydra_ppo.py COMMAND --help: its flags):\n" + "\n".join(f"  {name:10}{first(cls)}" for name, cls in rows)
            + "\n\nWithout a COMMAND, the pipeline runs; its flags:")


def main(argv=None):
    """`python hydra_ppo.py [sft|ppo|generate|export] [--flags]`; without a subcommand: the whole pipeline."""
    argv = sys.argv[1:] if argv is None else argv
    name = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    cls, command = SUBCOMMANDS[name] if name else (PipelineConfig, pipeline)
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging
    logging.disable_progress_bar()  # our own bars are enough
    hub_logging.set_verbosity_error()  # its retries of an unreachable hub are warnings; a failure is our one line
    cfg = None
    try:
        cfg = parse_config(cls, argv[1:] if name else argv, prog="hydra_ppo.py" + (f" {name}" if name else ""),
                           commands="" if name else commands_help())
        command(cfg)
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (those say at which step, and what they kept)
        print(f"error: interrupted (`{name or 'pipeline'}`)", file=sys.stderr)
        return 2
    except torch.cuda.OutOfMemoryError:
        get = lambda k: getattr(cfg, k, "?")
        print(f"error: CUDA ran out of memory in `{name or 'pipeline'}`: mode {get('mode')}, batch {get('batch_size')} "
              f"(micro-batch {get('micro_batch_size')}), {get('max_prompt_len')} prompt + {get('max_response_len')} "
              f"response tokens, model {get('model') if hasattr(cfg, 'model') else get('sft')}. What helps: a smaller "
              f"--micro-batch-size (then --batch-size), --grad-checkpointing, shorter --max-prompt-len / "
              f"--max-response-len, and --mode hydra (one model in memory instead of two or four).", file=sys.stderr)
        return 3
    finally:
        release_folders()
    return 0


if __name__ == "__main__":
    sys.exit(main())
