"""VGPO's update against Flow-GRPO's scripts/train_sd3.py at commit 74db691 (github.com/yifan123/flow_grpo; the
commits 54809b5 and 1f4ca40 read the same in these places), each formula written out here: the KL penalty at every
step of SD3.5's schedule is theirs; the gradient through classifier-free guidance is not. Their compute_log_prob
keeps both branches, g·∂v_c + (1 − g)·∂v_u; vgpo.guided_velocity detaches the unconditional prediction, g·∂v_c. No
version of train_sd3.py we read detaches it."""
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import vgpo


class OneWeight(torch.nn.Module):
    """v(x) = θ·c·x with c = 2 for the prompt and 1 for the empty prompt: a net whose ∂v_c/∂θ and ∂v_u/∂θ
    differ, so the guided gradient says which branches it flows through."""

    def __init__(self):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.tensor(1.0))

    def forward(self, x, encoder_hidden_states, pooled_projections, timestep, return_dict=False):
        return (self.theta * encoder_hidden_states.view(-1, 1, 1, 1) * x,)


def flow_grpo_guided_velocity(net, x, t, cond, uncond, g):
    """train_sd3.py's compute_log_prob at 74db691: one call on [uncond; cond], v = v_u + g·(v_c − v_u), nothing
    detached."""
    out = net(torch.cat([x, x]), encoder_hidden_states=torch.cat([uncond[0], cond[0]]),
              pooled_projections=torch.cat([uncond[1], cond[1]]), timestep=torch.cat([t, t]))[0]
    v_u, v_c = out.chunk(2)
    return v_u + g * (v_c - v_u)


def test_the_guidance_gradient_flows_through_the_conditional_branch_only_where_flow_grpos_takes_both():
    """Re-scoring for the loss, vgpo detaches the unconditional prediction: ∂v/∂θ = g·∂v_c/∂θ. Flow-GRPO's
    train_sd3.py (74db691) trains both branches: (1 − g)·∂v_u + g·∂v_c. The value is the guided velocity in both."""
    g, x, t = 4.5, torch.ones(1, 1, 1, 1), torch.tensor(0.5)
    cond, uncond = (torch.tensor([2.0]), torch.zeros(1)), (torch.tensor([1.0]), torch.zeros(1))
    v_c, v_u = 2.0, 1.0  # at θ = 1, and ∂v_c/∂θ = 2, ∂v_u/∂θ = 1
    ours, theirs = OneWeight(), OneWeight()
    v = vgpo.guided_velocity(ours, x, t, cond, uncond, g)
    v.sum().backward()
    w = flow_grpo_guided_velocity(theirs, x, (t * 1000).expand(1), cond, uncond, g)
    w.sum().backward()
    assert v.item() == pytest.approx(v_u + g * (v_c - v_u)) == w.item()
    assert ours.theta.grad.item() == pytest.approx(g * 2.0)  # 9
    assert theirs.theta.grad.item() == pytest.approx((1 - g) * 1.0 + g * 2.0)  # 5.5


def sd35_sigmas(num_steps=10):
    """SD3.5-Medium's schedule: FlowMatchEulerDiscreteScheduler with shift 3, as its scheduler config."""
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(num_steps)
    return sched.sigmas.float()


def flow_grpo_kl(v, v_ref, x, sigma, sigma_next, sigma_max, noise_level):
    """train_sd3.py's KL of one step, from its sde_step_with_logprob's mean and std_dev_t (no dt in the std):
    mean over C, H, W of (mean − mean_ref)² / (2·std_dev_t²)."""
    dt = sigma_next - sigma
    std_dev_t = noise_level * (sigma / (1 - (sigma_max if sigma == 1 else sigma))) ** 0.5

    def mean_of(vel):
        return x * (1 + std_dev_t**2 / (2 * sigma) * dt) + vel * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt

    return ((mean_of(v) - mean_of(v_ref)) ** 2).mean(dim=(1, 2, 3)) / (2 * std_dev_t**2)


def test_the_kl_penalty_is_flow_grpos_at_every_step_of_sd35s_schedule(monkeypatch):
    """On SD3.5's shift-3, 10-step schedule the KL the update adds is Flow-GRPO's at each of the 9 trained steps
    (so its β values carry over), and equals the exact KL of the two Gaussian steps times −dt_k (reading 7)."""
    args = vgpo.make_args(model="tiny", beta=0.04, num_steps=10, num_generations=2, prompts_per_epoch=2,
                          train_batch_size=4, gradient_accumulation_steps=1, sde_steps=0)
    model = vgpo.load_model(args)
    with torch.no_grad():  # a reference that differs from the policy, so that the KL is not 0
        for p in model.reference.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    sigmas, n = sd35_sigmas(), 4
    latents = torch.randn((n, 11, *model.latent_shape), generator=torch.Generator().manual_seed(0))
    prompts = ["a red circle"] * 2 + ["two blue squares"] * 2
    traj = vgpo.Trajectories(latents, torch.zeros(n, 10), latents[:, 1:], sigmas, None, prompts,
                             torch.tensor([0, 0, 1, 1]))
    seen = []

    def recording_loss(log_probs, log_probs_old, advantages, clip_range, kl=None, beta=0.0):
        seen.append((kl.detach().clone(), beta))
        return real_loss(log_probs, log_probs_old, advantages, clip_range, kl, beta)

    real_loss = vgpo.policy_loss
    monkeypatch.setattr(vgpo, "policy_loss", recording_loss)
    params = [p for p in model.transformer.parameters() if p.requires_grad]
    vgpo.update(model, traj, torch.zeros(n, 10), torch.optim.SGD(params, lr=0.0), args, shuffle=torch.arange(2))
    assert len(seen) == 9 and all(beta == 0.04 for _, beta in seen)  # one micro-batch, steps 0…8
    cond = model.encode(prompts)
    with torch.no_grad():
        for k, (kl, _) in enumerate(seen):
            x, s, s_next = latents[:, k], float(sigmas[k]), float(sigmas[k + 1])
            v = vgpo.guided_velocity(model.transformer, x, sigmas[k], cond, None, 1.0)
            v_ref = vgpo.guided_velocity(model.reference, x, sigmas[k], cond, None, 1.0)
            want = flow_grpo_kl(v, v_ref, x, s, s_next, float(sigmas[1]), args.noise_level)
            assert (want > 0).all()
            torch.testing.assert_close(kl, want, rtol=1e-4, atol=0)
            # the exact KL of N(mean, std²) and N(mean_ref, std²), std² = std_dev_t²·(−dt), dims-averaged
            _, _, mean, std = vgpo.sde_step_with_logprob(v, x, s, s_next, args.noise_level,
                                                         prev_sample=latents[:, k + 1])
            _, _, mean_ref, _ = vgpo.sde_step_with_logprob(v_ref, x, s, s_next, args.noise_level,
                                                           prev_sample=latents[:, k + 1])
            exact = torch.distributions.kl_divergence(torch.distributions.Normal(mean, std),
                                                      torch.distributions.Normal(mean_ref, std)).mean(dim=(1, 2, 3))
            torch.testing.assert_close(kl, exact * (s - s_next), rtol=1e-4, atol=0)


def test_the_schedule_the_readme_quotes_for_the_kl():
    """The README's figures for reading 7: on SD3.5's schedule −dt runs from 0.040 (step 0) to 0.269 (step 8),
    so an exact-KL β of 0.004 would weigh step 0 2.5× and step 8 0.37× as much as Flow-GRPO's 0.04."""
    sigmas = sd35_sigmas()
    minus_dt = (sigmas[:-1] - sigmas[1:])[:9]
    assert (round(minus_dt[0].item(), 3), round(minus_dt[8].item(), 3)) == (0.040, 0.269)
    weight = 0.004 / minus_dt / 0.04  # exact KL × 0.004 = Flow-GRPO's KL × 0.004/(−dt), against 0.04
    assert (round(weight[0].item(), 1), round(weight[8].item(), 2)) == (2.5, 0.37)

