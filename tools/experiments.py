"""The seeded experiments on the toy world (logged in results/RESULTS.md): VGPO against GRPO, VGPO's two halves and
its step weights, an oracle's per-step credit, and VGPO's sensitivity to κ, anchor_steps and γ. Every run is a
`vgpo.train` run in its own folder; this script plans them, runs the missing ones, scores each final policy under
three evaluation-noise seeds, and summarises them into results/experiments.md, main.png and sensitivity.png.

    python -m tools.experiments run --shard 0/2 &  python -m tools.experiments run --shard 1/2   # the full plan
    python -m tools.experiments summarise                # tables and plots only
    python -m tools.experiments run --epochs 10 --seeds 2 --eval-every 5 --only main   # a smaller budget
    python -m tools.experiments snr                      # signal-to-noise of one rollout's policy gradient

Groups (`--only`):
    main         GRPO, VGPO, temporal-only (VGPO with --anchor-coef 0), anchor-only (VGPO with --no-temporal-values)
                 and VGPO without step weights (--no-step-weights: ω ≡ 1, previews kept), `--seeds` seeds each
                 (default 5), the same budget
    oracle       per-step credit from the truth: Â_k = the group-normalised A*_k = V(x_{k+1}) − V(x_k), V by
                 `--continuations` branching continuations (tools.credit), trained by vgpo's own update;
                 `--oracle-seeds` seeds (default 3)
    sensitivity  VGPO with one of anchor_steps, κ (anchor_coef), γ changed; `--sensitivity-seeds` seeds (default 2)
Defaults (epochs, eval_every, every hyperparameter) come from vgpo.make_args(model="tiny"): the toy preset.
(Reward-diversity depletion, the strict reward's uniform groups, is tools.collapse's subject.)

A run whose folder holds a finished metrics.jsonl (its last row is the final, evaluated epoch) is skipped;
an interrupted one with a checkpoint is resumed (vgpo's --resume), one without is started again. So the
plan can be run in pieces (`--only`, `--deadline`, `--shard`) and summarised at any time. Runs go to
runs/experiments/ (not committed); the table and plots to results/ (committed), with every finished run's logged
curves and scores in results/experiments-runs.json, from which `summarise` works where a run folder is absent.
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
import shapes
import vgpo

VARIANTS = {  # name → the settings it changes from the toy preset
    "grpo": dict(algo="grpo"),
    "vgpo": dict(),
    "temporal-only": dict(anchor_coef=0.0),  # per-step values and weights, no absolute term
    "anchor-only": dict(temporal_values=False),  # terminal reward only, ω ≡ 1, with the absolute term
    "no-step-weights": dict(step_weights=False),  # previews, values and anchor as VGPO's, ω ≡ 1
}
# The oracle arm: rollouts without previews (as GRPO's), the credit replaced by tools.credit.Oracle
ORACLE = dict(algo="grpo")
# Sensitivity: one setting changed at a time around the preset's value (the preset's own point is the
# main grid's VGPO run, reused, as is its temporal-only run for κ = 0). The preset's anchor_steps (5) covers all 4
# trained steps, so 2 anchors the early half of them only.
SENSITIVITY = {"anchor_steps": [2], "anchor_coef": [0.0, 0.3, 3.0], "gamma": [0.5, 1.0]}
COLORS = {"grpo": "tab:red", "vgpo": "tab:blue", "temporal-only": "tab:green", "anchor-only": "tab:purple",
          "no-step-weights": "tab:orange", "oracle": "black"}
ARCHIVE = "experiments-runs.json"  # in --results: every finished run's slimmed rows and scores, by folder name


@dataclasses.dataclass
class Run:
    group: str
    label: str  # what the table calls it
    seed: int
    overrides: dict
    oracle: int = 0  # > 0: an oracle run, its credit from this many continuations per state

    def folder(self, root: str, epochs: int) -> str:
        if self.oracle:
            return os.path.join(root, f"oracle-m{self.oracle}-e{epochs}-s{self.seed}")
        # named by what it changes, so two groups asking for the same settings share one run
        tag = "-".join(f"{k}={v}" for k, v in sorted(self.overrides.items()) if k != "algo")
        algo = self.overrides.get("algo", "vgpo")
        return os.path.join(root, f"{algo}{'-' + tag if tag else ''}-e{epochs}-s{self.seed}")


def plan(only, seeds: int, sensitivity_seeds: int, oracle_seeds: int = 3, continuations: int = 3) -> list[Run]:
    """Every run of the chosen groups, seed-major so that a plan cut short has balanced variants."""
    runs = []
    if "main" in only:
        runs += [Run("main", name, s, o) for s in range(seeds) for name, o in VARIANTS.items()]
    if "oracle" in only:
        runs += [Run("oracle", "oracle", s, ORACLE, oracle=continuations) for s in range(oracle_seeds)]
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


def score(folder: str, first: dict, base_of: str = "") -> dict:
    """Held-out strict accuracy ('strict_accuracy', 'strict/<category>') under each evaluation-noise seed
    (shapes.EVAL_SEEDS): their mean, and 'per_seed'. Of the policy the finished run in `folder` saved, or with
    `base_of` (a run folder) of the base model that run started from. `first`: the first seed's evaluation, which
    the run logged already (its final row; row 0 for the base). Kept in FOLDER/eval_seeds.json."""
    path = os.path.join(folder, "eval_seeds.json")
    if not os.path.exists(path):
        args = recovery.resume_args(vgpo.Args, base_of or folder)  # the run's settings, as --resume reads them
        model = vgpo.load_model(args)
        if not base_of:
            harness.init_from(model, folder)
        runs = [first] + [vgpo.evaluate(model, args, seed=s) for s in shapes.EVAL_SEEDS[1:]]
        runs = [{k[5:]: v for k, v in r.items() if k.startswith("eval/strict")} for r in runs]
        out = {k: float(np.mean([r[k] for r in runs])) for k in runs[0]} | {
            "per_seed": [r["strict_accuracy"] for r in runs]}
        os.makedirs(folder, exist_ok=True)
        with open(path, "w") as f:
            json.dump(out, f)
    with open(path) as f:
        return json.load(f)


def distinct(runs: list[Run], opts) -> list[Run]:
    """One run per folder, in plan order (a sensitivity run at the preset's values is a main-grid run)."""
    return list({r.folder(opts.runs, opts.epochs): r for r in reversed(runs)}.values())[::-1]


def execute(runs: list[Run], opts) -> None:
    """Run what is missing, in order (with --shard K/N, every N-th of them from the K-th), scoring each finished
    run under the three evaluation-noise seeds; stop starting new runs after --deadline (UTC HH:MM)."""
    mine = distinct(runs, opts)[opts.shard[0]::opts.shard[1]]  # a shard's share: from the plan, not from what is done
    todo = [r for r in mine if not finished(r.folder(opts.runs, opts.epochs), opts.epochs)]
    print(f"{len(mine)} runs planned{' for this shard' if opts.shard[1] > 1 else ''}, {len(mine) - len(todo)} "
          f"already finished, {len(todo)} to run", flush=True)
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
        t0, c0 = time.time(), time.process_time()
        if run.oracle:
            from tools import credit

            vgpo.train(args, credit_fn=credit.Oracle(args, run.oracle))
        else:
            vgpo.train(args)
        print(f"=== done in {(time.time() - t0) / 60:.1f} min ({(time.process_time() - c0) / 60:.1f} CPU min)",
              flush=True)
        shutil.rmtree(os.path.join(folder, "checkpoints"), ignore_errors=True)  # 45 MB each; the run is complete
        score(folder, read_rows(folder)[-1])
        if opts.shard[1] == 1:  # one process: tables and plots are current after every run
            summarise(runs, opts)


# ----------------------------------------------------------------------------------------------------
# Summaries
# ----------------------------------------------------------------------------------------------------


# What the summaries read of a run's rows: kept in the archive, rounded (the tables quote 3 decimals)
KEPT = ("epoch", "eval/", "reward/mean", "reward/frac_all_solved", "reward/frac_all_failed", "advantage/frac_nonzero",
        "advantage/trained_mean_abs",
        "time/epoch_s", "credit/preview_corr")


def slim(rows: list[dict]) -> list[dict]:
    def rnd(v):
        return [rnd(x) for x in v] if isinstance(v, list) else round(v, 6) if isinstance(v, float) else v

    return [{k: rnd(v) for k, v in r.items() if k.startswith(KEPT)} for r in rows]


def load_archive(opts) -> dict:
    path = os.path.join(opts.results, ARCHIVE)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def record(folder: str, opts, archive: dict):
    """(slimmed rows, score) of a finished run: from its folder, else from the archive; None if neither has it."""
    if finished(folder, opts.epochs):
        rows = read_rows(folder)
        archive[os.path.basename(folder)] = {"rows": slim(rows), "score": score(folder, rows[-1])}
    entry = archive.get(os.path.basename(folder))
    return (entry["rows"], entry["score"]) if entry else None


def collect(runs: list[Run], opts, archive: dict) -> dict:
    """{(group, label): [(seed, slimmed metric rows, eval_seeds score) of each finished seed, by seed]}, from the run
    folders or the archive (which this updates with every finished folder); unfinished runs are left out."""
    out = {}
    for r in sorted(runs, key=lambda r: r.seed):
        got = record(r.folder(opts.runs, opts.epochs), opts, archive)
        if got:
            out.setdefault((r.group, r.label), []).append((r.seed, *got))
    return out


def mean_se(values) -> tuple[float, float]:
    """Mean and standard error over seeds (std with ddof 1 / √n; 0 for one seed)."""
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0


def fmt(values) -> str:
    m, se = mean_se(values)
    return f"{m:.3f} ± {se:.3f}" if len(values) > 1 else f"{m:.3f}"


def fmt_defined(values) -> str:
    """fmt over the values that are not NaN ('undefined' if none is)."""
    v = [x for x in values if not np.isnan(x)]
    return fmt(v) if v else "undefined"


def curve(seeds: list, key: str, smooth: int = 1, step: int | None = None):
    """(epochs, mean over seeds, s.e. over seeds) of `key` at the epochs every seed logged it; `smooth` > 1: a
    trailing running mean over that many epochs first (training metrics are noisy epoch to epoch); `step`: of the
    per-step vector `key`, that step's entry, where defined."""
    per_seed = []
    for _, rows, _ in seeds:
        rows = [r for r in rows if key in r and (step is None or r[key][step] is not None)]
        e = np.array([r["epoch"] for r in rows])
        v = np.array([float(r[key] if step is None else r[key][step]) for r in rows])
        if smooth > 1 and len(v) >= smooth:
            v = np.convolve(v, np.ones(smooth) / smooth, mode="valid")
            e = e[smooth - 1:]
        per_seed.append(dict(zip(e.tolist(), v)))
    epochs = sorted(set.intersection(*[set(d) for d in per_seed]))
    vals = np.array([[d[e] for e in epochs] for d in per_seed])
    se = vals.std(0, ddof=1) / np.sqrt(len(per_seed)) if len(per_seed) > 1 else np.zeros(len(epochs))
    return np.array(epochs), vals.mean(0), se


def window(rows: list[dict], key: str, first: bool, n: int = 10) -> float:
    """Mean of `key` over a run's first (or last) n trained epochs."""
    v = [float(r[key]) for r in rows if key in r and r["epoch"] > 0]
    return float(np.mean(v[:n] if first else v[-n:]))


# The four arms are a 2 × 2 design, temporal values on/off × anchor on/off (GRPO is VGPO with both off): each half's
# effect is a difference of two arms, with the other half off and with it on.
HALVES = {"temporal values (ω and previews)": (("temporal-only", "grpo"), ("vgpo", "anchor-only")),
          "the anchor (κ·Q̄)": (("anchor-only", "grpo"), ("vgpo", "temporal-only"))}


FOUR = ("grpo", "vgpo", "temporal-only", "anchor-only")  # the arms of the 2 × 2


def halves(final: dict) -> dict:
    """{half: (per-seed effect with the other half off, with it on)} from {arm: {seed: final accuracy}}, over the
    seeds every arm of the 2 × 2 has; 'seeds': those seeds."""
    seeds = sorted(set.intersection(*[set(final[a]) for a in FOUR]))
    out = {name: tuple([final[x][s] - final[y][s] for s in seeds] for x, y in pairs) for name, pairs in HALVES.items()}
    return out | {"seeds": seeds}


def arms_of(data: dict) -> dict:
    """{arm: its finished seeds} for the main grid's arms and the oracle, in the tables' order."""
    return {a: data[(g, a)] for g, a in [("main", a) for a in VARIANTS] + [("oracle", "oracle")] if (g, a) in data}


def paired(final: dict, a: str, ref: str) -> list[float]:
    """Per-seed differences a − ref of the final accuracy, over the seeds both have."""
    return [final[a][s] - final[ref][s] for s in sorted(final[a]) if ref in final and s in final[ref]]


def paired_cells(values: dict, a: str) -> list[str]:
    """The '− GRPO, same seeds' and '− VGPO, same seeds' cells of arm a, from {arm: {seed: value}} (empty for the
    reference itself or where it has no common seed)."""
    return [fmt(d) if d and a != ref else "" for ref, d in ((r, paired(values, a, r)) for r in ("grpo", "vgpo"))]


def main_tables(data: dict, opts, base: dict | None) -> list[str]:
    by_arm = arms_of(data)
    arms = list(by_arm)
    if not arms:
        return ["_no finished runs of the main grid for this budget yet_", ""]
    final = {a: {s: sc["strict_accuracy"] for s, _, sc in by_arm[a]} for a in arms}
    ref = "grpo" if "grpo" in arms else None
    ref_final = curve(by_arm[ref], "eval/strict_accuracy")[1][-1] if ref else None
    epochs = curve(by_arm[arms[0]], "eval/strict_accuracy")[0]
    head = ["arm", "seeds", "final (3 noise seeds)", "− GRPO, same seeds", "− VGPO, same seeds", "best evaluation",
            *[f"@{int(e)}" for e in epochs], "epochs to GRPO's final", "below the base"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a in arms:
        seeds = by_arm[a]
        best = [max(r["eval/strict_accuracy"] for r in rows if "eval/strict_accuracy" in r) for _, rows, _ in seeds]
        e, m, se = curve(seeds, "eval/strict_accuracy")
        hit = [int(ei) for ei, mi in zip(e, m) if ei > 0 and ref_final is not None and mi >= ref_final - 1e-9]
        below = sum(v < base["strict_accuracy"] for v in final[a].values()) if base else "?"
        lines.append("| " + " | ".join([
            a, str(len(seeds)), f"**{fmt(list(final[a].values()))}**",
            *paired_cells(final, a), fmt(best),
            *[f"{mi:.3f} ± {si:.3f}" for mi, si in zip(m, se)],
            (str(hit[0]) if hit else f"not by {int(e[-1])}") if ref_final is not None else "",
            f"{below} of {len(seeds)}"]) + " |")
    most = max(len(final[a]) for a in arms)
    lines += ["", "Final accuracy by training seed (3 noise seeds each):", "",
              "| arm | " + " | ".join(f"seed {s}" for s in range(most)) + " |", "|" + "---|" * (most + 1)]
    for a in arms:
        cells = [f"{final[a][s]:.3f}" if s in final[a] else "" for s in range(most)]
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    # One evaluation of a run can differ from the next by as much as the arms do, so a comparison at the last epoch
    # alone is noisy; the mean over the second half's evaluations says whether an ordering holds beyond that epoch.
    late = [int(x) for x in epochs if x > 0 and x >= epochs[-1] / 2]
    late_mean = {a: {s: np.mean([r["eval/strict_accuracy"] for r in rows if r.get("epoch") in late
                                 and "eval/strict_accuracy" in r]) for s, rows, _ in by_arm[a]} for a in arms}
    lines += ["", f"The same comparison on the mean of each run's evaluations at epochs {', '.join(map(str, late))} "
              "(first noise seed): one evaluation moves by a few hundredths from one to the next within a run.", "",
              "| arm | mean of the late evaluations | − GRPO, same seeds | − VGPO, same seeds |", "|---|---|---|---|"]
    for a in arms:
        lines.append(f"| {a} | {fmt(list(late_mean[a].values()))} | " + " | ".join(paired_cells(late_mean, a)) + " |")
    if set(FOUR) <= set(arms):
        effects = halves(final)
        lines += ["", f"The four arms as a 2 × 2 design (final accuracy, paired by seed, {len(effects['seeds'])} "
                  "seeds): what each half adds with the other half off, with it on, and the average.", "",
                  "| adding | with the other off | with the other on | average |", "|---|---|---|---|"]
        for name in HALVES:
            off, on = effects[name]
            lines.append(f"| {name} | {fmt(off)} | {fmt(on)} | {fmt([(a + b) / 2 for a, b in zip(off, on)])} |")
    lines += ["", "Groups and updates: the share of groups whose 8 samples all pass (all-solved) or all fail "
              "(all-failed), of trained trajectories whose advantage is non-zero on some trained step, and the mean "
              "absolute advantage over the trained steps; epochs 1–10 → the last 10 (mean ± s.e. over seeds).", ""]
    keys = [("reward/mean", "training reward"), ("reward/frac_all_solved", "all-solved groups"),
            ("reward/frac_all_failed", "all-failed groups"), ("advantage/frac_nonzero", "trajectories with Â ≠ 0"),
            ("advantage/trained_mean_abs", "mean size of Â, trained steps")]
    lines += ["| arm | " + " | ".join(t for _, t in keys) + " | s / epoch |", "|" + "---|" * (len(keys) + 2)]
    for a in arms:
        seeds = by_arm[a]
        cells = [" → ".join(fmt([window(r, k, first) for _, r, _ in seeds]) for first in (True, False))
                 for k, _ in keys]
        secs = np.mean([r["time/epoch_s"] for _, rows, _ in seeds for r in rows if "time/epoch_s" in r])
        lines.append(f"| {a} | " + " | ".join(cells) + f" | {secs:.1f} |")
    cats = [c for c in shapes.CATEGORIES if f"strict/{c}" in by_arm[arms[0]][0][2]]  # those held out
    lines += ["", "By category, final (3 noise seeds; mean ± s.e. over seeds):", "",
              "| arm | " + " | ".join(c.replace("_", " ") for c in cats) + " |", "|" + "---|" * (len(cats) + 1)]
    if base:
        lines.append("| base | " + " | ".join(f"{base[f'strict/{c}']:.3f}" for c in cats) + " |")
    for a in arms:
        seeds = by_arm[a]
        lines.append(f"| {a} | " + " | ".join(fmt([sc[f"strict/{c}"] for _, _, sc in seeds]) for c in cats) + " |")
    scoring = [a for a in arms if any("credit/preview_corr" in r for _, rows, _ in by_arm[a] for r in rows)]
    if scoring:  # the arms that score previews: does a preview's agreement with the final reward change in training?
        preset = vgpo.make_args(model="tiny", **opts.set)
        trained = vgpo.sde_window(preset.num_steps, preset.sde_steps)
        lines += ["", "Preview agreement, corr(r_k, R) over each epoch's trajectories, at the trained steps "
                  "(epochs 1–10 → the last 10; mean ± s.e. over seeds; 'undefined' where r_k never varied):", "",
                  "| arm | " + " | ".join(f"step {k}" for k in range(trained)) + " |", "|" + "---|" * (trained + 1)]
        for a in scoring:
            cells = [" → ".join(fmt_defined([preview_window(rows, k, first) for _, rows, _ in by_arm[a]])
                                for first in (True, False)) for k in range(trained)]
            lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return lines + [""]


def preview_window(rows: list[dict], k: int, first: bool, n: int = 10) -> float:
    """Mean of corr(r_k, R) over a run's first (or last) n trained epochs where it is defined."""
    v = [r["credit/preview_corr"][k] for r in rows if "credit/preview_corr" in r]
    v = [x for x in (v[:n] if first else v[-n:]) if x is not None]
    return float(np.mean(v)) if v else float("nan")


def sensitivity_table(data: dict, opts) -> list[str]:
    preset = vgpo.make_args(model="tiny")
    ref = {s: sc["strict_accuracy"] for s, _, sc in data.get(("main", "grpo"), [])}
    lines = ["| setting | value | seeds | final per seed (3 noise seeds) | mean | − preset, same seeds | "
             "− GRPO, same seeds |", "|---|---|---|---|---|---|---|"]
    found = False
    for key, values in SENSITIVITY.items():
        here = {s: sc["strict_accuracy"] for s, _, sc in data.get(("sensitivity", "vgpo"), [])}
        for v in sorted(set(values) | {getattr(preset, key)}):
            lb = "vgpo" if v == getattr(preset, key) else f"{key}={v}"
            seeds = data.get(("sensitivity", lb))
            if not seeds:
                continue
            found = True
            acc = {s: sc["strict_accuracy"] for s, _, sc in seeds}
            d_preset = [acc[s] - here[s] for s in acc if s in here] if lb != "vgpo" else []
            d_grpo = [acc[s] - ref[s] for s in acc if s in ref]
            lines.append(f"| {key} | {v}{' (preset)' if lb == 'vgpo' else ''} | {len(seeds)} | "
                         f"{', '.join(f'{acc[s]:.3f}' for s in sorted(acc))} | {fmt(list(acc.values()))} | "
                         f"{fmt(d_preset) if d_preset else ''} | {fmt(d_grpo) if d_grpo else ''} |")
    return (lines if found else ["_no finished sensitivity runs for this budget yet_"]) + [""]


def plots(data: dict, opts, base: dict | None) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    by_arm = arms_of(data)
    if by_arm:
        panels = [("eval/strict_accuracy", "held-out strict accuracy", "×: final, 3 noise seeds", 1),
                  ("reward/mean", "training reward", "5-epoch mean", 5),
                  ("reward/frac_all_solved", "share of all-solved groups", "5-epoch mean", 5),
                  ("reward/frac_all_failed", "share of all-failed groups", "5-epoch mean", 5),
                  ("advantage/frac_nonzero", "share of trajectories with Â ≠ 0", "5-epoch mean", 5)]
        fig, ax = plt.subplots(2, 3, figsize=(10, 6.4))
        ax = ax.flatten()
        for i, (a, seeds) in enumerate(by_arm.items()):
            c = COLORS.get(a)
            for axis, (key, _, _, smooth) in zip(ax, panels):
                e, m, se = curve(seeds, key, smooth)
                axis.plot(e, m, "o-" if smooth == 1 else "-", color=c, ms=3, lw=1.2, label=f"{a} (n = {len(seeds)})")
                axis.fill_between(e, m - se, m + se, color=c, alpha=0.15, lw=0)
            fm, fse = mean_se([sc["strict_accuracy"] for _, _, sc in seeds])
            ax[0].errorbar([opts.epochs * (1.03 + 0.02 * i)], [fm], yerr=[fse], fmt="x", color=c, capsize=2)
        for axis, (_, title, note, _) in zip(ax, panels):
            axis.set(xlabel="epoch", ylabel=title, title=f"{title} ({note})")
            axis.title.set_fontsize(9)
        if "vgpo" in by_arm:  # the last panel: how well VGPO's previews predict the final reward as it trains
            for k, ls in ((1, ":"), (2, "--"), (3, "-")):
                e, m, se = curve(by_arm["vgpo"], "credit/preview_corr", 5, step=k)
                ax[5].plot(e, m, ls, color=COLORS["vgpo"], label=f"step {k}")
                ax[5].fill_between(e, m - se, m + se, color=COLORS["vgpo"], alpha=0.15, lw=0)
            ax[5].set(xlabel="epoch", ylabel="corr(r_k, R)", title="VGPO: preview agreement (5-epoch mean)")
            ax[5].title.set_fontsize(9)
            ax[5].legend(fontsize=8)
        else:
            ax[5].axis("off")
        handles, labels = ax[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8, frameon=False)
        fig.suptitle(f"mean ± s.e. over seeds (shaded); {budget_line(opts)}", fontsize=8)
        fig.tight_layout(rect=(0, 0.05, 1, 1))
        path = os.path.join(opts.results, "main.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    preset = vgpo.make_args(model="tiny")
    if any(g == "sensitivity" for g, _ in data):
        fig, ax = plt.subplots(1, len(SENSITIVITY), figsize=(10, 3.4), sharey=True)
        grpo = [sc["strict_accuracy"] for _, _, sc in data.get(("main", "grpo"), [])]
        for axis, (key, values) in zip(ax, SENSITIVITY.items()):
            xs, ms = [], []
            for v in sorted(set(values) | {getattr(preset, key)}):
                seeds = data.get(("sensitivity", "vgpo" if v == getattr(preset, key) else f"{key}={v}"))
                if seeds:
                    acc = [sc["strict_accuracy"] for _, _, sc in seeds]
                    axis.plot([v] * len(acc), acc, ".", color="tab:blue", alpha=0.5)
                    xs.append(v), ms.append(np.mean(acc))
            axis.plot(xs, ms, "o-", color="tab:blue", label="VGPO (dots: seeds)")
            axis.axvline(getattr(preset, key), color="grey", ls=":", label="preset")
            if grpo:
                axis.axhline(np.mean(grpo), color="tab:red", ls="--", label=f"GRPO, {len(grpo)} seeds")
            if base:
                axis.axhline(base["strict_accuracy"], color="black", ls=":", label="base model")
            axis.set(xlabel=key, title=f"sensitivity to {key}")
        ax[0].set_ylabel("final held-out strict accuracy")
        ax[0].legend(fontsize=7)
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
    archive = load_archive(opts)
    data = collect(runs, opts, archive)
    folders = [r.folder(opts.runs, opts.epochs) for r in distinct(runs, opts)]
    done = [f for f in folders if os.path.basename(f) in archive]
    local = [f for f in done if finished(f, opts.epochs)]
    if local:  # every run starts from the same base model: score it once, from the first finished run's settings
        archive["base"] = {"score": score(os.path.join(opts.runs, "base"), read_rows(local[0])[0], base_of=local[0])}
    base = archive.get("base", {}).get("score")
    with open(os.path.join(opts.results, ARCHIVE), "w") as f:
        json.dump(dict(sorted(archive.items())), f, separators=(",", ":"))
    lines = ["# Experiments on the toy world (written by `python -m tools.experiments`)", "",
             f"Budget: {budget_line(opts)}. {len(done)} of {len(folders)} planned runs finished. Held-out strict "
             "accuracy (GenEval's mean over the six categories); 'final' averages the final policy's evaluations under "
             "three evaluation-noise seeds, '@E' and 'best' use the first seed (the run's own evaluations; @0 is "
             "the base model). Mean ± standard error over training seeds; '− GRPO, same seeds' is the mean of "
             "the per-seed differences. Seconds per epoch: wall time at one thread per run, on 2 CPU cores shared by "
             "several runs (results/RESULTS.md says how many). "
             "'Below the base': runs whose final accuracy ends under the base model's"
             + (f" ({base['strict_accuracy']:.3f} under the same three noise seeds)." if base else "."), "",
             f"Command: `{opts.cmdline}`", "", "## GRPO, VGPO, its two halves, its step weights, and an oracle", ""]
    lines += main_tables(data, opts, base)
    if any(r.group == "sensitivity" for r in runs):
        lines += ["## Sensitivity (VGPO, one setting changed from the preset)", ""]
        lines += sensitivity_table(data, opts)
    for p in plots(data, opts, base):
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
    p.add_argument("--only", default="main,oracle,sensitivity",
                   help="comma-separated groups: main, oracle, sensitivity (default: all)")
    p.add_argument("--epochs", type=int, default=preset.epochs,
                   help=f"epochs per run (default: the preset's {preset.epochs})")
    p.add_argument("--eval-every", type=int, default=preset.eval_every,
                   help=f"(default: the preset's {preset.eval_every})")
    p.add_argument("--seeds", type=int, default=5, help="seeds 0…N−1 of the main grid (default 5)")
    p.add_argument("--sensitivity-seeds", type=int, default=2, help="seeds of the sensitivity sweep (default 2)")
    p.add_argument("--oracle-seeds", type=int, default=3, help="seeds of the oracle arm (default 3)")
    p.add_argument("--continuations", type=int, default=3,
                   help="oracle: continuations per state for V(x_k) (default 3; its cost and noise: results/)")
    p.add_argument("--shard", default="0/1", help="K/N: run every N-th missing run from the K-th, to use N processes")
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
        if set(only) - {"main", "oracle", "sensitivity"}:
            raise harness.UsageError(f"--only {opts.only!r}: use main, oracle and/or sensitivity, comma-separated")
        k, _, n = opts.shard.partition("/")
        if not (k.isdigit() and n.isdigit() and int(k) < int(n)):
            raise harness.UsageError(f"--shard {opts.shard!r}: write K/N with 0 ≤ K < N, e.g. 0/2 and 1/2")
        opts.shard = (int(k), int(n))
        if min(opts.epochs, opts.eval_every, opts.seeds, opts.sensitivity_seeds, opts.oracle_seeds,
               opts.continuations) < 1:
            raise harness.UsageError("--epochs, --eval-every, the seed counts and --continuations must be ≥ 1")
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
             f"--sensitivity-seeds {opts.sensitivity_seeds}", f"--oracle-seeds {opts.oracle_seeds}",
             f"--continuations {opts.continuations}",
             f"--only {opts.only}", *[f"--set {k}={v}" for k, v in opts.set.items()]])
        runs = plan(only, opts.seeds, opts.sensitivity_seeds, opts.oracle_seeds, opts.continuations)
        harness.validate(run_args(runs[0], "", opts))
        if opts.command == "run":
            execute(runs, opts)
            if opts.shard[1] > 1:  # the other shards may still be running: summarise once they are all done
                print("this shard is done; when every shard is: python -m tools.experiments summarise", flush=True)
                return 0
        print(summarise(runs, opts))
    except harness.UsageError as e:
        print(f"tools.experiments: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
