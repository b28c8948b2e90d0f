"""Tests of the tutorial as a course lab: the student copy (`python -m tools.notebook --student`), its stubs and
checks, the VGPO_SOLUTIONS hook (conftest.py), the lab install, and what the notebook's text says: its numbers, its
run time, its plots. The notebook is executed in the kernel of tests/test_tutorial.py, which sees only what the lab
install installs."""
import ast
import importlib.util
import inspect
import os
import re
import subprocess
import sys

import nbformat
import pytest
import torch

from tests.test_tutorial import NOTEBOOK, ROOT, execute_quick, lab_distributions, lab_kernel  # noqa: F401 (fixture)
from tools import notebook as tool

import vgpo


def teacher():
    return nbformat.read(NOTEBOOK, as_version=4)


def stubbed_functions(nb) -> dict[str, str]:
    """{my_NAME: its def's source} of the solution cells of `nb`."""
    out = {}
    for cell in nb.cells:
        if "solution" in cell.metadata.get("tags", []):
            for node in ast.parse(cell.source).body:
                if isinstance(node, ast.FunctionDef) and node.name.startswith("my_"):
                    out[node.name] = ast.get_source_segment(cell.source, node)
    return out


def module_of(sources: dict[str, str], tmp_path, name="stubs"):
    """The functions `sources` defines, as a module (written to a file and imported: no exec of strings)."""
    path = tmp_path / f"{name}.py"
    path.write_text("import numpy as np\nimport torch\n\n" + "\n\n".join(sources.values()) + "\n")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_student_copy_stubs_have_vgpos_signatures_and_raise_not_implemented(tmp_path):
    """Every exercise function of the student copy is a stub with exactly vgpo's parameters (names, kinds, defaults:
    vgpo's own callers pass them all), its docstring kept, raising NotImplementedError when called."""
    student = tool.student_copy(teacher())
    stubs = stubbed_functions(student)
    assert len(stubs) >= 7, sorted(stubs)
    module = module_of(stubs, tmp_path)
    for name in stubs:
        mine, theirs = getattr(module, name), getattr(vgpo, name[3:])
        assert [(p.name, p.kind, p.default) for p in inspect.signature(mine).parameters.values()] == \
            [(p.name, p.kind, p.default) for p in inspect.signature(theirs).parameters.values()], name
        assert mine.__doc__, name
        with pytest.raises(NotImplementedError):
            mine(*[None] * len([p for p in inspect.signature(mine).parameters.values() if p.default is p.empty]))


def test_the_student_copy_gives_no_answer_away_and_the_teachers_edition_keeps_them():
    """The student copy has no answer or teacher cell, no line of an answer's body, and no output in the exercise
    cells; the committed teacher's edition is unchanged by making it and still has its answers and their outputs."""
    nb = teacher()
    before = nbformat.writes(nb)
    student = tool.student_copy(nb)
    assert nbformat.writes(nb) == before
    assert not [c for c in student.cells if {"answer", "teacher"} & set(c.metadata.get("tags", []))]
    answers = [c for c in nb.cells if "answer" in c.metadata.get("tags", [])]
    assert len(answers) >= 4 and [c for c in nb.cells if "teacher" in c.metadata.get("tags", [])]
    bodies = {line.strip() for src in stubbed_functions(nb).values() for line in src.splitlines()[2:]
              if line.strip() and not line.strip().startswith(('"', "'"))}
    student_code = "\n".join(c.source for c in student.cells if c.cell_type == "code")
    leaked = [line for line in bodies if line in student_code and line != tool.STUB]
    assert not leaked, leaked
    lab = [c for c in student.cells if {"solution", "exercise"} & set(c.metadata.get("tags", []))]
    assert len(lab) >= 9 and not any(c.outputs for c in lab)
    assert all(c.outputs for c in nb.cells if c.cell_type == "code" and "solution" in c.metadata.get("tags", []))
    assert student.metadata["vgpo_tutorial_edition"] == "student"


def pasted(student, tmp_path):
    """The student copy with vgpo's own bodies pasted into the stubs (renamed my_NAME), and the helpers they call
    imported from vgpo into the cell."""
    nb = nbformat.reads(nbformat.writes(student), as_version=4)  # a copy
    for cell in nb.cells:
        if "solution" not in cell.metadata.get("tags", []):
            continue
        tree = ast.parse(cell.source)
        lines = cell.source.splitlines()
        for node in reversed([n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("my_")]):
            name = node.name[3:]
            source = inspect.getsource(getattr(vgpo, name)).replace(f"def {name}(", f"def my_{name}(")
            lines[node.lineno - 1 - len(node.decorator_list) : node.end_lineno] = source.splitlines()
        helpers = "from vgpo import math, _group_normalize, temporal_values, step_weights  # what vgpo's bodies call"
        cell.source = helpers + "\n" + "\n".join(lines)
    return nb


def lab_lines(nb) -> list[str]:
    """The printed lines of `nb`'s code cells (a cell's stream may arrive in several outputs)."""
    return [line for c in nb.cells if c.cell_type == "code"
            for line in "".join(o.get("text", "") for o in c.outputs).splitlines()]


def test_the_student_copy_runs_unanswered_and_passes_with_vgpos_bodies(lab_kernel, tmp_path):
    """Top to bottom in quick mode: unanswered, every check says 'not yet' and every later cell still runs (exercise
    9 trains with vgpo's own functions); with vgpo's bodies pasted into the stubs every check matches and exercise 9
    trains with all of them."""
    student = tool.student_copy(teacher())
    checks = len(stubbed_functions(student))
    ran = execute_quick(student, lab_kernel)
    out = lab_lines(ran)
    assert sum(": not yet" in line for line in out) >= checks, out
    assert not [line for line in out if "matches vgpo" in line or "differs" in line or "raised" in line]
    assert any("none yet: this run uses vgpo's own" in line for line in out)
    assert any(line.startswith("notebook ran in") for line in out)

    ran = execute_quick(pasted(student, tmp_path), lab_kernel)
    out = lab_lines(ran)
    assert sum("matches vgpo." in line for line in out) == checks, out
    assert not [line for line in out if "not yet" in line or "differs" in line or "raised" in line], out
    assert any(line.startswith("your functions in this run: preview, temporal_values") for line in out), out
    assert any("reproduces the rollout's previews" in line for line in out), out


def test_tools_notebook_writes_the_student_copy_and_bad_input_is_one_line_exit_2(tmp_path, capsys):
    out = tmp_path / "lab.ipynb"
    assert tool.main(["--student", str(out)]) == 0
    assert nbformat.read(str(out), as_version=4).metadata["vgpo_tutorial_edition"] == "student"
    capsys.readouterr()
    own = tmp_path / "tutorial.ipynb"  # a copy: were the check broken, the committed notebook would be overwritten
    own.write_text(open(NOTEBOOK, encoding="utf-8").read(), encoding="utf-8")
    for argv, needle in [(["--notebook", str(own), "--student", str(own)], "teacher's edition"),
                         (["--student", str(tmp_path / "no" / "lab.ipynb")], "no folder"),
                         (["--student", str(out), "--quick"], "give one of them"),
                         (["--notebook", str(tmp_path / "none.ipynb")], "no such file"),
                         (["--measure", "--output", str(out)], "--output"), (["--nope"], "--help")]:
        assert tool.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and needle in err and "Traceback" not in err, (argv, err)


def solutions_header(tmp_path, source: str):
    """pytest's report header (or its usage error) with VGPO_SOLUTIONS set to a file holding `source`."""
    path = tmp_path / "my_solutions.py"
    path.write_text(source)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only",
                           "-k", "temporal_values", "test_vgpo.py"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "VGPO_SOLUTIONS": str(path)}, timeout=120)
    return proc.returncode, proc.stdout + proc.stderr


def test_vgpo_solutions_leaves_unwritten_stubs_out_and_refuses_another_signature(tmp_path):
    """conftest.py: a stub still raising NotImplementedError keeps vgpo's function (the others are tested); a
    function without vgpo's parameters (here the SDE step without `noise`) is refused with a one-line usage error."""
    code, out = solutions_header(tmp_path, "import vgpo\n\ndef my_temporal_values(rewards, gamma):\n"
                                 "    return 1.0 * vgpo.temporal_values(rewards, gamma)\n\n"
                                 "def my_policy_loss(log_probs, log_probs_old, advantages, clip_range, kl=None,\n"
                                 '                   beta=0.0):\n    "the clipped loss"\n'
                                 "    raise NotImplementedError  # your code here\n")
    assert code == 0, out
    assert "testing your temporal_values in place of vgpo's; not written yet, so vgpo's own: policy_loss" in out, out
    code, out = solutions_header(tmp_path, "def my_sde_step_with_logprob(velocity, sample, sigma, sigma_next, "
                                 "noise_level, prev_sample=None, generator=None):\n    return 0\n")
    assert code == 4 and "must take vgpo.sde_step_with_logprob's parameters" in out and "noise=None" in out, out
    code, out = solutions_header(tmp_path, "def my_step_weights(values):\n    raise NotImplementedError()\n")
    assert code == 4 and "still raising NotImplementedError: step_weights" in out, out


def test_preview_recovers_the_clean_sample_when_the_velocity_is_exact():
    """Eq. 9 against its analytic case (exercise 1): for one data point x0 and noise ε the flow's state at σ is
    x = (1 − σ)·x0 + σ·ε and its velocity is exactly ε − x0, so the preview x − σ·v is x0 at every σ."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 16, 4, 4, generator=g), torch.randn(3, 16, 4, 4, generator=g)
    for sigma in (1.0, 0.7, 0.1):
        x = (1 - sigma) * x0 + sigma * eps
        torch.testing.assert_close(vgpo.preview(x, sigma, eps - x0), x0, atol=1e-6, rtol=0)


def normalised(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("**", ""))


def test_the_run_time_is_quoted_the_same_everywhere():
    """One run-time sentence (tools.notebook.RUN_TIME) for full and quick mode: in tools/notebook.py's docstring,
    the README and the notebook's introduction, word for word; once measured (it has digits), in results/RESULTS.md
    too, with its command."""
    sentence = normalised(tool.RUN_TIME)
    intro = normalised("\n".join(c.source for c in teacher().cells[:4] if c.cell_type == "markdown"))
    readme = normalised(open(os.path.join(ROOT, "README.md"), encoding="utf-8").read())
    assert sentence in normalised(tool.__doc__) and sentence in intro and sentence in readme
    assert len(re.findall(r"[Rr]un time", intro)) == 1 and "full" in sentence and "quick mode" in sentence
    if re.search(r"\d", sentence):
        assert sentence in normalised(open(os.path.join(ROOT, "results", "RESULTS.md"), encoding="utf-8").read())
        assert "python -m tools.notebook --measure" in open(os.path.join(ROOT, "results", "RESULTS.md")).read()


# Numbers the text may quote that are not measurements of this project: PPO's usual clip range, and the paper's
# reported SD3.5-M results (base → Flow-GRPO → VGPO on GenEval, OCR and PickScore), quoted as the paper's.
NOT_OURS = {"0.2", "0.63", "0.95", "0.96", "0.59", "0.92", "0.94", "21.72", "23.31", "23.41"}


def decimals(text: str) -> list[str]:
    """The decimal numbers of `text` (signs aside), outside code spans and LaTeX."""
    text = re.sub(r"`[^`]*`|\$\$.*?\$\$|\$[^$]*\$|arXiv\s+\d+\.\d+", " ", text, flags=re.S)  # arXiv ids aside
    return re.findall(r"(?<![\w.])\d+\.\d+(?![\d.]*\d)", text)


def results_numbers() -> set[str]:
    found = set()
    for name in os.listdir(os.path.join(ROOT, "results")):
        if name.endswith(".md"):
            found |= set(re.findall(r"\d+\.\d+", open(os.path.join(ROOT, "results", name), encoding="utf-8").read()))
    return found


def settings_numbers() -> set[str]:
    """Every float setting of the toy preset and SD3.5's, as the text writes it (0.9, 0.7, …)."""
    values = {v for m in ("tiny", "sd3.5") for v in vars(vgpo.make_args(model=m)).values() if isinstance(v, float)}
    return {f"{v:g}" for v in values} | {f"{v:.1f}" for v in values}


def quoted_but_not_measured(text: str) -> list[str]:
    measured = results_numbers()
    rounded = {f"{float(x):.{d}f}" for x in measured for d in (1, 2, 3)}  # 0.280 in results/ may be written 0.28
    return [x for x in decimals(text) if x not in measured | rounded | settings_numbers() | NOT_OURS]


def test_every_number_in_the_notebooks_text_and_the_readmes_results_comes_from_results():
    """Each decimal number in the notebook's markdown and in the README's Results and Tutorial sections is in a
    results/*.md file (or is one of its numbers rounded), a setting of vgpo.py, or a number the text says is not
    ours."""
    text = "\n".join(c.source for c in teacher().cells if c.cell_type == "markdown")
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    results = readme[readme.index("## Results"): readme.index("## Checkpoints")]
    assert len(decimals(text)) > 40 and len(decimals(results)) > 40
    assert not quoted_but_not_measured(text), quoted_but_not_measured(text)
    assert not quoted_but_not_measured(results), quoted_but_not_measured(results)
    assert quoted_but_not_measured("VGPO scored 0.8123 here") == ["0.8123"]  # the test can fail


def test_the_lab_install_is_what_the_notebook_needs_pinned_as_the_repository():
    """requirements-lab.txt: each package pinned or bounded exactly as requirements.txt, without the OCR engine,
    the SD3 path's libraries, the notebook runner or the test runner (the kernel of the notebook tests sees only what
    it installs, and torch: tests/test_tutorial.py)."""
    def reqs(name):
        lines = open(os.path.join(ROOT, name), encoding="utf-8").read().splitlines()
        return {re.split(r"[=<>]", ln)[0].strip(): ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")}

    lab, full = reqs("requirements-lab.txt"), reqs("requirements.txt")
    assert lab and all(full[name] == line for name, line in lab.items()), (lab, full)
    assert not set(lab) & {"torch", "transformers", "peft", "accelerate", "rapidocr-onnxruntime", "onnxruntime",
                           "nbformat", "nbclient", "ipykernel", "pytest"}
    assert {"diffusers", "numpy", "matplotlib"} <= set(lab)
    allowed = lab_distributions()
    assert {"diffusers", "torch", "ipykernel", "huggingface-hub"} <= allowed
    assert not allowed & {"transformers", "peft", "rapidocr-onnxruntime", "nbclient"}


def test_the_notebooks_figures_are_at_most_10_inches_wide():
    """Every matplotlib figure in the committed notebook is ≤ 10 in wide at the notebook's 90 dpi (the images
    loaded from results/ are shown at the notebook's width)."""
    sizes = [re.search(r"<Figure size (\d+(?:\.\d+)?)x", o["data"]["text/plain"]) for c in teacher().cells
             if c.cell_type == "code" for o in c.outputs if "text/plain" in o.get("data", {})]
    widths = [float(m.group(1)) / 90 for m in sizes if m]
    assert len(widths) >= 9 and max(widths) <= 10.0 + 1e-6, widths
