"""Generate the README's method table from the method catalogue (conf/method/) and the docstrings.

    python -m scripts.method_table            # print the table
    python -m scripts.method_table --write    # replace it in README.md (between the markers)
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- methods:begin -->", "<!-- methods:end -->"


def rows() -> list[dict]:
    from methods import catalog

    out = []
    for name in catalog.names():
        cls = catalog.get(name).cls()
        mod = importlib.import_module(cls.__module__)
        prefix = f"``{name}``:"
        own, module = (cls.__doc__ or "").strip(), (mod.__doc__ or "").strip()
        # the docstring that names the method; a module of several methods describes each in its class
        doc = own if own.startswith(prefix) else module if module.startswith(prefix) else (own or module)
        summary = " ".join(doc.strip().split("\n\n")[0].split())
        summary = summary[len(prefix):].strip() if summary.startswith(prefix) else summary
        knobs = [f.name for f in dataclasses.fields(cls) if f.name != "ratio"] if dataclasses.is_dataclass(cls) else []
        out.append({"name": name, "family": cls.family, "memory": cls.memory, "kernel": cls.kernel,
                    "summary": summary, "knobs": ", ".join(f"`{k}`" for k in knobs) or "-"})
    return out


def table() -> str:
    lines = ["| method | family | memory | kernel | knobs | what it is |", "|---|---|---|---|---|---|"]
    for r in rows():
        lines.append(f"| `{r['name']}` | {r['family']} | {r['memory']} | {r['kernel']} | {r['knobs']} | {r['summary']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--readme", default=str(REPO / "README.md"))
    args = ap.parse_args(argv)
    t = table()
    if not args.write:
        print(t)
        return 0
    readme = Path(args.readme)
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        print(f"error: {readme} has no {BEGIN} ... {END} markers", file=sys.stderr)
        return 2
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{t}\n{END}{tail}")
    print(f"updated {os.path.relpath(readme)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
