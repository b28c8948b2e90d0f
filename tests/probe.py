"""`python tests/probe.py ARGS` is `python vgpo.py ARGS` with one more reward, 'shapes_probe': the shapes reward,
except on the process named by VGPO_PROBE=RANK:ACTION@CALL[,ACTION@CALL...], which at its CALL-th call
(counted from 1) returns NaN rewards (nan), raises (raise) or sends itself SIGTERM (signal). Without VGPO_PROBE it
is the shapes reward. tests/test_distributed.py launches it under torchrun to see how a run of several processes
reacts when one of them meets a NaN, a failure or a signal."""
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import reward  # noqa: E402
import vgpo  # noqa: E402


def shapes_probe(device="cpu"):
    base = reward.shapes_reward(device)
    rank, _, plan = os.environ.get("VGPO_PROBE", "").partition(":")
    actions = {int(call): action for action, _, call in (item.partition("@") for item in plan.split(",") if item)}
    calls = [0]

    def fn(images, prompts, metadata):
        out = base(images, prompts, metadata)
        if os.environ.get("RANK", "0") != rank:
            return out
        calls[0] += 1
        action = actions.get(calls[0])
        if action == "raise":
            raise ValueError(f"probe failure on process {rank}")
        if action == "signal":
            os.kill(os.getpid(), signal.SIGTERM)
        return out * float("nan") if action == "nan" else out

    fn.metrics, fn.check_prompts = base.metrics, base.check_prompts
    return fn


if __name__ == "__main__":
    reward.REWARDS["shapes_probe"] = shapes_probe
    sys.exit(vgpo.main())
