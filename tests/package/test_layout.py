"""The package's layout: no import circles, no module past about 400 lines, and the old module paths still import."""

import ast
import importlib
import subprocess
import sys
import warnings

import pytest

from conftest import REPO

SLIM = REPO / "slim"
MAX_LINES = 430  # "about 400": a module longer than this is split by concern


def module_name(path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path) -> set[str]:
    """Every slim module `path` imports, at any depth (a function-level import is an edge too), with the
    packages Python imports on the way (importing slim.a.b runs slim.a's __init__ first)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [module] + [f"{module}.{a.name}" for a in node.names]  # `from pkg import submodule`
        for t in targets:
            if t == "slim" or t.startswith("slim."):
                parts = t.split(".")
                found.update(".".join(parts[:i]) for i in range(2, len(parts) + 1))
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in SLIM.rglob("*.py") if p.name != "__main__.py"}
    return {
        m: {t for t in imports_of(p) if t in modules and t != m and not m.startswith(t + ".")}
        for m, p in modules.items()
    }


def circles_of(g: dict[str, set[str]]) -> list[list[str]]:
    """The import circles a depth-first walk of `g` meets, each as the path that closes it."""
    state, stack, circles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(g[m]):
            if state.get(t) == "open":
                circles.append(stack[stack.index(t) :] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(g):
        if m not in state:
            visit(m)
    return circles


def test_no_import_circles():
    circles = circles_of(graph())
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


def test_the_checker_sees_a_circle():
    # function-level imports are edges, and so is the package __init__ Python runs on the way
    g = graph()
    assert "slim.policies.base" in g["slim.policies.slim"]
    assert "slim.answering.prompts" in g["slim.answering.answers"]  # imported inside a function too
    assert {"slim.models.embedder", "slim.models"} <= g["slim.judges.features"]  # inside a function; its package
    # and a circle in such a graph is found, whatever its length
    assert circles_of({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert circles_of({"a": {"b"}, "b": set()}) == []


def test_no_module_is_too_long():
    long = {module_name(p): n for p in SLIM.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines, split them by concern: {long}"


OLD_NAMES = {  # old path -> names a user may hold
    "slim.interventions": ["SlimPolicy", "ITIPolicy", "MimicPolicy", "Policy", "model_fingerprint"],
    "slim.generation": ["answer_questions", "qa_prompt", "generate_greedy", "extract_answer"],
    "slim.gaussian_ot": ["ot_map", "fit_layer_maps", "solve_head_sdp", "load_layer_maps"],
    "slim.heads": ["HeadTrace", "set_head_layout"],
    "slim.timing": ["paired_overhead", "time_head_map", "write_table4"],
    "slim.transfer": ["load_nq_open", "run_transfer"],
    "slim.reports": ["comparison_table"],
    "slim.data": ["load_truthfulqa", "make_folds", "probe_texts"],
    "slim.evaluation": ["evaluate_method", "load_scorers"],
}


@pytest.mark.parametrize("old", sorted(OLD_NAMES))
def test_old_paths_still_import(old):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        module = importlib.import_module(old)
    missing = [n for n in OLD_NAMES[old] if not hasattr(module, n)]
    assert not missing


def test_an_old_path_warns_with_the_new_one():
    sys.modules.pop("slim.prefix", None)
    with pytest.warns(DeprecationWarning, match=r"slim\.prefix moved to slim\.answering\.prefix"):
        importlib.import_module("slim.prefix")


def test_old_module_commands_still_run():
    proc = subprocess.run(
        [sys.executable, "-m", "slim.reports", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and "summaries" in proc.stdout


def test_every_policy_kind_is_registered():
    from slim.policies import POLICY_KINDS

    assert set(POLICY_KINDS) == {"slim", "iti", "mimic", "linear_act", "slim_on_iti_heads", "iti_on_slim_layer"}


def test_test_files_have_unique_names():
    """tests/ has no __init__.py files, so pytest imports each test file by its bare name: two files of one name
    in different folders stop the collection."""
    names = sorted(p.name for p in (REPO / "tests").rglob("test_*.py"))
    assert [n for i, n in enumerate(names) if n in names[:i]] == []
