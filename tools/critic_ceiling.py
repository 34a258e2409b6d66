"""How much of the return's variance could a critic explain at a given budget? The yardstick for PPO's logged
explained_var (RESULTS.md: the critic on a real model).

    python tools/critic_ceiling.py --sft DIR/hydra-sft --rollouts 24 --batch-size 16 --max-response-len 16 \
        --max-prompt-len 64 --seed 0

Samples --rollouts rollouts of --batch-size responses from the SFT policy (Hydra-PPO's actor before its first update,
exactly the SFT model) and scores them with Hydra-SFT's reward head, as PPO's first steps do. With the policy equal to
the reference the KL is 0, so the Monte Carlo return (gamma = lambda = 1) of every response token is its response's
normalised score. A value head is then fitted in hindsight: ridge regression from the trunk's hidden states, at the
positions the critic reads (HydraModel.values), to those returns, on the first n rollouts; it is judged on the last 4.
The ridge is picked on those 4, which favours the fit: an optimistic ceiling for a linear value head on the frozen
trunk, and for a policy that stands still (PPO's critic chases a moving one). Prints, per n, the held-out explained
variance against the Monte Carlo returns and the metric PPO logs (explained_var against the GAE returns built on
the head's own values, lambda 0.95, per rollout, averaged over the 4); the first row is the critic PPO starts from,
the reward head read at every prefix.
"""
import os
import random
import sys
from dataclasses import dataclass, replace

import torch
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import harness  # noqa: E402
import hydra_ppo as hp
from harness import arg

HELD_OUT = 4  # rollouts the fits are judged on
RIDGES = (1.0, 10.0, 100.0, 1e3, 1e4)


@dataclass
class CeilingConfig(harness.PPOConfig):
    """The explained variance a value head fitted in hindsight reaches on the SFT policy's rollouts (PPO's flags for
    the model, data and lengths; --mode is hydra)."""
    rollouts: int = arg(24, f"rollouts to sample: the fits use up to all but the last {HELD_OUT}", ge=HELD_OUT + 1)


def sample(cfg):
    """-> (one dict per rollout, the critic's value head). A rollout: h (B, R, H) hidden states where the critic reads,
    mask (B, R), score (B,) normalised, values (B, R) of the critic PPO starts from, logged: the explained_var PPO
    logged for it."""
    run = harness.start_run(cfg)
    learner = hp.setup_ppo(cfg, harness.checkpoint_loader(cfg, run.device, run.dtype))
    critic, tok = learner.roles["critic"], harness.load_tokenizer(cfg.sft)
    prompts = [p["prompt"] for p in harness.split_pairs(harness.load_pairs(cfg.data), cfg.eval_frac, cfg.seed)[0]]
    random.Random(cfg.seed).shuffle(prompts)
    torch.manual_seed(cfg.seed)
    out = []
    for i in tqdm(range(cfg.rollouts), desc="rollouts of the SFT policy"):
        chosen = [prompts[(i * cfg.batch_size + j) % len(prompts)] for j in range(cfg.batch_size)]
        batch, stats = hp.rollout(learner, tok, *harness.prompt_batch(tok, chosen, cfg, run.device), cfg, run)
        with torch.no_grad(), hp.adapter_on(critic), run.autocast():
            h = critic.model(batch["ids"], batch["mask"])[:, batch["P"] - 1:-1].float()  # (B, R, H)
        mean, std = batch["score_norm"]
        out.append(dict(h=h, mask=batch["resp_mask"], score=(batch["score"] - mean) / std, values=batch["values"],
                        logged=stats["explained_var"]))
    return out, critic.model.value_head


def flat(rollouts):
    """-> X (tokens, H), y (tokens,): hidden states and Monte Carlo returns of every real response token."""
    X = torch.cat([r["h"][r["mask"].bool()] for r in rollouts]).double()
    y = torch.cat([r["score"][:, None].expand_as(r["mask"])[r["mask"].bool()] for r in rollouts]).double()
    return X, y


def ev(pred, y):
    """PPO's explained_variance over every token (no mask)."""
    return hp.explained_variance(pred, y, torch.ones_like(y))


def logged_ev(values_of, rollouts, lam):
    """PPO's explained_var: against the GAE returns built on the head's own values, per rollout, averaged."""
    evs = []
    for r in rollouts:
        m = r["mask"]
        v = values_of(r).float() * m
        rewards = torch.zeros_like(m)
        rewards[torch.arange(len(m)), m.sum(1).long() - 1] = r["score"].float()
        evs.append(hp.explained_variance(v, hp.compute_gae(rewards, v, m, 1.0, lam)[1], m))
    return sum(evs) / len(evs)


def ceiling(cfg):
    micro = cfg.micro_batch_size if cfg.batch_size % cfg.micro_batch_size == 0 else cfg.batch_size
    cfg = replace(cfg, minibatch_size=cfg.batch_size, micro_batch_size=micro)  # no update: one minibatch
    harness.validate(cfg)
    harness.check(cfg.mode == "hydra", "--mode: the ceiling is measured for hydra (the actor is Hydra-SFT)")
    rollouts = sample(cfg)[0]
    test, Xt_yt = rollouts[-HELD_OUT:], flat(rollouts[-HELD_OUT:])
    y_test = Xt_yt[1]
    print(f"\n{sum(r['mask'].sum().item() for r in rollouts) / len(rollouts):.0f} response tokens a rollout; "
          f"judged on the last {HELD_OUT} rollouts")
    print("| value head | held-out EV (Monte Carlo returns) | explained_var as PPO logs it |\n|---|---|---|")
    init = torch.cat([r["values"][r["mask"].bool()] for r in test]).double()
    print(f"| PPO's critic at step 1 (the reward head) | {ev(init, y_test):.3f} | "
          f"{logged_ev(lambda r: r['values'], test, cfg.lam):.3f} |")
    fit = len(rollouts) - HELD_OUT
    for n in sorted({2 ** i for i in range(fit.bit_length()) if 2 ** i <= fit} | {fit}):
        X, y = flat(rollouts[:n])
        mu, y_mean = X.mean(0), y.mean()
        best = None
        for ridge in RIDGES:
            w = torch.linalg.solve((X - mu).T @ (X - mu) + ridge * torch.eye(X.shape[1], dtype=X.dtype),
                                   (X - mu).T @ (y - y_mean))
            head = lambda h, w=w: (h.double() - mu) @ w + y_mean  # noqa: E731
            score = ev(head(Xt_yt[0]), y_test)
            if best is None or score > best[0]:
                best = (score, ridge, head)
        score, ridge, head = best
        print(f"| fitted on {n} rollout{'s' * (n > 1)} ({len(y)} tokens, ridge {ridge:g}) | {score:.3f} | "
              f"{logged_ev(lambda r: head(r['h']), test, cfg.lam):.3f} |")


def main(argv=None):
    """A bad flag or input is one error line and exit 2."""
    try:
        ceiling(harness.parse_config(CeilingConfig, sys.argv[1:] if argv is None else argv, "critic_ceiling.py"))
    except hp.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
