"""Tests of tutorial.ipynb (executed headless in quick mode, in a kernel that sees only what the lab install installs),
its lab exercises, and tools/experiments.py."""
import ast
import glob
import importlib.metadata
import importlib.util
import inspect
import json
import os
import re
import subprocess
import sys

import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "tutorial.ipynb")


def _pngs(cell):
    return sum("image/png" in o.get("data", {}) for o in cell.get("outputs", []))


def _pngs_by_section(nb):
    """{section number: PNG outputs in that section}, sections being the '## N.' markdown headings."""
    counts, section = {}, 0
    for cell in nb.cells:
        if cell.cell_type == "markdown" and re.match(r"## \d+\.", cell.source):
            section = int(cell.source[3:].split(".")[0])
        counts[section] = counts.get(section, 0) + (_pngs(cell) if cell.cell_type == "code" else 0)
    return counts


def lab_distributions() -> set[str]:
    """The distributions a lab machine has: what `pip install -r requirements-lab.txt` installs, torch (installed
    on its own, README), and a Jupyter kernel (ipykernel); each with everything it requires, by installed metadata."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    lines = open(os.path.join(ROOT, "requirements-lab.txt"), encoding="utf-8").read().splitlines()
    todo = [Requirement(ln).name for ln in lines if ln.strip() and not ln.startswith("#")] + ["torch", "ipykernel"]
    seen = set()
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:  # not installed here: nothing of it can be imported either
            continue
        for line in requires:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


@pytest.fixture(scope="module")
def lab_kernel(tmp_path_factory):
    """A kernelspec for this interpreter that sees only the lab's distributions: a folder of links to their files
    is its whole site-packages (python -S skips the real one), so an import of anything else fails in it."""
    from packaging.utils import canonicalize_name

    tmp = tmp_path_factory.mktemp("lab")
    site = tmp / "site-packages"
    site.mkdir()
    allowed = lab_distributions()
    for dist in importlib.metadata.distributions():
        if canonicalize_name(dist.metadata["Name"]) not in allowed:
            continue
        for top in {f.parts[0] for f in dist.files or [] if f.parts and f.parts[0] != ".."}:
            src, dst = dist.locate_file(top), site / top
            if os.path.exists(src) and not dst.exists():
                dst.symlink_to(src)
    spec = tmp / "kernels" / "vgpo-lab"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-S", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "vgpo lab", "language": "python", "env": {"PYTHONPATH": str(site)}}))
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = str(tmp)
    yield "vgpo-lab"
    if old is None:
        os.environ.pop("JUPYTER_PATH", None)
    else:
        os.environ["JUPYTER_PATH"] = old


def execute_quick(nb, kernel_name):
    """`nb` executed top to bottom in quick mode at the suite's thread count, in the repository root."""
    from nbclient import NotebookClient

    env = {"VGPO_TUTORIAL_QUICK": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    saved = {k: os.environ.get(k) for k in (*env, "MPLBACKEND")}
    os.environ.update(env)
    os.environ.pop("MPLBACKEND", None)  # the kernel's inline backend turns figures into PNG outputs
    try:
        for cell in nb.cells:
            if cell.cell_type == "code":
                cell.outputs = []
        NotebookClient(nb, timeout=300, kernel_name=kernel_name, resources={"metadata": {"path": ROOT}}).execute()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb


def test_notebook_runs_in_quick_mode_with_only_the_lab_install_and_draws_its_plots(lab_kernel):
    """The committed tutorial.ipynb executes without error in quick mode in a kernel that can import only what the
    lab install installs (so the notebook imports nothing more); every section draws a plot, and every exercise of
    the teacher's edition matches vgpo's."""
    nb = execute_quick(nbformat.read(NOTEBOOK, as_version=4), lab_kernel)
    counts = _pngs_by_section(nb)
    assert all(counts.get(s, 0) >= 1 for s in (1, 2, 3, 4, 5, 6, 8)), counts  # 7, SD3.5, prints settings
    assert counts[4] >= 1 and counts[6] >= 2 and counts[8] >= 1, counts
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "mode: quick" in text
    assert text.count("matches vgpo.") == len(exercises()) and "not yet" not in text and "differs" not in text


def test_the_lab_kernel_cannot_import_what_the_lab_install_lacks(lab_kernel):
    """The restricted kernel of these tests is restricted: the OCR engine and the notebook runner are installed here
    but not importable there, while torch and diffusers are."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "import importlib.util\nprint([importlib.util.find_spec(m) is not None for m in "
        "('torch', 'diffusers', 'rapidocr_onnxruntime', 'nbclient', 'transformers')])")])
    assert importlib.util.find_spec("nbclient") and importlib.util.find_spec("rapidocr_onnxruntime")
    out = execute_quick(nb, lab_kernel).cells[0].outputs[0]["text"]
    assert out.strip() == "[True, True, False, False, False]", out


def test_committed_notebook_is_executed_small_with_plots_and_redefines_nothing():
    """tutorial.ipynb was executed top to bottom in one kernel in full mode (execution counts 1…n, no error output;
    refresh it with `python -m tools.notebook`), has its plots, is ≤ 2 MB and defines no function of the library."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), "python -m tools.notebook"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    assert nb.metadata.get("vgpo_tutorial_mode") == "full"
    assert os.path.getsize(NOTEBOOK) <= 2_000_000
    assert sum(_pngs(c) for c in code) >= 10
    import harness, recovery, reward, shapes, vgpo

    library = {n for m in (vgpo, harness, recovery, shapes, reward) for n in dir(m)
               if callable(getattr(m, n)) and not n.startswith("_")}
    defined = {node.name for c in nb.cells if c.cell_type == "code"
               for node in ast.walk(ast.parse(c.source)) if isinstance(node, ast.FunctionDef)}
    assert not defined & library, defined & library


def _tests_by_name():
    """{'file::test_name': source} of every test function in the suite."""
    out = {}
    for path in glob.glob(os.path.join(ROOT, "test_*.py")) + glob.glob(os.path.join(ROOT, "tests", "test_*.py")):
        src = open(path).read()
        for node in ast.parse(src).body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test"):
                out[f"{os.path.basename(path)}::{node.name}"] = ast.get_source_segment(src, node)
    return out


def exercises() -> list[tuple[str, str]]:
    """(function, pytest -k selector) of each lab exercise, as the notebook's lab section lists them."""
    section = next(c.source for c in nbformat.read(NOTEBOOK, as_version=4).cells
                   if c.cell_type == "markdown" and re.match(r"## \d+\. Lab exercises", c.source))
    return re.findall(r'^- `(\w+)`: `VGPO_SOLUTIONS=my_solutions.py python -m pytest -q -k "([^"]+)"`$', section, re.M)


def test_the_notebook_lists_an_exercise_for_each_function_it_asks_for():
    """Each 'def my_NAME' cell of the lab section has its line in the exercise list, and each listed name is vgpo's."""
    import vgpo

    nb = nbformat.read(NOTEBOOK, as_version=4)
    asked = {node.name[3:] for c in nb.cells if c.cell_type == "code" for node in ast.walk(ast.parse(c.source))
             if isinstance(node, ast.FunctionDef) and node.name.startswith("my_")}
    listed = [f for f, _ in exercises()]
    assert asked and sorted(listed) == sorted(asked), (asked, listed)
    assert all(getattr(vgpo, f).__module__ == "vgpo" for f in listed)


@pytest.mark.parametrize("function, selector", exercises())
def test_each_exercise_selector_selects_tests_that_call_the_function(function, selector):
    """The `pytest -k` selector the notebook gives for an exercise selects tests, and one of them calls the function."""
    from _pytest.mark.expression import Expression

    expr = Expression.compile(selector)
    chosen = {n: s for n, s in _tests_by_name().items() if expr.evaluate(lambda sub: sub.lower() in n.lower())}
    assert chosen, selector
    assert any(f"vgpo.{function}(" in s for s in chosen.values()), (function, sorted(chosen))


# A wrong answer to each exercise: vgpo's own function (same parameters), its result moved a little
WRONG = {"sde_step_with_logprob": "(out[0], out[1] + 0.01, out[2], out[3])", "policy_loss": "(1.01 * out[0], out[1])"}


@pytest.mark.parametrize("function, selector", exercises())
def test_a_wrong_solution_fails_the_exercise_tests(tmp_path, function, selector):
    """VGPO_SOLUTIONS puts the learner's function in place of vgpo's: a slightly wrong one fails the exercise's
    tests."""
    import vgpo

    wrong = tmp_path / "my_solutions.py"
    wrong.write_text(f"import vgpo\n_right = vgpo.{function}\n\n"
                     f"def my_{function}{inspect.signature(getattr(vgpo, function))}:\n"
                     f"    out = _right(**dict(locals()))\n    return {WRONG.get(function, '1.01 * out + 0.01')}\n")
    env = {**os.environ, "VGPO_SOLUTIONS": str(wrong)}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-k", selector, "test_vgpo.py",
                           "tests/test_lab.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "failed" in proc.stdout, proc.stdout[-2000:]
    assert f"testing your {function} in place" in proc.stdout


SMALL = ["--set", "prompts_per_epoch=2", "--set", "num_generations=4", "--set", "train_batch_size=4",
         "--set", "gradient_accumulation_steps=2", "--set", "num_steps=4", "--set", "eval_steps=3",
         "--set", "eval_batch_size=16"]


def test_experiments_run_in_shards_score_summarise_and_skip_finished_runs(tmp_path, capsys):
    """tools/experiments.py: two shards run the plan between them (each run once), every final policy is scored
    under the three evaluation-noise seeds (the first is the run's own last evaluation, the others new ones), the
    table quotes those scores, finished runs are skipped, and the archive in results/ alone (the run folders gone)
    gives the same summary."""
    from tools import experiments

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\ntwo blue squares\na circle left of a square\n")
    argv = ["--only", "main", "--epochs", "2", "--eval-every", "1", "--seeds", "1", "--set", f"prompts={prompts}",
            *SMALL, "--set", "eval_steps=20",  # images the verifier can pass, so noise seeds differ
            "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "results")]
    assert experiments.main(["run", *argv, "--shard", "0/2"]) == 0
    assert "3 runs planned for this shard, 0 already finished, 3 to run" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "runs")) == ["grpo-e2-s0", "vgpo-anchor_coef=0.0-e2-s0",
                                                     "vgpo-step_weights=False-e2-s0"]  # its half
    assert experiments.main(["run", *argv, "--shard", "1/2"]) == 0
    assert "2 runs planned for this shard, 0 already finished, 2 to run" in capsys.readouterr().out
    folder = tmp_path / "runs" / "grpo-e2-s0"
    rows = [json.loads(ln) for ln in (folder / "metrics.jsonl").open()]
    scored = json.loads((folder / "eval_seeds.json").read_text())
    assert scored["per_seed"][0] == rows[-1]["eval/strict_accuracy"] and len(scored["per_seed"]) == 3
    assert len(set(scored["per_seed"])) > 1, scored  # three different noise draws
    assert scored["strict_accuracy"] == pytest.approx(sum(scored["per_seed"]) / 3)
    import harness
    import shapes
    import vgpo

    args = vgpo.Args(**{k: v for k, v in json.loads((folder / "args.json").read_text()).items()
                        if k in vgpo.Args.__dataclass_fields__})
    model = vgpo.load_model(args)
    harness.init_from(model, str(folder))
    again = vgpo.evaluate(model, args, seed=shapes.EVAL_SEEDS[2])["eval/strict_accuracy"]
    assert scored["per_seed"][2] == pytest.approx(again)  # the third seed's evaluation of the saved policy
    assert experiments.main(["summarise", *argv]) == 0
    capsys.readouterr()
    table = (tmp_path / "results" / "experiments.md").read_text()
    assert f"| grpo | 1 | **{scored['strict_accuracy']:.3f}** |" in table
    assert (tmp_path / "results" / "main.png").exists()
    assert "| temporal values (ω and previews) |" in table and "| the anchor (κ·Q̄) |" in table  # the 2 × 2
    assert "| no-step-weights | 1 |" in table and "Preview agreement" in table
    late = [r["eval/strict_accuracy"] for r in rows if r["epoch"] in (1, 2)]  # the second half's evaluations
    assert "each run's evaluations at epochs 1, 2 (first" in table
    assert f"| grpo | {sum(late) / len(late):.3f} |  | " in table
    archived = json.loads((tmp_path / "results" / "experiments-runs.json").read_text())
    assert archived["grpo-e2-s0"]["score"] == scored and len(archived["grpo-e2-s0"]["rows"]) == len(rows)
    assert experiments.main(["run", *argv]) == 0
    assert "5 runs planned, 5 already finished, 0 to run" in capsys.readouterr().out
    import shutil

    shutil.rmtree(tmp_path / "runs")  # the summary from the archive alone
    os.remove(tmp_path / "results" / "experiments.md")
    assert experiments.main(["summarise", *argv]) == 0
    assert (tmp_path / "results" / "experiments.md").read_text() == table
    assert experiments.main(["summarise", "--only", "nope"]) == 2
    assert experiments.main(["run", "--shard", "2/2"]) == 2


def test_experiments_halves_are_the_2x2_differences_paired_by_seed():
    """tools.experiments.halves: temporal values' effect is temporal-only − GRPO (anchor off) and VGPO − anchor-only
    (anchor on); the anchor's is anchor-only − GRPO and VGPO − temporal-only; only seeds every arm has count."""
    from tools import experiments

    final = {"grpo": {0: 0.60, 1: 0.62, 2: 0.9}, "vgpo": {0: 0.61, 1: 0.66},
             "temporal-only": {0: 0.59, 1: 0.63}, "anchor-only": {0: 0.65, 1: 0.64}}
    got = experiments.halves(final)
    assert got["seeds"] == [0, 1]
    off, on = got["temporal values (ω and previews)"]
    assert off == pytest.approx([-0.01, 0.01]) and on == pytest.approx([-0.04, 0.02])
    off, on = got["the anchor (κ·Q̄)"]
    assert off == pytest.approx([0.05, 0.02]) and on == pytest.approx([0.02, 0.03])


def test_experiments_snr_keeps_the_update_gradient_without_changing_the_model(tmp_path):
    """tools/experiments.py snr: a rollout's kept gradient is non-zero, reproduced by the same seed and different for
    another; the model is not updated; the command writes its table."""
    import torch

    import vgpo
    from tools import experiments

    settings = dict(reward="jpeg_compressibility", prompts_per_epoch=2, num_generations=2, num_steps=3,
                    train_batch_size=2, gradient_accumulation_steps=1)
    args = vgpo.make_args(model="tiny", **settings)
    model = vgpo.load_model(args)
    before = [p.detach().clone() for p in model.transformer.parameters()]
    grads, rewards, per_traj = experiments.policy_gradients(args, 2, model=model)
    assert all(torch.equal(a, p) for a, p in zip(before, model.transformer.parameters()))
    again, _, _ = experiments.policy_gradients(args, 1, model=model)
    assert torch.equal(grads[0], again[0]) and grads[0].norm() > 0 and per_traj > 0
    assert grads[0].numel() == sum(p.numel() for p in model.transformer.parameters() if p.requires_grad)
    cos, _ = experiments.mean_cosine(grads)
    assert abs(cos) < 0.99  # new noise, new gradient
    argv = ["snr", "--batches", "2", "--combine", "1", "--rewards", "jpeg_compressibility", "--algos", "grpo",
            "--results", str(tmp_path), *[f"--set={k}={v}" for k, v in settings.items() if k != "reward"]]
    assert experiments.main(argv) == 0
    assert "| jpeg_compressibility | grpo |" in (tmp_path / "snr.md").read_text()
    assert experiments.main(["snr", "--batches", "1"]) == 2


def test_the_readme_figure_shows_vgpos_per_step_credit_beside_grpos_flat_one():
    """tools/figure.py's group (results/credit.png): a prompt whose samples disagree, GRPO's advantage the same at
    every step, VGPO's not, and both computed by vgpo's own functions: the values, weights and advantages it plots
    are vgpo.credit's of its instant rewards, with the run's settings (VGPO) and with --algo grpo."""
    import dataclasses

    import torch

    import shapes
    import vgpo
    from tools import figure

    args = vgpo.make_args(model="tiny", num_generations=4, num_steps=4, train_batch_size=48)
    model = vgpo.load_model(args)
    prompt, r, values, weights, adv, grpo = figure.one_group(args, model, vgpo.make_reward(args, model.device))
    assert r.shape == values.shape == weights.shape == adv.shape == grpo.shape == (4, 4)
    assert prompt in shapes.TRAIN_PROMPTS and r[:, -1].std() > 0
    assert torch.equal(grpo, grpo[:, :1].expand_as(grpo)) and not torch.equal(adv, adv[:, :1].expand_as(adv))
    torch.testing.assert_close(values, vgpo.temporal_values(r, args.gamma))
    group = torch.zeros(4, dtype=torch.long)
    for got, want in zip((values, weights, adv), vgpo.credit(r, group, args)):
        assert torch.equal(got, want)
    assert torch.equal(grpo, vgpo.credit(r, group, dataclasses.replace(args, algo="grpo"))[2])


def test_collapse_tool_decomposes_the_gradient_into_pieces_that_add_up():
    """tools.collapse: groups are told apart by their terminal rewards (mixed, all-solved, all-failed); the update's
    gradient is linear in Â, so the gradients of Â masked to each kind of group add up to the whole one; a small
    decomposition runs and reports every piece for every measured rollout."""
    import torch

    import vgpo
    from tools import collapse

    kinds = collapse.group_kinds(torch.tensor([1.0, 1, 0, 0, 0, 1, 0.2, 0.2]), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    assert [kinds[k].nonzero().flatten().tolist() for k in ("mixed", "all-solved", "all-failed")] == \
        [[4, 5], [0, 1], [2, 3, 6, 7]]
    args = vgpo.make_args(model="tiny", prompts_per_epoch=2, num_generations=4, train_batch_size=4, num_steps=4)
    model = vgpo.load_model(args)
    traj = vgpo.rollout(model, ["a red circle", "two blue squares"], args, generator=torch.Generator().manual_seed(0))
    adv = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    whole = collapse.gradient(model, traj, adv, args)
    parts = sum(collapse.gradient(model, traj, adv * (traj.group_ids == g)[:, None].float(), args) for g in (0, 1))
    assert whole.norm() > 0
    torch.testing.assert_close(parts, whole, rtol=1e-4, atol=1e-4 * whole.abs().max().item())
    out = collapse.decompose(None, batches=2, ref_batches=1, prompts_per_epoch=2, num_generations=4,
                             train_batch_size=8, num_steps=4)
    assert {"vgpo total", "grpo total", "vgpo mixed relative", "vgpo all-solved absolute"} <= set(out["pieces"])
    assert all(len(d["cos"]) == 2 and all(-1 <= c <= 1 for c in d["cos"]) for d in out["pieces"].values())
    assert abs(sum(out["shares"].values()) - 1) < 1e-6


def test_collapse_tool_bad_input_is_one_line_and_exit_2(capsys, tmp_path, monkeypatch):
    from tools import collapse

    monkeypatch.chdir(tmp_path)  # no runs/collapse here
    assert collapse.main(["run", "--shard", "2/2"]) == 2
    assert collapse.main(["run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "--shard '2/2'" in err[0] and "python -m tools.collapse base" in err[1]
