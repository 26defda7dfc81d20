"""The README's method table is generated from the method docstrings and stays in sync."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_readme_method_table_is_current():
    out = subprocess.run([sys.executable, "scripts/method_table.py"], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out in (REPO / "README.md").read_text(), "run `python scripts/method_table.py --write`"


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
