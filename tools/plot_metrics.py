"""A run's learning curves as one PNG, from its metrics.jsonl (needs matplotlib: pip install matplotlib).

    python tools/plot_metrics.py out/demo/ppo/metrics.jsonl docs/demo_ppo.png

Four panels per PPO step: the reward model's score, the KL to the reference policy, the critic's explained
variance (left out for rloo and grpo, which have no critic) and the policy's entropy (README: "What healthy metrics
look like").
"""
import json
import sys

PANELS = (("score", "reward-model score"), ("kl", "KL to reference (nats / response)"),
          ("explained_var", "critic explained variance"), ("entropy", "policy entropy (nats / token)"))


def main(src, dst):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in open(src, encoding="utf-8") if line.strip()]
    rows = [r for r in rows if "kl" in r]  # PPO lines only
    if not rows:
        sys.exit(f"{src}: no PPO metrics lines")
    panels = [(key, title) for key, title in PANELS if any(key in r for r in rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), dpi=100)
    for ax, (key, title) in zip(axes, panels):
        ax.plot([r["step"] for r in rows if key in r], [r[key] for r in rows if key in r], lw=1.5)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("PPO step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(dst, metadata={"Software": None})  # no version stamp: the same metrics give the same file
    print(f"wrote {dst}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(*sys.argv[1:])
