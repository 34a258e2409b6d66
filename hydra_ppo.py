"""hydra-ppo: Hydra-RLHF (Santacroce et al. 2023, "Efficient RLHF: Reducing the Memory Usage of PPO",
arXiv 2309.00754) in plain PyTorch + transformers. This file is the method, read top to bottom; with lora.py beside
it, it is the whole of it. harness.py runs it for real (flags, data, checkpoints, resume, torchrun, the commands):

    python hydra_ppo.py                                       # the whole method offline: Hydra-SFT, Hydra-PPO, verdict
    python hydra_ppo.py sft --model M --data D --out DIR      # Hydra-SFT: one model, an LM head and a reward head
    python hydra_ppo.py ppo --mode hydra --sft DIR --data D   # PPO in one of the paper's five configurations
    python hydra_ppo.py ppo --mode rloo --sft DIR --data D    # beyond the paper: Hydra without a critic (or grpo)

Hydra-RLHF in three sentences. Hydra-SFT trains one decoder with two heads, the LM head on the chosen responses and
a reward head on (chosen, rejected) pairs. Hydra-PPO then adds LoRA adapters for the actor and the critic: with LoRA
off, the same weights are the reference policy and the reward model, so PPO's four models fit in one (MODES below).
The five PPO configurations of the paper's Table 2 differ only in which trunks they hold and which adapter each of
the four roles reads (MODES); the two critic-free ones of MODES drop the critic.

The objective, written once. A rollout samples responses y = (y_1 .. y_T) to prompts x from pi_theta (the actor;
temperature tau, --temperature). Its per-token rewards carry the KL to the reference policy pi_ref:

    r_t   = -beta * (log pi_theta(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t))                    beta: --kl-coef
            + [t = T] * (RM(x, y) - mu) / sigma          mu, sigma: the SFT policy's scores (--reward-norm)
    A_t   = sum_{l >= 0} (gamma lam)^l delta_{t+l},   delta_t = r_t + gamma V_old(s_{t+1}) - V_old(s_t)     (GAE)
    R_t   = A_t + V_old(s_t);  V_old: the critic's values at the rollout, 0 after the last token; A_t then whitened
    L     = L_pi + vf_coef * L_V, minimised over the actor's LoRA theta and the critic's LoRA + value head phi (jhydra:
            one shared adapter; full: whole trunks; trainable_groups):
    L_pi  = E_t[ max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps)) ],   rho_t = pi_theta(y_t) / pi_theta_old(y_t)
    L_V   = 0.5 E_t[ max((V_phi(s_t) - R_t)^2, (V_old(s_t) + clip(V_phi(s_t) - V_old(s_t), -eps_v, eps_v) - R_t)^2) ]

Critic-free Hydra (--mode rloo | grpo, beyond the paper): k responses per prompt (group_size), one reward each,
    R(x, y) = (RM(x, y) - mu) / sigma - beta * sum_t (log pi_theta(y_t | ..) - log pi_ref(y_t | ..)),
and A_t = A(y) on every token of y, from R against the other responses to x (group_advantages: RLOO's leave-one-out
mean, GRPO's group mean and std); L = L_pi. No critic, no value head: one trunk, one LoRA set.

E_t is the mean over real response tokens (per micro-batch, averaged over the minibatch by rows); the KL enters only
through the reward, never as a loss term. The score may also be clipped (--score-clip), charged for a missing EOS
(--missing-eos-penalty) and r whitened (--whiten-rewards): rewards_and_advantages.
The flags: eps --cliprange, eps_v --cliprange-value, gamma --gamma, lam --lam, vf_coef --vf-coef (harness.PPOConfig
holds every hyperparameter with its default and its meaning).

Read in this order: HydraModel (the two heads), sft_loss (Hydra-SFT), the PPO maths (compute_gae, ppo_policy_loss,
ppo_value_loss; group_advantages without a critic), MODES and build_roles (which models each configuration holds),
generate, then ppo_step (one PPO iteration: rollout, steps 1-4; ppo_update, step 5; update_kl_coef, step 6), and
the loops sft_loop and ppo_loop.
"""
import math
import time
import typing
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from lora import (DEFAULT_TARGETS, LINEAR_TYPES, add_lora, decoder_layers, folded, lora_off, lora_parameters,
                  use_adapter)


class UserError(Exception):
    """A mistake in the input or the configuration: the command line prints it as one line (no traceback), exit 2."""


def check(cond, msg):
    """A user-facing check: a one-line error instead of a traceback."""
    if not cond:
        raise UserError(msg)


# ----------------------------------------------------------------------------------------------------------------
# Device and precision, in one object as nanoGPT keeps them in one block. bf16 (auto on CUDA) is CUDA's set-up on any
# device (the CPU has a bf16 autocast too): frozen trunks load in `dtype` and run under bf16 autocast, while what is
# trained (LoRA, heads, full fine-tuning's master weights) and AdamW's state stay fp32. Heads always compute in fp32.

class Run(typing.NamedTuple):
    device: torch.device
    dtype: torch.dtype           # of the frozen trunks
    autocast: typing.Callable    # autocast(): the context every forward runs in
    rank: int = 0                # data parallel (torchrun): this process, of `world`
    world: int = 1


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


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


# ----------------------------------------------------------------------------------------------------------------
# The two-head model: one decoder, an LM head (the causal LM's own), a reward head and a value head.

LOGITS_CHUNK = 16  # response positions per LM-head chunk: B x 16 x V logits at a time


def token_logprobs(final_logits, h, labels, entropy, temperature):
    """log softmax(logits(h) / T)[label] for one chunk: (B, C, H) -> (B, C), and the entropy (no grad: only logged).
    T is the sampling temperature: the policy PPO optimises is the distribution the responses were sampled from."""
    B, C, H = h.shape
    logits = final_logits(h.reshape(B * C, H)).view(B, C, -1) / temperature  # (B, C, V); 2-D: a strided slice is slower
    lp = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    if not entropy:
        return lp
    with torch.no_grad():
        logp = logits.log_softmax(-1)
        return lp, -(logp.exp() * logp).sum(-1)  # H = -sum_v p log p


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
        # The model's own last step from its LM head to the logits generate() samples from: Cohere multiplies by
        # logit_scale, Granite divides by logits_scaling, Gemma 2 and 3 soft-cap, cap * tanh(logits / cap).
        config = lm.config
        self.logit_scale = getattr(config, "logit_scale", None) or 1 / (getattr(config, "logits_scaling", None) or 1)
        self.softcap = getattr(config, "final_logit_softcapping", None)
        if device.type != "meta":
            self.check_logits()

    def final_logits(self, h):
        """(N, H) -> (N, V) fp32 logits of the distribution the model samples from: PPO's ratio and KL are exact
        only for that one."""
        logits = self.lm.get_output_embeddings()(h).float()
        logits = logits * self.logit_scale if self.logit_scale != 1 else logits
        return self.softcap * torch.tanh(logits / self.softcap) if self.softcap else logits

    @torch.no_grad()
    def check_logits(self):
        """final_logits must give the model's own logits: a family with another final step (not one of the three
        above) is refused, rather than trained on log-probs of a distribution it never samples from."""
        lm, V = self.lm, self.lm.get_output_embeddings().out_features
        ids = torch.arange(3, 11, device=self.reward_head.weight.device)[None] % V  # (1, 8)
        was, _ = lm.training, lm.eval()
        theirs = lm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()[0]  # (8, V)
        ours = self.final_logits(self(ids, torch.ones_like(ids))[0])
        lm.train(was)
        tol = 1e-4 if lm.get_output_embeddings().weight.dtype == torch.float32 else 2e-2
        check(torch.allclose(ours, theirs, rtol=tol, atol=tol * theirs.abs().max().item()),
              f"{type(lm).__name__}: its logits come from a final step after the LM head that hydra-ppo does not "
              f"apply (largest difference {(ours - theirs).abs().max().item():.3g}); PPO's log-probs would not be "
              f"those of the distribution it samples from")

    def forward(self, input_ids, attention_mask):
        # Positions count real tokens only, so a left-padded prompt starts at position 0 like an unpadded one.
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        out = self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 use_cache=False)
        return out.last_hidden_state  # (B, T, H)

    def logprobs(self, hidden, input_ids, start, entropy=False, temperature=1.0):
        """Log-probs of tokens input_ids[:, start:] (needs start >= 1), and their entropy if asked. Only response
        positions go through the LM head, LOGITS_CHUNK positions at a time under activation checkpointing: the
        (B, R, V) logits never exist at once, in the forward or the backward (which recomputes each chunk)."""
        h = hidden[:, start - 1:-1]           # (B, R, H): the state at t-1 predicts token t
        labels = input_ids[:, start:]         # (B, R)
        chunks = [checkpoint(token_logprobs, self.final_logits, h[:, i:i + LOGITS_CHUNK], labels[:, i:i + LOGITS_CHUNK],
                             entropy, temperature, use_reentrant=False) for i in range(0, h.shape[1], LOGITS_CHUNK)]
        if not entropy:
            return torch.cat(chunks, 1)  # (B, R)
        return torch.cat([c[0] for c in chunks], 1), torch.cat([c[1] for c in chunks], 1)

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


def checkpointing_on(lm):
    """Activation (gradient) checkpointing, by either of transformers' names for it. Non-reentrant: works with a
    frozen trunk."""
    if hasattr(lm, "activation_checkpointing_enable"):
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


# ----------------------------------------------------------------------------------------------------------------
# Hydra-SFT: one decoder pass over [prompt+chosen ; prompt+rejected] feeds both heads.
#   loss = lm_coef * CE(chosen response tokens) + rm_coef * -log sigmoid(r_chosen - r_rejected)

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


# ----------------------------------------------------------------------------------------------------------------
# PPO maths: small pure functions on (B, R) tensors; `mask` is 1 on real response tokens (right-padded).

def masked_whiten(x, mask, shift_mean=True):
    """(x - mean) / std over the real tokens; shift_mean=False adds the mean back (unit spread, the same mean)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    white = (x - mean) * torch.rsqrt(var + 1e-8)
    return white if shift_mean else white + mean


def compute_gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """Generalized advantage estimation (Schulman et al. 2015), per token of right-padded responses.
        delta_t = r_t + gamma * V(s_{t+1}) - V(s_t),   the value after the last real token is 0
        A_t     = delta_t + gamma * lam * A_{t+1}
        returns = A + V
    rewards, values, mask: (B, R) over response tokens. -> (advantages, returns), both (B, R) and 0 on padding."""
    rewards, values = rewards * mask, values * mask  # padding carries no reward and no value
    R = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(R)):
        next_value = values[:, t + 1] if t + 1 < R else torch.zeros_like(last)  # 0 past the end (masked)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, cliprange):
    """Clipped surrogate (Schulman et al. 2017):  L = E[max(-A r, -A clip(r, 1-eps, 1+eps))],  r = pi/pi_old."""
    logratio = logprobs - old_logprobs
    ratio = torch.exp(logratio)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = masked_mean(torch.max(pg_losses, pg_losses2), mask)
    with torch.no_grad():
        stats = dict(pg_loss=pg_loss.item(),
                     approx_kl=masked_mean((ratio - 1) - logratio, mask).item(),  # k3 estimator, >= 0
                     clipfrac=masked_mean((pg_losses2 > pg_losses).float(), mask).item(),
                     ratio=masked_mean(ratio, mask).item())
    return pg_loss, stats


def ppo_value_loss(vpred, old_values, returns, mask, cliprange_value):
    """Clipped value loss:  0.5 * E[max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2)]."""
    vpred_clipped = old_values + torch.clamp(vpred - old_values, -cliprange_value, cliprange_value)
    vf_losses = torch.max((vpred - returns) ** 2, (vpred_clipped - returns) ** 2)
    vf_loss = 0.5 * masked_mean(vf_losses, mask)
    with torch.no_grad():
        stats = dict(vf_loss=vf_loss.item(),
                     vf_clipfrac=masked_mean(((vpred_clipped - returns) ** 2 > (vpred - returns) ** 2).float(),
                                             mask).item())
    return vf_loss, stats


def explained_variance(values, returns, mask):
    return 1 - (masked_mean((returns - values - masked_mean(returns - values, mask)) ** 2, mask)
                / masked_mean((returns - masked_mean(returns, mask)) ** 2, mask).clamp(min=1e-8)).item()


def normalize_rewards(critic, score):
    """Reward normalisation (Ziegler et al. 2019; summarize_from_feedback_details): the mean and std of the reward
    model's scores (B,) on the SFT policy's samples; PPO then rewards (score - mean) / std, so the SFT policy scores
    0 on average whatever the reward model's scale. The value head (critic: None in a critic-free mode), a copy of
    the reward head, is shifted and scaled the same way, so that it still predicts the rewards it will be trained
    on. -> (mean, std)"""
    moments = mean_over_ranks(dict(m=score.mean().item(), m2=(score ** 2).mean().item()))
    mean, std = moments["m"], max(moments["m2"] - moments["m"] ** 2, 1e-6) ** 0.5
    if critic is not None:
        with torch.no_grad():
            critic.value_head.weight.div_(std)
            critic.value_head.bias.sub_(mean).div_(std)
    return mean, std


def group_advantages(rewards, k, estimator):
    """Critic-free advantages, one per response: rewards (B,), rows i*k .. i*k+k-1 the k responses to prompt i.
        rloo: A_i = R_i - 1/(k-1) sum_{j != i} R_j       leave-one-out baseline (Ahmadian et al. 2024; TRL RLOOTrainer)
        grpo: A_i = (R_i - mean_j R_j) / (std_j R_j + 1e-4)  group-normalised (Shao et al. 2024; TRL GRPOTrainer; the
              std unbiased, as torch.std)
    j runs over the group of R_i's prompt. -> (B,)"""
    R = rewards.view(-1, k)                                        # (B / k, k): a row per prompt
    if estimator == "rloo":
        A = R - (R.sum(1, keepdim=True) - R) / (k - 1)
    else:
        A = (R - R.mean(1, keepdim=True)) / (R.std(1, keepdim=True) + 1e-4)
    return A.reshape(-1)


def update_kl_coef(beta, kl, target, n, horizon):
    """Adaptive KL controller (Ziegler et al. 2019): nudge beta so the KL per sequence approaches `target`."""
    error = max(-0.2, min(0.2, kl / target - 1))
    return beta * (1 + error * n / horizon)


# ----------------------------------------------------------------------------------------------------------------
# The five PPO configurations (paper, Table 2), in one table. Four roles: the actor, the critic, the reference policy
# (ref) and the reward model (rm). Each role is a trunk with one adapter on, read through one head (HEADS). A trunk is
# a model loaded from a checkpoint: "sft" from --sft (Hydra-SFT in hydra and jhydra, whose reward head is then the
# reward model), "rm" from --rm, "... copy" a second, frozen one. LORA_OFF: the trunk itself, LoRA off; a trained role
# with LORA_OFF (full) trains its whole trunk, in fp32. The learning rates where --actor-lr / --critic-lr are 0: LoRA
# trains a few new weights from zero at the paper's actor rate 5e-4, the critic at that rate too (OpenRLHF: a critic
# rate at or above the actor's), not the paper's 5e-5, at which the critic did not learn (RESULTS.md: the critic);
# full fine-tuning moves every weight of a trained model, at the paper's full fine-tuning scale (its SFT and RM rates).
# Beyond the paper, rloo and grpo: Hydra with a critic-free estimator of the advantages (group_advantages). No critic
# role, no value head: 1 trunk and 1 LoRA set, LoRA off still the reference policy and the reward model.

LORA_OFF = None
NO_CRITIC = None
HEADS = dict(actor="lm", critic="value", ref="lm", rm="reward")
ROLES = tuple(HEADS)
#           actor              critic             reference              reward model         advantages  lr: a, c
MODES = {mode: dict(zip(ROLES + ("advantages", "lr"), row)) for mode, row in dict(
    full=  (("sft", LORA_OFF), ("rm", LORA_OFF),  ("sft copy", LORA_OFF), ("rm copy", LORA_OFF), "gae",  (5e-7, 1e-6)),
    lora=  (("sft", "actor"),  ("rm", "critic"),  ("sft copy", LORA_OFF), ("rm copy", LORA_OFF), "gae",  (5e-4, 5e-4)),
    dlora= (("sft", "actor"),  ("rm", "critic"),  ("sft", LORA_OFF),      ("rm", LORA_OFF),      "gae",  (5e-4, 5e-4)),
    jhydra=(("sft", "shared"), ("sft", "shared"), ("sft", LORA_OFF),      ("sft", LORA_OFF),     "gae",  (5e-4, 5e-4)),
    hydra= (("sft", "actor"),  ("sft", "critic"), ("sft", LORA_OFF),      ("sft", LORA_OFF),     "gae",  (5e-4, 5e-4)),
    rloo=  (("sft", "actor"),  NO_CRITIC,         ("sft", LORA_OFF),      ("sft", LORA_OFF),     "rloo", (5e-4, None)),
    grpo=  (("sft", "actor"),  NO_CRITIC,         ("sft", LORA_OFF),      ("sft", LORA_OFF),     "grpo", (5e-4, None)),
).items()}  # MODES["hydra"]["ref"] == ("sft", LORA_OFF)
GROUP_SIZE = 4  # k, responses per prompt, of rloo and grpo where --group-size is 0 (GAE modes: 1)


class Role(typing.NamedTuple):
    model: HydraModel
    adapter: typing.Optional[str]  # LORA_OFF: the trunk itself (LoRA off; in full mode the whole model)
    head: str                      # "lm" | "value" | "reward" (the reward head)


def add_adapter(lm, cfg, adapter="default"):
    """add_lora with the run's rank, alpha and --lora-targets; a one-line error when no layer matches."""
    names = cfg.lora_targets.strip()  # "" or "all-linear" (peft's word for the default): every linear map
    targets = tuple(t.strip() for t in names.split(",")) if names not in ("", DEFAULT_TARGETS) else DEFAULT_TARGETS
    own = sorted({n.rsplit(".", 1)[-1] for n, m in decoder_layers(lm).named_modules() if isinstance(m, LINEAR_TYPES)})
    check(targets == DEFAULT_TARGETS or any(t.rsplit(".", 1)[-1] in own for t in targets),
          f"--lora-targets {names}: no linear map of the decoder layers is named so (this model's: {', '.join(own)})")
    try:
        return add_lora(lm, targets, r=cfg.lora_r, alpha=cfg.lora_alpha, adapter=adapter)
    except ValueError as e:
        raise UserError(f"{e} (--lora-targets)") from None


def build_roles(cfg, load):
    """-> {actor, critic, ref, rm: Role}: exactly the models MODES gives cfg.mode, each trunk loaded once, by
    load(checkpoint, fp32): a new, frozen HydraModel of "sft" or "rm". Full fine-tuning keeps every trunk in fp32: the
    trained ones as master weights, the frozen copies so that they compute exactly as the actor does (KL 0 at step
    1)."""
    table, trunks = MODES[cfg.mode], {}
    full = table["actor"][1] is LORA_OFF
    names = [r for r in ROLES if table[r] is not NO_CRITIC]  # rloo, grpo: no critic

    def trunk(role):
        name = table[role][0]
        if name not in trunks:
            trunks[name] = load(name.split()[0], fp32=full)
        return trunks[name]
    trained = {table[r][1]: trunk(r) for r in trained_roles(names)}  # adapter -> trunk (jhydra: one; full: LORA_OFF)
    for adapter, model in trained.items():
        if adapter is not LORA_OFF:
            add_adapter(model.lm, cfg, adapter)
    roles = {r: Role(trunk(r), table[r][1], HEADS[r]) for r in names}
    if "critic" in roles:
        critic = roles["critic"].model
        critic.value_head.load_state_dict(critic.reward_head.state_dict())  # the critic starts from the reward model
    else:
        roles["actor"].model.value_head = None  # critic-free: no value head at all
    return roles


def trained_roles(names):
    """The roles PPO trains, of `names`: the actor, and the critic where the mode has one."""
    return [n for n in ("actor", "critic") if n in names]


def group_size(cfg):
    """k, the responses sampled per prompt: --group-size, or where it is 0, GROUP_SIZE for a critic-free mode, 1 for
    PPO with GAE."""
    return cfg.group_size or (1 if MODES[cfg.mode]["advantages"] == "gae" else GROUP_SIZE)


def learning_rates(cfg):
    """-> (actor_lr, critic_lr): the flags, or where one is 0, the mode's default (MODES)."""
    actor_lr, critic_lr = MODES[cfg.mode]["lr"]
    return cfg.actor_lr or actor_lr, cfg.critic_lr or critic_lr


def trainable_groups(roles, cfg):
    """Optimizer parameter groups: actor (actor_lr) and critic (critic_lr; none in a critic-free mode). Everything
    else stays frozen."""
    actor, critic = roles["actor"], roles.get("critic")
    if actor.adapter is LORA_OFF:  # full: the whole models (the critic's LM head is not used)
        a, c = list(actor.model.lm.parameters()), list(critic.model.lm.base_model.parameters())
    else:
        a = lora_parameters(actor.model, actor.adapter)
        c = [] if critic is None or critic.adapter == actor.adapter else lora_parameters(critic.model, critic.adapter)
    # The value head is new: it trains in every mode with a critic (in jhydra it is the critic's whole group; the
    # shared adapter is in the actor's, at actor_lr, trained by both losses).
    c += list(critic.model.value_head.parameters()) if critic else []
    for p in a + c:
        p.requires_grad_(True)
    actor_lr, critic_lr = learning_rates(cfg)
    return [dict(params=a, lr=actor_lr)] + ([dict(params=c, lr=critic_lr)] if critic else [])


@dataclass
class Learner:
    """What PPO trains and what changes as it does: the roles, AdamW over the trained parameters (trainable_groups'
    order), the RNG that shuffles minibatches, and beta, the KL coefficient (adaptive with --target-kl)."""
    roles: dict
    opt: typing.Optional[torch.optim.Optimizer]
    params: list
    generator: typing.Optional[torch.Generator]
    beta: float
    score_norm: typing.Optional[tuple] = None  # (mean, std) of the first rollout's scores (--reward-norm)


def setup_ppo(cfg, load):
    """-> Learner. LoRA's A init draws from the seeded RNG."""
    torch.manual_seed(cfg.seed)
    roles = build_roles(cfg, load)
    groups = trainable_groups(roles, cfg)
    if cfg.grad_checkpointing:
        for name in trained_roles(roles):
            checkpointing_on(roles[name].model.lm)
    return Learner(roles, torch.optim.AdamW(groups, weight_decay=0.0), [p for g in groups for p in g["params"]],
                   torch.Generator().manual_seed(cfg.seed), cfg.kl_coef)


def adapter_on(role):
    """The role's adapter on; LORA_OFF: LoRA off, the trunk itself (the reference policy, the reward model)."""
    return lora_off(role.model) if role.adapter is LORA_OFF else use_adapter(role.model, role.adapter)


def passes(roles, names):
    """Group roles by (trunk, adapter): one decoder pass feeds every head of a group. In hydra the reference and
    the reward model share one pass; in jhydra the actor and the critic do too."""
    groups = {}
    for n in names:
        r = roles[n]
        groups.setdefault((id(r.model), r.adapter), (r, []))[1].append(n)
    return list(groups.values())


def models_of(roles):
    return list({id(r.model): r.model for r in roles.values()}.values())


# ----------------------------------------------------------------------------------------------------------------
# Sampling

@torch.no_grad()
def generate(role, prompt_ids, prompt_mask, tok, cfg, greedy=False):
    """Sample up to cfg.max_response_len tokens from `role` (its adapter on, or LoRA off; cfg.fold_lora: the adapter
    folded into a copy of the weights), at cfg.temperature, top_k, top_p. -> ids (B, P+R), mask (B, P+R), has_eos (B,).
    Responses are cut after their first EOS (kept: the policy learns to stop) and right-padded."""
    from transformers import GenerationConfig
    # Every field that shapes the distribution is set, so that the samples come from pi: a checkpoint's
    # generation_config.json (e.g. a repetition_penalty) would fill in any field left unset, or even one set to its
    # global default, so the model's own is blank while sampling. No two fields contradict each other (transformers
    # warns on every call if they do): no sampling fields when greedy; min_length=P (no minimum response length) only
    # overrides a checkpoint's own.
    P = prompt_ids.shape[1]
    sampling = dict(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, min_p=None, typical_p=1.0,
                    epsilon_cutoff=0.0, eta_cutoff=0.0)
    gen = GenerationConfig(do_sample=not greedy, **({} if greedy else sampling), repetition_penalty=1.0,
                           no_repeat_ngram_size=0, bad_words_ids=None, suppress_tokens=None,
                           begin_suppress_tokens=None, sequence_bias=None, forced_bos_token_id=None,
                           forced_eos_token_id=None, min_length=P, max_new_tokens=cfg.max_response_len,
                           pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    lm = role.model.lm
    own, lm.generation_config = lm.generation_config, GenerationConfig()
    try:
        fold = cfg.fold_lora and role.adapter is not LORA_OFF
        with adapter_on(role), (folded(role.model, role.adapter) if fold else nullcontext()):
            out = lm.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=gen)
    finally:
        lm.generation_config = own
    resp = out[:, P:]                                            # (B, R)
    is_eos = resp == tok.eos_token_id
    has_eos = is_eos.any(1)
    first_eos = torch.where(has_eos, is_eos.int().argmax(1), resp.shape[1])
    resp_mask = (torch.arange(resp.shape[1], device=resp.device) <= first_eos[:, None]).long()  # EOS included
    R = int(resp_mask.sum(1).max())
    resp, resp_mask = resp[:, :R].masked_fill(resp_mask[:, :R] == 0, tok.pad_token_id), resp_mask[:, :R]
    return torch.cat([prompt_ids, resp], 1), torch.cat([prompt_mask, resp_mask], 1), has_eos


# ----------------------------------------------------------------------------------------------------------------
# One PPO iteration, ppo_step (the end of this section): a rollout, the update, the KL coefficient.
#   1 sample (generate)  2 score (score_rollout)  3 KL-shaped rewards, 4 GAE (rewards_and_advantages): rollout
#   5 update (ppo_update)  6 the KL coefficient (update_kl_coef)
# Tensors of the rollout: ids, mask (B, P+R) in the token layout above; resp_mask (B, R) 1 on response tokens up to
# EOS; per-token logprobs, ref_logprobs, values (B, R); score (B,), the reward model's.

class Clock:
    """For the time_* metrics (where a step's time goes): seconds since the last call (CUDA work is asynchronous: synchronize before reading the time)."""
    def __init__(self, device):
        self.device, self.t = device, time.perf_counter()

    def __call__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t, self.t = self.t, time.perf_counter()
        return self.t - t


@torch.no_grad()
def score_rollout(roles, names, ids, mask, P, cfg, run):
    """Step 2: the heads of the roles `names` on the rollout, in chunks of cfg.micro_batch_size rows, one decoder pass
    per (trunk, adapter) (see passes). -> {name: (B, R) log-probs (actor, ref) or values (critic), (B,) score (rm)}."""
    out = {n: [] for n in names}
    for i in range(0, ids.shape[0], cfg.micro_batch_size):
        ids_c, mask_c = ids[i:i + cfg.micro_batch_size], mask[i:i + cfg.micro_batch_size]
        for role, group in passes(roles, names):
            with adapter_on(role), run.autocast():
                h = role.model(ids_c, mask_c)  # (b, P+R, H)
                for n in group:  # the role's head: (b, R) log-probs or values, (b,) score
                    m, head = roles[n].model, roles[n].head
                    out[n].append((m.logprobs(h, ids_c, P, temperature=cfg.temperature) if head == "lm" else
                                   m.values(h, P) if head == "value" else m.score(h, mask_c)).float())
    return {n: torch.cat(v) for n, v in out.items()}


def rewards_and_advantages(batch, cfg):
    """Steps 3-4: KL-shaped rewards, then the advantages (GAE: and the returns), added to `batch`. -> stats."""
    resp_mask, score, beta, values = batch["resp_mask"], batch["score"], batch["beta"], batch["values"]
    # 3. Rewards: r_t = -beta * (log pi(y_t) - log pi_ref(y_t)), plus the score at the last response token,
    #    normalised (--reward-norm), clipped (--score-clip), less --missing-eos-penalty.
    if batch["score_norm"]:
        score = (score - batch["score_norm"][0]) / batch["score_norm"][1]
    if cfg.score_clip:
        score = score.clamp(-cfg.score_clip, cfg.score_clip)
    if cfg.missing_eos_penalty:
        score = torch.where(batch["has_eos"], score, score - cfg.missing_eos_penalty)
    kl = (batch["logprobs"] - batch["ref_logprobs"]) * resp_mask  # (B, R) per-token log-ratio
    stats = dict(score=batch["score"].mean().item(), kl=kl.sum(1).mean().item(), beta=beta,  # the RM's own scale
                 response_len=resp_mask.sum(1).mean().item(), eos_frac=batch["has_eos"].float().mean().item())
    estimator = MODES[cfg.mode]["advantages"]
    if estimator != "gae":  # critic-free: one reward per response, R = score - beta * KL, its advantage on every token
        rewards = score - beta * kl.sum(1)                        # (B,)
        batch["advantages"] = group_advantages(rewards, group_size(cfg), estimator)[:, None] * resp_mask
        return dict(stats, reward=rewards.mean().item())
    rewards = -beta * kl
    last = resp_mask.sum(1).long() - 1                            # (B,) index of the last response token
    rewards[torch.arange(len(last), device=last.device), last] += score
    if cfg.whiten_rewards:
        rewards = masked_whiten(rewards, resp_mask, shift_mean=False) * resp_mask
    # 4. Advantages: GAE over the response tokens, whitened over real tokens.
    advantages, returns = compute_gae(rewards, values, resp_mask, cfg.gamma, cfg.lam)
    batch["advantages"], batch["returns"] = masked_whiten(advantages, resp_mask) * resp_mask, returns
    return dict(stats, reward=rewards.sum(1).mean().item(),
                explained_var=explained_variance(values, returns, resp_mask))


def rollout(learner, tok, p_ids, p_mask, cfg, run, fast=False):
    """Steps 1-4 on left-padded prompts (B / k, P), k = group_size. -> batch (the rollout's tensors, B rows), stats.
    fast (one_pass): the actor's pass (in jhydra also the critic's) and steps 3-4 are left to the update's first
    forward."""
    roles, clock = learner.roles, Clock(p_ids.device)
    for model in models_of(roles):
        model.eval()
    # 1. Sample k responses per prompt from the actor (its adapter on; --fold-lora: folded into a copy of the weights).
    #    Rows i*k .. i*k+k-1 answer prompt i: the group a critic-free estimator compares.
    k = group_size(cfg)
    p_ids, p_mask = p_ids.repeat_interleave(k, 0), p_mask.repeat_interleave(k, 0)  # (B, P)
    with run.autocast():
        ids, mask, has_eos = generate(roles["actor"], p_ids, p_mask, tok, cfg)
    P = p_ids.shape[1]
    stats = dict(time_generate=clock())
    # 2. Score. The reference policy and the reward model: their adapter is LORA_OFF in every mode (one pass for
    #    both heads in hydra and jhydra, two in dlora; lora and full hold frozen copies without LoRA).
    with_lora_off = score_rollout(roles, ("ref", "rm"), ids, mask, P, cfg, run)
    #    --reward-norm: the first rollout, the SFT policy's (nothing trained yet), sets the scores' mean and std; the value
    #    head is rescaled before it reads the rollout.
    if cfg.reward_norm and learner.score_norm is None:
        learner.score_norm = normalize_rewards(roles["critic"].model if "critic" in roles else None,
                                               with_lora_off["rm"])
    #    The old log-probs (actor) and values (critic), each with its adapter on.
    trained = trained_roles(roles)
    in_update = passes(roles, trained)[0][1] if fast else []
    adapters_on = score_rollout(roles, [n for n in trained if n not in in_update], ids, mask, P, cfg, run)
    batch = dict(ids=ids, mask=mask, P=P, has_eos=has_eos, beta=learner.beta, score_norm=learner.score_norm,
                 resp_mask=mask[:, P:].float(),  # (B, R) 1 on response tokens up to EOS
                 ref_logprobs=with_lora_off["ref"], score=with_lora_off["rm"], logprobs=adapters_on.get("actor"),
                 values=adapters_on.get("critic"))
    stats["time_score"] = clock()
    # 3. KL-shaped rewards, 4. GAE advantages.
    if not fast:
        stats.update(rewards_and_advantages(batch, cfg))
    return batch, stats


def actor_critic_loss(role, names, batch, idx, cfg, run):
    """Step 5's loss on the rows idx, from one forward of `role` (its adapter on, in the caller): pg_loss (when the
    actor reads it) + vf_coef * vf_loss (when the critic does). -> (loss, stats)."""
    ids, mask, resp_mask, loss, stats = batch["ids"][idx], batch["mask"][idx], batch["resp_mask"][idx], 0.0, {}
    with run.autocast():
        h = role.model(ids, mask)  # (b, P+R, H)
        logprobs, entropy, vpred = None, None, None
        if "actor" in names:
            logprobs, entropy = role.model.logprobs(h, ids, batch["P"], entropy=True, temperature=cfg.temperature)
            logprobs = logprobs.float()  # (b, R)
        if "critic" in names:
            vpred = role.model.values(h, batch["P"])  # (b, R)
        if "advantages" not in batch:  # the one_pass fast path: this, the update's first forward, ran at theta_old
            old_from_this_pass(batch, idx, logprobs, vpred)
            stats.update(rewards_and_advantages(batch, cfg))
        if logprobs is not None:
            pg_loss, s = ppo_policy_loss(logprobs, batch["logprobs"][idx], batch["advantages"][idx], resp_mask,
                                         cfg.cliprange)
            stats.update(s, entropy=masked_mean(entropy, resp_mask).item())
            loss = loss + pg_loss
        if vpred is not None:
            vf_loss, s = ppo_value_loss(vpred, batch["values"][idx], batch["returns"][idx], resp_mask,
                                        cfg.cliprange_value)
            stats.update(s)
            loss = loss + cfg.vf_coef * vf_loss
    return loss, stats


def average_gradients(params):
    """Data parallel (torchrun): the mean of every trained gradient over the ranks. No-op in one process."""
    import torch.distributed as dist
    if not dist.is_initialized():
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    for work in [dist.all_reduce(p.grad, async_op=True) for p in params]:
        work.wait()
    for p in params:
        p.grad /= dist.get_world_size()


def mean_over_ranks(stats):
    """Data parallel: every stat averaged over the ranks. No-op in one process."""
    import torch.distributed as dist
    if not dist.is_initialized():
        return stats
    t = torch.tensor(list(stats.values()), dtype=torch.float64,
                     device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return dict(zip(stats, (t / dist.get_world_size()).tolist()))


def optimizer_step(opt, params, max_grad_norm):
    """The gradients averaged over ranks, each parameter group (PPO: the actor's, the critic's) clipped to
    max_grad_norm on its own, as the separate actor and critic optimizers of DeepSpeed-Chat and OpenRLHF are (the
    value loss's gradients must not shrink the actor's step); then one step, never with a non-finite gradient (the
    parameters stay good), gradients zeroed. -> each group's gradient norm before clipping."""
    average_gradients(params)  # data parallel (no-op in one process)
    norms = [torch.nn.utils.clip_grad_norm_(g["params"], max_grad_norm).item() for g in opt.param_groups]
    if all(math.isfinite(n) for n in norms):
        opt.step()
    opt.zero_grad(set_to_none=True)
    return norms


def minibatch_step(learner, mb, batch, cfg, run):
    """One optimizer step on the rows mb: gradients accumulated over micro-batches, one forward per (trunk, adapter)
    of the actor and the critic (one in jhydra). -> stats."""
    stats = {}
    for idx in mb.split(cfg.micro_batch_size):
        weight = len(idx) / len(mb)
        for role, names in passes(learner.roles, trained_roles(learner.roles)):
            with adapter_on(role):  # backward() inside: gradient checkpointing recomputes with it on
                loss, s = actor_critic_loss(role, names, batch, idx, cfg, run)
                (loss * weight).backward()
            for k, v in s.items():
                stats[k] = stats.get(k, 0.0) + v * weight
    norms = optimizer_step(learner.opt, learner.params, cfg.max_grad_norm)  # [actor's, critic's (if any)]
    stats.update(zip(("grad_norm", "critic_grad_norm"), norms), skipped=float(not math.isfinite(sum(norms))))
    return stats


def ppo_update(learner, batch, cfg, run):
    """Step 5: ppo_epochs over shuffled minibatches, one optimizer step each. -> a stats dict per minibatch."""
    for model in models_of(learner.roles):
        model.train()  # PPO's trunks load with every dropout rate 0; in transformers train() turns checkpointing on
    all_stats = []
    for _ in range(cfg.ppo_epochs):
        perm = torch.randperm(batch["ids"].shape[0], generator=learner.generator).to(batch["ids"].device)
        all_stats += [minibatch_step(learner, mb, batch, cfg, run) for mb in perm.split(cfg.minibatch_size)]
    return all_stats


def one_pass(cfg, B):
    """The fast path of the paper's setting: 1 PPO epoch, one optimizer step, one forward over the whole batch of B
    rows. That forward runs at theta_old, so its detached outputs are the old log-probs (and values, where the critic
    shares the pass): the rollout skips that pass, and steps 3-4 run in the update, after that forward
    (actor_critic_loss). Exact (the ratio is 1), with a pass fewer."""
    return cfg.ppo_epochs == 1 and B <= min(cfg.minibatch_size, cfg.micro_batch_size)


def old_from_this_pass(batch, idx, logprobs, values):
    """The one_pass fast path: the update's first forward (at theta_old), detached, gives the old log-probs of the
    rows idx (all of them), and the old values where the critic shares the pass (jhydra; else values is None)."""
    assert len(idx) == batch["ids"].shape[0], "one_pass needs one forward over the whole batch"
    batch["logprobs"] = torch.empty_like(logprobs).index_copy(0, idx, logprobs.detach())
    if values is not None:
        batch["values"] = torch.empty_like(values).index_copy(0, idx, values.detach())


def ppo_step(learner, tok, p_ids, p_mask, cfg, run):
    """One PPO iteration on left-padded prompts (B / k, P), its steps in order. -> batch (the rollout's tensors, B
    responses), stats (averaged over minibatches and ranks; the time of each phase)."""
    fast = one_pass(cfg, p_ids.shape[0] * group_size(cfg))
    batch, stats = rollout(learner, tok, p_ids, p_mask, cfg, run, fast)  # steps 1-4 (fast: 1-2)
    clock = Clock(p_ids.device)
    # 5. Update: ppo_epochs over minibatches, clipped policy and value losses (fast: after steps 3-4).
    mb_stats = ppo_update(learner, batch, cfg, run)
    stats["time_update"] = clock()
    stats = mean_over_ranks({**stats, **{k: sum(s[k] for s in mb_stats if k in s) / len(mb_stats)
                                         for k in mb_stats[0]}})
    # 6. The adaptive KL controller (--target-kl): beta for the next iteration, from the KL this one measured in step 3
    #    (over every rank's rollouts); not after a step whose updates all were skipped.
    if cfg.target_kl and stats["skipped"] < 1:
        learner.beta = update_kl_coef(learner.beta, stats["kl"], cfg.target_kl, cfg.batch_size * run.world,
                                      cfg.kl_horizon)
    return batch, stats


# ----------------------------------------------------------------------------------------------------------------
# The loops. The harness gives each its data (draw(): the next batch, this rank's shard) and does the logging,
# checkpoints and resume between the steps they yield.

def loss_weights(cfg):
    """-> (lm_coef, rm_coef): the weights of the losses --task trains (sft: the LM loss only, rm: the reward loss)."""
    return 0.0 if cfg.task == "rm" else cfg.lm_coef, 0.0 if cfg.task == "sft" else cfg.rm_coef


def sft_step(model, opt, params, draw, cfg, run):
    """One Hydra-SFT optimizer step, gradients accumulated over micro-batches; draw() -> (ids, mask, P, n): the next
    micro-batch of n pairs in the token layout (rows n.. the rejected responses). -> (stats, gradient norm)."""
    stats, (lm_coef, rm_coef) = {}, loss_weights(cfg)
    for _ in range(cfg.batch_size // cfg.micro_batch_size):  # gradient accumulation
        ids, mask, P, n = draw()
        with run.autocast():
            loss, s = sft_loss(model, ids.to(run.device), mask.to(run.device), P, n, lm_coef, rm_coef)
        (loss * cfg.micro_batch_size / cfg.batch_size).backward()
        for k, v in s.items():
            stats[k] = stats.get(k, 0.0) + v * cfg.micro_batch_size / cfg.batch_size
    return mean_over_ranks(stats), optimizer_step(opt, params, cfg.max_grad_norm)[0]  # one group


def sft_loop(model, opt, params, draw, cfg, run, steps):
    """Hydra-SFT: `steps` optimizer steps. Yields (step, stats, gradient norm)."""
    model.train()
    for step in range(1, steps + 1):
        yield (step, *sft_step(model, opt, params, draw, cfg, run))


def ppo_loop(learner, tok, draw, cfg, run, first=1):
    """PPO: iterations first .. cfg.steps, each a ppo_step on the prompts draw() gives ((B, P) ids, mask). Yields
    (step, stats)."""
    for step in range(first, cfg.steps + 1):
        yield step, ppo_step(learner, tok, *draw(), cfg, run)[1]


# ----------------------------------------------------------------------------------------------------------------
# Evaluation: responses of the trained policy vs the SFT policy (LoRA off / the frozen reference) on held-out
# prompts, judged by the reward model or any judge(prompts, responses) -> list of floats (the paper used GPT-4).

def win_rate_interval(per_prompt, level=0.95, resamples=2000, seed=0):
    """-> (lo, hi): percentile bootstrap over prompts of the mean win-rate. One draw is one prompt's win-rate (its
    PPO x SFT response pairs, a tie counting 0.5): responses to the same prompt are not independent, prompts are.
    Seeded, so the same win-rates give the same interval."""
    x = torch.tensor(per_prompt, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    means = x[torch.randint(len(x), (resamples, len(x)), generator=g)].mean(1)  # (resamples,) resampled prompt sets
    lo, hi = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)).tolist()
    return lo, hi


def verdict(interval):
    """What a win-rate interval says: PPO is better or worse than SFT only when 0.5 (a tie) lies outside it."""
    lo, hi = interval
    return "no significant difference" if lo <= 0.5 <= hi else "PPO better" if lo > 0.5 else "SFT better"


def decode_responses(tok, ids, mask, P):
    """The response part (columns P:) of each row as text, padding and special tokens dropped."""
    return tok.batch_decode(ids[:, P:].masked_fill(mask[:, P:] == 0, tok.pad_token_id), skip_special_tokens=True)


@torch.no_grad()
def evaluate_ppo(roles, tok, prompts, encode, cfg, run, judge=None):
    """cfg.eval_samples responses per prompt from the policy (actor) and from SFT (ref), judged; encode(prompts) ->
    left-padded ids, mask on the device. -> (metrics: the win-rate of PPO over SFT and its interval, samples)."""
    for model in models_of(roles):
        model.eval()  # after an update they are in train(): with checkpointing on, generate would drop the KV cache
    k = cfg.eval_samples
    repeated = [p for p in prompts for _ in range(k)]  # rows i*k .. i*k+k-1: k sampled responses to prompt i
    out = {}
    for who in ("policy", "sft"):
        role = roles["actor" if who == "policy" else "ref"]
        rows = []
        for i in tqdm(range(0, len(repeated), cfg.eval_batch_size), desc=f"evaluate ({who})", dynamic_ncols=True,
                      leave=False, disable=run.rank > 0):
            chunk = repeated[i:i + cfg.eval_batch_size]
            p_ids, p_mask = encode(chunk)
            with run.autocast():
                ids, mask, _ = generate(role, p_ids, p_mask, tok, cfg)
            P = p_ids.shape[1]
            scored = score_rollout(roles, ("actor", "ref", "rm"), ids, mask, P, cfg, run)
            resp_mask = mask[:, P:].float()
            texts = decode_responses(tok, ids, mask, P)
            rows += [dict(response=t, score=sc, kl=kl, length=n) for t, sc, kl, n in
                     zip(texts, scored["rm"].tolist(), ((scored["actor"] - scored["ref"]) * resp_mask).sum(1).tolist(),
                         resp_mask.sum(1).tolist())]
        judged = judge(repeated, [r["response"] for r in rows]) if judge else [r["score"] for r in rows]
        out[who] = [dict(r, judge=j) for r, j in zip(rows, judged)]
    pol, ref = out["policy"], out["sft"]
    win = lambda a, b: 1.0 if a["judge"] > b["judge"] else 0.5 if a["judge"] == b["judge"] else 0.0
    # Per prompt: every PPO response against every SFT response to it (k x k pairs, ties 0.5).
    wins = [sum(win(a, b) for a in pol[i * k:(i + 1) * k] for b in ref[i * k:(i + 1) * k]) / k ** 2
            for i in range(len(prompts))]
    interval = win_rate_interval(wins)
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)
    metrics = dict(win_rate=sum(wins) / len(wins), win_rate_ci=list(interval), verdict=verdict(interval),
                   eval_prompts=len(prompts), eval_samples=k,
                   judge=judge.__name__.removesuffix("_judge") if judge else "reward_model",
                   policy_score=mean(pol, "score"), sft_score=mean(ref, "score"),
                   policy_judge=mean(pol, "judge"), sft_judge=mean(ref, "judge"),
                   policy_kl=mean(pol, "kl"), policy_len=mean(pol, "length"), sft_len=mean(ref, "length"))
    samples = [dict(prompt=p, policy=pol[i * k]["response"], sft=ref[i * k]["response"]) for i, p in enumerate(prompts)]
    return metrics, samples


if __name__ == "__main__":  # the command line lives in harness.py: the flags, the data, the commands
    import sys
    from harness import main
    sys.exit(main())
