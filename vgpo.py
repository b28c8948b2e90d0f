"""VGPO: Value-Anchored Group Policy Optimization for flow-matching text-to-image models, in one file.

Shao et al., "Anchoring Values in Temporal and Group Dimensions for Flow Matching Model Alignment", arXiv
2512.12387. VGPO changes Flow-GRPO (Liu et al., arXiv 2505.05470) in two places: every denoising step gets
its own value from the rewards of one-step clean-image previews (the temporal dimension), and the group
advantage gets an absolute, value-anchored term that survives when all samples of a prompt score the same
(the group dimension). The sampler, the loss and the update are Flow-GRPO's.

    python vgpo.py                  # the built-in tiny model on the shapes toy world, CPU, minutes
    python vgpo.py --algo grpo      # the Flow-GRPO baseline, same code and budget
    python vgpo.py --model sd3.5    # SD3.5-Medium with LoRA on one GPU: the OCR task (--task pickscore, geneval)

Time runs from noise to data: σ_0 = 1 > … > σ_T = 0 are the scheduler's sigmas, step k maps x_k → x_{k+1},
v ≈ noise − x_0 and an Euler step is x + v·dt with dt = σ_{k+1} − σ_k < 0 (Meta's `flow_matching` runs time the
other way). Shapes: N = P·G trajectories (P prompts, G = `num_generations` each), T steps, (C, H, W) a latent.

    code                    symbol                                          source
    guided_velocity         v = v_u + g·(v_c − v_u)                         classifier-free guidance
    sde_step_with_logprob   x_{k+1} ~ N(mean_k, std_k²·(−dt)), log π_θ      Flow-GRPO's SDE step
    preview                 x̂0_{k+1} = x_{k+1} − σ_{k+1}·v(x_{k+1})         paper Eq. 9
    instant_rewards         r_k = R(x̂0_{k+1}, prompt)                       paper Eq. 9
    temporal_values         Q_k = r_k + γ·Q_{k+1}                           paper Eq. 10
    step_weights            ω_k = Q_k / mean_k' Q_k'                        paper Eq. 11
    vgpo_advantages         Â_k = ω_k·[(Q_k − μ_k)/(s_k + 1e-4) + κ_k·Q̄_k]  paper Eqs. 12–13
    grpo_advantages         Â = (R − mean_group R)/(std_group R + 1e-4)     Flow-GRPO's GRPO advantage
    policy_loss             mean max(−Â·ρ, −Â·clip(ρ, 1 ± ε)) + β·KL        Flow-GRPO's clipped loss and KL
    update, train_epoch     minibatches, accumulation, AdamW, norm clip     Flow-GRPO's schedule

Where the paper is silent the code follows numbered readings (README), tagged `# reading N`. Plumbing, each call
marked `# plumbing`, lives in harness.py, recovery.py and distributed.py: a reader of the method can skip them.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch

import distributed  # plumbing
import harness  # plumbing
import recovery  # plumbing
from harness import Model, load_model, load_prompts, make_reward, sample_prompts


def _f(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Args:
    """One flag per field. Defaults: the paper's SD3.5 recipe but `model` (the toy, whose preset applies: Settings)."""

    # the method
    algo: str = _f("vgpo", "'vgpo', or 'grpo': the Flow-GRPO baseline on the same code path")
    num_generations: int = _f(8, "G, trajectories per prompt (a group)")
    prompts_per_epoch: int = _f(8, "P, prompts per epoch: N = P·G trajectories")
    num_steps: int = _f(10, "T, denoising steps of a rollout")
    guidance_scale: float = _f(4.5, "g, classifier-free guidance, the same in RL and evaluation (reading 8)")
    noise_level: float = _f(0.7, "a, the SDE's noise scale: std_k = a·sqrt(σ_k/(1−σ_k))")
    sde_steps: int = _f(0, "S: steps 0…S−1 are SDE steps and trained, the rest Euler (reading 9); 0: all T−1")
    gamma: float = _f(0.9, "γ, discount of Q_k = r_k + γ·Q_{k+1} (Eq. 10, reading 2)")
    anchor_coef: float = _f(1.0, "κ, weight of the absolute term κ·Q̄_k (Eqs. 12–13, reading 4); 0: off")
    anchor_steps: int = _f(5, "the absolute term is on for steps k < this")
    temporal_values: bool = _f(True, "instant rewards and step weights; off: terminal reward, ω ≡ 1 (reading 6)")
    step_weights: bool = _f(True, "ω_k of Eq. 11; off: ω ≡ 1, the previews' values kept (an ablation)")
    scale_rewards: str = _f("auto", "÷ the std of the 'group', 'batch' or 'none'; auto: GRPO batch, VGPO group")
    adv_clip_max: float = _f(5.0, "advantages are clipped to ±this (reading 5)")
    clip_range: float = _f(1e-4, "ε, ratio clip of the loss (small: log π is a mean over dimensions)")
    beta: float = _f(0.04, "β, weight of Flow-GRPO's KL to the reference policy (reading 7)")
    ema_decay: float = _f(0.9, "decay of Flow-GRPO's EMA of the weights (evaluated and saved); 0: off")
    ema_update_interval: int = _f(8, "the EMA is updated every this many optimizer steps")
    learning_rate: float = _f(3e-4, "AdamW learning rate")
    weight_decay: float = _f(1e-4, "AdamW weight decay")
    max_grad_norm: float = _f(1.0, "gradient-norm clip")
    train_batch_size: int = _f(8, "B, micro-batch of trajectories, the same in rollout and training")
    gradient_accumulation_steps: int = _f(4, "A, micro-batches per optimizer step")
    eval_steps: int = _f(40, "ODE steps when evaluating")
    eval_batch_size: int = _f(16, "images per batch when evaluating")
    # the run
    task: str = _f("auto", "'ocr', 'pickscore', 'geneval' (SD3) or 'shapes' (toy); auto: the model's own")
    model: str = _f("tiny", "'tiny' (the toy model), 'sd3.5', 'sd3.5-large', an SD3 hub id or local folder")
    reward: str = _f("ocr", "R: a name in reward.REWARDS, a sum 'pickscore=1,aesthetic=0.5', or NAME@DIR")
    prompts: str = _f("ocr", "'ocr', 'preference', 'geneval', 'shapes', or a .txt/.jsonl file")
    reward_dtype: str = _f("fp32", "dtype of the rewards' CLIP models: 'fp32' (Flow-GRPO's) or 'fp16'")
    seed: int = _f(0, "random seed: the prompts, and the noise and shuffle of each (epoch, group)")
    device: str = _f("auto", "'auto' (cuda if available), 'cpu' or 'cuda'")
    output_dir: str = _f("", "run folder (default runs/<algo>-<seed>-<timestamp>)")
    epochs: int = _f(100, "epochs: one rollout of P×G trajectories and its update each")
    eval_every: int = _f(10, "evaluate on held-out prompts every this many epochs (and at 0 and the end)")
    save_every: int = _f(10, "checkpoint every this many epochs and at the end (0: only when stopped)")
    keep_checkpoints: int = _f(2, "keep the newest this many checkpoints")
    resume: str = _f("", "continue the run in this folder from its last good checkpoint")
    init_from: str = _f("", "start a new run from the weights another run saved (its folder)")
    nan_patience: int = _f(3, "stop, with a checkpoint, after this many NaN/inf batches in a row")
    # SD3-family models (sd3.py); the tiny model ignores these
    resolution: int = _f(512, "image size in pixels, a multiple of 16")
    max_sequence_length: int = _f(256, "T5 prompt tokens (SD3.5 was trained with 256)")
    random_weights: bool = _f(False, "the architecture with random weights: no download, to plan memory and speed")
    low_memory: bool = _f(False, "for a 24 GB card: micro-batch 4 × 8, eval batch 4, gradient checkpointing")
    preview_decoder: str = _f("vae", "decoder of the previews (reading 1): 'vae', 'tiny' (TAESD3) or a folder")
    dtype: str = _f("auto", "frozen weights: 'auto' (bf16 on GPUs with native bf16, else fp32), 'bf16', 'fp32'")
    gradient_checkpointing: bool = _f(False, "recompute activations in backward: less memory, slower update")
    lora_rank: int = _f(32, "LoRA rank r on the attention projections")
    lora_alpha: float = _f(64.0, "LoRA α (the adapter is scaled by α/r)")

    def __post_init__(self):  # 'auto' resolved here, so that a run's args.json says what it ran
        if self.task == "auto":  # the model's own task
            self.task = "shapes" if self.model == "tiny" else "ocr"
        if self.scale_rewards == "auto":  # each algorithm as its source defines it
            self.scale_rewards = "batch" if self.algo == "grpo" else "group"


# ======================================= §1  The SDE step with log-probability, and the rollout =====================
# The policy π_θ is the stochastic sampler: each step is a Gaussian transition whose mean depends on the velocity,
# so a trajectory is T actions with log-probabilities. Flow-GRPO turns the model's ODE into an SDE with the same
# marginals (images stay in-distribution) and noise scale a·sqrt(σ/(1−σ)).
def guided_velocity(net, x, sigma, cond, uncond, guidance_scale):
    """Classifier-free guidance: v = v_u + g·(v_c − v_u), in fp32. x (B, C, H, W); cond/uncond = (seq, pooled).
    With g = 1 only the conditional pass is run. The gradient is g·∂v_c (v_u detached; Flow-GRPO's: both, README)."""
    t = (sigma * 1000).expand(x.shape[0])  # diffusers' SD3 takes timestep = 1000·σ
    x = x.to(cond[0].dtype)  # the transformer's dtype (bf16 on SD3.5); the result is cast back to fp32
    if guidance_scale == 1.0:
        return net(x, encoder_hidden_states=cond[0], pooled_projections=cond[1], timestep=t,
                   return_dict=False)[0].float()
    # one batched call for both passes, [uncond; cond], as the stock pipeline does
    out = net(torch.cat([x, x]), encoder_hidden_states=torch.cat([uncond[0], cond[0]]),
              pooled_projections=torch.cat([uncond[1], cond[1]]), timestep=torch.cat([t, t]), return_dict=False)[0]
    v_u, v_c = out.float().chunk(2)
    # trained through the conditional branch only; rollouts and evaluation take no gradient anyway
    v_u = v_u.detach()
    return v_u + guidance_scale * (v_c - v_u)


def sde_step_with_logprob(velocity, sample, sigma, sigma_next, noise_level, prev_sample=None, generator=None,
                          noise=None):
    """Flow-GRPO's SDE step: one Euler–Maruyama step of its marginal-preserving reverse SDE, and its log-prob.
    velocity, sample (B, C, H, W); sigma, sigma_next floats or 0-d tensors. Returns (next_sample, log_prob (B,),
    mean (B, C, H, W), std = std_k·sqrt(−dt)). `prev_sample` given: scored, not drawn; `noise`: the draw's ε
    (default from `generator`). noise_level 0: the Euler step x + v·dt, log_prob 0."""
    # fp32 throughout: with bf16 latents std² and (x − mean)²/std² lose the digits the ratio depends on
    v, x = velocity.float(), sample.float()
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    sigma_next = torch.as_tensor(sigma_next, dtype=torch.float32)
    dt = sigma_next - sigma  # < 0
    # (a) std_k = a·sqrt(σ/(1−σ)); at σ = 1 (the first step) Flow-GRPO puts 1 − σ_{k+1} in the denominator
    denom = 1 - torch.where(sigma >= 1, sigma_next, sigma)
    std_k = noise_level * torch.sqrt(sigma / denom)
    # (b) mean = x + [v + std²/(2σ)·(x + (1−σ)·v)]·dt   (the score term keeps the ODE's marginals)
    mean = x + (v + std_k**2 / (2 * sigma) * (x + (1 - sigma) * v)) * dt
    std = std_k * torch.sqrt(-dt)
    if noise_level == 0:
        # the ODE limit: std = 0 makes the bracket exactly v, so mean = x + v·dt is the Euler step;
        # the density is degenerate, and a log-prob of 0 marks the step as deterministic
        return mean, torch.zeros(x.shape[0], device=x.device), mean, std
    # (c) x_{k+1} = mean + std·ε
    if prev_sample is None:  # drawn where the generator lives: a CPU generator gives the same ε on any device
        eps = noise if noise is not None else torch.randn(x.shape, generator=generator, dtype=torch.float32,
                                                          device=generator.device if generator else x.device)
        prev_sample = mean + std * eps.to(x.device)
    # the sample is data, not a function of θ: gradients flow only through the mean
    prev_sample = prev_sample.float().detach()
    # (d) Gaussian log-density, averaged (not summed) over C·H·W so that its scale does not grow with
    # resolution: the ratio exp(Δ log π) then moves by ~1e-4 per update and ε is chosen at that scale
    log_prob = -((prev_sample - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return prev_sample, log_prob.mean(dim=tuple(range(1, x.ndim))), mean, std


def preview(x, sigma, velocity):
    """Eq. 9's one-step clean-image prediction: x̂0 = x − σ·v, the image the model would output if it stopped
    here (Euler straight to σ = 0). At the step's own velocity it costs no transformer call. (B, C, H, W)."""
    return x - sigma * velocity


@dataclass
class Trajectories:
    """One batch of rollouts. k indexes steps; x0_preds[:, k] is x̂0_{k+1}, the preview after step k."""

    latents: torch.Tensor  # (N, T+1, C, H, W), x_0 = noise … x_T
    log_probs: torch.Tensor  # (N, T) log π_old(x_{k+1} | x_k); 0 for deterministic steps (the last; after S)
    x0_preds: torch.Tensor  # (N, T, C, H, W)
    sigmas: torch.Tensor  # (T+1,)
    images: torch.Tensor  # (N, 3, H', W') in [0, 1]
    prompts: list  # N strings
    group_ids: torch.Tensor  # (N,) long: the index of the trajectory's prompt


def sde_window(num_steps: int, sde_steps: int) -> int:
    """S, the number of SDE (and trained) steps 0…S−1: `sde_steps` capped at T − 1, 0 meaning T − 1 (the last step
    is always a plain Euler step to σ_T = 0). Reading 9."""
    return min(sde_steps, num_steps - 1) if sde_steps else num_steps - 1


@torch.no_grad()
def generate(model: Model, prompts: list[str], num_steps: int, noise_level: float, guidance_scale: float,
             batch_size: int, generator=None, noise=None, record: bool = True, desc: str = "rollout",
             sde_steps: int = 0, step_noise=None):
    """One image per prompt in micro-batches: SDE steps 0…S−1, Euler steps S…T−1. Returns (images, latents,
    log_probs, x0_preds, sigmas), the middle three None unless `record`. `noise` (N, C, H, W) starts the
    trajectories, `step_noise` (N, S, C, H, W) is the SDE steps' ε; drawn from `generator` if None."""
    # Micro-batches of the training size: SD3 outputs depend slightly on the batch size, and a rollout
    # scored at another size than it is re-scored at shows up as ratio ≠ 1 before any update.
    n, (c, h, w), T = len(prompts), model.latent_shape, num_steps
    stochastic = sde_window(T, sde_steps)
    sigmas = model.sigmas(T)  # (T+1,)
    if noise is None:  # x_0 ~ N(0, I): σ_0 = 1 is pure noise (drawn where the generator lives, as in the SDE step)
        noise = torch.randn((n, c, h, w), generator=generator, device=generator.device if generator else model.device)
    # a caller's noise may be elsewhere (CPU noise for a model on the GPU): every draw is used on the model's device
    noise, step_noise = noise.to(model.device), step_noise if step_noise is None else step_noise.to(model.device)
    latents = torch.empty((n, T + 1, c, h, w), device=model.device) if record else None
    x0_preds = torch.empty((n, T, c, h, w), device=model.device) if record else None
    log_probs = torch.zeros((n, T), device=model.device) if record else None
    images = []
    bar = harness.progress(math.ceil(n / batch_size) * T, desc)
    for s in range(0, n, batch_size):
        b = slice(s, s + batch_size)
        x = noise[b].float()  # (B, C, H, W)
        cond = model.encode(prompts[b])
        uncond = model.encode([""] * x.shape[0]) if guidance_scale != 1.0 else None
        for k in range(T):
            if record:  # x_k is kept: training re-scores x_k → x_{k+1} under the updated policy
                latents[b, k] = x
            v = guided_velocity(model.transformer, x, sigmas[k], cond, uncond, guidance_scale)  # (B, C, H, W)
            if record and k > 0:  # reading 1: step k's velocity also gives the preview after step k − 1
                x0_preds[b, k - 1] = preview(x, sigmas[k], v)
            if k < stochastic:
                x, lp, _, _ = sde_step_with_logprob(v, x, sigmas[k], sigmas[k + 1], noise_level, generator=generator,
                                                    noise=None if step_noise is None else step_noise[b, k])
                if record:
                    log_probs[b, k] = lp
            else:  # σ_T = 0 (or past the SDE window): a plain Euler step, no noise, not trained
                x = x + (sigmas[k + 1] - sigmas[k]) * v
            bar.update()
        if record:
            latents[b, T], x0_preds[b, T - 1] = x, x  # x̂0_T = x_T
        images.append(model.decode(x))
    bar.close()
    return torch.cat(images) if images else None, latents, log_probs, x0_preds, sigmas


def rollout(model: Model, prompts: list[str], args: Args, generator=None, noise=None, step_noise=None) -> Trajectories:
    """P distinct prompts, each sampled G = args.num_generations times with the SDE (N = P·G); noise as `generate`."""
    # a group = the G trajectories of one prompt, stored next to each other; group_ids says which
    expanded = [p for p in prompts for _ in range(args.num_generations)]
    group_ids = torch.arange(len(prompts)).repeat_interleave(args.num_generations).to(model.device)  # (N,)
    images, latents, log_probs, x0_preds, sigmas = generate(
        model, expanded, args.num_steps, args.noise_level, args.guidance_scale, args.train_batch_size,
        generator=generator, noise=noise, sde_steps=args.sde_steps, step_noise=step_noise)
    return Trajectories(latents, log_probs, x0_preds, sigmas, images, expanded, group_ids)


# ======================================= §2  Instant rewards → discounted values → step weights (Eqs. 9–11) ========
# GRPO credits every step with the terminal reward R(x_T). VGPO asks after each step k how good the image already
# looks: the preview x̂0_{k+1} is what the model would output if it stopped now, so its reward r_k measures the
# progress made up to step k, and the discounted sum Q_k of what follows is that step's value.
@torch.no_grad()
def instant_rewards(model: Model, traj: Trajectories, reward_fn, metadata: list[dict], previews: bool,
                    batch_size: int = 256) -> torch.Tensor:
    """Eq. 9: r_k = R(decode(x̂0_{k+1}), prompt), (N, T); r_{T−2} = r_{T−1}, the terminal reward. With previews=False
    only the terminal reward is computed and r_k = 0 for k < T−1 (GRPO; the ablation of reading 6)."""
    n, T = traj.log_probs.shape
    r = torch.zeros((n, T), device=model.device)
    # reading 1: the terminal reward r_{T−1} scores the rollout's final images (x̂0_T = x_T, the full decoder)
    terminal = reward_fn(traj.images, traj.prompts, metadata)
    r[:, -1] = recovery.require_finite(terminal, "terminal reward").float().to(model.device)  # NaN guard
    if not previews:
        return r
    r[:, -2] = r[:, -1]  # reading 1: the last step is Euler to σ_T = 0, so the preview after T−2 is x_T itself
    # The other N·(T−2) previews, in large batches: VGPO's extra cost (T − 1 reward calls per image instead of
    # one), timed apart as time/reward_s; `--preview-decoder tiny` cuts it.
    decode = model.preview_decode or model.decode
    flat = traj.x0_preds[:, : T - 2].flatten(0, 1)  # (N·(T−2), C, H, W), trajectory-major
    prompts = [p for p in traj.prompts for _ in range(T - 2)]
    metas = [m for m in metadata for _ in range(T - 2)]
    out = [reward_fn(decode(flat[s : s + batch_size]), prompts[s : s + batch_size], metas[s : s + batch_size])
           for s in range(0, len(flat), batch_size)]
    if out:
        r[:, :-2] = recovery.require_finite(torch.cat(out), "instant reward").float().to(model.device).view(n, T - 2)
    return r


def temporal_values(rewards: torch.Tensor, gamma: float) -> torch.Tensor:
    """Eq. 10: Q_{T−1} = r_{T−1}, Q_k = r_k + γ·Q_{k+1}, from the instant rewards r. (N, T) → (N, T)."""
    q = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])  # (N,), Q_T = 0: nothing follows the last step
    # backwards in k, as a return is computed in RL; T is ~10, so a Python loop costs nothing
    for k in reversed(range(rewards.shape[1])):  # reading 2: γ = 0.9 by default, the paper gives none
        running = rewards[:, k] + gamma * running
        q[:, k] = running
    return q


def step_weights(values: torch.Tensor) -> torch.Tensor:
    """Eq. 11: ω_k = Q_k / mean_k' Q_k' over the trajectory's T steps; 1 where that mean is ≤ 1e-8 (a
    trajectory with no reward has no preferred step). (N, T) → (N, T)."""
    # reading 3: the mean over all T steps (the untrained last one too, so ω depends on values alone), not the
    # sum: ω averages 1 over a trajectory and the loss keeps GRPO's scale. Early steps accumulate more future
    # reward, so ω > 1 early and < 1 late: the loss leans on the steps that decide the layout.
    mean = values.mean(dim=1, keepdim=True)  # (N, 1)
    # rewards are ≥ 0 (reward.py), so ω ≥ 0; the clamp keeps the division finite in the branch torch.where drops
    return torch.where(mean > 1e-8, values / mean.clamp_min(1e-8), torch.ones_like(values))


# ======================================= §3  Advantages: VGPO's anchored one beside GRPO's (Eqs. 12–13) ============
def _group_normalize(x: torch.Tensor, group_ids: torch.Tensor, scale: str = "group") -> torch.Tensor:
    """(x − group mean) / (std + 1e-4), per column. x (N,) or (N, T). The 1e-4 keeps a uniform group at 0
    instead of 0/0. `scale`: the std of the 'group', of the 'batch' (the column's N values: Flow-GRPO's
    global_std) or 'none' (no division)."""
    centred, std = torch.empty_like(x), torch.empty_like(x)
    # a loop over groups reads like the equation; P is at most a few dozen, so it costs nothing
    for g in group_ids.unique():
        m = group_ids == g
        centred[m] = x[m] - x[m].mean(dim=0)
        std[m] = x[m].std(dim=0, unbiased=False)  # reading 5: the population std, as Flow-GRPO's np.std
    if scale == "batch":
        std = x.std(dim=0, unbiased=False).expand_as(x)
    return centred if scale == "none" else centred / (std + 1e-4)


def vgpo_advantages(values, group_ids, gamma, anchor_coef, anchor_steps, adv_clip_max, weights=None,
                    rewarded=None, scale_rewards="group"):
    """Eqs. 12–13: Â_k = ω_k·[(Q_k − μ_k)/(s_k + 1e-4) + κ_k·Q̄_k], clipped to ±adv_clip_max.
    values Q (N, T); group_ids (N,); weights ω (N, T), step_weights(values) when None. μ_k, s_k: mean and std
    of Q_k over the group (`scale_rewards` 'group'), s_k over all N ('batch'), or no division ('none').
    κ_k = κ (`anchor_coef`) on steps k < `anchor_steps`, else 0. Q̄_k = Q_k / Σ_{j≥k, j rewarded} γ^{j−k}, the
    discounted mean of the future rewards that exist; `rewarded` (T,) bool marks the steps with an instant
    reward (default all: Q̄_k = Q_k·(1 − γ)/(1 − γ^{T−k}); terminal reward only: Q̄_k = R)."""
    # The relative term is GRPO's, per step: which trajectories of this prompt did better at step k. It vanishes
    # when the group agrees (all solved or all failed), where GRPO stops learning. The absolute term rewards a step
    # for the value it reached, so a uniformly good group is still pushed (though a push that is the same for the
    # whole group has no expected gradient: README, Results); it is on in the early steps only.
    T = values.shape[1]
    relative = _group_normalize(values, group_ids, scale_rewards)  # (N, T): 0 for a uniform group; reading 5
    # reading 4: Q_k's size depends on k; dividing by the discounts of the rewards that exist makes it a weighted
    # mean of rewards, in [0, 1] like them, so κ is on the unit-std relative term's scale at every step. That
    # normaliser is itself a discounted sum, Eq. 10 of the 0/1 row of scored steps.
    if rewarded is None:
        rewarded = torch.ones(T, dtype=torch.bool, device=values.device)
    norm = temporal_values(rewarded.to(values.dtype)[None], gamma)[0]  # (T,): Σ_{j≥k, j rewarded} γ^{j−k}
    k = torch.arange(T, device=values.device)
    kappa = torch.where(k < anchor_steps, anchor_coef, 0.0).to(values.dtype)  # (T,)
    absolute = kappa * values / norm  # (N, T): κ_k·Q̄_k, in reward units
    if weights is None:
        weights = step_weights(values)
    # reading 5: ω multiplies both terms; the clip bounds one outlier in a group of std ≈ 0
    return (weights * (relative + absolute)).clamp(-adv_clip_max, adv_clip_max)


def grpo_advantages(rewards, group_ids, scale_rewards, adv_clip_max, num_steps):
    """Flow-GRPO's advantage: Â^i = (R^i − mean_group R)/(std + 1e-4), the same for all T steps. (N,) → (N, T)."""
    adv = _group_normalize(rewards, group_ids, scale_rewards).clamp(-adv_clip_max, adv_clip_max)  # (N,)
    return adv.unsqueeze(1).expand(-1, num_steps).contiguous()


def credit(r: torch.Tensor, group_ids: torch.Tensor, args: Args):
    """Eqs. 10–13 (or GRPO's advantage) for one rollout: (values, weights, advantages), each (N, T), from the
    instant rewards r (N, T). GRPO's 'values' are the terminal reward and its weights 1."""
    if args.algo == "vgpo":
        values = temporal_values(r, args.gamma)  # Eq. 10
        weighted = args.temporal_values and args.step_weights  # reading 6; --no-step-weights: ω ≡ 1 alone
        weights = step_weights(values) if weighted else torch.ones_like(values)  # Eq. 11
        rewarded = None if args.temporal_values else torch.arange(r.shape[1], device=r.device) == r.shape[1] - 1
        adv = vgpo_advantages(values, group_ids, args.gamma, args.anchor_coef, args.anchor_steps,
                              args.adv_clip_max, weights=weights, rewarded=rewarded,
                              scale_rewards=args.scale_rewards)  # Eqs. 12–13
    else:  # GRPO credits every step alike
        values, weights = r[:, -1:].expand_as(r), torch.ones_like(r)
        adv = grpo_advantages(r[:, -1], group_ids, args.scale_rewards, args.adv_clip_max, args.num_steps)
    return values, weights, adv


# ======================================= §4  The clipped loss with KL, and the update (Flow-GRPO's) ================
def policy_loss(log_probs, log_probs_old, advantages, clip_range, kl=None, beta=0.0):
    """Flow-GRPO's loss: L = mean(max(−Â·ρ, −Â·clip(ρ, 1 − ε, 1 + ε))) + β·mean(KL), ρ = exp(log π_θ − log π_old).
    All arguments (B,) for one trained step. Returns (loss, stats)."""
    # PPO's clipped surrogate. The log-probs are averaged over dims, so a ratio of 1 ± 1e-3 is already a
    # real change of the step distribution; ε is chosen at that scale (1e-4 for SD3.5, 3e-3 for the toy).
    ratio = torch.exp(log_probs - log_probs_old)  # (B,), 1 on-policy
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    # max of the two losses = min of the two objectives: the pessimistic bound. Outside the band the
    # clipped term is constant, so it has no gradient exactly when moving further would pay
    l_clip = torch.maximum(unclipped, clipped).mean()
    l_kl = kl.mean() if kl is not None else torch.zeros((), device=ratio.device)
    stats = {  # diagnostics only: how far the policy moved from the rollout's, and how often the clip bit
        "policy/approx_kl": 0.5 * ((log_probs - log_probs_old) ** 2).mean().item(),
        "policy/clip_frac": ((ratio - 1).abs() > clip_range).float().mean().item(),
        "loss/policy": l_clip.item(),
        "loss/kl": l_kl.item(),
    }
    return l_clip + beta * l_kl, stats


def make_optimizer(model: Model, args: Args) -> torch.optim.Optimizer:
    """AdamW over the trainable weights (the prompt encoder, and under LoRA the base weights, stay frozen)."""
    params = [p for p in model.transformer.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay)


def update(model: Model, traj: Trajectories, advantages, optimizer, args: Args, shuffle=None, guard=None) -> dict:
    """For each micro-batch and trained step k (0…S−1): forward, loss, backward; an optimizer step every A
    micro-batches. Stratified shuffle: the U optimizer steps take G/U of every group, in the order `shuffle`
    (P, G) gives (default: as stored). A NaN/inf loss or gradient skips its step, counted by `guard`."""
    # One backward per (micro-batch, step): one transformer call's activations alive at a time (SD3.5 on one GPU)
    n, T = traj.log_probs.shape
    trained, accum = sde_window(T, args.sde_steps), args.gradient_accumulation_steps  # steps 0…trained−1
    params = [p for p in model.transformer.parameters() if p.requires_grad]
    # Every optimizer step sees every prompt, and holds the same trajectories however many processes share the
    # groups (each orders its own): (groups, U, G/U) → (U, groups, G/U), step by step. Where U does not divide G
    # (one process only: harness.validate) the steps take the groups' trajectories position by position.
    groups, steps = len(traj.group_ids.unique()), max(1, n // (args.train_batch_size * accum))  # U optimizer steps
    G = n // groups
    table = torch.arange(0, n, G)[:, None] + (shuffle if shuffle is not None else torch.arange(G)).cpu()  # (groups, G)
    order = table.view(groups, steps, G // steps).transpose(0, 1).flatten() if G % steps == 0 else table.T.flatten()
    stats = defaultdict(list)
    guard = guard if guard is not None else recovery.NanGuard(args.nan_patience)
    bad = None  # what was NaN/inf in the current optimizer step
    bar = harness.progress(math.ceil(n / args.train_batch_size) * trained, "update")
    for i, idx in enumerate(order.to(model.device).split(args.train_batch_size)):
        prompts = [traj.prompts[j] for j in idx.tolist()]
        cond = model.encode(prompts)
        uncond = model.encode([""] * len(prompts)) if args.guidance_scale != 1.0 else None
        for k in range(trained):
            x, x_next = traj.latents[idx, k], traj.latents[idx, k + 1]
            sigma, sigma_next = traj.sigmas[k], traj.sigmas[k + 1]
            v = guided_velocity(model.transformer, x, sigma, cond, uncond, args.guidance_scale)
            _, log_prob, mean, std = sde_step_with_logprob(v, x, sigma, sigma_next, args.noise_level,
                                                           prev_sample=x_next)
            kl = None
            if args.beta > 0:
                with torch.no_grad():
                    v_ref = guided_velocity(model.reference, x, sigma, cond, uncond, args.guidance_scale)
                    _, _, mean_ref, _ = sde_step_with_logprob(v_ref, x, sigma, sigma_next, args.noise_level,
                                                              prev_sample=x_next)
                # reading 7: Flow-GRPO's KL, |Δmean|²/(2·std_k²) dims-averaged: the exact KL of the two Gaussian
                # steps (std² = std_k²·(−dt)) times −dt, so that Flow-GRPO's β values carry over
                kl = ((mean - mean_ref) ** 2).mean(dim=(1, 2, 3)) / (2 * std**2) * (sigma - sigma_next)
            loss, s = policy_loss(log_prob, traj.log_probs[idx, k], advantages[idx, k], args.clip_range, kl, args.beta)
            if not torch.isfinite(loss):  # NaN guard: no backward, and this optimizer step will be skipped
                bad = "the loss"
                continue
            (loss / (trained * accum)).backward()  # the optimizer step sees the mean over steps and micro-batches
            for key, val in s.items():
                stats[key].append(val)
            bar.update()
        if (i + 1) % accum == 0:  # gradient-norm clip as Flow-GRPO: a rare huge advantage cannot jump
            bad = distributed.average_gradients(params, bad)  # plumbing: torchrun: the mean over the processes
            norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            if guard.record(bad is None and bool(torch.isfinite(norm)), bad or "the gradient"):  # NaN guard
                stats["policy/grad_norm"].append(norm.item())
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            bad = None
    bar.close()
    return distributed.means(stats)  # plumbing: torchrun: the means of every process's values


# ======================================= §5  One epoch, and evaluation ============================================
def train_epoch(model: Model, chosen: list, args: Args, reward_fn, optimizer, epoch: int, guard=None,
                credit_fn=None) -> dict:
    """One epoch on the P `chosen` (prompt, metadata) pairs: rollout → rewards → credit → update. Each group's
    noise and shuffle are keyed by (seed, epoch, group); `guard` (a NanGuard) counts NaN/inf batches skipped.
    `credit_fn(model, traj, metadata, r, group_ids, epoch)`, if given, replaces `credit` (an experiment's rule)."""
    guard = guard if guard is not None else recovery.NanGuard(args.nan_patience)
    guard.skipped = 0
    # --- sample: P prompts × G trajectories with their old log-probs and previews ---
    t0, G, S = time.time(), args.num_generations, sde_window(args.num_steps, args.sde_steps)
    groups = distributed.my_groups(len(chosen))  # plumbing: torchrun: this process's P/K groups (else all P)
    noise, step_noise, shuffle = distributed.group_draws(args.seed, epoch, groups, G, model.latent_shape, S,
                                                         model.device)
    traj = rollout(model, [chosen[g][0] for g in groups], args, noise=noise, step_noise=step_noise)
    metadata = [chosen[g][1] for g in groups for _ in range(G)]
    t1 = time.time()
    use_previews = args.algo == "vgpo" and args.temporal_values  # GRPO never looks at previews
    try:  # NaN guard: a rollout with a NaN/inf reward or log-prob is not learned from
        with distributed.together(recovery.NonFiniteError):  # plumbing: torchrun: one process's NaN skips on all
            r = instant_rewards(model, traj, reward_fn, metadata, previews=use_previews)  # Eq. 9, (N, T)
            recovery.require_finite(traj.log_probs, "log-prob")
    except recovery.NonFiniteError as e:
        guard.record(False, f"the rollout ({e})")
        return {"guard/skipped_batches": guard.skipped, "time/rollout_s": t1 - t0, "time/epoch_s": time.time() - t0}
    # plumbing: torchrun: the whole batch, every process's rows in group order: r (N, T), group ids (N,)
    r, group_ids = distributed.gather(r), distributed.gather(traj.group_ids + groups.start)
    t2 = time.time()
    # --- credit: per-step values and advantages (VGPO) or one advantage for all steps (GRPO) ---
    values, weights, adv = credit(r, group_ids, args) if credit_fn is None else \
        credit_fn(model, traj, metadata, r, group_ids, epoch)  # Eqs. 10–13, on the whole batch
    t3 = time.time()
    # --- learn: clipped policy gradient over the rollout (this process's rows of the batch) ---
    stats = update(model, traj, adv[groups.start * G : groups.stop * G], optimizer, args, shuffle, guard)
    metrics = harness.epoch_metrics(r, values, weights, adv, group_ids, S, use_previews)  # plumbing: logged keys
    return {**metrics, **stats, "guard/skipped_batches": guard.skipped,
            "time/rollout_s": t1 - t0, "time/reward_s": t2 - t1, "time/update_s": time.time() - t3,
            "time/epoch_s": time.time() - t0}


# Every evaluation starts from this seed's noise, whatever --seed is: a change between two is the model's
EVAL_SEED = 1234


@torch.no_grad()
def evaluate(model: Model, args: Args, reward_fn=None, eval_set=None, run=None, epoch=None,
             seed: int = EVAL_SEED) -> dict:
    """ODE sampling (a = 0) of the held-out prompts, `eval_steps` steps, the guidance of training (reading 8),
    the same starting noise (from `seed`) every time. Returns {'eval/score': …, …}; `run`: saves a grid too."""
    t0 = time.time()
    eval_set = eval_set or load_prompts(args)[1]
    reward_fn = reward_fn or make_reward(args, model.device, eval_set)
    prompts, metas = [p for p, _ in eval_set], [m for _, m in eval_set]
    gen = torch.Generator(model.device).manual_seed(seed)
    noise = torch.randn((len(prompts), *model.latent_shape), generator=gen, device=model.device)  # image i: noise[i]
    share = distributed.my_batches(len(prompts), args.eval_batch_size)  # plumbing: torchrun: whole batches each
    # noise_level 0: the deterministic ODE sampler users sample with after training
    images = generate(model, prompts[share], args.eval_steps, 0.0, args.guidance_scale, args.eval_batch_size,
                      noise=noise[share], record=False, desc="eval")[0]
    images = distributed.gather_to_first(images)  # plumbing: torchrun: every image on process 0, None elsewhere
    # a reward with its own metrics (GenEval-style: strict accuracy by category) reports them; others their mean
    metrics = reward_fn.metrics if hasattr(reward_fn, "metrics") else lambda *a: {"score": reward_fn(*a).mean().item()}
    scores = distributed.on_first(metrics, images, prompts, metas)  # plumbing: torchrun: scored once, on process 0
    if run is not None:
        run.save_samples(images, prompts, epoch)  # plumbing: samples/epoch_NNNN.png
    return {f"eval/{k}": v for k, v in scores.items()} | {"time/eval_s": time.time() - t0}


# ======================================= §6  Training: the whole method, epoch after epoch =========================
def train(args: Args, credit_fn=None) -> list[dict]:
    """Per epoch: rollout → rewards → values → advantages → update. Returns the metric rows, one per epoch
    (row 0: the base model). With `args.resume` it continues that run from its last good checkpoint.
    `credit_fn`: replaces `credit` in every epoch (train_epoch; tools.credit's oracle)."""
    # --- set-up: everything that can fail on bad input fails here, with one line, before the first rollout ---
    harness.validate(args)  # plumbing: ranges, files, batch arithmetic
    distributed.start(harness.resolve_device(args))  # plumbing: torchrun: join the other processes
    checkpoint = recovery.find_checkpoint(args) if args.resume else None  # plumbing: the newest undamaged one
    args = dataclasses.replace(args, output_dir=args.resume or args.output_dir)  # a resumed run stays in its folder
    # One seeded stream picks each epoch's prompts; the noise and shuffle are keyed by (seed, epoch, group), so they
    # do not depend on how groups are split between processes. On the CPU a run is bitwise reproducible (tested).
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)  # which prompts each epoch
    # the prompts and the reward before the big model: a bad prompt file or an absent reward stops at once
    train_set, eval_set = load_prompts(args)  # plumbing
    reward_fn = make_reward(args, harness.resolve_device(args), train_set + eval_set)  # plumbing
    harness.check_vocabulary(args, train_set + eval_set)  # plumbing: the tiny model knows only its words
    run = harness.RunFolder.open(args, checkpoint)  # plumbing: runs/<run>/, args.json
    model = load_model(args, prompts=[p for p, _ in train_set + eval_set])  # plumbing: the prompt files read once
    harness.init_from(model, args.init_from)  # plumbing: --init-from: another run's trained weights (the KL's
    #                                                     reference stays the base model)
    optimizer = make_optimizer(model, args)
    ema = harness.WeightEMA(optimizer, args.ema_decay, args.ema_update_interval)  # Flow-GRPO's: evaluated and saved
    rngs = {"prompts": rng}  # the random state a checkpoint keeps
    guard = recovery.NanGuard(args.nan_patience)  # plumbing: skips NaN/inf batches, stops after too many
    run.startup_box(args, model, optimizer.param_groups[0]["params"], sde_window(args.num_steps, args.sde_steps),
                    notes=(harness.presets_note(args, TASKS, PRESETS), ema.describe()))

    # --- epoch 0: the base model on the held-out prompts, the reference point of every curve ---
    if checkpoint:  # plumbing: a resumed run puts back weights, optimizer, random states and its metric rows
        history = recovery.restore_checkpoint(checkpoint, model, optimizer, rngs, guard, ema)
    else:
        history = [{"epoch": 0, **evaluate(model, args, reward_fn, eval_set, run, epoch=0)}]
        run.log(history[-1])  # plumbing: metrics.jsonl
    # plumbing: Ctrl-C / SIGTERM finish the epoch, then save a checkpoint; out of GPU memory saves the one before it
    with recovery.StopSignals() as stop, recovery.OutOfMemory(run.path, args, model, optimizer, rngs, guard, history,
                                                               ema) as out_of_memory:
        for epoch in range(history[-1]["epoch"] + 1, args.epochs + 1):
            out_of_memory.before_epoch(epoch)  # plumbing: keeps the state an out-of-memory stop saves
            chosen = sample_prompts(train_set, args.prompts_per_epoch, rng)
            row = {"epoch": epoch, **train_epoch(model, chosen, args, reward_fn, optimizer, epoch, guard, credit_fn)}
            if epoch % args.eval_every == 0 or epoch == args.epochs:  # the last epoch is always evaluated
                with ema.applied():  # Flow-GRPO evaluates the EMA of the weights (the weights if it is off)
                    row.update(evaluate(model, args, reward_fn, eval_set, run, epoch=epoch))
            history.append(row)
            run.log(row, args.epochs)  # plumbing: metrics.jsonl (flushed: a killed run keeps its curve), console
            due = args.save_every and (epoch % args.save_every == 0 or epoch == args.epochs)
            # plumbing: checkpoint, then stop if a signal (to any process, under torchrun) or NaNs asked to
            if stop.requested() or guard.tripped or due:
                saved = recovery.save_checkpoint(run.path, epoch, args, model, optimizer, rngs, guard, history, ema)
                recovery.raise_if_stopped(stop.signum, guard, saved, args, epoch)
    run.finish(model, history, ema, sde_window(args.num_steps, args.sde_steps))  # plumbing: weights, curves.png
    return history


# ======================================= Settings: presets, the command line, the entry point =====================
# Presets fill every field the user did not set: flags > --low-memory > TASKS[task] > PRESETS[model] > default.

# The toy model (--model tiny); the runs behind these choices are in results/RESULTS.md.
PRESETS = {
    "tiny": dict(
        guidance_scale=1.0,  # reading 8: the policy optimised is the one evaluated: the toy model without CFG
        learning_rate=1e-4,  # every weight is trained (no LoRA): a smaller step than LoRA's 3e-4
        clip_range=3e-3,  # 256 latent dimensions, not SD3.5's 65 536: the averaged log-prob is noisier
        beta=0.0,  # no KL: it saves the reference pass, and no toy run collapsed without it
        reward="shapes_strict",  # the evaluation's own 0/1 metric: partial credit pays for adding objects
        sde_steps=4,  # reading 9: the layout is decided in the first steps; later noise only blurs their credit
        epochs=80, eval_every=20,  # a few minutes on a laptop CPU; held-out accuracy has levelled off by then
        prompts_per_epoch=16,  # 16 prompts × 8 = 128 trajectories: a cheap epoch with many groups
        train_batch_size=32,  # a CPU is faster on bigger batches
        gradient_accumulation_steps=1,  # 4 optimizer steps per epoch: smaller steps average one rollout's noise
        eval_batch_size=128,
        scale_rewards="group", ema_decay=0.0,  # as the toy runs in results/ (Flow-GRPO's batch std and EMA: untried)
    ),
}
# The paper's three tasks (--task), each Flow-GRPO's SD3.5 config for it (general_ocr_sd3_1gpu, pickscore_sd3,
# geneval_sd3) on one GPU as its 1-GPU OCR config is: the batch numbers are the Args defaults (8 prompts × 8 images,
# micro-batch 8, 2 optimizer steps per epoch); what differs between tasks is here. β is Flow-GRPO's (reading 7).
TASKS = {
    "ocr": dict(prompts="ocr", reward="ocr", beta=0.04),  # also the Args defaults
    "pickscore": dict(prompts="preference", reward="pickscore", beta=0.01),
    "geneval": dict(prompts="geneval", reward="geneval", beta=0.04),  # trained on partial credit
    "shapes": dict(prompts="shapes"),  # the toy world: its reward and the rest are the tiny model's preset
}
# --low-memory (SD3 only): a micro-batch of 4 halves the train step's activations (a batch of 8 with CFG), ×8
# accumulation keeps 2 optimizer steps per epoch, checkpointing keeps few activations; one image per VAE call: sd3.py.
LOW_MEMORY = dict(train_batch_size=4, gradient_accumulation_steps=8, eval_batch_size=4, gradient_checkpointing=True)


def make_args(**overrides) -> Args:
    """Args for `overrides`: what the user set > --low-memory > TASKS[task] > PRESETS[model] > the Args default.
    `task` 'auto' becomes the model's own task: 'shapes' on the tiny model, 'ocr' on SD3-family models."""
    return harness.apply_presets(Args, overrides, PRESETS, TASKS, LOW_MEMORY)  # plumbing: checks names, fills


def parse_args(argv=None) -> Args:
    """One flag per Args field (`--field-name VALUE`, `--flag/--no-flag`); `--resume DIR` starts from that run's."""
    presets = {f"--model {m}": p for m, p in PRESETS.items()} | {f"--task {t}": p for t, p in TASKS.items()}
    intro = __doc__.split("\n\n")[0]
    given = harness.read_flags(argv, Args, presets, f"{intro} Presets: {harness.PRESET_ORDER}.")
    return recovery.resume_args(Args, **given) if given.get("resume") else make_args(**given)


def main(argv=None) -> int:
    """Exit codes: 0 done; 2 bad input (one line); 3 the NaN guard; 4 out of GPU memory; 130 / 143 SIGINT / SIGTERM
    (checkpoint saved); 1 anything else (a bug, a crashed reward model, another process under torchrun)."""
    return recovery.exit_code(lambda: train(parse_args(argv)))  # plumbing: how the run ended → the exit code


if __name__ == "__main__":
    sys.exit(main())
