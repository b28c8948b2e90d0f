"""pytest hook for the tutorial's lab exercises (tutorial.ipynb, section 7).

    VGPO_SOLUTIONS=my_solutions.py python -m pytest -q -k advantage

puts the functions defined in my_solutions.py (under vgpo's names, or with a `my_` prefix) in place of
vgpo's for that pytest run, so the repository's tests check your re-implementation. Without the variable
nothing changes."""
import importlib.util
import os

import pytest

EXERCISES = ("temporal_values", "step_weights", "vgpo_advantages", "grpo_advantages", "sde_step_with_logprob",
             "policy_loss")


def pytest_configure(config):
    path = os.environ.get("VGPO_SOLUTIONS")
    if not path:
        return
    if not os.path.isfile(path):
        raise pytest.UsageError(f"VGPO_SOLUTIONS={path}: no such file")
    spec = importlib.util.spec_from_file_location("vgpo_solutions", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    import vgpo

    found = {name: getattr(module, name, None) or getattr(module, "my_" + name, None) for name in EXERCISES}
    found = {k: v for k, v in found.items() if callable(v)}
    if not found:
        raise pytest.UsageError(f"VGPO_SOLUTIONS={path} defines none of {', '.join(EXERCISES)} (or my_<name>)")
    for name, fn in found.items():
        setattr(vgpo, name, fn)
    config.vgpo_solutions = sorted(found)


def pytest_report_header(config):
    if getattr(config, "vgpo_solutions", None):
        return f"VGPO_SOLUTIONS: testing your {', '.join(config.vgpo_solutions)} in place of vgpo's"
