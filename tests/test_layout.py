"""Tests of the layout: imports point one way (tools, tests, notebook → vgpo → plumbing → sd3, reward → shapes),
the plumbing says it is plumbing, and the code follows the style the README promises."""
import ast
import glob
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUMBING = ("harness", "recovery", "distributed")


def python_files() -> list[str]:
    """Every .py file of the project, relative to the root."""
    found = [os.path.relpath(p, ROOT) for folder in ("", "tools", "tests", "prompts")
             for p in glob.glob(os.path.join(ROOT, folder, "*.py"))]
    return sorted(found)


def module_of(path: str) -> str:
    name = path[:-3].replace(os.sep, ".")
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


def imports(path: str, modules: set[str]) -> set[str]:
    """The project modules `path` imports anywhere in it (function-level imports included)."""
    out, package = set(), module_of(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(open(os.path.join(ROOT, path), encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from . import x, from .y import x
                base = ".".join(filter(None, [package, base]))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            out |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & modules
    return out - {module_of(path)}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = python_files()
    modules = {module_of(p) for p in files}
    return {module_of(p): imports(p, modules) for p in files}


def test_the_import_walk_sees_the_known_edges(graph):
    """The walk finds what is there, function-level imports included (so the tests below can fail)."""
    assert {"harness", "recovery"} <= graph["vgpo"]
    assert {"shapes", "sd3", "reward"} <= graph["harness"]  # all three imported inside functions
    assert "shapes" in graph["reward"] and "vgpo" in graph["tools.bench"]


def test_the_project_imports_form_no_cycle(graph):
    """No module imports itself through others (depth-first search for a back edge)."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                pytest.fail("import cycle: " + " → ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_nothing_the_package_imports_imports_vgpo(graph):
    """vgpo is imported only by tools, tests and the notebook: no module vgpo depends on reaches it again, and the
    toy world, the rewards and the SD3 loader import no plumbing either."""
    def reach(m, seen):
        for n in graph[m] - seen:
            seen.add(n)
            reach(n, seen)
        return seen

    below = reach("vgpo", set())
    assert {"harness", "recovery", "shapes", "reward", "sd3"} <= below
    for m in below:
        assert "vgpo" not in reach(m, set()), m
    for m in ("shapes", "reward", "sd3"):
        assert not reach(m, set()) & {"vgpo", *PLUMBING}, m


@pytest.mark.parametrize("name", PLUMBING)
def test_plumbing_modules_say_so_in_their_first_line(name):
    first = ast.get_docstring(ast.parse(open(os.path.join(ROOT, f"{name}.py"), encoding="utf-8").read()))
    assert "plumbing: a reader of the method can skip this" in first.splitlines()[0]


def test_lines_are_at_most_120_characters():
    long = [f"{p}:{i}" for p in python_files()
            for i, line in enumerate(open(os.path.join(ROOT, p), encoding="utf-8"), 1) if len(line.rstrip("\n")) > 120]
    assert not long, long


def test_no_parameter_shadows_a_function_of_its_module():
    """A parameter named like a module-level function hides it inside the function body (pytest fixtures, which
    are requested by parameter name, excepted)."""
    clashes = []
    for p in python_files():
        tree = ast.parse(open(os.path.join(ROOT, p), encoding="utf-8").read())
        functions = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                     and not any("fixture" in ast.unparse(d) for d in n.decorator_list)}
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                a = node.args
                names = {x.arg for x in a.posonlyargs + a.args + a.kwonlyargs + [a.vararg, a.kwarg] if x}
                clashes += [f"{p}:{node.lineno} {n}" for n in names & functions]
    assert not clashes, clashes


def test_no_document_outside_the_repository_is_cited():
    """Code, README, results and notebook cite only what a reader of the repository can open."""
    paths = python_files() + ["README.md", "tutorial.ipynb"] + [os.path.relpath(p, ROOT) for p in
                                                                 glob.glob(os.path.join(ROOT, "results", "*.md"))]
    design_note = ("SPEC" + " §", "SPEC" + ".md")  # spelt apart so that this file does not cite it
    cited = [p for p in paths if any(s in open(os.path.join(ROOT, p), encoding="utf-8").read() for s in design_note)]
    assert not cited, cited


def test_vgpo_reads_method_first_with_one_line_helps_and_settings_at_the_end():
    """vgpo.py opens with Args (the --help, one source line per field) and then the method, the first equation
    within ~120 lines; the preset and task tables sit in the settings section after train()."""
    tree = ast.parse(open(os.path.join(ROOT, "vgpo.py"), encoding="utf-8").read())
    where = {n.name if hasattr(n, "name") else ast.unparse(n.targets[0]): n for n in tree.body
             if isinstance(n, (ast.FunctionDef, ast.ClassDef)) or (isinstance(n, ast.Assign) and len(n.targets) == 1)}
    assert where["guided_velocity"].lineno <= 125
    fields = [n for n in where["Args"].body if isinstance(n, ast.AnnAssign)]
    assert len(fields) > 40 and all(f.lineno == f.end_lineno for f in fields)
    assert all(where[name].lineno > where["train"].end_lineno for name in ("PRESETS", "TASKS", "LOW_MEMORY"))
