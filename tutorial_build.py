"""Writes tutorial.ipynb from the cells below (edit here, not in the .ipynb), and with --execute runs it.

    python tutorial_build.py                       # write tutorial.ipynb without outputs
    python tutorial_build.py --execute             # write it and execute it in place (full mode, ≤ 15 min)
    python tutorial_build.py --execute --quick     # the same in quick mode (VGPO_TUTORIAL_QUICK=1, ≤ 3 min)

The notebook imports vgpo, shapes and reward and never redefines their functions.
"""
from __future__ import annotations

import argparse
import os
import sys

import nbformat

HERE = os.path.dirname(os.path.abspath(__file__))
NOTEBOOK = os.path.join(HERE, "tutorial.ipynb")

# The lab exercises: (function in vgpo, the pytest -k selector whose tests check it). test_tutorial.py checks
# that each selector selects tests that call the function.
EXERCISES = [
    ("temporal_values", "temporal_values"),
    ("step_weights", "temporal_values or advantage"),
    ("vgpo_advantages", "advantage or reduces_to_grpo"),
    ("grpo_advantages", "grpo_scaling or reduces_to_grpo"),
    ("sde_step_with_logprob", "sde_logprob or noise_level_zero"),
    ("policy_loss", "rescored_rollout or clip_stops or kl_term"),
]

CELLS = []


def md(text):
    CELLS.append(nbformat.v4.new_markdown_cell(text.strip("\n")))


def code(text):
    CELLS.append(nbformat.v4.new_code_cell(text.strip("\n")))


md(r"""
# VGPO on a laptop: a tutorial

This notebook walks through **VGPO** (Value-Anchored Group Policy Optimization; Shao et al.,
arXiv 2512.12387) in the order of the paper, on the toy world shipped with this repository: a 3.5 M-parameter
SD3-architecture flow model on the 16×4×4 latents of a small autoencoder, drawing coloured shapes at 32×32,
scored by an exact GenEval-style verifier.
Every function used here comes from `vgpo.py`, `shapes.py` and `reward.py`; the notebook only calls and plots.

Quick mode (`VGPO_TUTORIAL_QUICK=1`, what the test suite runs, ≤ 3 min on 2 CPU cores) shrinks the training
runs of section 5 to a smoke test; full mode (≤ 15 min) runs them long enough to read.
""")

code(r"""
import dataclasses, os, time, warnings
import numpy as np
import torch
import matplotlib.pyplot as plt

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm in a notebook without ipywidgets
import vgpo, shapes, reward

QUICK = os.environ.get("VGPO_TUTORIAL_QUICK", "") not in ("", "0")
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "0")) or torch.get_num_threads())
plt.rcParams.update({"figure.dpi": 60, "font.size": 9})
t_start = time.time()

args = vgpo.make_args(model="tiny")  # the toy preset: whatever PRESETS["tiny"] says today
model = vgpo.load_model(args)
reward_fn = vgpo.make_reward(args, model.device)  # the preset's reward: 'shapes_strict', GenEval's strict 0/1 score
T = args.num_steps
print(f"mode: {'quick' if QUICK else 'full'}; T = {T} steps (rollouts: SDE for the first {args.sde_steps or T - 1}), "
      f"G = {args.num_generations}, noise level a = {args.noise_level}, "
      f"γ = {args.gamma}, κ = {args.anchor_coef} on the first {args.anchor_steps} steps")

def strip(rows, row_labels=(), titles=(), size=1.1):
    # rows: list of (K, 3, H, W) image tensors in [0, 1], shown as one row each
    K = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), K, figsize=(size * K, size * len(rows) + 0.3), squeeze=False)
    for i, r in enumerate(rows):
        for j in range(K):
            ax = axes[i, j]
            ax.axis("off")
            if j < len(r):
                ax.imshow(r[j].permute(1, 2, 0).clamp(0, 1).cpu().numpy(), interpolation="nearest")
            if i == 0 and j < len(titles):
                ax.set_title(titles[j], fontsize=8)
        if i < len(row_labels):
            axes[i, 0].text(-4, 16, row_labels[i], ha="right", va="center", fontsize=9)
    plt.show()

# The running example: of 12 training prompts (2 per category), the one whose G SDE samples disagree most,
# so that the credit plots below have something to show (chosen live: the base model may change)
candidates = [p for c in shapes.CATEGORIES for p in [p for p in shapes.TRAIN_PROMPTS if shapes.METADATA[p]["category"] == c][:2]]
pool = vgpo.rollout(model, candidates, args, generator=torch.Generator().manual_seed(0))
R = reward_fn(pool.images, pool.prompts, [shapes.METADATA[p] for p in pool.prompts]).view(len(candidates), -1)
prompt = candidates[int((R.std(1) + 1e-3 * R.mean(1)).argmax())]
meta = shapes.METADATA[prompt]
print("prompt:", repr(prompt), meta)
print("terminal rewards of its group:", np.round(R[candidates.index(prompt)].tolist(), 2))
""")

# ---------------------------------------------------------------------------------------------------
md(r"""
## 1. Flow matching: ODE against SDE trajectories

The model predicts a velocity $v_\theta(x, \sigma) \approx \varepsilon - x_0$. Time runs from noise
($\sigma_0 = 1$) to data ($\sigma_T = 0$) and the sampler is the Euler ODE step

$$x_{k+1} = x_k + v_\theta(x_k, \sigma_k)\,(\sigma_{k+1} - \sigma_k).$$

An ODE has no randomness, so no policy gradient. Flow-GRPO replaces it by a reverse SDE with the same marginals,

$$x_{k+1} = x_k + \Big[v_k + \frac{s_k^2}{2\sigma_k}\big(x_k + (1-\sigma_k)v_k\big)\Big]\Delta t_k + s_k\sqrt{-\Delta t_k}\,\varepsilon,
\qquad s_k = a\sqrt{\tfrac{\sigma_k}{1-\sigma_k}},$$

so every step is a Gaussian action with a log-probability. Below: one starting noise, sampled once with
the ODE ($a = 0$) and twice with the SDE; each column is $x_k$ after step $k$.
""")

code(r"""
noise = torch.randn((1, *model.latent_shape), generator=torch.Generator().manual_seed(0))
runs = {"ODE (a = 0)": vgpo.sample(model, [prompt], T, 0.0, args.guidance_scale, 1, noise=noise)}
for s in (1, 2):
    runs[f"SDE seed {s}"] = vgpo.sample(model, [prompt], T, args.noise_level, args.guidance_scale, 1,
                                        generator=torch.Generator().manual_seed(s), noise=noise)
sigmas = runs["ODE (a = 0)"][4]
strip([model.decode(out[1][0]) for out in runs.values()], row_labels=list(runs),
      titles=[f"k={k}\nσ={sigmas[k]:.2f}" for k in range(T + 1)])
score = reward_fn(torch.cat([out[0] for out in runs.values()]), [prompt] * 3, [meta] * 3)
print("terminal rewards:", dict(zip(runs, score.tolist())))
""")

# ---------------------------------------------------------------------------------------------------
md(r"""
## 2. The step log-probability, averaged over dimensions

Each SDE step is $\mathcal N(\mu_k, (s_k\sqrt{-\Delta t_k})^2 I)$, so

$$\log\pi_\theta(x_{k+1}\mid x_k) = \frac1D\sum_{d=1}^{D}\Big[-\frac{(x_{k+1,d}-\mu_{k,d})^2}{2 s_k^2(-\Delta t_k)} - \log\big(s_k\sqrt{-\Delta t_k}\big) - \tfrac12\log 2\pi\Big].$$

The code **averages** over the $D = C\cdot H\cdot W$ dimensions instead of summing (as Flow-GRPO does). A
summed log-ratio grows with $D$ (256 here, 65 536 for SD3.5's latents): a tiny change of the velocity moves
it by whole units and the PPO ratio $e^{\Delta\log\pi}$ leaves any clip band at once. Averaged, the same
change moves the ratio by $10^{-4}$–$10^{-3}$, which is why the clip range $\varepsilon$ is ~1e-3 (toy) or
1e-4 (SD3.5) and not PPO's 0.2. Below: one recorded SDE step re-scored after perturbing the velocity by a
relative amount δ.
""")

code(r"""
_, latents, log_probs, _, sig = runs["SDE seed 1"]
k = 3
x_k, x_next = latents[:, k], latents[:, k + 1]
cond = model.encode([prompt])
with torch.no_grad():
    v = vgpo.guided_velocity(model.transformer, x_k, sig[k], cond, None, args.guidance_scale)
_, lp, mean, std = vgpo.sde_step_with_logprob(v, x_k, sig[k], sig[k + 1], args.noise_level, prev_sample=x_next)
D = x_k[0].numel()
print(f"step {k}: averaged log π = {lp.item():.4f} (recorded in the rollout: {log_probs[0, k].item():.4f}); "
      f"summed over D = {D} dims it would be {lp.item() * D:.1f}")
u = torch.randn(v.shape, generator=torch.Generator().manual_seed(7))
deltas = np.logspace(-5, -1, 9)
diffs = []
for d in deltas:
    _, lp2, _, _ = vgpo.sde_step_with_logprob(v + d * v.std() * u, x_k, sig[k], sig[k + 1], args.noise_level, prev_sample=x_next)
    diffs.append(abs((lp2 - lp).item()))
diffs = np.array(diffs)
fig, ax = plt.subplots(figsize=(5, 3.2))
ax.loglog(deltas, diffs, "o-", label="averaged over dims (vgpo.py)")
ax.loglog(deltas, diffs * D, "s--", label=f"summed over D = {D}")
ax.loglog(deltas, diffs * 65536, ":", label="summed, SD3.5 latent size (65 536)")
ax.axhline(args.clip_range, color="grey", lw=0.8); ax.text(deltas[0], args.clip_range * 1.3, f"ε = {args.clip_range} (toy)", fontsize=8)
ax.axhline(0.2, color="grey", lw=0.8, ls="--"); ax.text(deltas[0], 0.26, "PPO's usual 0.2", fontsize=8)
ax.set(xlabel="relative velocity change δ", ylabel="|Δ log π| = |log ratio|", title="why ε is ~1e-3, not 0.2")
ax.legend(fontsize=7); plt.show()
""")

# ---------------------------------------------------------------------------------------------------
md(r"""
## 3. Instant rewards: what the image looks like after each step

VGPO's temporal dimension starts from the one-step prediction of the clean image after step $k$ (paper Eq. 9):

$$\hat x_0^{(k+1)} = x_{k+1} - \sigma_{k+1}\,v_\theta(x_{k+1}, \sigma_{k+1}), \qquad r_k = R\big(\hat x_0^{(k+1)}, c\big),$$

the velocity being the one step $k+1$ computes anyway (no extra transformer call). $r_{T-1}$ is the ordinary
terminal reward. `vgpo.instant_rewards` decodes and scores all previews of a batch at once.
""")

code(r"""
G = args.num_generations
for seed in range(10):  # one group of G trajectories of the prompt (the first seed whose rewards differ)
    group = vgpo.rollout(model, [prompt], args, generator=torch.Generator().manual_seed(seed))
    r = vgpo.instant_rewards(model, group, reward_fn, [meta] * G, previews=True)  # (G, T)
    if r[:, -1].std() > 0:
        break
best = int(r[:, -1].argmax())  # its best trajectory
strip([model.decode(group.latents[best, 1:]), model.decode(group.x0_preds[best])], row_labels=["x_{k+1}", "x̂0 preview"],
      titles=[f"k={k}\nr={r[best, k]:.2f}" for k in range(T)])
print(f"rollout seed {seed}, trajectory {best}: instant rewards r_k =", np.round(r[best].tolist(), 3))
""")

# ---------------------------------------------------------------------------------------------------
md(r"""
## 4. Per-timestep credit for one group

For the $G$ trajectories of one prompt, VGPO turns the instant rewards into discounted values, step weights
and anchored advantages (paper Eqs. 10–13; `vgpo.py` §2–§3):

$$Q_k = r_k + \gamma Q_{k+1},\qquad \omega_k = \frac{Q_k}{\frac1T\sum_{k'}Q_{k'}},\qquad
\hat A_k^i = \omega_k^i\Big[\frac{Q_k^i-\mu_k}{s_k+10^{-4}} + \alpha_k\,\bar Q_k^i\Big],\quad
\bar Q_k = Q_k\frac{1-\gamma}{1-\gamma^{T-k}},\ \alpha_k = \kappa\,[k < \text{anchor\_steps}].$$

GRPO gives every step the same $\hat A^i = (R^i - \text{mean}_{\text{group}}R)/(\text{std}+10^{-4})$: flat lines
in the last panel.
""")

code(r"""
# the group of section 3
Q = vgpo.temporal_values(r, args.gamma)
w = vgpo.step_weights(Q)
A = vgpo.vgpo_advantages(Q, group.group_ids, args.gamma, args.anchor_coef, args.anchor_steps, args.adv_clip_max)
A_grpo = vgpo.grpo_advantages(r[:, -1], group.group_ids, args.scale_rewards, args.adv_clip_max, T)
strip([group.images], titles=[f"R={x:.2f}" for x in r[:, -1].tolist()])
fig, axes = plt.subplots(1, 5, figsize=(16, 3))
colors = plt.cm.viridis(r[:, -1].numpy() / max(r[:, -1].max().item(), 1e-6))
for ax, (name, val) in zip(axes, [("instant reward r_k", r), ("value Q_k", Q), ("step weight ω_k", w),
                                   ("VGPO advantage Â_k", A), ("GRPO advantage (flat)", A_grpo)]):
    for i in range(G):
        ax.plot(range(T), val[i].numpy(), "o-", ms=3, color=colors[i])
    ax.set(title=name, xlabel="step k")
    if name.startswith(("VGPO", "GRPO")):
        ax.axvline(T - 1.5, color="grey", ls=":", lw=0.8)  # the last step is not trained
plt.tight_layout(); plt.show()
""")

md(r"""
**A uniform group.** Give all $G$ trajectories the same instant rewards (copy the best trajectory's): GRPO's
advantage is exactly 0, so this prompt teaches GRPO nothing. VGPO's relative term is 0 too, but the absolute
term $\omega_k\kappa\bar Q_k$ survives on the first `anchor_steps` steps. Note what it does *not* do: a group
that scored 0 everywhere has $Q \equiv 0$ and gets no signal from the anchor either; the anchor reinforces
uniformly *good* groups.
""")

code(r"""
same = r[best : best + 1].expand(G, T).clone()
Qs = vgpo.temporal_values(same, args.gamma)
A_same = vgpo.vgpo_advantages(Qs, group.group_ids, args.gamma, args.anchor_coef, args.anchor_steps, args.adv_clip_max)
A_same_grpo = vgpo.grpo_advantages(same[:, -1], group.group_ids, args.scale_rewards, args.adv_clip_max, T)
A_zero = vgpo.vgpo_advantages(torch.zeros(G, T), group.group_ids, args.gamma, args.anchor_coef, args.anchor_steps, args.adv_clip_max)
print("uniform group, VGPO Â_k:", np.round(A_same[0].tolist(), 3))
print("uniform group, GRPO Â_k:", np.round(A_same_grpo[0].tolist(), 3))
print("all-zero group, VGPO Â_k:", np.round(A_zero[0].tolist(), 3))
""")

# ---------------------------------------------------------------------------------------------------
md(r"""
## 5. Advantage collapse: GRPO against VGPO

GRPO's signal lives in the within-group spread of rewards. Where a group is uniform (`frac_zero_std`, TRL's
name, counts such groups) its advantage is 0. The strict 0/1 reward (`shapes_strict`: the prompt is fully
right or not) makes this common. Below, short GRPO and VGPO runs from the same base model and seed on that
reward, with `vgpo.train_epoch` (the body of `vgpo.train`'s loop) and `vgpo.evaluate` (ODE sampling of
held-out prompts). Quick mode runs a few tiny epochs (a smoke test: the curves are noise); full mode runs
long enough to see trends, and the README's *Experiments* section has the measured multi-seed comparison.
""")

code(r"""
if QUICK:  # a smoke test of the loop: 3 epochs of 4 prompts × 8, held-out set 1 image per prompt
    budget = dict(epochs=3, prompts_per_epoch=4, train_batch_size=16, eval_every=3)
    eval_set = [(p, shapes.METADATA[p]) for p in shapes.TEST_PROMPTS]
else:      # the preset's batch; held-out set as in vgpo.train (≥ 6 images per prompt)
    budget = dict(epochs=12, eval_every=4)
    eval_set = vgpo.load_prompts(args)[1]

def short_run(algo, reward_name="shapes_strict", seed=0):
    a = vgpo.make_args(model="tiny", algo=algo, reward=reward_name, seed=seed, **budget)
    torch.manual_seed(a.seed)  # the same three random streams as vgpo.train
    rng = np.random.default_rng(a.seed)
    rollout_gen, shuffle_gen = torch.Generator().manual_seed(a.seed), torch.Generator().manual_seed(a.seed + 1)
    m = vgpo.load_model(a)
    opt = vgpo.make_optimizer(m, a)
    fn = vgpo.make_reward(a, m.device)
    train_set = vgpo.load_prompts(a)[0]
    rows = [{"epoch": 0, **vgpo.evaluate(m, a, fn, eval_set)}]
    for epoch in range(1, a.epochs + 1):
        chosen = vgpo.sample_prompts(train_set, a.prompts_per_epoch, rng)
        row = {"epoch": epoch, **vgpo.train_epoch(m, chosen, a, fn, opt, rollout_gen, shuffle_gen)}
        if epoch % a.eval_every == 0 or epoch == a.epochs:
            row.update(vgpo.evaluate(m, a, fn, eval_set))
        rows.append(row)
    return rows

t0 = time.time()
history = {algo: short_run(algo) for algo in ("grpo", "vgpo")}
print(f"{budget['epochs']} epochs × 2 algorithms in {time.time() - t0:.0f} s")
""")

code(r"""
def curve(rows, key, reduce=float):
    pts = [(r["epoch"], reduce(r[key])) for r in rows if key in r]
    return [p[0] for p in pts], [p[1] for p in pts]

trained_mean = lambda v: float(np.mean(v[:-1]))  # mean |Â| over the trained steps
style = {"grpo": dict(color="tab:red"), "vgpo": dict(color="tab:blue")}
fig, axes = plt.subplots(1, 3, figsize=(13, 3))
for algo, rows in history.items():
    for ax, key, red in [(axes[0], "reward/std", float), (axes[1], "reward/frac_zero_std", float),
                         (axes[2], "advantage/mean_abs", trained_mean)]:
        ax.plot(*curve(rows, key, red), "o-", ms=3, label=algo, **style[algo])
for ax, t in zip(axes, ["within-group reward std", "frac_zero_std (uniform groups)", "mean |Â| over trained steps"]):
    ax.set(title=t, xlabel="epoch"); ax.legend()
plt.tight_layout(); plt.show()

fig, axes = plt.subplots(1, 3, figsize=(13, 3))
for algo, rows in history.items():
    axes[0].plot(*curve(rows, "reward/mean"), "o-", ms=3, label=algo, **style[algo])
    axes[1].plot(*curve(rows, "eval/strict_accuracy"), "o-", label=algo, **style[algo])
    last = [r for r in rows if "advantage/mean_abs" in r][-1]
    axes[2].plot(last["advantage/mean_abs"], "o-", ms=3, label=f"{algo}, epoch {last['epoch']}", **style[algo])
for ax, t, x in zip(axes, ["training reward (strict, SDE rollouts)", "held-out strict accuracy (ODE)", "mean |Â_k| by step"],
                    ["epoch", "epoch", "step k"]):
    ax.set(title=t, xlabel=x); ax.legend()
plt.tight_layout(); plt.show()
for algo, rows in history.items():
    acc = curve(rows, "eval/strict_accuracy")[1]
    print(f"{algo}: held-out strict accuracy {acc[0]:.3f} → {acc[-1]:.3f}; frac_zero_std first/last epoch "
          f"{rows[1]['reward/frac_zero_std']:.2f}/{rows[-1]['reward/frac_zero_std']:.2f}")
""")

# ---------------------------------------------------------------------------------------------------
md(r"""
## 6. The real thing: SD3.5 on one GPU

The same `vgpo.py` runs Stable Diffusion 3.5 Medium with LoRA (the paper's model; `sd3.py` loads it):

```bash
hf auth login    # once, after accepting the licence of stabilityai/stable-diffusion-3.5-medium
python vgpo.py --model sd3.5 --prompts ocr --reward ocr                  # text rendering, Flow-GRPO's OCR task
python vgpo.py --model sd3.5 --prompts preference --reward pickscore     # human preference
python vgpo.py --model sd3.5 --algo grpo --prompts ocr --reward ocr      # the baseline, same budget
python vgpo.py --model sd3.5 --random-weights --epochs 1                 # no download: memory and speed only
python bench.py --model sd3.5 --random-weights                           # VGPO's extra cost against GRPO
```

What the curves should look like (the paper's reported numbers, SD3.5-M, not measured here): GenEval
0.63 → 0.95 (Flow-GRPO) → 0.96 (VGPO); OCR 0.59 → 0.92 → 0.94; PickScore 21.72 → 23.31 → 23.41. In
`metrics.jsonl`, `reward/mean` should rise within tens of epochs; `reward/frac_zero_std` rises as the
policy gets good (groups become all-correct), which is where GRPO's `advantage/mean_abs` falls and VGPO's
anchored steps keep a signal; `policy/clip_frac` should stay well below 0.5 (if not, lower the learning
rate or widen `--clip-range`). The settings the run would use, without loading anything:
""")

code(r"""
sd = vgpo.make_args(model="sd3.5")
for f in ("num_generations", "prompts_per_epoch", "num_steps", "eval_steps", "guidance_scale", "noise_level",
          "clip_range", "beta", "learning_rate", "lora_rank", "gamma", "anchor_coef", "anchor_steps"):
    print(f"{f:>18} = {getattr(sd, f)!r:<8} (toy: {getattr(args, f)!r})")
print(f"N = {sd.prompts_per_epoch * sd.num_generations} trajectories per epoch, "
      f"{sd.prompts_per_epoch * sd.num_generations // (sd.train_batch_size * sd.gradient_accumulation_steps)} optimizer steps per epoch")
""")

# ---------------------------------------------------------------------------------------------------
md(r"""
## 7. Lab exercises

Re-implement a piece of the method. Each cell below compares your function with `vgpo`'s on random inputs.
To run the **repository's tests** on your version, save your functions under vgpo's names (or with the
`my_` prefix) in a file, e.g. `my_solutions.py`, and run the command given: `conftest.py` then puts your
functions in place of vgpo's for that pytest run (everything that calls them, training included, uses yours).

```bash
VGPO_SOLUTIONS=my_solutions.py python -m pytest -q -k "advantage or reduces_to_grpo"
```
""" + "\n".join(f"- `{fn}`: `VGPO_SOLUTIONS=my_solutions.py python -m pytest -q -k \"{sel}\"`" for fn, sel in EXERCISES))

code(r"""
def check(mine, theirs, make_inputs, trials=5):
    # compare your function with vgpo's on random inputs; says 'not attempted' while it raises NotImplementedError
    try:
        for t in range(trials):
            inputs = make_inputs(torch.Generator().manual_seed(t))
            want, got = theirs(*inputs), mine(*inputs)
            want, got = (want if isinstance(want, tuple) else (want,)), (got if isinstance(got, tuple) else (got,))
            for a, b in zip(want, got):
                if isinstance(a, torch.Tensor):
                    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    except NotImplementedError:
        return print(f"{mine.__name__}: not attempted yet")
    except AssertionError as e:
        return print(f"{mine.__name__}: differs from vgpo.{theirs.__name__}: {str(e).splitlines()[0]}")
    print(f"{mine.__name__}: matches vgpo.{theirs.__name__} on {trials} random inputs")

def random_rewards(g, N=8, T=6):  # (N, T) rewards in [0, 1], two groups of 4
    return torch.rand(N, T, generator=g), torch.arange(N) // 4
""")

md(r"""
**Exercise 1 (eq. 4).** $Q_{T-1} = r_{T-1}$, $Q_k = r_k + \gamma Q_{k+1}$ for `instant_rewards` of shape (N, T).
""")
code(r"""
def my_temporal_values(instant_rewards, gamma):
    raise NotImplementedError  # your code here

check(my_temporal_values, vgpo.temporal_values, lambda g: (random_rewards(g)[0], 0.9))
""")

md(r"""
**Exercise 2 (eq. 5).** $\omega_k = Q_k / \text{mean}_{k'} Q_{k'}$ per trajectory, and 1 where that mean is ≤ 1e-8.
""")
code(r"""
def my_step_weights(values):
    raise NotImplementedError  # your code here

check(my_step_weights, vgpo.step_weights, lambda g: (vgpo.temporal_values(random_rewards(g)[0], 0.9),))
""")

md(r"""
**Exercise 3 (eq. 6).** The anchored advantage: group-normalise $Q_k$ per step (population std, + 1e-4), add
$\alpha_k\bar Q_k$ on the first `anchor_steps` steps, multiply by ω (`weights`, or `step_weights(values)` when
None), clip to ±`adv_clip_max`. Then check it against the tests: `-k "advantage or reduces_to_grpo"`.
""")
code(r"""
def my_vgpo_advantages(values, group_ids, gamma, anchor_coef, anchor_steps, adv_clip_max, weights=None):
    raise NotImplementedError  # your code here

check(my_vgpo_advantages, vgpo.vgpo_advantages,
      lambda g: (vgpo.temporal_values(random_rewards(g)[0], 0.9), random_rewards(g)[1], 0.9, 1.0, 3, 5.0))
""")

md(r"""
**Exercise 4 (eq. 7).** GRPO's advantage, the same for all `num_steps` steps; `scale_rewards` is 'group',
'batch' or 'none'.
""")
code(r"""
def my_grpo_advantages(rewards, group_ids, scale_rewards, adv_clip_max, num_steps):
    raise NotImplementedError  # your code here

check(my_grpo_advantages, vgpo.grpo_advantages,
      lambda g: (random_rewards(g)[0][:, -1], random_rewards(g)[1], "group", 5.0, 6))
""")

md(r"""
**Exercise 5 (eq. 2).** The SDE step and its dimension-averaged log-probability. Return
`(next_sample, log_prob (B,), mean, std)`; score `prev_sample` when it is given; with `noise_level` 0 return
the Euler step and a log-prob of 0.
""")
code(r"""
def my_sde_step_with_logprob(velocity, sample, sigma, sigma_next, noise_level, prev_sample=None, generator=None):
    raise NotImplementedError  # your code here

check(my_sde_step_with_logprob, vgpo.sde_step_with_logprob,
      lambda g: (torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g), 0.7, 0.6, 0.7,
                 torch.randn(4, 3, 8, 8, generator=g)))
""")

md(r"""
**Exercise 6 (eq. 8).** The clipped surrogate with KL: return `(loss, stats)` with the stats keys of
`vgpo.policy_loss`.
""")
code(r"""
def my_policy_loss(log_probs, log_probs_old, advantages, clip_range, kl=None, beta=0.0):
    raise NotImplementedError  # your code here

check(my_policy_loss, vgpo.policy_loss,
      lambda g: (torch.randn(8, generator=g) * 1e-3, torch.zeros(8), torch.randn(8, generator=g), 1e-3,
                 torch.rand(8, generator=g), 0.1))
print(f"notebook ran in {time.time() - t_start:.0f} s ({'quick' if QUICK else 'full'} mode)")
""")


def build() -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook(cells=CELLS)
    for i, cell in enumerate(nb.cells):  # stable ids: a rebuild changes only what changed
        cell.id = f"cell-{i:02d}"
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                   "language_info": {"name": "python"}}
    return nb


def execute(nb, quick: bool, timeout: int = 900, kernel_name: str = "python3"):
    """Run the notebook headless in this folder with nbclient; quick mode via VGPO_TUTORIAL_QUICK."""
    from nbclient import NotebookClient

    os.environ["VGPO_TUTORIAL_QUICK"] = "1" if quick else "0"  # the kernel inherits this process's environment
    os.environ.pop("MPLBACKEND", None)  # the kernel's inline backend turns figures into PNG outputs
    NotebookClient(nb, timeout=timeout, kernel_name=kernel_name, resources={"metadata": {"path": HERE}}).execute()
    return nb


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--execute", action="store_true", help="execute the notebook and keep its outputs")
    p.add_argument("--quick", action="store_true", help="with --execute: quick mode (VGPO_TUTORIAL_QUICK=1)")
    p.add_argument("--output", default=NOTEBOOK)
    a = p.parse_args(argv)
    nb = build()
    if a.execute:
        execute(nb, a.quick)
        nb.metadata["vgpo_tutorial_mode"] = "quick" if a.quick else "full"
    nbformat.write(nb, a.output)
    print(f"wrote {a.output} ({os.path.getsize(a.output) / 1e6:.2f} MB{', executed' if a.execute else ''})")


if __name__ == "__main__":
    sys.exit(main())
