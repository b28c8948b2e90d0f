"""Benchmarks that print their figures (never timed tests).

    python bench.py                     # toy world on this machine: VGPO's epoch time against GRPO's
    python bench.py summarize runs/*    # a Markdown table of finished runs (held-out accuracy, time)

VGPO decodes and scores a preview after every step (T reward calls per image instead of one): this
measures what that costs. Both algorithms run in one process on the same model, interleaved epoch by
epoch on the same prompts (which goes first alternates), after one warm-up epoch each, so that machine
noise hits both alike. Writes the table as JSON (--out).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time

import numpy as np
import torch

import reward
import vgpo


def toy_epoch_time(epochs: int = 6, seed: int = 0) -> dict:
    args = vgpo.make_args(model="tiny", seed=seed)
    model = vgpo.load_model(args)
    reward_fn = reward.REWARDS[args.reward](model.device)
    train_set, _ = vgpo.load_prompts(args)
    rng = np.random.default_rng(seed)
    optimizer = vgpo.make_optimizer(model, args)  # the same optimizer as a training run
    rollout_gen, shuffle_gen = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    rows = {"vgpo": [], "grpo": []}
    for e in range(epochs + 1):  # epoch 0 is the warm-up
        chosen = vgpo.sample_prompts(train_set, args.prompts_per_epoch, rng)
        for algo in (("vgpo", "grpo") if e % 2 == 0 else ("grpo", "vgpo")):
            row = vgpo.train_epoch(model, chosen, dataclasses.replace(args, algo=algo), reward_fn, optimizer,
                                   rollout_gen, shuffle_gen)
            if e > 0:
                rows[algo].append(row)
            print(f"epoch {e} {algo}: {row['time/epoch_s']:.2f} s", flush=True)
    keys = ("time/rollout_s", "time/reward_s", "time/update_s", "time/epoch_s")
    table = {algo: {k: float(np.mean([r[k] for r in rs])) for k in keys} for algo, rs in rows.items()}
    table["vgpo/grpo epoch time"] = table["vgpo"]["time/epoch_s"] / table["grpo"]["time/epoch_s"]
    table["setting"] = {"epochs": epochs, "N": args.prompts_per_epoch * args.num_generations, "T": args.num_steps,
                        "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
                        "date": time.strftime("%Y-%m-%d")}
    return table


def summarize(run_dirs: list[str]) -> str:
    """Markdown table of runs: held-out strict accuracy at epoch 0 and at the end, best, time per epoch."""
    lines = ["| run | algo | seed | epochs | held-out strict, base → final | change | best (epoch) | s/epoch | total min |",
             "|---|---|---|---|---|---|---|---|---|"]
    for d in run_dirs:
        args = json.load(open(f"{d}/args.json"))
        rows = [json.loads(ln) for ln in open(f"{d}/metrics.jsonl")]
        evals = [r for r in rows if "eval/strict_accuracy" in r]
        best = max(evals, key=lambda r: r["eval/strict_accuracy"])
        first, last = evals[0]["eval/strict_accuracy"], evals[-1]["eval/strict_accuracy"]
        per_epoch = np.mean([r["time/epoch_s"] for r in rows if "time/epoch_s" in r])
        total = sum(r.get("time/epoch_s", 0) + r.get("time/eval_s", 0) for r in rows) / 60
        lines.append(f"| {d} | {args['algo']} | {args['seed']} | {rows[-1]['epoch']} | {first:.3f} → {last:.3f} | "
                     f"{last - first:+.3f} | {best['eval/strict_accuracy']:.3f} ({best['epoch']}) | {per_epoch:.1f} | {total:.1f} |")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["summarize"]:
        print(summarize(argv[1:]))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=6, help="timed epochs per algorithm (after one warm-up each)")
    p.add_argument("--out", default="bench-toy.json")
    a = p.parse_args(argv)
    t = toy_epoch_time(a.epochs)
    print(f"\n{'seconds per epoch':18s} {'rollout':>8s} {'reward':>8s} {'update':>8s} {'epoch':>8s}")
    for algo in ("vgpo", "grpo"):
        print(f"{algo:18s} " + " ".join(f"{t[algo][k]:8.2f}" for k in
                                        ("time/rollout_s", "time/reward_s", "time/update_s", "time/epoch_s")))
    print(f"VGPO / GRPO epoch time: {t['vgpo/grpo epoch time']:.3f} (N = {t['setting']['N']}, T = {t['setting']['T']}, "
          f"{t['setting']['threads']} threads)")
    with open(a.out, "w") as f:
        json.dump(t, f, indent=2)


if __name__ == "__main__":
    main()
