"""pytest hook for the tutorial's lab exercises (tutorial.ipynb, section 8, which lists them).

    VGPO_SOLUTIONS=my_solutions.py python -m pytest -q -k advantage

puts the functions defined in my_solutions.py under one of vgpo's function names (or that name with a `my_`
prefix) in place of vgpo's for that pytest run, so the repository's tests check your re-implementation. A function
whose body is still only `raise NotImplementedError` (an exercise not done yet) is left out, and vgpo's own stays;
a function whose parameters differ from vgpo's is refused, since vgpo's callers pass every argument by name or
position. Without the variable nothing changes. (At the repository root, this file also puts the root on sys.path
for the tests in tests/, and hides any GPU from the tests: see below.)"""
import ast
import importlib.util
import inspect
import os
import textwrap

import pytest

# The tests are CPU tests: bitwise reproducibility, and comparisons with the stock pipeline in fp32 at 1e-4. On a
# machine with a GPU, `--device auto` would move their models there (bf16 on SD3); hiding the GPU before torch first
# looks for one pins every test and every process it starts to the CPU. A GPU's own check: python -m tools.bench --smoke
os.environ["CUDA_VISIBLE_DEVICES"] = ""


def not_written_yet(fn) -> bool:
    """True for a function whose body, its docstring aside, is only `raise NotImplementedError[(…)]`: a lab stub."""
    node = ast.parse(textwrap.dedent(inspect.getsource(fn))).body[0]
    body = node.body[1:] if ast.get_docstring(node) is not None else node.body
    raised = body[0].exc if len(body) == 1 and isinstance(body[0], ast.Raise) else None
    return raised is not None and "NotImplementedError" in ast.unparse(raised)


def parameters(fn) -> list:
    """What callers rely on: each parameter's name, kind and default (annotations aside)."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def pytest_configure(config):
    # tests/test_distributed.py: runs of two processes under torchrun (`-m distributed`, or `-m "not distributed"`)
    config.addinivalue_line("markers", "distributed: launches runs of several processes with torchrun (gloo, CPU)")
    path = os.environ.get("VGPO_SOLUTIONS")
    if not path:
        return
    if not os.path.isfile(path):
        raise pytest.UsageError(f"VGPO_SOLUTIONS={path}: no such file")
    spec = importlib.util.spec_from_file_location("vgpo_solutions", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    import vgpo

    # only what the file itself defines: a name it imported (e.g. `from vgpo import update`) is vgpo's own
    own = {name: fn for name, fn in vars(module).items()
           if inspect.isfunction(fn) and fn.__module__ == module.__name__}
    found, stubs = {}, []
    for name, fn in sorted(own.items(), key=lambda item: not item[0].startswith("my_")):  # NAME beats my_NAME
        target = name[3:] if name.startswith("my_") else name
        theirs = getattr(vgpo, target, None)
        if not (inspect.isfunction(theirs) and theirs.__module__ == "vgpo"):
            continue
        if not_written_yet(fn):
            stubs.append(target)
            continue
        if parameters(fn) != parameters(theirs):
            raise pytest.UsageError(f"VGPO_SOLUTIONS={path}: {name}{inspect.signature(fn)} must take vgpo.{target}'s "
                                    f"parameters {inspect.signature(theirs)}: vgpo's callers pass them")
        found[target] = fn
    if not found:
        raise pytest.UsageError(
            f"VGPO_SOLUTIONS={path} defines no written function named as one of vgpo's (e.g. vgpo_advantages or "
            f"my_vgpo_advantages)" + (f"; still raising NotImplementedError: {', '.join(stubs)}" if stubs else ""))
    for name, fn in found.items():
        setattr(vgpo, name, fn)
    config.vgpo_solutions = sorted(found), sorted(set(stubs) - set(found))


def pytest_report_header(config):
    if getattr(config, "vgpo_solutions", None):
        yours, stubs = config.vgpo_solutions
        return (f"VGPO_SOLUTIONS: testing your {', '.join(yours)} in place of vgpo's"
                + (f"; not written yet, so vgpo's own: {', '.join(stubs)}" if stubs else ""))
