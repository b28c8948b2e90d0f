"""Per-step credit against the truth on the toy world: what each denoising step's action was worth, by branching.

From a state x_k of a rollout, M independent continuations with the rollout's own sampler (SDE steps with fresh
noise inside the window 0…S−1, the Euler steps after) estimate its value V(x_k) = E[R | x_k]. Given its noise a
step is deterministic, so the true advantage of step k's action is A*_k = V(x_{k+1}) − V(x_k) = Q(x_k, a_k) − V(x_k).
From x_S on nothing is random: V(x_S) = R. This tool measures how well each credit rule's Â_k (VGPO's and its
parts, GRPO's) tracks A*_k, what the previews predict, and what VGPO's step weights do to failed and solved
trajectories; `Oracle` is a credit rule that uses A*_k itself (the oracle arm of tools.experiments).

    python -m tools.credit                            # the base model → results/credit-base.json, credit.md
    python -m tools.credit --policy runs/experiments/vgpo-e80-s0 --label trained   # a trained policy
    python -m tools.credit report                     # results/credit.md and credit-truth.png from the JSON files

Correlations are Pearson's over the batch's trajectories at each trained step ('pooled': over all (trajectory,
trained step) pairs); ± is a bootstrap standard error over prompt groups (a group's trajectories share a prompt).
"""
from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import sys
import time

import numpy as np
import torch

import distributed
import harness
import recovery
import vgpo


# ----------------------------------------------------------------------------------------------------
# Branching: continuations from the states of a rollout
# ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def continue_from(model, x, k: int, prompts: list[str], args, generator=None, step_noise=None) -> torch.Tensor:
    """Finish trajectories from x_k (B, C, H, W) with the rollout's sampler: SDE steps k…S−1, Euler steps S…T−1
    (as vgpo.generate). The SDE steps' ε from `step_noise` (B, S−k, C, H, W) if given (then this reproduces the
    rollout), else from `generator`. Returns x_T (B, C, H, W)."""
    T, S = args.num_steps, vgpo.sde_window(args.num_steps, args.sde_steps)
    sigmas = model.sigmas(T)
    cond = model.encode(prompts)
    uncond = model.encode([""] * len(prompts)) if args.guidance_scale != 1.0 else None
    x = x.float()
    for j in range(k, T):
        v = vgpo.guided_velocity(model.transformer, x, sigmas[j], cond, uncond, args.guidance_scale)
        if j < S:
            eps = step_noise[:, j - k] if step_noise is not None else \
                torch.randn(x.shape, generator=generator, device=x.device)
            x, _, _, _ = vgpo.sde_step_with_logprob(v, x, sigmas[j], sigmas[j + 1], args.noise_level, noise=eps)
        else:
            x = x + (sigmas[j + 1] - sigmas[j]) * v
    return x


@torch.no_grad()
def branch(model, traj, metadata: list[dict], reward_fn, args, m: int, generator, states=None,
           batch_size: int = 256) -> torch.Tensor:
    """Rewards of `m` independent continuations from each state x_k, k in `states` (default 0…S−1), of every
    trajectory: (N, len(states), m)."""
    n, S = len(traj.prompts), vgpo.sde_window(args.num_steps, args.sde_steps)
    states = list(range(S)) if states is None else list(states)
    out = torch.empty((n, len(states), m))
    for i, k in enumerate(states):
        x = traj.latents[:, k].repeat_interleave(m, dim=0)  # (N·m, C, H, W), trajectory-major
        prompts = [p for p in traj.prompts for _ in range(m)]
        metas = [d for d in metadata for _ in range(m)]
        rewards = []
        for s in range(0, len(x), batch_size):
            end = continue_from(model, x[s : s + batch_size], k, prompts[s : s + batch_size], args, generator)
            rewards.append(reward_fn(model.decode(end), prompts[s : s + batch_size], metas[s : s + batch_size]))
        out[:, i] = torch.cat(rewards).float().cpu().view(n, m)
    return out


def true_advantages(samples: torch.Tensor, terminal: torch.Tensor, own: bool = True) -> torch.Tensor:
    """A*_k = V̂(x_{k+1}) − V̂(x_k), k = 0…S−1, from continuation rewards `samples` (N, S, M) of x_0…x_{S−1} and the
    terminal rewards R (N,), V(x_S) = R. With `own`, the trajectory's R is one more sample of V(x_{k+1}) (it is
    one continuation from there) but never of V(x_k), whose estimate would then depend on step k's action."""
    terminal = terminal.float().cpu()
    base = samples.mean(dim=2)  # (N, S): V̂(x_k)
    m = samples.shape[2]
    later = (samples[:, 1:].sum(dim=2) + terminal[:, None]) / (m + 1) if own else samples[:, 1:].mean(dim=2)
    target = torch.cat([later, terminal[:, None]], dim=1)  # (N, S): V̂(x_{k+1}), exact at k + 1 = S
    return target - base


class Oracle:
    """A credit rule for vgpo.train(credit_fn=...): Â_k = A*_k from `continuations` branches per state, normalised
    per step within each group as VGPO's relative term is (vgpo._group_normalize, `scale_rewards`), clipped to
    ±adv_clip_max; steps after the window get 0 (they are not trained). The continuations' noise is keyed by
    (seed, epoch), so an oracle run is reproducible. One process only."""

    def __init__(self, args, continuations: int):
        self.args, self.m, self.reward_fn = args, continuations, None

    def __call__(self, model, traj, metadata, r, group_ids, epoch):
        if distributed.world_size() > 1:
            raise harness.UsageError("the oracle's credit branches every trajectory on one process: run it without "
                                     "torchrun")
        if self.reward_fn is None:
            self.reward_fn = harness.make_reward(self.args, model.device)
        S = vgpo.sde_window(self.args.num_steps, self.args.sde_steps)
        gen = distributed.keyed_generator(self.args.seed, epoch, 7919)  # not the rollout's own keys
        samples = branch(model, traj, metadata, self.reward_fn, self.args, self.m, gen)
        a_star = true_advantages(samples, r[:, -1]).to(r.device)  # (N, S)
        adv = torch.zeros_like(r)
        adv[:, :S] = vgpo._group_normalize(a_star, group_ids, self.args.scale_rewards).clamp(
            -self.args.adv_clip_max, self.args.adv_clip_max)
        values = r[:, -1:].expand_as(r).clone()  # logged as credit/value: V̂(x_{k+1}) on the window, R after it
        values[:, :S] = a_star + samples.mean(dim=2).to(r.device)
        return values, torch.ones_like(r), adv


# ----------------------------------------------------------------------------------------------------
# The measurement
# ----------------------------------------------------------------------------------------------------
# The credit rules compared, each the run settings it is vgpo.credit under (from the measured model's settings)
CREDITS = {
    "GRPO": dict(algo="grpo"),
    "VGPO": dict(),
    "VGPO, κ = 0": dict(anchor_coef=0.0),
    "VGPO, ω ≡ 1": dict(step_weights=False),
    "relative term, ω ≡ 1": dict(anchor_coef=0.0, step_weights=False),
    "anchor only": dict(temporal_values=False),
}


def corr(a: np.ndarray, b: np.ndarray) -> float:
    if a.std() < 1e-12 or b.std() < 1e-12:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def bootstrap(stat, groups: np.ndarray, reps: int, seed: int = 0) -> np.ndarray:
    """stat(index array) over `reps` resamples of whole groups with replacement: (reps, …)."""
    rng = np.random.default_rng(seed)
    ids = np.unique(groups)
    members = [np.flatnonzero(groups == g) for g in ids]
    return np.array([stat(np.concatenate([members[j] for j in rng.integers(0, len(ids), len(ids))]))
                     for _ in range(reps)])


def measure(args, m: int, prompts_per_epoch: int, seed: int, reps: int, oracle_m: int, policy: str = "") -> dict:
    """Rollout of `prompts_per_epoch` × G training prompts with the model of `args` (the base, or `policy`'s
    weights), its previews, `m` continuations from each state x_0…x_{S−1}, and every comparison; a JSON-able dict."""
    t0, c0 = time.time(), time.process_time()
    model = vgpo.load_model(args)
    harness.init_from(model, policy)
    train_set, _ = vgpo.load_prompts(args)
    reward_fn = vgpo.make_reward(args, model.device, train_set)
    chosen = vgpo.sample_prompts(train_set, prompts_per_epoch, np.random.default_rng(seed))
    metadata = [d for _, d in chosen for _ in range(args.num_generations)]
    T, S, G = args.num_steps, vgpo.sde_window(args.num_steps, args.sde_steps), args.num_generations
    n = len(metadata)
    gen = torch.Generator(model.device).manual_seed(seed)
    noise = torch.randn((n, *model.latent_shape), generator=gen)
    step_noise = torch.randn((n, S, *model.latent_shape), generator=gen)
    traj = vgpo.rollout(model, [p for p, _ in chosen], args, noise=noise, step_noise=step_noise)
    r = vgpo.instant_rewards(model, traj, reward_fn, metadata, previews=True)  # (N, T): every arm's inputs
    R = r[:, -1].cpu()
    groups = traj.group_ids.cpu().numpy()

    # checks: the continuation is the rollout's sampler; from x_S it is deterministic and gives R
    k_check = 1
    again = continue_from(model, traj.latents[:, k_check], k_check, traj.prompts, args,
                          step_noise=step_noise[:, k_check:])
    reproduce = (again - traj.latents[:, T]).abs().max().item()
    ends = [continue_from(model, traj.latents[:, S], S, traj.prompts, args, generator=gen) for _ in range(2)]
    deterministic = (ends[0] - ends[1]).abs().max().item()
    from_s = reward_fn(model.decode(ends[0]), traj.prompts, metadata).float().cpu()
    t1 = time.time()

    samples = branch(model, traj, metadata, reward_fn, args, m, gen)  # (N, S, M)
    t2 = time.time()
    # The truth from the continuations alone: R's own noise must not enter A*, or every credit built on R would
    # correlate with it through that noise (A*_{S−1} = R − V̂(x_{S−1}) is exact where it uses R: V(x_S) = R)
    a_star = true_advantages(samples, R, own=False)  # (N, S)
    half = m // 2  # two independent halves: what differs between them is the estimate's noise
    a1, a2 = true_advantages(samples[..., :half], R, own=False), true_advantages(samples[..., half:], R, own=False)
    noise_sd = (a1 - a2).std(dim=0) / math.sqrt(2) * math.sqrt(half / m)  # a half's noise, scaled to all m
    values_true = torch.cat([samples.mean(2), R[:, None]], dim=1)  # (N, S+1): V̂(x_0…x_S)

    credits = {}
    for name, change in CREDITS.items():
        _, w, adv = vgpo.credit(r, traj.group_ids, dataclasses.replace(args, **change))
        credits[name] = (adv[:, :S].cpu(), w[:, :S].cpu())
    # the oracle's own credit with few continuations (as trained), scored against the other continuations
    few = vgpo._group_normalize(true_advantages(samples[..., :oracle_m], R), traj.group_ids.cpu(),
                                args.scale_rewards).clamp(-args.adv_clip_max, args.adv_clip_max)
    rest = true_advantages(samples[..., oracle_m:], R, own=False)

    A, Rn = a_star.numpy(), R.numpy()

    def per_step(x, y, idx):  # correlation at each trained step, and pooled over them
        return [corr(x[idx, k], y[idx, k]) for k in range(S)] + [corr(x[idx].ravel(), y[idx].ravel())]

    everyone = np.arange(n)
    out = {"settings": {"policy": policy or "base", "prompts": prompts_per_epoch, "group_size": G,
                        "trajectories": n, "continuations": m, "trained_steps": S, "num_steps": T,
                        "gamma": args.gamma, "anchor_coef": args.anchor_coef, "seed": seed, "bootstrap": reps,
                        "oracle_continuations": oracle_m},
           "checks": {"continuation_reproduces_rollout_max_abs": reproduce, "from_x_S_max_abs": deterministic,
                      "from_x_S_reward_equals_R": bool(torch.equal(from_s, R)),
                      "mean_R": float(R.mean()),
                      "mean_V": [float(v) for v in values_true.mean(0)],
                      "mean_V_se": [float(v) for v in values_true.std(0) / math.sqrt(n)]},
           "seconds": {"rollout_and_checks": t1 - t0, "branching": t2 - t1}}

    # the truth: how much each step decides, and how well it is estimated
    rel = [corr(a1[:, k].numpy(), a2[:, k].numpy()) for k in range(S)]
    out["truth"] = {
        "sd_A": [float(A[:, k].std()) for k in range(S)],
        "noise_sd_A": [float(v) for v in noise_sd],
        # split-half reliability, stepped up to the full estimate (Spearman–Brown); its square root bounds any
        # correlation with the estimated A*
        "reliability": [2 * x / (1 + x) if x == x else float("nan") for x in rel],
        "ceiling": [math.sqrt(max(2 * x / (1 + x), 0)) if x == x else float("nan") for x in rel],
    }
    # the previews: does r_k predict the final reward, and the true value of the state it previews?
    rk = r.cpu().numpy()
    out["previews"] = {
        "corr_r_R": [corr(rk[:, k], Rn) for k in range(T)],
        "corr_r_V": [corr(rk[:, k], values_true[:, k + 1].numpy()) for k in range(S)],
        "corr_R_V": [corr(Rn, values_true[:, k + 1].numpy()) for k in range(S)],
        "pass_rate": [float(rk[:, k].mean()) for k in range(T)],
        "p_solved_if_pass": [float(Rn[rk[:, k] == 1].mean()) if (rk[:, k] == 1).any() else None for k in range(T)],
        "p_solved_if_fail": [float(Rn[rk[:, k] == 0].mean()) if (rk[:, k] == 0).any() else None for k in range(T)],
    }
    values = vgpo.temporal_values(r, args.gamma).cpu().numpy()
    out["values"] = {"corr_Q_R": [corr(values[:, k], Rn) for k in range(S)],
                     "corr_Q_V": [corr(values[:, k], values_true[:, k + 1].numpy()) for k in range(S)]}

    # every credit against A*: per step and pooled, with bootstrap s.e.; paired differences from GRPO
    table = {}
    boot = {}
    for name, (adv, _) in credits.items():
        x = adv.numpy()
        table[name] = per_step(x, A, everyone)
        boot[name] = bootstrap(lambda idx: per_step(x, A, idx), groups, reps)
    oracle_name = f"oracle, M = {oracle_m}"
    table[oracle_name] = per_step(few.numpy(), rest.numpy(), everyone)
    boot[oracle_name] = bootstrap(lambda idx: per_step(few.numpy(), rest.numpy(), idx), groups, reps)
    out["corr_with_A"] = {name: {"value": table[name], "se": np.nanstd(boot[name], axis=0).tolist(),
                                 "minus_grpo": (np.array(table[name]) - np.array(table["GRPO"])).tolist(),
                                 "minus_grpo_se": np.nanstd(boot[name] - boot["GRPO"], axis=0).tolist()}
                          for name in table}
    out["corr_with_A"][oracle_name]["note"] = f"against A* from the other {m - oracle_m} continuations"
    # sign agreement where A*_k is clearly non-zero (|A*_k| > 2 × the estimate's noise)
    clear = np.abs(A) > 2 * noise_sd.numpy()[None]
    out["sign_agreement"] = {name: [float((np.sign(adv.numpy()[clear[:, k], k]) == np.sign(A[clear[:, k], k])).mean())
                                    if clear[:, k].any() else None for k in range(S)]
                             for name, (adv, _) in credits.items()}
    out["clear_count"] = [int(clear[:, k].sum()) for k in range(S)]

    # what ω does: failed and solved trajectories, split by whether a preview before the end passed
    passed_early = (rk[:, : T - 2] > 0.5).any(axis=1)
    kinds = {"failed, a preview passed": (Rn < 0.5) & passed_early,
             "failed, no preview passed": (Rn < 0.5) & ~passed_early,
             "solved": Rn >= 0.5}
    w_vgpo, adv_vgpo = credits["VGPO"][1].numpy(), credits["VGPO"][0].numpy()
    adv_now = credits["VGPO, ω ≡ 1"][0].numpy()
    adv_grpo = credits["GRPO"][0].numpy()
    out["omega"] = {kind: {"count": int(mask.sum()),
                           "omega": w_vgpo[mask].mean(0).tolist() if mask.any() else None,
                           "adv_vgpo": adv_vgpo[mask].mean(0).tolist() if mask.any() else None,
                           "adv_vgpo_no_omega": adv_now[mask].mean(0).tolist() if mask.any() else None,
                           "adv_grpo": adv_grpo[mask].mean(0).tolist() if mask.any() else None,
                           "A_star": A[mask].mean(0).tolist() if mask.any() else None}
                    for kind, mask in kinds.items()}
    out["seconds"]["total"] = time.time() - t0
    out["seconds"]["cpu"] = time.process_time() - c0  # what it costs at one thread, however busy the machine was
    return out


# ----------------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------------
def _f(x, digits=2) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.{digits}f}"


def _p(x, digits=2) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def oracle_entry(d: dict) -> dict | None:
    """The oracle's row of a measurement's corr_with_A (named by its M; the one with a note), None if not measured."""
    return next((v for v in d["corr_with_A"].values() if "note" in v), None)


def report_section(d: dict, label: str) -> list[str]:
    s, S = d["settings"], d["settings"]["trained_steps"]
    c, t, p = d["checks"], d["truth"], d["previews"]
    steps = " | ".join(f"step {k}" for k in range(S))
    lines = [f"## {'The base model' if s['policy'] == 'base' else 'The policy of ' + s['policy']} ({label})", "",
             f"{s['trajectories']} trajectories ({s['prompts']} training prompts × {s['group_size']}), "
             f"{s['continuations']} continuations from each of x_0…x_{S - 1}, seed {s['seed']}; {S} trained steps of "
             f"{s['num_steps']}; {s['bootstrap']} bootstrap resamples of the groups. "
             f"{d['seconds']['total'] / 60:.1f} min ({d['seconds']['cpu'] / 60:.1f} CPU min).", "",
             "Checks: continuing x_1 with the rollout's own noise reproduces its x_T to "
             f"{c['continuation_reproduces_rollout_max_abs']:.1e}; "
             f"two continuations from x_{S} differ by {c['from_x_S_max_abs']:.1e} and "
             f"{'give' if c['from_x_S_reward_equals_R'] else 'do NOT give'} R; mean R {c['mean_R']:.3f}, mean V̂(x_k), "
             f"k = 0…{S}: " + ", ".join(f"{v:.3f} ± {e:.3f}" for v, e in zip(c["mean_V"], c["mean_V_se"])) + ".", "",
             "**The truth.** How much each step decides (s.d. of A*_k over trajectories), the noise of its estimate, "
             "and the highest correlation any credit can reach with the estimate (√reliability, split halves):", "",
             f"| | {steps} |", "|---|" + "---|" * S,
             "| s.d. of A*_k | " + " | ".join(_p(v) for v in t["sd_A"]) + " |",
             "| noise s.d. of the estimate | " + " | ".join(_p(v) for v in t["noise_sd_A"]) + " |",
             "| ceiling of a correlation | " + " | ".join(_p(v) for v in t["ceiling"]) + " |", "",
             "**The previews.** r_k scores the preview after step k; V(x_{k+1}) is the true value of the state it "
             "previews.", "",
             "| | " + " | ".join(f"step {k}" for k in range(S)) + " |", "|---|" + "---|" * S,
             "| share of previews passing | " + " | ".join(_p(v) for v in p["pass_rate"][:S]) + " |",
             "| corr(r_k, R) | " + " | ".join(_f(v) for v in p["corr_r_R"][:S]) + " |",
             "| corr(r_k, V(x_{k+1})) | " + " | ".join(_f(v) for v in p["corr_r_V"]) + " |",
             "| corr(R, V(x_{k+1})) | " + " | ".join(_f(v) for v in p["corr_R_V"]) + " |",
             "| corr(Q_k, R) | " + " | ".join(_f(v) for v in d["values"]["corr_Q_R"]) + " |",
             "| corr(Q_k, V(x_{k+1})) | " + " | ".join(_f(v) for v in d["values"]["corr_Q_V"]) + " |",
             "| P(R = 1 \\| r_k = 1) | " + " | ".join(_p(v) for v in p["p_solved_if_pass"][:S]) + " |",
             "| P(R = 1 \\| r_k = 0) | " + " | ".join(_p(v) for v in p["p_solved_if_fail"][:S]) + " |", "",
             "**Each credit against the truth**: corr(Â_k, A*_k) per trained step and pooled over them (± bootstrap "
             "s.e.), and the paired difference from GRPO's on the same rollout.", "",
             f"| credit | {steps} | pooled | pooled − GRPO |", "|---|" + "---|" * (S + 2)]
    for name, v in d["corr_with_A"].items():
        cells = [f"{_f(x)} ± {_p(e)}" for x, e in zip(v["value"], v["se"])]
        diff = "" if name == "GRPO" else f"{_f(v['minus_grpo'][-1])} ± {_p(v['minus_grpo_se'][-1])}"
        lines.append(f"| {name}{' *' if 'note' in v else ''} | " + " | ".join(cells) + f" | {diff} |")
    oracle = oracle_entry(d)
    if oracle:
        lines += ["", f"\\* the oracle arm's own credit (A*_k from {s['oracle_continuations']} continuations per "
                  f"state, group-normalised), {oracle['note']}: what its noise leaves of the truth."]
    lines += ["", "Sign agreement of Â_k with A*_k where A*_k is clearly non-zero (|A*_k| > 2 × its noise s.d.; "
              "count per step: " + ", ".join(str(x) for x in d["clear_count"]) + "):", "",
              f"| credit | {steps} |", "|---|" + "---|" * S]
    for name, v in d["sign_agreement"].items():
        lines.append(f"| {name} | " + " | ".join(_p(x) for x in v) + " |")
    lines += ["", "**What ω does** (VGPO's step weights ω_k = Q_k / mean Q): mean ω_k, VGPO's Â_k, the same without ω, "
              "GRPO's Â and A*_k, by kind of trajectory.", "",
              f"| trajectories | count | | {steps} |", "|---|---|---|" + "---|" * S]
    for kind, v in d["omega"].items():
        if not v["count"]:
            continue
        for key, name in (("omega", "ω_k"), ("adv_vgpo", "VGPO Â_k"), ("adv_vgpo_no_omega", "VGPO Â_k, ω ≡ 1"),
                          ("adv_grpo", "GRPO Â"), ("A_star", "A*_k")):
            fmt = _p if key == "omega" else _f
            lines.append(f"| {kind if key == 'omega' else ''} | {v['count'] if key == 'omega' else ''} | {name} | "
                         + " | ".join(fmt(x) for x in v[key]) + " |")
    return lines + [""]


def plot(found: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(10, 3.5))
    styles = {"GRPO": ("tab:red", "o"), "VGPO": ("tab:blue", "s"), "VGPO, ω ≡ 1": ("tab:orange", "^"),
              "anchor only": ("tab:purple", "v"), "oracle": ("black", "*")}
    for (label, d), ls in zip(found.items(), ("-", "--")):
        S = d["settings"]["trained_steps"]
        ks = np.arange(S)
        p = d["previews"]
        if ls == "-":
            ax[0].plot(ks, [np.nan if v is None else v for v in p["corr_r_R"][:S]], "o-", color="tab:blue",
                       label="corr(r_k, R)")
            ax[0].plot(ks, [np.nan if v is None else v for v in p["corr_r_V"]], "s--", color="tab:green",
                       label="corr(r_k, V(x_{k+1}))")
            ax[0].plot(ks, [np.nan if v is None else v for v in p["corr_R_V"]], "D-.", color="tab:red",
                       label="corr(R, V(x_{k+1}))")
            ax[0].plot(ks, d["truth"]["sd_A"], "^:", color="black", label="s.d. of A*_k")
        for name, (color, marker) in styles.items():
            v = oracle_entry(d) if name == "oracle" else d["corr_with_A"][name]
            ax[1].errorbar(ks + 0.05 * list(styles).index(name), v["value"][:S], yerr=v["se"][:S], ls=ls,
                           marker=marker, color=color, ms=4, capsize=2,
                           label=(f"oracle, M = {d['settings']['oracle_continuations']}" if name == "oracle"
                                  else name) if ls == "-" else None)
        ax[1].plot(ks, d["truth"]["ceiling"], ls, color="grey", lw=3, alpha=0.4,
                   label="ceiling (noise of A*)" if ls == "-" else None)
        kind = d["omega"]["failed, a preview passed"]
        if kind["count"] and ls == "-":
            for key, name, color in (("adv_vgpo", "VGPO Â_k", "tab:blue"), ("adv_vgpo_no_omega", "VGPO, ω ≡ 1",
                                                                            "tab:orange"),
                                     ("adv_grpo", "GRPO Â", "tab:red")):
                ax[2].plot(ks, kind[key][:S], "o-", color=color, label=name)
            ax[2].plot(ks, np.array(kind["A_star"][:S]) * 5, "k:", label="A*_k × 5")
            ax[2].set_title(f"failed after a passing preview (n = {kind['count']})", fontsize=9)
        elif ls == "-":
            ax[2].text(0.5, 0.5, "no failed trajectory\nafter a passing preview", ha="center",
                       transform=ax[2].transAxes)
    ax[0].set(xlabel="step k", ylabel="correlation / s.d.", title="previews and the truth")
    ax[1].set(xlabel="step k", ylabel="corr(Â_k, A*_k)",
              title="credit against the truth" + (" (dashed: trained)" if len(found) > 1 else ""))
    ax[2].set(xlabel="step k", ylabel="mean advantage")
    for a in ax:
        a.axhline(0, color="grey", lw=0.5)
        a.legend(fontsize=7)
        a.title.set_fontsize(9)
        a.set_xticks(range(found[next(iter(found))]["settings"]["trained_steps"]))
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def report(results: str) -> str:
    found = {}
    for path in sorted(glob.glob(os.path.join(results, "credit-*.json"))):
        label = os.path.basename(path)[7:-5]
        with open(path) as f:
            found[label] = json.load(f)
    if not found:
        raise harness.UsageError(f"no credit-*.json in {results}: run `python -m tools.credit` first")
    found = dict(sorted(found.items(), key=lambda kv: kv[0] != "base"))  # the base model first
    lines = ["# Per-step credit against the truth (written by `python -m tools.credit report`)", "",
             "From every state x_k of one rollout on the toy world, independent continuations with the rollout's "
             "sampler estimate V(x_k) = E[R | x_k]; A*_k = V(x_{k+1}) − V(x_k) is the true advantage of step k's "
             "action. Commands: " + "; ".join(f"`{d['command']}`" for d in found.values()) + ".", ""]
    for label, d in found.items():
        lines += report_section(d, label)
    plot(found, os.path.join(results, "credit-truth.png"))
    lines.append("![credit-truth.png](credit-truth.png)")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(results, "credit.md"), "w") as f:
        f.write(text)
    return text


def main(argv=None) -> int:
    p = harness.Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", nargs="?", default="measure", choices=["measure", "report"],
                   help="measure (then report), or only report from the JSON files")
    p.add_argument("--policy", default="", help="a run folder whose saved policy to measure (default: the base model)")
    p.add_argument("--label", default="", help="names results/credit-LABEL.json (default: base, or trained)")
    p.add_argument("--continuations", type=int, default=24, help="M, continuations per state (default 24)")
    p.add_argument("--prompts", type=int, default=16, help="training prompts, each G times (default 16)")
    p.add_argument("--oracle-continuations", type=int, default=3,
                   help="the oracle arm's M, whose noise is measured against the rest (default 3)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the groups (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="prompts, rollout and continuations (default 0)")
    p.add_argument("--results", default="results", help="where credit-LABEL.json, credit.md and the plot go")
    try:
        opts = p.parse_args(argv)
        if opts.command == "measure":
            if opts.continuations < 4 or not 1 <= opts.oracle_continuations < opts.continuations - 1:
                raise harness.UsageError("--continuations must be ≥ 4 and --oracle-continuations between 1 and "
                                         "--continuations − 2")
            if opts.prompts < 2 or opts.bootstrap < 10:
                raise harness.UsageError("--prompts must be ≥ 2 and --bootstrap ≥ 10")
            if opts.policy and not os.path.exists(os.path.join(opts.policy, "args.json")):
                raise harness.UsageError(f"--policy {opts.policy!r}: not a run folder (no args.json); give one that "
                                         "python vgpo.py wrote")
            args = recovery.resume_args(vgpo.Args, opts.policy) if opts.policy else vgpo.make_args(model="tiny")
            if args.model != "tiny":
                raise harness.UsageError("the truth by branching needs the toy world: --policy must be a run of "
                                         "the tiny model")
            harness.validate(args)
            d = measure(args, opts.continuations, opts.prompts, opts.seed, opts.bootstrap,
                        opts.oracle_continuations, opts.policy)
            label = opts.label or ("trained" if opts.policy else "base")
            d["command"] = "python -m tools.credit" + (f" --policy {opts.policy}" if opts.policy else "") + \
                (f" --label {opts.label}" if opts.label else "") + \
                "".join(f" --{k} {getattr(opts, k.replace('-', '_'))}" for k, default in
                        (("continuations", 24), ("prompts", 16), ("oracle-continuations", 3), ("seed", 0))
                        if getattr(opts, k.replace('-', '_')) != default)
            os.makedirs(opts.results, exist_ok=True)
            with open(os.path.join(opts.results, f"credit-{label}.json"), "w") as f:
                json.dump(d, f, indent=1)
        print(report(opts.results))
    except harness.UsageError as e:
        print(f"tools.credit: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
