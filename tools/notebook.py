"""Executes tutorial.ipynb headless and saves it with its outputs (the notebook itself is the source: edit it
in Jupyter or any editor, then run this to refresh the outputs that are committed with it).

    python -m tools.notebook                 # execute in full mode and save (≈ 6 min at 1 thread)
    python -m tools.notebook --quick         # quick mode (VGPO_TUTORIAL_QUICK=1): section 5 is a smoke test
    python -m tools.notebook --clear         # save without outputs (e.g. before a review of the cells)
"""
from __future__ import annotations

import argparse
import os
import sys

import nbformat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "tutorial.ipynb")


def clear(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    return nb


def execute(nb: nbformat.NotebookNode, quick: bool, timeout: int = 900, kernel_name: str = "python3"):
    """Run the notebook headless in the repository root with nbclient; quick mode via VGPO_TUTORIAL_QUICK."""
    from nbclient import NotebookClient

    os.environ["VGPO_TUTORIAL_QUICK"] = "1" if quick else "0"  # the kernel inherits this process's environment
    os.environ.pop("MPLBACKEND", None)  # the kernel's inline backend turns figures into PNG outputs
    NotebookClient(clear(nb), timeout=timeout, kernel_name=kernel_name,
                   resources={"metadata": {"path": ROOT}}).execute()
    nb.metadata["vgpo_tutorial_mode"] = "quick" if quick else "full"
    return nb


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="quick mode (VGPO_TUTORIAL_QUICK=1)")
    p.add_argument("--clear", action="store_true", help="do not execute: save the notebook without outputs")
    p.add_argument("--notebook", default=NOTEBOOK, help="the notebook to run (default: tutorial.ipynb)")
    p.add_argument("--output", default=None, help="where to save it (default: in place)")
    a = p.parse_args(argv)
    nb = nbformat.read(a.notebook, as_version=4)
    nb = clear(nb) if a.clear else execute(nb, a.quick)
    out = a.output or a.notebook
    nbformat.write(nb, out)
    print(f"wrote {out} ({os.path.getsize(out) / 1e6:.2f} MB{'' if a.clear else ', executed'})")


if __name__ == "__main__":
    sys.exit(main())
