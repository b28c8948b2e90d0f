"""results/credit.png, the README's figure: what VGPO changes, shown on one group of the toy world's base model.

    python -m tools.figure             # seconds on a CPU

For the G trajectories of one training prompt it plots the instant rewards r_k of the one-step previews
(paper Eq. 9), the values Q_k (Eq. 10), the step weights ω_k (Eq. 11) and VGPO's advantage Â_k (Eqs. 12–13)
beside GRPO's, which is the same at every step, each trajectory coloured by what happened to it (succeeded; failed
after a passing preview; never passed: the tutorial's section 4 explains why the second kind gets the largest negative
advantage on its good-looking steps). The prompt is the one, of two per category, whose group disagrees most; every
number comes from vgpo.py's own functions.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

import shapes
import vgpo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_group(args, model, reward_fn, seed: int = 0):
    """(prompt, instant rewards, values, weights, VGPO advantages, GRPO advantages) of one group, each (G, T)."""
    by_category = {c: [p for p in shapes.TRAIN_PROMPTS if shapes.METADATA[p]["category"] == c]
                   for c in shapes.CATEGORIES}
    candidates = [p for ps in by_category.values() for p in ps[:2]]
    pool = vgpo.rollout(model, candidates, args, generator=torch.Generator().manual_seed(seed))
    terminal = reward_fn(pool.images, pool.prompts, [shapes.METADATA[p] for p in pool.prompts])
    terminal = terminal.view(len(candidates), -1)
    prompt = candidates[int((terminal.std(1) + 1e-3 * terminal.mean(1)).argmax())]  # most disagreement
    metadata = [shapes.METADATA[prompt]] * args.num_generations
    for s in range(seed, seed + 10):  # the first rollout of it whose terminal rewards differ
        group = vgpo.rollout(model, [prompt], args, generator=torch.Generator().manual_seed(s))
        r = vgpo.instant_rewards(model, group, reward_fn, metadata, previews=True)
        if r[:, -1].std() > 0:
            break
    values, weights, adv = vgpo.credit(r, group.group_ids, args)
    grpo = vgpo.grpo_advantages(r[:, -1], group.group_ids, args.scale_rewards, args.adv_clip_max, args.num_steps)
    return prompt, r, values, weights, adv, grpo


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "results", "credit.png"))
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    args = vgpo.make_args(model="tiny")
    torch.manual_seed(a.seed)
    model = vgpo.load_model(args)
    prompt, r, values, weights, adv, grpo = one_group(args, model, vgpo.make_reward(args, model.device), a.seed)
    T, last, S = args.num_steps, r[:, -1], vgpo.sde_window(args.num_steps, args.sde_steps)
    # what happened to each trajectory: the colour key of the tutorial's section 4, where the plot is explained
    early = (r[:, : T - 2] > 0.5).any(dim=1)  # some preview before the final image passed
    kinds = ["succeeded" if last[i] > 0.5 else "failed after a passing preview" if early[i] else "never passed"
             for i in range(len(r))]
    colour = {"succeeded": "tab:green", "failed after a passing preview": "tab:orange", "never passed": "tab:red"}
    offset = torch.linspace(-0.15, 0.15, len(r)).tolist()  # sideways, so that identical trajectories stay visible
    fig, axes = plt.subplots(1, 4, figsize=(10, 3.4))
    panels = [("instant reward $r_k$ (Eq. 9)", r), ("value $Q_k$ (Eq. 10)", values),
              ("step weight $ω_k$ (Eq. 11)", weights), ("advantage $Â_k$ (Eqs. 12–13)", adv)]
    for ax, (title, val) in zip(axes, panels):
        ax.axvspan(-0.5, S - 0.5, color="tab:blue", alpha=0.08, lw=0, label=f"trained steps 0–{S - 1}")
        for i in range(len(val)):
            ax.plot([k + offset[i] for k in range(T)], val[i].tolist(), "o-", ms=3, lw=1.1, alpha=0.85,
                    color=colour[kinds[i]], label=kinds[i] if kinds.index(kinds[i]) == i else None)
        ax.set(title=title, xlabel="step k", xticks=range(0, T, 2))
    axes[3].plot(range(T), grpo[0].tolist(), ":", lw=1.2, color="k", label="GRPO's, every step")
    for i in range(1, len(grpo)):
        axes[3].plot(range(T), grpo[i].tolist(), ":", lw=1.2, color="k")
    axes[3].axhline(0, color="k", lw=0.4)
    handles, labels = axes[3].get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda j: list(colour).index(labels[j]) if labels[j] in colour else 9)
    fig.legend([handles[j] for j in order], [labels[j] for j in order], loc="lower center", ncol=5, fontsize=8.5,
               frameon=False)
    fig.suptitle(f"one group of G = {args.num_generations} trajectories of '{prompt}' (toy world, base model, "
                 f"reward {args.reward})", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    fig.savefig(a.out, dpi=90)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
