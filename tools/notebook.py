"""Executes tutorial.ipynb headless and saves it with its outputs, and writes the lab's student copy. The notebook is
the source: edit it in Jupyter or any editor, then run this to refresh the outputs committed with it.

    python -m tools.notebook                      # execute the teacher's edition in full mode, save it in place
    python -m tools.notebook --quick              # quick mode (VGPO_TUTORIAL_QUICK=1): smaller demos and training run
    python -m tools.notebook --student lab.ipynb  # the student copy: the answers become stubs, answer cells go
    python -m tools.notebook --measure            # time both modes at one thread; writes nothing in the repository
    python -m tools.notebook --clear              # save without outputs (e.g. before a review of the cells)

Run time: full mode 1 min 5 s, quick mode 24 s, at one thread on a 2-core CPU where an epoch of the toy preset
takes 4.7 s.

The committed tutorial.ipynb is the teacher's edition. Its cells carry tags that the student copy follows:
`solution` (a code cell whose `def my_…` functions get their bodies replaced by `raise NotImplementedError`, the
signature and docstring kept, and its outputs cleared), `exercise` (a code cell whose outputs are cleared: they would
give an answer away), `answer` and `teacher` (markdown cells left out).
"""
from __future__ import annotations

import ast
import copy
import datetime
import os
import re
import sys
import tempfile
import time

import nbformat

import harness

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "tutorial.ipynb")

# The notebook's run time, in the same words here, in the docstring above, in README.md and in the notebook's
# introduction (tests/test_lab.py checks it). `python -m tools.notebook --measure` prints the sentence to put here.
RUN_TIME = ("Run time: full mode 1 min 5 s, quick mode 24 s, at one thread on a 2-core CPU where an epoch "
            "of the toy preset takes 4.7 s.")

STUB = "raise NotImplementedError  # your code here"


def clear(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    return nb


def execute(nb: nbformat.NotebookNode, quick: bool, timeout: int = 900, kernel_name: str = "python3"):
    """Run the notebook headless in the repository root with nbclient; quick mode via VGPO_TUTORIAL_QUICK. Returns
    the notebook and the seconds each section took ({'setup': s, '1': s, …}, from nbclient's cell timings)."""
    from nbclient import NotebookClient

    os.environ["VGPO_TUTORIAL_QUICK"] = "1" if quick else "0"  # the kernel inherits this process's environment
    os.environ.pop("MPLBACKEND", None)  # the kernel's inline backend turns figures into PNG outputs
    NotebookClient(clear(nb), timeout=timeout, kernel_name=kernel_name, record_timing=True,
                   resources={"metadata": {"path": ROOT}}).execute()
    nb.metadata["vgpo_tutorial_mode"] = "quick" if quick else "full"
    return nb, section_seconds(nb)


def section_seconds(nb: nbformat.NotebookNode) -> dict[str, float]:
    """Seconds of execution per section ('## N.' headings; 'setup' before the first), from the timing metadata
    nbclient records, which is then removed: it would change the committed file on every run."""
    out, section = {}, "setup"
    for cell in nb.cells:
        if cell.cell_type == "markdown" and re.match(r"## \d+\.", cell.source):
            section = cell.source[3:].split(".")[0]
        timing = cell.metadata.pop("execution", None)
        if timing and "iopub.execute_input" in timing and "shell.execute_reply" in timing:
            start, end = (datetime.datetime.fromisoformat(timing[k].replace("Z", "+00:00"))
                          for k in ("iopub.execute_input", "shell.execute_reply"))
            out[section] = out.get(section, 0.0) + (end - start).total_seconds()
    return out


def stub(source: str) -> str:
    """`source` with the body of every top-level `def my_…` replaced by STUB (its signature and docstring kept)."""
    lines = source.splitlines()
    functions = [n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name.startswith("my_")]
    for node in reversed(functions):  # from the bottom, so that earlier line numbers stay valid
        has_doc = ast.get_docstring(node) is not None
        first = node.body[0].end_lineno + 1 if has_doc else node.body[0].lineno
        indent = " " * node.body[0].col_offset
        lines[first - 1 : node.end_lineno] = [indent + STUB]
    return "\n".join(lines)


def student_copy(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """The lab's student copy of the teacher's edition `nb` (unchanged): see the module's docstring."""
    nb = copy.deepcopy(nb)
    cells = []
    for cell in nb.cells:
        tags = set(cell.metadata.get("tags", []))
        if tags & {"answer", "teacher"}:
            continue
        if "solution" in tags:
            cell.source = stub(cell.source)
        if cell.cell_type == "code" and tags & {"solution", "exercise"}:
            cell.outputs, cell.execution_count = [], None
        cells.append(cell)
    nb.cells = cells
    nb.metadata["vgpo_tutorial_edition"] = "student"
    return nb


def duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"


def epoch_seconds(epochs: int = 3) -> float:
    """The median wall time of an epoch of the toy preset (16 prompts × 8), at this process's thread count."""
    import numpy as np

    import vgpo

    args = vgpo.make_args(model="tiny")
    model = vgpo.load_model(args)
    reward_fn, optimizer = vgpo.make_reward(args, model.device), vgpo.make_optimizer(model, args)
    rng = np.random.default_rng(0)
    train_set = vgpo.load_prompts(args)[0]
    times = []
    for epoch in range(1, epochs + 1):
        chosen = vgpo.sample_prompts(train_set, args.prompts_per_epoch, rng)
        t0 = time.time()
        vgpo.train_epoch(model, chosen, args, reward_fn, optimizer, epoch)
        times.append(time.time() - t0)
    return float(np.median(times))


def measure(notebook: str) -> str:
    """Executes `notebook` in full and in quick mode at one thread (into a temporary folder) and times an epoch of
    the toy preset; prints the sections' seconds and returns the RUN_TIME sentence."""
    os.environ["OMP_NUM_THREADS"] = "1"  # the kernels inherit it; the notebook sets torch's threads from it
    import torch

    torch.set_num_threads(1)
    wall = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("full", "quick"):
            nb = nbformat.read(notebook, as_version=4)
            t0 = time.time()
            nb, sections = execute(nb, quick=mode == "quick")
            wall[mode] = time.time() - t0
            nbformat.write(nb, os.path.join(tmp, f"{mode}.ipynb"))
            print(f"{mode} mode: {wall[mode]:.0f} s wall; seconds per section: "
                  + ", ".join(f"{k} {v:.0f}" for k, v in sections.items()))
    epoch = epoch_seconds()
    return (f"Run time: full mode {duration(wall['full'])}, quick mode {duration(wall['quick'])}, at one thread on a "
            f"{os.cpu_count()}-core CPU where an epoch of the toy preset takes {epoch:.1f} s.")


def main(argv=None) -> int:
    p = harness.Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="quick mode (VGPO_TUTORIAL_QUICK=1)")
    p.add_argument("--clear", action="store_true", help="do not execute: save the notebook without outputs")
    p.add_argument("--student", metavar="OUT", help="write the student copy of the teacher's edition to OUT")
    p.add_argument("--measure", action="store_true", help="time full and quick mode at one thread; print RUN_TIME")
    p.add_argument("--notebook", default=NOTEBOOK, help="the notebook to read (default: tutorial.ipynb)")
    p.add_argument("--output", default=None, help="where to save the executed notebook (default: in place)")
    try:
        a = p.parse_args(argv)
        chosen = [flag for flag, on in (("--student", a.student), ("--measure", a.measure), ("--clear", a.clear),
                                        ("--quick", a.quick)) if on]
        if len(chosen) > 1:
            raise harness.UsageError(f"{' and '.join(chosen)}: give one of them")
        if a.output and (a.student or a.measure):
            raise harness.UsageError(f"--output: {chosen[0]} writes no executed notebook")
        if not os.path.isfile(a.notebook):
            raise harness.UsageError(f"--notebook {a.notebook}: no such file")
        if a.student:
            out = os.path.abspath(a.student)
            if out == os.path.abspath(a.notebook):
                raise harness.UsageError(f"--student {a.student}: that is the teacher's edition; name another file")
            if not os.path.isdir(os.path.dirname(out)):
                raise harness.UsageError(f"--student {a.student}: no folder {os.path.dirname(out)}")
    except harness.UsageError as e:
        print(f"tools.notebook: error: {e}", file=sys.stderr)
        return 2
    nb = nbformat.read(a.notebook, as_version=4)
    if a.measure:
        print(f'RUN_TIME = "{measure(a.notebook)}"\n(put it in tools/notebook.py, its docstring, README.md and '
              "the notebook's introduction, with a dated entry in results/RESULTS.md)")
        return 0
    if a.student:
        nbformat.write(student_copy(nb), a.student)
        print(f"wrote {a.student}: the student copy of {os.path.relpath(a.notebook)}")
        return 0
    t0 = time.time()
    if a.clear:
        nb = clear(nb)
    else:
        nb, sections = execute(nb, a.quick)
        print("seconds per section: " + ", ".join(f"{k} {v:.0f}" for k, v in sections.items()))
    out = a.output or a.notebook
    nbformat.write(nb, out)
    ran = "" if a.clear else f", executed in {time.time() - t0:.0f} s"
    print(f"wrote {out} ({os.path.getsize(out) / 1e6:.2f} MB{ran})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
