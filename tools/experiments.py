"""The experiments on the toy world (logged in results/RESULTS.md): VGPO against GRPO and its two halves,
reward-diversity depletion, and sensitivity to κ, anchor_steps and γ. Every run is an ordinary `vgpo.train`
run in its own folder; this script plans them, runs the missing ones one after another in this process, and summarises
the folders into a Markdown table and PNG plots.

    python -m tools.experiments run                      # the full plan (slow: hours on 2 CPU cores)
    python -m tools.experiments run --epochs 10 --seeds 2 --eval-every 5 --only main   # a smaller budget
    python -m tools.experiments summarise --epochs 10 --seeds 2 --eval-every 5         # tables and plots only
    python -m tools.experiments snr                      # signal-to-noise of one rollout's policy gradient

Groups (`--only`):
    main         GRPO, VGPO, temporal-values-only (VGPO with --anchor-coef 0) and anchor-only (VGPO with
                 --no-temporal-values), `--seeds` seeds each, the same budget
    depletion    GRPO and VGPO on the strict 0/1 reward (`--reward shapes_strict`), where many groups are
                 uniform; `--depletion-seeds` seeds (default: `--seeds`)
    sensitivity  VGPO with one of κ (anchor_coef), anchor_steps, γ changed; `--sensitivity-seeds` seeds
Defaults (epochs, eval_every, every hyperparameter) come from vgpo.make_args(model="tiny"): the toy preset.

A run whose folder holds a finished metrics.jsonl (its last row is the final, evaluated epoch) is skipped;
an interrupted one with a checkpoint is resumed (vgpo's --resume), one without is started again. So the
plan can be run in pieces (`--only`, `--deadline`) and summarised at any time. Runs go to
runs/experiments/ (not committed); the table and plots to results/ (committed).
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import json
import os
import shutil
import sys
import time

import numpy as np
import torch

import harness
import recovery
import vgpo

VARIANTS = {  # name → the settings it changes from the toy preset
    "grpo": dict(algo="grpo"),
    "vgpo": dict(),
    "temporal-only": dict(anchor_coef=0.0),  # per-step values and weights, no absolute term
    "anchor-only": dict(temporal_values=False),  # terminal reward only, ω ≡ 1, with the absolute term
}
DEPLETION = {"grpo-strict": dict(algo="grpo", reward="shapes_strict"), "vgpo-strict": dict(reward="shapes_strict")}
# Sensitivity: one setting changed at a time around the preset's value (the preset's own point is the
# main grid's VGPO run, reused). κ = 0 is temporal-only and anchor_steps ≥ T − 1 anchors every trained step.
SENSITIVITY = {"anchor_coef": [0.3, 3.0], "anchor_steps": [2, 9], "gamma": [0.5, 1.0]}
COLORS = {"grpo": "tab:red", "vgpo": "tab:blue", "temporal-only": "tab:green", "anchor-only": "tab:purple",
          "grpo-strict": "tab:red", "vgpo-strict": "tab:blue"}


@dataclasses.dataclass
class Run:
    group: str
    label: str  # what the table calls it
    seed: int
    overrides: dict

    def folder(self, root: str, epochs: int) -> str:
        # named by what it changes, so two groups asking for the same settings share one run
        tag = "-".join(f"{k}={v}" for k, v in sorted(self.overrides.items()) if k != "algo")
        algo = self.overrides.get("algo", "vgpo")
        return os.path.join(root, f"{algo}{'-' + tag if tag else ''}-e{epochs}-s{self.seed}")


def plan(only, seeds: int, sensitivity_seeds: int, depletion_seeds: int | None = None) -> list[Run]:
    """Every run of the chosen groups, seed-major so that a plan cut short has balanced variants."""
    runs = []
    if "main" in only:
        runs += [Run("main", name, s, o) for s in range(seeds) for name, o in VARIANTS.items()]
    if "depletion" in only:
        depletion_seeds = seeds if depletion_seeds is None else depletion_seeds
        runs += [Run("depletion", name, s, o) for s in range(depletion_seeds) for name, o in DEPLETION.items()]
    if "sensitivity" in only:
        for s in range(sensitivity_seeds):
            runs.append(Run("sensitivity", "vgpo", s, {}))
            runs += [Run("sensitivity", f"{k}={v}", s, {k: v}) for k, values in SENSITIVITY.items() for v in values]
    return runs


def read_rows(folder: str) -> list[dict]:
    path = os.path.join(folder, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def finished(folder: str, epochs: int) -> bool:
    rows = read_rows(folder)
    return bool(rows) and rows[-1]["epoch"] == epochs and "eval/strict_accuracy" in rows[-1]


def run_args(run: Run, folder: str, opts) -> vgpo.Args:
    extra = dict(epochs=opts.epochs, eval_every=opts.eval_every, save_every=opts.eval_every, keep_checkpoints=1)
    return vgpo.make_args(model="tiny", seed=run.seed, output_dir=folder, **{**extra, **run.overrides, **opts.set})


def execute(runs: list[Run], opts) -> None:
    """Run what is missing, in order; stop starting new runs after --deadline (UTC HH:MM)."""
    todo = [r for r in runs if not finished(r.folder(opts.runs, opts.epochs), opts.epochs)]
    print(f"{len(runs)} runs planned, {len(runs) - len(todo)} already finished, {len(todo)} to run", flush=True)
    for i, run in enumerate(todo):
        if opts.deadline and dt.datetime.now(dt.timezone.utc).strftime("%H:%M") >= opts.deadline:
            print(f"deadline {opts.deadline} UTC reached: {len(todo) - i} runs not started", flush=True)
            break
        folder = run.folder(opts.runs, opts.epochs)
        args = run_args(run, folder, opts)
        if os.path.isdir(os.path.join(folder, "checkpoints")) and os.listdir(os.path.join(folder, "checkpoints")):
            args = recovery.resume_args(vgpo.Args, folder, epochs=opts.epochs)  # an interrupted run: continue it
        elif os.path.exists(folder):  # started but nothing to continue from: start again
            shutil.rmtree(folder)
        print(f"\n=== [{i + 1}/{len(todo)}] {run.group}: {run.label}, seed {run.seed} → {folder}", flush=True)
        t0 = time.time()
        vgpo.train(args)
        print(f"=== done in {(time.time() - t0) / 60:.1f} min", flush=True)
        shutil.rmtree(os.path.join(folder, "checkpoints"), ignore_errors=True)  # 45 MB each; the run is complete
        summarise(runs, opts)  # tables and plots are current after every run


# ----------------------------------------------------------------------------------------------------
# Summaries
# ----------------------------------------------------------------------------------------------------


def collect(runs: list[Run], opts) -> dict:
    """{(group, label): [rows of each finished seed]}; unfinished runs are left out (and counted)."""
    out = {}
    for r in runs:
        folder = r.folder(opts.runs, opts.epochs)
        if finished(folder, opts.epochs):
            out.setdefault((r.group, r.label), []).append(read_rows(folder))
    return out


def by_epoch(seed_rows: list[list[dict]], key, reduce=lambda v: v):
    """(epochs, mean over seeds, std over seeds (ddof 1; 0 for one seed)) of `key` where every seed has it."""
    per_epoch = {}
    for rows in seed_rows:
        for row in rows:
            if key in row:
                per_epoch.setdefault(row["epoch"], []).append(reduce(row[key]))
    epochs = sorted(e for e, v in per_epoch.items() if len(v) == len(seed_rows))
    vals = [np.array(per_epoch[e], dtype=float) for e in epochs]
    return (np.array(epochs), np.array([v.mean() for v in vals]),
            np.array([v.std(ddof=1) if len(v) > 1 else 0.0 for v in vals]))


def tail_mean(seed_rows, key, n=3, reduce=lambda v: v):
    """Mean over seeds of the mean of `key` over the last n trained epochs."""
    return float(np.mean([np.mean([reduce(r[key]) for r in [r for r in rows if key in r][-n:]]) for rows in seed_rows]))


def head_mean(seed_rows, key, n=3, reduce=lambda v: v):
    return float(np.mean([np.mean([reduce(r[key]) for r in [r for r in rows if key in r][:n]]) for rows in seed_rows]))


def fmt(m, s, n):
    return f"{m:.3f} ± {s:.3f}" if n > 1 else f"{m:.3f}"


def table(data: dict, group: str, labels: list[str], opts, reference: str | None = None) -> list[str]:
    """Markdown rows: held-out strict accuracy by evaluated epoch (mean ± std over seeds), epochs to reach the
    reference's final accuracy, frac_zero_std and mean |Â| (first → last 3 epochs), seconds per epoch."""
    present = [lb for lb in labels if (group, lb) in data]
    if not present:
        return [f"_no finished runs of `{group}` for this budget yet_", ""]
    epochs = by_epoch(data[(group, present[0])], "eval/strict_accuracy")[0]
    ref_final = None
    if reference and (group, reference) in data:
        ref_final = by_epoch(data[(group, reference)], "eval/strict_accuracy")[1][-1]
    head = ["run", "seeds", *[f"strict acc. @{e}" for e in epochs]]
    head += [f"epochs to {reference}'s final" if ref_final is not None else None, "train reward (first 3 → last 3)",
             "frac_zero_std (first 3 → last 3)", "mean abs(Â) (first 3 → last 3)", "s / epoch", "s / eval"]
    head = [h for h in head if h is not None]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for lb in present:
        rows = data[(group, lb)]
        n = len(rows)
        e, m, s = by_epoch(rows, "eval/strict_accuracy")
        cells = [lb, str(n), *[fmt(mi, si, n) for mi, si in zip(m, s)]]
        if ref_final is not None:  # first evaluated epoch after training began where the mean reaches it
            hit = [int(ei) for ei, mi in zip(e, m) if ei > 0 and mi >= ref_final - 1e-9]
            cells.append(str(hit[0]) if hit else f"not in {int(e[-1])}")
        for key, red in [("reward/mean", float), ("reward/frac_zero_std", float),
                         ("advantage/trained_mean_abs", float)]:
            cells.append(f"{head_mean(rows, key, reduce=red):.3f} → {tail_mean(rows, key, reduce=red):.3f}")
        cells.append(f"{np.mean([r['time/epoch_s'] for rows_ in rows for r in rows_ if 'reward/mean' in r]):.1f}")
        cells.append(f"{np.mean([r['time/eval_s'] for rows_ in rows for r in rows_ if 'time/eval_s' in r]):.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def sensitivity_table(data, opts) -> list[str]:
    base = vgpo.make_args(model="tiny")
    lines = ["| setting | value | seeds | held-out strict acc., base → final | frac_zero_std (last 3) |",
             "|---|---|---|---|---|"]
    found = False
    for key, values in SENSITIVITY.items():
        for v in sorted(set(values) | {getattr(base, key)}):
            lb = "vgpo" if v == getattr(base, key) else f"{key}={v}"
            rows = data.get(("sensitivity", lb))
            if not rows:
                continue
            found = True
            _, m, s = by_epoch(rows, "eval/strict_accuracy")
            mark = " (preset)" if lb == "vgpo" else ""
            lines.append(f"| {key} | {v}{mark} | {len(rows)} | {m[0]:.3f} → {fmt(m[-1], s[-1], len(rows))} | "
                         f"{tail_mean(rows, 'reward/frac_zero_std'):.3f} |")
    return (lines if found else ["_no finished sensitivity runs for this budget yet_"]) + [""]


def plots(data: dict, opts) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for group, labels, name in [("main", list(VARIANTS), "main"), ("depletion", list(DEPLETION), "depletion")]:
        present = [lb for lb in labels if (group, lb) in data]
        if not present:
            continue
        fig, ax = plt.subplots(1, 4, figsize=(17, 3.6))
        for lb in present:
            rows, c = data[(group, lb)], COLORS.get(lb)
            for a, key, red in [(ax[0], "eval/strict_accuracy", float), (ax[1], "reward/mean", float),
                                (ax[2], "reward/frac_zero_std", float), (ax[3], "advantage/trained_mean_abs", float)]:
                e, m, s = by_epoch(rows, key, red)
                a.plot(e, m, "o-" if key.startswith("eval") else "-", color=c, label=f"{lb} (n={len(rows)})", ms=4)
                a.fill_between(e, m - s, m + s, color=c, alpha=0.15)
        titles = ["held-out strict accuracy (mean ± std over seeds)", "training reward (terminal)",
                  "frac_zero_std (uniform groups)", "mean |Â| over trained steps"]
        for a, t in zip(ax, titles):
            a.set(xlabel="epoch", title=t)
        ax[0].legend(fontsize=8)
        fig.suptitle(f"{group}: {budget_line(opts)}", fontsize=9)
        fig.tight_layout()
        path = os.path.join(opts.results, f"{name}.png")
        fig.savefig(path, dpi=70)
        plt.close(fig)
        written.append(path)
    base = vgpo.make_args(model="tiny")
    if any(g == "sensitivity" for g, _ in data):
        fig, ax = plt.subplots(1, len(SENSITIVITY), figsize=(12, 3.4))
        for a, (key, values) in zip(ax, SENSITIVITY.items()):
            xs, ms, ss = [], [], []
            for v in sorted(set(values) | {getattr(base, key)}):
                rows = data.get(("sensitivity", "vgpo" if v == getattr(base, key) else f"{key}={v}"))
                if rows:
                    _, m, s = by_epoch(rows, "eval/strict_accuracy")
                    xs.append(v), ms.append(m[-1]), ss.append(s[-1])
            a.errorbar(xs, ms, yerr=ss, fmt="o-")
            a.axvline(getattr(base, key), color="grey", ls=":", label="preset")
            a.set(xlabel=key, ylabel="final held-out strict acc.", title=f"sensitivity to {key}")
        fig.tight_layout()
        path = os.path.join(opts.results, "sensitivity.png")
        fig.savefig(path, dpi=70)
        plt.close(fig)
        written.append(path)
    return written


def budget_line(opts) -> str:
    a = vgpo.make_args(model="tiny", epochs=opts.epochs, **opts.set)
    return (f"{opts.epochs} epochs of {a.prompts_per_epoch}×{a.num_generations} trajectories, T = {a.num_steps}, "
            f"evaluated every {opts.eval_every} epochs on the held-out set ({a.eval_steps} ODE steps)"
            + (f", overrides {opts.set}" if opts.set else ""))


def summarise(runs: list[Run], opts) -> str:
    os.makedirs(opts.results, exist_ok=True)
    data = collect(runs, opts)
    done = sum(len(v) for v in data.values())
    lines = ["# Experiments on the toy world (written by `python -m tools.experiments`)", "",
             f"Budget: {budget_line(opts)}. {done} of {len(runs)} planned runs finished. Accuracy is the mean over "
             "seeds ± the std over seeds (ddof 1); '@E' is the evaluation after epoch E (@0 = the base model). "
             "'first 3 → last 3' averages the first and the last three training epochs. Seconds are wall time on "
             "this machine, 1 thread.", "",
             f"Command: `{opts.cmdline}`", "", "## GRPO, VGPO and its two halves", ""]
    lines += table(data, "main", list(VARIANTS), opts, reference="grpo")
    lines += ["## Reward-diversity depletion (strict 0/1 reward, `--reward shapes_strict`)", ""]
    lines += table(data, "depletion", list(DEPLETION), opts, reference="grpo-strict")
    lines += ["## Sensitivity (VGPO, one setting changed)", ""]
    lines += sensitivity_table(data, opts)
    for p in plots(data, opts):
        lines.append(f"![{os.path.basename(p)}]({os.path.basename(p)})")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(opts.results, "experiments.md"), "w") as f:
        f.write(text)
    return text


# ----------------------------------------------------------------------------------------------------
# Gradient signal-to-noise (`python -m tools.experiments snr`): how much one rollout's gradient says
# ----------------------------------------------------------------------------------------------------
class _KeepGradient:
    """Stands in for the optimizer in vgpo.update: adds up the gradient it would have stepped with."""

    def __init__(self, params):
        self.params, self.grad = params, None

    def step(self):
        g = torch.cat([p.grad.flatten() for p in self.params])
        self.grad = g.clone() if self.grad is None else self.grad + g

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


def policy_gradients(args: vgpo.Args, batches: int, seed: int = 0, model=None) -> tuple[list, list, float]:
    """The policy gradient of `batches` independent rollouts of the *same* P prompts, with the model left
    unchanged: vgpo.rollout → instant_rewards → credit → update, the optimizer replaced by _KeepGradient
    (no gradient-norm clip, one accumulated gradient per rollout). Returns (gradients, mean terminal
    rewards, seconds per trajectory). `model`: a vgpo.Model (default: load the base model of `args`)."""
    model = model or vgpo.load_model(args)
    train, held_out = vgpo.load_prompts(args)
    reward_fn = vgpo.make_reward(args, model.device, train + held_out)
    chosen = vgpo.sample_prompts(train, args.prompts_per_epoch, np.random.default_rng(seed))
    metadata = [m for _, m in chosen for _ in range(args.num_generations)]
    n = args.prompts_per_epoch * args.num_generations
    measure = dataclasses.replace(args, max_grad_norm=float("inf"),
                                  gradient_accumulation_steps=-(-n // args.train_batch_size))
    params = [p for p in model.transformer.parameters() if p.requires_grad]
    grads, rewards, t0 = [], [], time.time()
    for b in range(batches):
        gen = torch.Generator(model.device).manual_seed(seed * 1000 + b)
        traj = vgpo.rollout(model, [p for p, _ in chosen], args, generator=gen)
        previews = args.algo == "vgpo" and args.temporal_values
        r = vgpo.instant_rewards(model, traj, reward_fn, metadata, previews=previews)
        _, _, adv = vgpo.credit(r, traj.group_ids, args)
        keep = _KeepGradient(params)
        vgpo.update(model, traj, adv, keep, measure)  # one optimizer step: the order does not matter
        grads.append(keep.grad)
        rewards.append(r[:, -1].mean().item())
    return grads, rewards, (time.time() - t0) / (batches * n)


def mean_cosine(grads: list) -> tuple[float, float]:
    """Mean and standard error of the cosine between every pair of independent gradients."""
    if any(g.norm() == 0 for g in grads):  # every group uniform: no gradient, and no direction to compare
        return float("nan"), float("nan")
    cos = [torch.nn.functional.cosine_similarity(a, b, dim=0).item() for a, b in itertools.combinations(grads, 2)]
    return float(np.mean(cos)), float(np.std(cos) / np.sqrt(len(cos)))


def snr_report(opts) -> str:
    """A Markdown table: for each (reward, algo), the cosine between the gradients of independent rollouts
    of N trajectories and of `combine`·N, and what it implies per trajectory.

    If g = μ + noise, the noise independent between rollouts, the expected cosine of two gradients of m
    trajectories each is c = m·s²/(1 + m·s²), s² = |μ|²/(noise variance of one trajectory). So
    s² = c/(m·(1 − c)), and about 1/s² trajectories give a gradient whose direction is half signal (c = ½).
    The cosine of the sums of `combine` rollouts checks the model: it should grow about `combine`-fold."""
    lines = [f"Command: `{opts.cmdline}` (the base model; the same {opts.set.get('prompts_per_epoch', 16)} training "
             "prompts in every rollout, new noise each time)", "",
             "| reward | algo | reward mean | cos, N traj. | cos, sums of " + str(opts.combine) + " | s² per traj. | "
             "traj. for cos ½ | s per traj. |", "|---|---|---|---|---|---|---|---|"]
    for reward in opts.rewards.split(","):
        for algo in opts.algos.split(","):
            args = vgpo.make_args(model="tiny", reward=reward, algo=algo, **opts.set)
            harness.validate(args)
            grads, rewards, per_traj = policy_gradients(args, opts.batches)
            n = args.prompts_per_epoch * args.num_generations
            c, se = mean_cosine(grads)
            sums = [sum(grads[i : i + opts.combine]) for i in range(0, len(grads) - opts.combine + 1, opts.combine)]
            c_sum, se_sum = mean_cosine(sums) if len(sums) > 1 else (float("nan"), float("nan"))
            s2 = c / (n * (1 - c)) if c > 0 else float("nan")
            need = f"{1 / s2:,.0f}" if c > 2 * se else f"> {n * (1 - c - 2 * se) / max(c + 2 * se, 1e-9):,.0f}"
            lines.append(f"| {reward} | {algo} | {np.mean(rewards):.3f} | {c:.4f} ± {se:.4f} (N = {n}) | "
                         f"{c_sum:.4f} ± {se_sum:.4f} | {s2:.2e} | {need} | {per_traj:.3f} |")
            print(lines[-1], flush=True)
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------


def parse_set(items) -> dict:
    """--set key=value (any vgpo.Args field, e.g. prompts_per_epoch=4), typed by the field."""
    fields = {f.name: f.type for f in dataclasses.fields(vgpo.Args)}
    out = {}
    for item in items or []:
        key, _, value = item.partition("=")
        if key not in fields or not value:
            raise harness.UsageError(f"--set {item!r}: write FIELD=VALUE with a vgpo.Args field (see python vgpo.py "
                                     "--help)")
        cast = {"int": int, "float": float, "str": str,
                "bool": lambda s: s.lower() in ("1", "true", "yes")}[fields[key]]
        try:
            out[key] = cast(value)
        except ValueError:
            raise harness.UsageError(f"--set {item!r}: {value!r} is not a {fields[key]}") from None
    return out


def main(argv=None) -> int:
    preset = vgpo.make_args(model="tiny")
    p = harness.Parser(description=__doc__.split("\n\n")[0])  # a usage mistake is one line and exit code 2
    p.add_argument("command", choices=["run", "summarise", "summarize", "snr"],
                   help="run the missing runs, only summarise, or measure the policy gradient's signal-to-noise")
    p.add_argument("--only", default="main,depletion,sensitivity",
                   help="comma-separated groups: main, depletion, sensitivity")
    p.add_argument("--epochs", type=int, default=preset.epochs,
                   help=f"epochs per run (default: the preset's {preset.epochs})")
    p.add_argument("--eval-every", type=int, default=preset.eval_every,
                   help=f"(default: the preset's {preset.eval_every})")
    p.add_argument("--seeds", type=int, default=3,
                   help="seeds 0…N−1 of the main grid and the depletion pair (default 3)")
    p.add_argument("--depletion-seeds", type=int, default=None, help="seeds of the depletion pair (default: --seeds)")
    p.add_argument("--sensitivity-seeds", type=int, default=1, help="seeds of the sensitivity sweep (default 1)")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE", help="change a vgpo.Args field in every run")
    p.add_argument("--deadline", default="", help="UTC HH:MM after which no new run starts (the current one finishes)")
    p.add_argument("--runs", default=os.path.join("runs", "experiments"), help="where the run folders go")
    p.add_argument("--results", default="results", help="where experiments.md and the plots go")
    p.add_argument("--batches", type=int, default=16, help="snr: independent rollouts per setting (default 16)")
    p.add_argument("--combine", type=int, default=4, help="snr: also compare sums of this many rollouts (default 4)")
    p.add_argument("--rewards", default="shapes,jpeg_compressibility", help="snr: comma-separated rewards")
    p.add_argument("--algos", default="grpo,vgpo", help="snr: comma-separated algorithms")
    try:
        opts = p.parse_args(argv)
        only = opts.only.split(",")
        if set(only) - {"main", "depletion", "sensitivity"}:
            raise harness.UsageError(f"--only {opts.only!r}: use main, depletion and/or sensitivity, comma-separated")
        opts.depletion_seeds = opts.seeds if opts.depletion_seeds is None else opts.depletion_seeds
        if min(opts.epochs, opts.eval_every, opts.seeds, opts.depletion_seeds, opts.sensitivity_seeds) < 1:
            raise harness.UsageError("--epochs, --eval-every and the seed counts must be ≥ 1")
        opts.set = parse_set(opts.set)
        if opts.command == "snr":
            if opts.batches < 2 or not 1 <= opts.combine <= opts.batches:
                raise harness.UsageError("--batches must be ≥ 2 and --combine between 1 and --batches")
            opts.cmdline = f"python -m tools.experiments snr --batches {opts.batches} --combine {opts.combine} " \
                           f"--rewards {opts.rewards} --algos {opts.algos}" + \
                           "".join(f" --set {k}={v}" for k, v in opts.set.items())
            report = snr_report(opts)
            os.makedirs(opts.results, exist_ok=True)
            with open(os.path.join(opts.results, "snr.md"), "w") as f:
                f.write(report + "\n")
            print(report)
            return 0
        opts.cmdline = "python -m tools.experiments run " + " ".join(
            [f"--epochs {opts.epochs}", f"--eval-every {opts.eval_every}", f"--seeds {opts.seeds}",
             f"--depletion-seeds {opts.depletion_seeds}", f"--sensitivity-seeds {opts.sensitivity_seeds}",
             f"--only {opts.only}", *[f"--set {k}={v}" for k, v in opts.set.items()]])
        runs = plan(only, opts.seeds, opts.sensitivity_seeds, opts.depletion_seeds)
        harness.validate(run_args(runs[0], "", opts))
        if opts.command == "run":
            execute(runs, opts)
        print(summarise(runs, opts))
    except harness.UsageError as e:
        print(f"tools.experiments: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
