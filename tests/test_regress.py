"""The results regression check: passes on an unchanged method, fails when its output changes."""

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _regress():
    spec = importlib.util.spec_from_file_location("regress", REPO / "scripts" / "regress.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_regress_detects_a_perturbed_method(tmp_path, capsys):
    regress = _regress()
    base = ["--baseline", str(tmp_path), "--methods", "uniform_int", "--tasks", "niah_single", "--limit", "3"]
    assert regress.main([*base, "--update"]) == 0
    assert (tmp_path / "uniform_int.csv").exists()
    assert regress.main(base) == 0
    # perturb the method: a different quantization group changes what it stores
    assert regress.main([*base, "method.group_size=16"]) == 1
    out = capsys.readouterr().out
    assert "kv_bytes_stored" in out and "regression" in out


def test_compare_tolerances():
    regress = _regress()
    base = {("m", 0.5, "t"): {"status": "ok", "n_samples": "20", "kv_bytes_full": "100", "kv_bytes_stored": "50",
                              "kv_bytes_stored_final": "60", "kv_bytes_read_per_step": "60", "accuracy": "0.5",
                              "limit": "20"}}
    row = {"method": "m", "ratio": 0.5, "task": "t", "status": "ok", "n_samples": 20, "kv_bytes_full": 100,
           "kv_bytes_stored": 50, "kv_bytes_stored_final": 60, "kv_bytes_read_per_step": 60, "accuracy": 0.55}
    assert regress.compare([row], base) == []  # one sample of 20 may flip
    assert regress.compare([{**row, "accuracy": 0.6}], base)  # two may not
    assert regress.compare([{**row, "kv_bytes_stored": 51}], base)  # bytes at end of context are exact
    assert regress.compare([{**row, "kv_bytes_stored_final": 61}], base) == []  # follow generation length
    assert regress.compare([{**row, "status": "failed"}], base)


def test_the_matrix_names_catalogue_methods_and_covers_every_family():
    from methods import catalog

    regress = _regress()
    assert set(regress.MATRIX) <= set(catalog.names())
    assert {catalog.family(n) for n in catalog.names()} <= {catalog.family(m) for m in regress.MATRIX}
