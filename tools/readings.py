"""Two consequences of the readings (README, "Where the paper is silent"), computed by vgpo.py's own functions.

    python -m tools.readings            # a second on a CPU; prints the tables in results/RESULTS.md

1. The absolute term κ·Q̄_k (reading 4) is positive for every trajectory. On a reward where every image scores about
   the same high value (PickScore ÷ 26 ≈ 0.85, the images of one prompt ~0.01 apart) it is a push up on the first
   `anchor_steps` steps of everything sampled, as large as the group-relative term or larger.
2. ω multiplies the relative term trajectory by trajectory (reading 5), so a group's advantages at one step no
   longer sum to zero as GRPO's do: with one success among G = 8 and κ = 0 the group's sum moves with ω.

Inputs are stated where they are made (the instant rewards are hand-made, not sampled from a model).
"""
from __future__ import annotations

import torch

import vgpo

T, G = 10, 8


def anchor_on_a_uniform_reward(scale_rewards: str, prompts: int = 8, seed: int = 0, mean: float = 0.85,
                               between: float = 0.02, within: float = 0.01) -> list[dict]:
    """A PickScore-like batch: `prompts` groups of G, terminal rewards mean + N(0, between²) per prompt +
    N(0, within²) per image, and every preview scoring as its final image (r_k = R for all k). Per step k the mean
    over trajectories of |ω·relative|, of ω·κ·Q̄ (κ = 1), of Â, and the share of Â > 0."""
    g = torch.Generator().manual_seed(seed)
    group_ids = torch.arange(prompts).repeat_interleave(G)
    terminal = mean + between * torch.randn(prompts, generator=g)[group_ids] + within * torch.randn(prompts * G,
                                                                                                 generator=g)
    r = terminal[:, None].expand(-1, T).contiguous()  # (N, T)
    args = vgpo.make_args(model="sd3.5", scale_rewards=scale_rewards)  # κ = 1 on the first 5 of T = 10 steps
    values, weights, adv = vgpo.credit(r, group_ids, args)
    relative = vgpo.vgpo_advantages(values, group_ids, args.gamma, 0.0, args.anchor_steps, args.adv_clip_max,
                                    weights=weights, scale_rewards=scale_rewards)  # κ = 0: ω·relative alone
    absolute = adv - relative  # ω·κ·Q̄ (no value here comes near the ±5 clip)
    return [{"k": k, "relative": relative[:, k].abs().mean().item(), "absolute": absolute[:, k].mean().item(),
             "advantage": adv[:, k].mean().item(), "positive": (adv[:, k] > 0).float().mean().item()}
            for k in range(args.anchor_steps + 1)]


def one_success_group_sums(previews: bool) -> dict:
    """One group of G = 8 with one success (R = 1, the others 0), κ = 0, γ = 0.9, T = 10. With `previews` every
    preview scores as its final image (the success's r_k = 1 at every step), else every preview scores 0 (only the
    final image passes: r_k = 0 for k < T − 1). Returns per step k: Σ_i Â_k^i with ω (VGPO), Σ_i of the relative
    term alone (ω ≡ 1), and the success's ω_k."""
    r = torch.zeros(G, T)
    if previews:
        r[0] = 1.0
    else:
        r[0, -1] = 1.0
    group_ids = torch.zeros(G, dtype=torch.long)
    values = vgpo.temporal_values(r, 0.9)
    weights = vgpo.step_weights(values)
    adv = vgpo.vgpo_advantages(values, group_ids, 0.9, 0.0, 5, 5.0, weights=weights)
    flat = vgpo.vgpo_advantages(values, group_ids, 0.9, 0.0, 5, 5.0, weights=torch.ones_like(values))
    return {"vgpo": adv.sum(0).tolist(), "without_omega": flat.sum(0).tolist(), "omega_success": weights[0].tolist()}


def main() -> int:
    print("Absolute term on a PickScore-like reward (8 prompts × 8, R ≈ 0.85, 0.02 between prompts, 0.01 within;"
          " previews score as the final image; κ = 1 on steps 0–4)\n")
    print("| --scale-rewards | step k | mean \\|ω·relative\\| | mean ω·κ·Q̄ | mean Â | share of Â > 0 |")
    print("|---|---|---|---|---|---|")
    for scale in ("group", "batch"):
        for row in anchor_on_a_uniform_reward(scale):
            print(f"| {scale} | {row['k']} | {row['relative']:.3f} | {row['absolute']:.3f} | {row['advantage']:.3f} "
                  f"| {row['positive']:.2f} |")
    print("\nOne success among G = 8, κ = 0, γ = 0.9, T = 10: the group's per-step sum Σ_i Â_k^i (k = 0 … 9; "
          "step 9 is not trained)\n")
    print("| previews | Σ_i Â_k^i with ω (VGPO) | without ω | ω_k of the success |")
    print("|---|---|---|---|")
    for previews in (True, False):
        s = one_success_group_sums(previews)
        fmt = lambda xs: " ".join(f"{x:+.2f}" for x in xs)  # noqa: E731
        label = "score as the final image" if previews else "score 0 (only the final image passes)"
        print(f"| {label} | {fmt(s['vgpo'])} | {fmt(s['without_omega'])} | {fmt(s['omega_success'])} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
