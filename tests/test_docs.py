"""The README's method table is generated from the method docstrings and stays in sync."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_readme_method_table_is_current():
    out = subprocess.run([sys.executable, "-m", "scripts.method_table"], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out in (REPO / "README.md").read_text(), "run `python -m scripts.method_table --write`"


def test_every_method_config_builds_and_documents_itself():
    import importlib

    from methods import catalog

    assert catalog.names() == sorted(p.stem for p in (REPO / "conf" / "method").glob("*.yaml"))
    for name in catalog.names():
        entry = catalog.get(name)
        klass = entry.cls()
        method = klass(**entry.defaults)
        assert method.family in ("none", "quantization", "eviction", "sparse", "composed"), name
        assert klass.__doc__ and importlib.import_module(klass.__module__).__doc__, name


# -- every command in the docs runs as written after `make install` (issue 25) ---------------------------
DOCS = ("README.md", "DEVELOPERS.md", "models/kvbench-tiny/README.md", "docs/ARCHITECTURE.md", "docs/PAPERS.md")
# Commands in these sections run on the project's GPU machine, whose own python has kvbench's wheels
# installed by `. scripts/gpu_env.sh` (no .venv there); they say so in the text.
GPU_MACHINE_SECTIONS = ("Running on the GPU machine",)
BARE = ("python", "python3", "pytest", "wandb", "pip")
PROGRAMS = (*BARE, ".venv/bin/python", ".venv/bin/wandb", "make")
SCRIPT_OF_TARGET = {"bench": "scripts/bench/__main__.py"}  # the file `-m scripts.bench` runs  # make <target> ARGS="..." passes ARGS to this script


def documented_commands():
    """(doc, line number, argv) of every command in a fenced or indented code block or an inline code
    span of the docs that starts with a program a user would type."""
    import re
    import shlex

    out = []
    for doc in DOCS:
        section, fence, pending = "", False, ""
        for n, line in enumerate((REPO / doc).read_text(encoding="utf-8").splitlines(), 1):
            if line.startswith("```"):
                fence = not fence
                continue
            if not fence and line.startswith("#"):
                section = line.lstrip("#").strip()
                continue
            if any(s in section for s in GPU_MACHINE_SECTIONS):
                continue
            if fence or line.startswith("    "):
                code = pending + line.strip()
                if code.endswith("\\"):
                    pending = code[:-1] + " "
                    continue
                pending = ""
                spans = [code]
            else:
                spans = re.findall(r"(?<!`)`([^`]+)`(?!`)", line)
            for span in spans:
                try:
                    words = shlex.split(span, comments=True)
                except ValueError:
                    continue
                if words and words[0] in PROGRAMS:
                    out.append((doc, n, words))
    return out


def _script_of(module):
    """The file ``python -m scripts.x`` runs: ``scripts/x.py``, or ``scripts/x/__main__.py`` for a package; None
    outside scripts/."""
    if not module.startswith("scripts."):
        return None
    path = module.replace(".", "/")
    return f"{path}/__main__.py" if (REPO / path).is_dir() else f"{path}.py"


def _help_texts(scripts):
    """{script: (exit code, --help output)}, every script run once with --help in one process."""
    import json
    import subprocess
    import sys

    runner = (
        "import contextlib, io, json, runpy, sys\n"
        "out = {}\n"
        "for script in sys.argv[1:]:\n"
        "    buf, code = io.StringIO(), 0\n"
        "    sys.argv = [script, '--help']\n"
        "    try:\n"
        "        with contextlib.redirect_stdout(buf):\n"
        "            runpy.run_path(script, run_name='__main__')\n"
        "    except SystemExit as e:\n"
        "        code = e.code or 0\n"
        "    except Exception as e:\n"
        "        code = repr(e)\n"
        "    out[script] = [code, buf.getvalue()]\n"
        "print(json.dumps(out))\n"
    )
    p = subprocess.run([sys.executable, "-c", runner, *scripts], cwd=REPO, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_every_documented_command_runs_as_written():
    import importlib.util
    import re

    from harness.run import UsageError, check_overrides

    cmds = documented_commands()
    assert len(cmds) > 30, "the extraction found too few commands"
    targets = set(re.findall(r"^([a-z][a-z0-9_-]*):", (REPO / "Makefile").read_text(), flags=re.M))
    scripts = sorted({_script_of(words[2]) for _, _, words in cmds if words[1:2] == ["-m"] and len(words) > 2
                      and _script_of(words[2])} | set(SCRIPT_OF_TARGET.values()))
    helps = _help_texts(scripts)
    problems = []

    def flags_ok(where, script, args):
        code, text = helps.get(script, (None, ""))
        if code != 0:
            problems.append(f"{where}: `{script} --help` exits {code}")
            return
        for a in args:
            if a == "--":
                break
            flag = a.split("=", 1)[0]
            if flag.startswith("--") and not re.search(rf"{re.escape(flag)}\b", text):
                problems.append(f"{where}: {script} has no flag {flag} (see its --help)")

    for doc, n, words in cmds:
        where = f"{doc}:{n}: {' '.join(words)}"
        prog, args = words[0], words[1:]
        if prog in BARE:
            problems.append(f"{where}: bare `{prog}` fails on a fresh clone; write .venv/bin/{prog} or a make target")
        elif prog == "make":
            target = next((a for a in args if "=" not in a and not a.startswith("-")), "help")
            if target not in targets:
                problems.append(f"{where}: no make target {target!r}")
            extra = [a.split("=", 1)[1] for a in args if a.startswith("ARGS=")]
            if target in SCRIPT_OF_TARGET and extra:
                flags_ok(where, SCRIPT_OF_TARGET[target], extra[0].split())
        elif prog == ".venv/bin/python" and args[:1] == ["-m"]:
            mod, rest = args[1], args[2:]
            if mod in ("harness.run", "harness.sweep"):
                overrides = [a for a in rest if "<" not in a and "..." not in a and a not in ("-m", "--default")]
                try:
                    check_overrides(overrides)
                except UsageError as e:
                    problems.append(f"{where}: {e}")
            elif _script_of(mod):
                script = _script_of(mod)
                if not (REPO / script).is_file():
                    problems.append(f"{where}: no script {script}")
                else:
                    flags_ok(where, script, rest)
            elif mod == "pytest":
                problems += [f"{where}: no test file {a}" for a in rest
                             if a.startswith("tests/") and not (REPO / a.split("::")[0]).exists()]
            elif importlib.util.find_spec(mod) is None:
                problems.append(f"{where}: no module {mod}")
        elif prog == ".venv/bin/python":  # a script by its path: its imports of harness/methods need the root
            script = args[0] if args else ""
            mod = script[:-3].replace("/", ".") if script.startswith("scripts/") and script.endswith(".py") else "..."
            problems.append(f"{where}: run scripts as modules from the repository root: .venv/bin/python -m {mod}")
    assert not problems, "\n".join(problems)


def test_install_says_what_it_installs_before_it_starts(tmp_path):
    """`make run` / `make test` on a fresh clone spend minutes in pip: the first lines say what and how long."""
    import subprocess

    # --no-print-directory: under a parent make (CI runs `make test`) make prints "Entering directory" first
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    cmd = ["make", "--no-print-directory", "-n", "install", f"VENV={tmp_path}/venv"]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    lines = p.stdout.splitlines()
    assert p.returncode == 0 and lines[0].startswith("echo") and "torch" in lines[0] and "40 s" in lines[0]
    assert "min" in lines[1]
    assert not any(" -q " in ln for ln in lines if "pip install" in ln)  # pip's progress is shown


def test_the_default_tasks_are_defined_once():
    from harness.sweep import DEFAULT_TASKS

    for path in (REPO / "conf" / "sweep").glob("*.yaml"):
        assert "task:" not in path.read_text(), f"{path.name}: the tasks are harness.sweep.DEFAULT_TASKS"
    readme = (REPO / "README.md").read_text()
    assert "DEFAULT_TASKS" in readme and ", ".join(f"`{t}`" for t in DEFAULT_TASKS) in readme


def test_the_adding_a_method_examples_run():
    """README "Adding a method": both examples are real subclasses that meet the contract on a tiny model."""
    import re

    from harness.engine import Engine, Prompt
    from harness.models import build_random_model, tiny_config
    from methods.api import ModelSpec

    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Adding a method", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 2, "the section shows an eviction method and a quantizer"
    model = build_random_model(tiny_config("llama"), seed=0)
    spec = ModelSpec.from_config(model.config)
    prompts = [Prompt(context=list(range(3, 40)), question=[5, 6]), Prompt(context=list(range(7, 30)), question=[9])]
    for code, (cls_name, ratio) in zip(blocks, (("VNorm", 0.5), ("IntG16", 0.75))):
        ns: dict = {}
        exec(compile(code, f"README:{cls_name}", "exec"), ns)  # noqa: S102
        method = ns[cls_name](ratio=ratio)
        assert not method.validate(spec), method.validate(spec)
        out = Engine(model, method).generate(prompts, max_new_tokens=3)
        stats = out.stats_context
        assert stats.bytes_stored < stats.bytes_full, (cls_name, stats)
    assert ns["IntG16"](ratio=0.75).extra_reasons(ModelSpec(**{**spec.__dict__, "head_dim": 40}), 4, 4)
