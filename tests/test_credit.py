"""Tests of tools/credit.py: the branching ground truth of per-step credit, and the oracle arm's credit rule."""
import json
import os

import pytest
import torch

import shapes
import vgpo
from tools import credit

PROMPTS = ["a red circle", "two blue squares", "a circle left of a square"]


@pytest.fixture(scope="module")
def small():
    args = vgpo.make_args(model="tiny", num_generations=4, num_steps=6, sde_steps=3, train_batch_size=4)
    model = vgpo.load_model(args)
    return args, model


def _rollout(args, model, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, S = len(PROMPTS) * args.num_generations, vgpo.sde_window(args.num_steps, args.sde_steps)
    noise = torch.randn((n, *model.latent_shape), generator=g)
    step_noise = torch.randn((n, S, *model.latent_shape), generator=g)
    return vgpo.rollout(model, PROMPTS, args, noise=noise, step_noise=step_noise), step_noise


def test_continuation_is_the_rollouts_sampler_and_deterministic_after_the_window(small):
    """Continuing x_k with the rollout's own SDE noise for steps k…S−1 gives the rollout's x_T (vgpo.generate's
    loop), for every k; from x_S (only Euler steps left) any noise gives the same x_T; fresh noise before S does not."""
    args, model = small
    traj, step_noise = _rollout(args, model)
    S = vgpo.sde_window(args.num_steps, args.sde_steps)
    for k in range(S + 1):
        end = credit.continue_from(model, traj.latents[:, k], k, traj.prompts, args, step_noise=step_noise[:, k:])
        torch.testing.assert_close(end, traj.latents[:, -1], rtol=0, atol=1e-6)
    g = torch.Generator().manual_seed(5)
    a = credit.continue_from(model, traj.latents[:, S], S, traj.prompts, args, generator=g)
    b = credit.continue_from(model, traj.latents[:, S], S, traj.prompts, args, generator=g)
    assert torch.equal(a, b)
    fresh = credit.continue_from(model, traj.latents[:, 1], 1, traj.prompts, args, generator=g)
    assert (fresh - traj.latents[:, -1]).abs().max() > 1e-2


def test_true_advantage_on_a_hand_built_case():
    """A*_k = V̂(x_{k+1}) − V̂(x_k) from the continuations' rewards, V(x_S) = R; with `own`, R is one more sample of
    V(x_{k+1}) (never of V(x_k)); the A*_k of a trajectory telescope to R − V̂(x_0)."""
    # one trajectory, S = 3, M = 4: V̂(x_0) = 1/4, V̂(x_1) = 3/4, V̂(x_2) = 1/2, R = 1
    samples = torch.tensor([[[0.0, 0, 0, 1], [1, 1, 1, 0], [1, 0, 1, 0]]])
    R = torch.tensor([1.0])
    assert credit.true_advantages(samples, R, own=False).tolist() == [[0.5, -0.25, 0.5]]
    # with R in the targets: V̂(x_1) = (3 + 1)/5, V̂(x_2) = (2 + 1)/5
    torch.testing.assert_close(credit.true_advantages(samples, R), torch.tensor([[0.8 - 0.25, 0.6 - 0.75, 0.5]]))
    assert credit.true_advantages(samples, R, own=False).sum().item() == pytest.approx(1 - 0.25)


def test_branch_estimates_the_value_and_the_oracle_normalises_it_per_step(small):
    """branch: M continuation rewards per state, reproducible from the generator, and every one a reward the
    continuation's image earns; Oracle: Â_k is the group-normalised A*_k of those samples, clipped, 0 after S."""
    args, model = small
    traj, _ = _rollout(args, model)
    reward_fn = vgpo.make_reward(args, model.device)
    metadata = [shapes.METADATA[p] for p in traj.prompts]
    S, m = vgpo.sde_window(args.num_steps, args.sde_steps), 3
    samples = credit.branch(model, traj, metadata, reward_fn, args, m, torch.Generator().manual_seed(1))
    again = credit.branch(model, traj, metadata, reward_fn, args, m, torch.Generator().manual_seed(1))
    assert samples.shape == (len(traj.prompts), S, m) and torch.equal(samples, again)
    assert set(samples.unique().tolist()) <= {0.0, 1.0} and 0 < samples.mean() < 1
    r = vgpo.instant_rewards(model, traj, reward_fn, metadata, previews=False)
    oracle = credit.Oracle(args, m)
    values, weights, adv = oracle(model, traj, metadata, r, traj.group_ids, epoch=3)
    gen = vgpo.distributed.keyed_generator(args.seed, 3, 7919)
    a_star = credit.true_advantages(credit.branch(model, traj, metadata, reward_fn, args, m, gen), r[:, -1])
    want = torch.zeros_like(adv)
    for g in traj.group_ids.unique():
        rows = traj.group_ids == g
        x = a_star[rows]
        want[rows, :S] = (x - x.mean(0)) / (x.std(0, unbiased=False) + 1e-4)
    torch.testing.assert_close(adv, want.clamp(-args.adv_clip_max, args.adv_clip_max))
    assert (adv[:, S:] == 0).all() and (weights == 1).all() and values.shape == r.shape


def test_an_oracle_run_trains_through_vgpos_own_loop(tmp_path):
    """vgpo.train(credit_fn=Oracle): the credit rule replaces vgpo.credit (the logged advantages are the oracle's:
    zero after the window), every trainable weight moves, and the run folder is an ordinary one."""
    from safetensors.torch import load_file

    p = tmp_path / "p.txt"
    p.write_text("\n".join(PROMPTS) + "\n")
    args = vgpo.make_args(model="tiny", algo="grpo", prompts=str(p), prompts_per_epoch=2, num_generations=4,
                          train_batch_size=4, gradient_accumulation_steps=2, num_steps=4, sde_steps=2, epochs=1,
                          eval_steps=3, eval_batch_size=16, output_dir=str(tmp_path / "run"))
    row = vgpo.train(args, credit_fn=credit.Oracle(args, 2))[-1]
    assert row["advantage/mean_abs"][2:] == [0.0, 0.0] and row["advantage/trained_mean_abs"] > 0
    base = shapes.load(shapes.CHECKPOINT)["transformer"]
    trained = load_file(str(tmp_path / "run" / "transformer.safetensors"))
    assert all(not torch.equal(trained[k], v) for k, v in base.named_parameters() if v.requires_grad)


def test_the_credit_command_measures_checks_and_reports(tmp_path, capsys):
    """python -m tools.credit on a small rollout: its checks pass (the continuation reproduces the rollout, x_S is
    deterministic and gives R, the mean V̂ is the mean R within noise), every credit is compared with A*, the
    report and plot are written; bad input is one line and exit code 2."""
    results = tmp_path / "results"
    assert credit.main(["--continuations", "6", "--prompts", "3", "--bootstrap", "20", "--oracle-continuations",
                        "2", "--results", str(results)]) == 0
    d = json.loads((results / "credit-base.json").read_text())
    c = d["checks"]
    assert c["continuation_reproduces_rollout_max_abs"] < 1e-5 and c["from_x_S_max_abs"] == 0
    assert c["from_x_S_reward_equals_R"]
    assert abs(c["mean_V"][0] - c["mean_R"]) < 4 * c["mean_V_se"][0] + 0.05
    assert set(credit.CREDITS) | {"oracle, M = 2"} == set(d["corr_with_A"])
    assert all(len(v["value"]) == d["settings"]["trained_steps"] + 1 for v in d["corr_with_A"].values())
    text = (results / "credit.md").read_text()
    assert "| VGPO |" in text and "What ω does" in text and (results / "credit-truth.png").exists()
    capsys.readouterr()
    assert credit.main(["--continuations", "2"]) == 2
    assert credit.main(["--policy", str(tmp_path / "nowhere")]) == 2
    assert credit.main(["report", "--results", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("tools.credit: error:") for line in err)
