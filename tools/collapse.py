"""Advantage collapse on the toy world: what GRPO and VGPO do with the groups whose samples all score the same.

    python -m tools.collapse base                  # the default VGPO and GRPO runs, seed 0 (epochs 1-80)
    python -m tools.collapse run --seeds 3         # from base's VGPO policy, 40 more epochs of each arm
    python -m tools.collapse run --reward shapes_soft   # the same on a continuous reward
    python -m tools.collapse run --shard 0/2 &  python -m tools.collapse run --shard 1/2   # the same on 2 cores
    python -m tools.collapse gradients             # where the update's expected signal comes from, by part
    python -m tools.collapse summarise             # results/collapse.md, collapse.png and collapse.json

The arms (`ARMS`) are tools.experiments' four: GRPO, VGPO, temporal-only (--anchor-coef 0) and anchor-only
(--no-temporal-values); each differs from the toy preset in that one setting. Every continuation starts from the
same policy (base's VGPO run, `--init-from`) with a fresh optimizer, on the strict 0/1 reward or on `shapes_soft`.
Finished runs are skipped, so the commands can be repeated; the final policies are scored on the held-out prompts
under three evaluation-noise seeds (shapes.EVAL_SEEDS). Runs go to runs/collapse/ (not committed).

The gradient decomposition splits one rollout's policy gradient into pieces by linearity (the update's gradient
is linear in Â at ratio 1): VGPO's Â into its relative part (Â with κ = 0) and the rest (the absolute term's),
and the groups into mixed, all-solved and all-failed ones; GRPO's Â is zero on uniform groups. Each piece is
compared with an independent large-batch estimate of the expected policy gradient ∇E[R]: the mean gradient of
`--ref-batches` other rollouts with Â = R − group mean (an unbiased direction: (1 − 1/G)·∇E[R]).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import numpy as np
import torch

import harness
import vgpo
from tools import experiments
from tools.experiments import VARIANTS, COLORS, _KeepGradient

ARMS = VARIANTS
ROOT = os.path.join("runs", "collapse")
# the policies whose gradient is decomposed: the base model, and where the continuations start
WHERE = {"base model": None, "trained (the default VGPO run's policy)": os.path.join(ROOT, "vgpo-s0")}
KEYS = ("reward/frac_all_solved", "reward/frac_all_failed", "advantage/frac_nonzero", "reward/mean")


def base_folder(algo: str) -> str:
    return os.path.join(ROOT, f"{algo}-s0")


# the continuations' rewards: the strict 0/1 score, and shapes_soft (strict × how cleanly the scene is drawn), a
# continuous reward whose spread in a mastered group shrinks without vanishing, as PickScore's does
REGIMES = {"shapes_strict": "from-vgpo-s0", "shapes_soft": "from-vgpo-s0-soft"}


def arm_folder(arm: str, seed: int, reward: str = "shapes_strict") -> str:
    return os.path.join(ROOT, REGIMES[reward], f"{arm}-s{seed}")


def finished(folder: str, epochs: int) -> bool:
    rows = experiments.read_rows(folder)
    done = os.path.exists(harness.policy_file(folder, tiny=True))
    return done and bool(rows) and rows[-1]["epoch"] == epochs


def score(folder: str) -> dict:
    """Held-out strict accuracy of a run's final weights under the three evaluation-noise seeds (kept in
    eval_seeds.json; 'start': the policy the continuations start from)."""
    return experiments.score(folder, experiments.read_rows(folder)[-1])


def train_and_score(args: vgpo.Args) -> None:
    """Train the run unless it finished, then score it (score keeps what it measured)."""
    t0 = time.time()
    if not finished(args.output_dir, args.epochs):
        if os.path.exists(args.output_dir):  # an unfinished run: start it again
            import shutil

            shutil.rmtree(args.output_dir)
        vgpo.train(args)
    score(args.output_dir)
    print(f"=== {args.output_dir}: {(time.time() - t0) / 60:.1f} min", flush=True)


def plan(opts) -> list[vgpo.Args]:
    """Every run of `opts.command` (base or run), in order: seed-major, so that a plan cut short is balanced."""
    if opts.command == "base":
        return [vgpo.make_args(model="tiny", algo=a, seed=0, output_dir=base_folder(a)) for a in ("vgpo", "grpo")]
    return [vgpo.make_args(model="tiny", seed=s, init_from=base_folder("vgpo"), epochs=opts.epochs,
                           eval_every=opts.eval_every,
                           save_every=0, reward=opts.reward, output_dir=arm_folder(arm, s, opts.reward), **o)
            for s in range(opts.seeds) for arm, o in ARMS.items()]


# ----------------------------------------------------------------------------------------------------
# The gradient decomposition
# ----------------------------------------------------------------------------------------------------
def gradient(model, traj, adv, args) -> torch.Tensor:
    """The update's gradient for advantages `adv` (N, T): one vgpo.update with the optimizer replaced by a
    recorder, every micro-batch in one step, no norm clip."""
    n = adv.shape[0]
    measure = dataclasses.replace(args, max_grad_norm=float("inf"),
                                  gradient_accumulation_steps=-(-n // args.train_batch_size))
    keep = _KeepGradient([p for p in model.transformer.parameters() if p.requires_grad])
    vgpo.update(model, traj, adv, keep, measure)
    return keep.grad if keep.grad is not None else torch.zeros(sum(p.numel() for p in keep.params))


def group_kinds(terminal: torch.Tensor, group_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Trajectory masks (N,) of the mixed, all-solved and all-failed groups (harness.group_kind)."""
    kind = {k: torch.zeros_like(terminal, dtype=torch.bool) for k in ("mixed", "all-solved", "all-failed")}
    for g in group_ids.unique():
        m = group_ids == g
        kind[harness.group_kind(terminal[m])] |= m
    return kind


def decompose(policy: str | None, batches: int, ref_batches: int, seed: int = 0, **overrides) -> dict:
    """Pieces of one rollout's gradient against the expected gradient (module docstring), at the base model
    (`policy` None) or a run's weights. Returns {piece: {'dot': [...], 'cos': [...], 'norm_share': [...]}, ...}
    with one value per measured rollout, and the shares of trajectories per kind of group. `overrides`: Args
    fields (a smaller batch in tests)."""
    args = vgpo.make_args(model="tiny", seed=seed, **overrides)
    model = vgpo.load_model(args)
    harness.init_from(model, policy or "")
    train, held_out = vgpo.load_prompts(args)
    reward_fn = vgpo.make_reward(args, model.device, train + held_out)
    chosen = vgpo.sample_prompts(train, args.prompts_per_epoch, np.random.default_rng(seed))
    prompts, metadata = [p for p, _ in chosen], [m for _, m in chosen for _ in range(args.num_generations)]
    grpo = dataclasses.replace(args, algo="grpo")
    reference = dataclasses.replace(args, algo="grpo", scale_rewards="none")

    def sample(b):
        traj = vgpo.rollout(model, prompts, args, generator=torch.Generator().manual_seed(10_000 * seed + b))
        return traj, vgpo.instant_rewards(model, traj, reward_fn, metadata, previews=True)

    g_ref = 0
    for b in range(ref_batches):  # rollouts 0…ref_batches−1: the reference; the measured ones come after
        traj, r = sample(b)
        g_ref = g_ref + gradient(model, traj, vgpo.credit(r, traj.group_ids, reference)[2], reference) / ref_batches
    out, shares = {}, {k: [] for k in ("mixed", "all-solved", "all-failed")}
    for b in range(ref_batches, ref_batches + batches):
        traj, r = sample(b)
        kinds = group_kinds(r[:, -1], traj.group_ids)
        _, _, adv = vgpo.credit(r, traj.group_ids, args)
        _, _, relative = vgpo.credit(r, traj.group_ids, dataclasses.replace(args, anchor_coef=0.0))
        _, _, adv_grpo = vgpo.credit(r, traj.group_ids, grpo)
        pieces = {}
        for kind, m in kinds.items():
            shares[kind].append(m.float().mean().item())
            mask = m[:, None].float()
            total = gradient(model, traj, adv * mask, args) if m.any() else 0 * g_ref
            rel = gradient(model, traj, relative * mask, args) if m.any() else 0 * g_ref
            pieces[f"vgpo {kind} relative"], pieces[f"vgpo {kind} absolute"] = rel, total - rel
            assert kind == "mixed" or not (adv_grpo * mask).any()  # GRPO's Â is exactly 0 on uniform groups
        pieces["vgpo total"] = sum(v for k, v in pieces.items() if k.startswith("vgpo"))
        pieces["grpo total"] = gradient(model, traj, adv_grpo, grpo)
        for name, g in pieces.items():
            total = pieces["vgpo total" if name.startswith("vgpo") else "grpo total"]
            d = out.setdefault(name, {"dot": [], "cos": [], "norm_share": []})
            d["dot"].append(float(g @ g_ref))
            d["cos"].append(float(torch.nn.functional.cosine_similarity(g, g_ref, dim=0)) if g.norm() > 0 else 0.0)
            d["norm_share"].append(float(g.norm() / total.norm()) if total.norm() > 0 else 0.0)
        print(f"rollout {b - ref_batches + 1}/{batches}: " + ", ".join(f"{k} {v['cos'][-1]:+.3f}" for k, v in
                                                                          out.items()), flush=True)
    return {"pieces": out, "shares": {k: float(np.mean(v)) for k, v in shares.items()},
            "ref_norm": float(g_ref.norm()), "batches": batches, "ref_batches": ref_batches,
            "reward": float(r[:, -1].mean())}


def decomposition_table(results: dict) -> list[str]:
    """Markdown: per policy and piece, the mean cosine with the expected gradient (± s.e. over rollouts), the
    piece's share of its algorithm's expected signal (mean dot / mean dot of the total) and of its norm."""
    lines = []
    for where, res in results.items():
        sh = res["shares"]
        lines += [f"**{where}** (the last rollout's reward {res['reward']:.2f}; trajectories in mixed / all-solved / "
                  f"all-failed groups: {sh['mixed']:.2f} / {sh['all-solved']:.2f} / {sh['all-failed']:.2f}; "
                  f"{res['batches']} rollouts against a reference of {res['ref_batches']})", "",
                  "| piece | cos with E[∇] | share of the signal | share of the norm |", "|---|---|---|---|"]
        for name, d in res["pieces"].items():
            total = res["pieces"]["vgpo total" if name.startswith("vgpo") else "grpo total"]
            cos = np.array(d["cos"])
            signal = np.mean(d["dot"]) / np.mean(total["dot"])
            lines.append(f"| {name} | {cos.mean():+.4f} ± {cos.std(ddof=1) / np.sqrt(len(cos)):.4f} | {signal:+.2f} | "
                         f"{np.mean(d['norm_share']):.2f} |")
        lines.append("")
    return lines


# ----------------------------------------------------------------------------------------------------
# Summary: tables, the figure and the curves the tutorial plots
# ----------------------------------------------------------------------------------------------------
def curve(rows: list[dict], offset: int = 0) -> dict:
    rows = [r for r in rows if "reward/mean" in r]
    return {"epoch": [r["epoch"] + offset for r in rows]} | {k: [r.get(k) for r in rows] for k in KEYS}


def summarise(opts) -> str:
    base = {a: experiments.read_rows(base_folder(a)) for a in ("vgpo", "grpo")}
    start = score(base_folder("vgpo")) if finished(base_folder("vgpo"), 80) else None
    data = {"base": {a: curve(r) for a, r in base.items() if r}, "start_accuracy": start and start["strict_accuracy"],
            "continued": {}, "final_accuracy": {}}
    arms = {}
    for reward in REGIMES:
        seeds = [s for s in range(opts.seeds) if all(finished(arm_folder(a, s, reward), opts.epochs) for a in ARMS)]
        if seeds:  # only seeds whose four arms all finished: the arms stay comparable
            arms[reward] = {arm: [experiments.read_rows(arm_folder(arm, s, reward)) for s in seeds] for arm in ARMS}
            data["continued"][reward] = {arm: [curve(r, offset=80) for r in runs] for arm, runs in arms[reward].items()}
            data["final_accuracy"][reward] = {arm: [score(arm_folder(arm, s, reward))["strict_accuracy"] for s in seeds]
                                              for arm in ARMS}
    os.makedirs(opts.results, exist_ok=True)
    lines = ["# Advantage collapse on the toy world (written by `python -m tools.collapse summarise`)", "",
             "Uniform groups: std of the terminal reward below harness.UNIFORM_STD, all-solved (mean ≥ 0.5) or "
             "all-failed; 'nonzero Â': share of trajectories with a nonzero advantage on a trained step. Means over "
             "epochs; ± the standard error over seeds.", "",
             "## The default runs (seed 0), epochs 1–10 → 71–80", "",
             "| run | held-out strict (3 noise seeds) | all-solved | all-failed | nonzero Â | train reward |",
             "|---|---|---|---|---|---|"]
    for a, rows in base.items():
        if rows and finished(base_folder(a), 80):
            c = curve(rows)
            cells = [f"{np.mean(c[k][:10]):.3f} → {np.mean(c[k][-10:]):.3f}" for k in KEYS]
            final = score(base_folder(a))["strict_accuracy"]
            lines.append(f"| {a} | {rows[0]['eval/strict_accuracy']:.3f} → {final:.3f} | " + " | ".join(cells) + " |")
    for reward, by_arm in arms.items():
        lines += ["", f"## {opts.epochs} more epochs on `{reward}` from the VGPO run's policy (held-out strict "
                  f"{start['strict_accuracy']:.3f}); means over the epochs", "",
                  "| arm | seeds | held-out strict at the end | change | all-solved | all-failed | nonzero Â | "
                  "train reward |", "|---|---|---|---|---|---|---|---|"]
        for arm, runs in by_arm.items():
            acc = np.array(data["final_accuracy"][reward][arm])
            se = acc.std(ddof=1) / np.sqrt(len(acc)) if len(acc) > 1 else 0.0
            cells = []
            for k in KEYS:
                per_seed = np.array([np.mean(curve(r)[k]) for r in runs])
                spread = per_seed.std(ddof=1) / np.sqrt(len(runs)) if len(runs) > 1 else 0.0
                cells.append(f"{per_seed.mean():.3f} ± {spread:.3f}")
            change = acc.mean() - start["strict_accuracy"]
            cells = [f"{acc.mean():.3f} ± {se:.3f}", f"{change:+.3f}", *cells]
            lines.append(f"| {arm} | {len(runs)} | {' | '.join(cells)} |")
    grads = {where: os.path.join(opts.results, f"collapse-gradients-{where.split()[0]}.json") for where in WHERE}
    grads = {where: json.load(open(path)) for where, path in grads.items() if os.path.exists(path)}
    if grads:
        lines += ["", "## Where the update's expected signal comes from (`python -m tools.collapse gradients`)", ""]
        lines += decomposition_table(grads)
        data["gradients"] = grads
    with open(os.path.join(opts.results, "collapse.json"), "w") as f:
        json.dump(data, f)
    plot(data, os.path.join(opts.results, "collapse.png"))
    lines += ["![collapse.png](collapse.png)", ""]
    text = "\n".join(lines)
    with open(os.path.join(opts.results, "collapse.md"), "w") as f:
        f.write(text)
    return text


def plot(data: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regimes = list(data["continued"]) or ["shapes_strict"]
    fig, axes = plt.subplots(len(regimes), 4, figsize=(17, 3.6 * len(regimes)), squeeze=False)
    titles = ["all-solved groups", "all-failed groups", "trajectories with Â ≠ 0", "training reward"]
    smooth = lambda v: np.convolve(v, np.ones(5) / 5, mode="valid")  # noqa: E731 (5-epoch running mean)
    for ax, reward in zip(axes, regimes):
        for a, key, title in zip(ax, KEYS, titles):
            for algo, c in data["base"].items():
                a.plot(smooth(c["epoch"]), smooth(c[key]), color=COLORS[algo], lw=1, alpha=0.6)
            for arm, curves in data["continued"].get(reward, {}).items():
                m = np.mean([c[key] for c in curves], axis=0)
                a.plot(smooth(curves[0]["epoch"]), smooth(m), color=COLORS[arm], label=f"{arm} (n={len(curves)})")
            a.axvline(80.5, color="grey", ls=":")
            a.set(xlabel="epoch (from 81: continued from VGPO's policy)", title=f"{title}, then {reward}")
        ax[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)


def main(argv=None) -> int:
    p = harness.Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["base", "run", "gradients", "summarise"])
    p.add_argument("--seeds", type=int, default=3, help="seeds of each continued arm (default 3)")
    p.add_argument("--reward", default="shapes_strict", choices=list(REGIMES), help="run: the continuations' reward")
    p.add_argument("--epochs", type=int, default=40, help="epochs of each continued arm (default 40)")
    p.add_argument("--eval-every", type=int, default=10, help="run: evaluate every this many epochs (default 10)")
    p.add_argument("--shard", default="0/1", help="K/N: run every N-th planned run from the K-th (parallel processes)")
    p.add_argument("--batches", type=int, default=16, help="gradients: measured rollouts per policy (default 16)")
    p.add_argument("--ref-batches", type=int, default=32, help="gradients: rollouts of the reference (default 32)")
    p.add_argument("--results", default="results", help="where the summary goes")
    try:
        opts = p.parse_args(argv)
        k, _, n = opts.shard.partition("/")
        if not (k.isdigit() and n.isdigit() and int(k) < int(n)):
            raise harness.UsageError(f"--shard {opts.shard!r}: write K/N with 0 ≤ K < N")
        if opts.command in ("run", "gradients") and not finished(base_folder("vgpo"), 80):
            raise harness.UsageError(f"no finished {base_folder('vgpo')}: run `python -m tools.collapse base` first")
        if opts.command in ("base", "run"):
            runs = plan(opts)[int(k) :: int(n)]
            for args in runs:
                train_and_score(args)
        elif opts.command == "gradients":  # --shard 0/2 and 1/2: one policy each
            for where, policy in list(WHERE.items())[int(k) :: int(n)]:
                result = decompose(policy, opts.batches, opts.ref_batches)
                with open(os.path.join(opts.results, f"collapse-gradients-{where.split()[0]}.json"), "w") as f:
                    json.dump(result, f)
                print("\n".join(decomposition_table({where: result})))
        if opts.command in ("summarise", "run", "base"):
            print(summarise(opts))
    except harness.UsageError as e:
        print(f"tools.collapse: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
