"""The architecture's rules, checked on the source (issue 19): no import cycle among the modules of methods/,
the harness imports no concrete method, a method added as one YAML is picked up by the catalogue and held
to the contract with no other edit, and scripts/ is sorted by role (entry points at the top level, trainers in
scripts/train/, experiments in scripts/experiments/).

What the harness may import from methods/ (``HARNESS_MAY_IMPORT``): the contract (``methods.api``), the
catalogue that builds methods by name (``methods.catalog``), the shared storage layouts (``methods.stores``
and its modules), the stores' kernels and their availability checks (``methods.kernels`` and its modules:
harness/kernels/ shares the interpreter checks and the rounding helper) and the calibration recorder
(``methods.capture``: a full cache that records q, k, v; not a method of the catalogue). Every concrete
method (full, eviction, kivi, ...) and every method-family part (ragged, selectors, quantizers, quant_base)
reaches the harness only through the catalogue.
"""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

import pytest
import torch

from methods import catalog

ROOT = Path(__file__).resolve().parent.parent
HARNESS_MAY_IMPORT = ("methods.api", "methods.catalog", "methods.capture", "methods.stores", "methods.kernels")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, known: set[str]) -> set[str]:
    """Modules ``path`` imports (module level and inside functions): ``from a import b`` names ``a.b`` when that
    is a module of ``known``, else ``a``; relative imports are resolved against the file's package."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for alias in node.names:
                sub = f"{mod}.{alias.name}"
                out.add(sub if sub in known else mod)
    return out


def _graph(folder: str) -> dict[str, set[str]]:
    files = sorted((ROOT / folder).rglob("*.py"))
    known = {_module_name(p) for p in sorted((ROOT / "methods").rglob("*.py"))} | {_module_name(p) for p in files}
    return {_module_name(p): _imports(p, known) for p in files}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (restricted to its own modules), or None."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node] & graph.keys()):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "torch"}}) is None


def test_no_import_cycle_in_methods():
    graph = _graph("methods")
    assert {"methods.api", "methods.stores", "methods.stores.dense", "methods.kernels.append"} <= graph.keys()
    assert "methods.stores.slot" in graph["methods.stores.dense"]  # the resolver sees package-internal imports
    cycle = _cycle(graph)
    assert cycle is None, "import cycle in methods/: " + " -> ".join(cycle)


def test_harness_imports_no_concrete_method():
    allowed = lambda mod: mod == "methods" or any(  # noqa: E731
        mod == a or mod.startswith(a + ".") for a in HARNESS_MAY_IMPORT)
    bad = {
        f"{module} imports {imp}"
        for module, imps in _graph("harness").items()
        for imp in imps
        if (imp == "methods" or imp.startswith("methods.")) and not allowed(imp)
    }
    assert not bad, f"the harness builds methods through methods.catalog only: {sorted(bad)}"
    assert "methods.catalog" in _graph("harness")["harness.parity"]


def test_a_new_yaml_is_in_the_catalogue_and_meets_the_contract(tmp_path, tiny_llama):
    """Adding a method is one file and one YAML: a second name for knorm with another default, in a copy of
    conf/method, is listed, built with its own default and passes the contract checks of tests/test_contract.py
    with no other edit."""
    import tests.test_contract as contract

    conf = tmp_path / "method"
    shutil.copytree(catalog.CONF_DIR, conf)
    (conf / "knorm_sinks.yaml").write_text((catalog.CONF_DIR / "knorm.yaml").read_text().replace(
        "n_sink: 0", "n_sink: 3"))
    assert "n_sink: 3" in (conf / "knorm_sinks.yaml").read_text()
    assert catalog.names(conf) == sorted([*catalog.names(), "knorm_sinks"])
    assert catalog.family("knorm_sinks", conf) == catalog.family("knorm")
    method = catalog.build("knorm_sinks", ratio=0.5, conf_dir=conf)
    assert method.n_sink == 3 and catalog.build("knorm", ratio=0.5).n_sink == 0
    contract.test_methods_satisfy_the_protocols(method, tiny_llama)
    contract.test_fork_is_independent(method, tiny_llama)


@pytest.mark.parametrize("queries", [False, True])
def test_one_capture_records_what_calibration_and_the_index_scripts_read(fresh_llama, queries):
    """methods.capture.Capture (harness/calibration.py, RateQuant's fit, scripts/experiments/index_recall.py,
    scripts/bench_sparse.py): each layer's latest q, k, v as the attention received them, and on request the
    queries after the context; the model's output is full's."""
    from harness.engine import Engine, Prompt
    from methods.capture import Capture
    from tests.helpers import random_prompts

    ctx, question = random_prompts([12, 3])
    cap = Capture(qkv=not queries, queries_after_context=queries)
    out = Engine(fresh_llama, cap, prefill_chunk=64).generate([Prompt(context=ctx, question=question)], max_new_tokens=3)
    ref = Engine(fresh_llama, catalog.build("full", ratio=0.0), prefill_chunk=64).generate(
        [Prompt(context=ctx, question=question)], max_new_tokens=3)
    assert out.tokens == ref.tokens
    n_layers = fresh_llama.config.num_hidden_layers
    assert len(cap.stores) == n_layers
    if queries:
        assert cap.captured == []
        for st in cap.stores:
            assert st.n_context == 12
            q = torch.cat(st.queries, dim=2)  # (1, H_q, T, D): the question, then the decode steps
            assert q.shape[:2] == (1, fresh_llama.config.num_attention_heads)
            assert 3 <= q.shape[2] <= 3 + 2  # the last generated token is never fed back
    else:
        assert len(cap.captured) == n_layers
        q, k, v = cap.captured[0]
        assert q.shape[1] == fresh_llama.config.num_attention_heads and k.shape[1] == fresh_llama.config.num_key_value_heads
        assert all(st.queries == [] for st in cap.stores)


def test_there_is_one_capture():
    """RateQuant's fit, harness.calibration and the index scripts record with the same class (issue 19);
    tests/test_session.py checks that it keeps every prefill chunk."""
    import methods.capture
    import methods.ratequant

    assert methods.ratequant.Capture is methods.capture.Capture


SCRIPT_ROLES = {"train": "trainers", "experiments": "the papers' experiments and diagnostics"}
SHELL_HELPERS = {"fetch_gpu_wheels.sh", "gpu_env.sh", "gpu_jobs.sh"}  # sourced or run on the way to the GPU machine


def _runs_as_module(path: Path) -> bool:
    """``python -m`` runs it: a module with a ``__main__`` guard, or a package with a ``__main__.py``."""
    if path.is_dir():
        return (path / "__init__.py").is_file() and (path / "__main__.py").is_file()
    return path.suffix == ".py" and 'if __name__ == "__main__":' in path.read_text()


def test_scripts_are_sorted_by_role():
    """scripts/ holds entry points only (each runs as ``python -m scripts.<name>``; bench/ is a runnable package)
    and the two shell helpers of the GPU machine; trainers and experiments live in scripts/train/ and
    scripts/experiments/, whose modules each run as ``python -m scripts.<role>.<name>``. No script patches
    sys.path (they run from the repository root as modules)."""
    top = ROOT / "scripts"
    misplaced = []
    for path in sorted(top.iterdir()):
        if path.name in ("__init__.py", "__pycache__") or path.name in SHELL_HELPERS:
            continue
        if path.name in SCRIPT_ROLES:
            assert (path / "__init__.py").is_file(), path
            misplaced += [f"{p.relative_to(ROOT)}: does not run as a module" for p in sorted(path.iterdir())
                          if p.name not in ("__init__.py", "__pycache__") and not _runs_as_module(p)]
        elif not _runs_as_module(path):
            misplaced.append(f"{path.relative_to(ROOT)}: not an entry point (a helper belongs in the package that "
                             f"uses it; trainers in scripts/train/, experiments in scripts/experiments/)")
        elif path.name.startswith("train"):
            misplaced.append(f"{path.relative_to(ROOT)}: a trainer belongs in scripts/train/")
    assert not misplaced, "\n".join(misplaced)
    patched = [str(p.relative_to(ROOT)) for p in sorted(top.rglob("*.py"))
               if re.search(r"sys\.path\.(insert|append)|sys\.path\s*=", p.read_text())]
    assert not patched, f"scripts run as modules from the repository root; no sys.path patching: {patched}"
