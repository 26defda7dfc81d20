"""The README's method table is generated from the method docstrings and stays in sync."""

import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def test_readme_method_table_is_current():
    out = subprocess.run([sys.executable, "scripts/method_table.py"], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out in (REPO / "README.md").read_text(), "run `python scripts/method_table.py --write`"


def test_every_method_config_builds_and_documents_itself():
    import importlib

    for path in sorted((REPO / "conf" / "method").glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text())
        mod, _, cls = cfg.pop("_target_").rpartition(".")
        klass = getattr(importlib.import_module(mod), cls)
        method = klass(**cfg)
        assert method.family in ("none", "quantization", "eviction", "sparse", "composed"), path
        assert klass.__doc__ and importlib.import_module(mod).__doc__, path
