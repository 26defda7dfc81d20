"""RateQuant: water-filling, rounding, calibration determinism, per-unit stores and their bytes."""

import math

import pytest
import torch

from harness.calibration import engine_runner
from methods.api import CalibrationContext, ModelSpec
from methods.quarot import QuaRot
from methods.ratequant import RateQuant, fit_distortion, round_to_widths, uniform_widths, water_fill
from methods.uniform_int import UniformInt
from tests.helpers import random_prompts, run


def test_water_filling_meets_the_average_and_the_closed_form():
    g = torch.Generator().manual_seed(0)
    log_c = torch.randn(16, generator=g, dtype=torch.float64) * 2
    beta, B = 4.2, 3.5
    b = water_fill(log_c, beta, B, lo=-50, hi=50)  # no clipping
    x = log_c / math.log(beta)
    assert torch.allclose(b, B + x - x.mean(), atol=1e-9)
    clipped = water_fill(log_c, beta, B, lo=2, hi=8)
    assert abs(float(clipped.mean()) - B) < 1e-9 and float(clipped.min()) >= 2 and float(clipped.max()) <= 8
    ints = round_to_widths(clipped, log_c, beta, total=int(B * 16), widths=[2, 3, 4, 5, 6, 7, 8])
    assert int(ints.sum()) == int(B * 16) and set(ints.tolist()) <= set(range(2, 9))
    assert (ints - clipped).abs().max() < 1.0 + 1e-9  # each unit within one step of its real width


def test_rounding_gives_leftover_bits_to_the_largest_gain():
    log_c = torch.tensor([0.0, 3.0, 1.0], dtype=torch.float64)  # unit 1 gains most per bit
    out = round_to_widths(torch.tensor([2.0, 2.0, 2.0]), log_c, 4.0, total=7, widths=[2, 3, 4])
    assert out.tolist() == [2, 3, 2]


def test_uniform_widths_spread_a_fractional_budget():
    w = uniform_widths(4, 8, 2.5)
    assert w.sum() == 20 and sorted(set(w.tolist())) == [2, 3]
    assert w[:4].sum() == w[4:].sum()  # K and V units get the same number of extra bits


def test_fit_recovers_beta():
    widths = [2, 3, 4, 5]
    a = torch.tensor([[1.0, 3.0], [0.5, 2.0]], dtype=torch.float64)
    D = a[..., None] * 4.5 ** -torch.tensor(widths, dtype=torch.float64)
    fit = fit_distortion(D, widths)
    assert abs(fit["beta"] - 4.5) < 1e-9 and fit["r2"] > 1 - 1e-12
    assert torch.allclose(fit["log_a"], a.log())


def _ctx(model, seed=0):
    samples = [torch.tensor(p) for p in random_prompts([96, 96], seed=seed)]
    return CalibrationContext(model=model, spec=ModelSpec.from_config(model.config), samples=samples, device="cpu",
                              dtype=torch.float32, seed=seed, run=engine_runner(model))


@pytest.mark.parametrize("base", ["kivi", "quarot"])
def test_calibration_is_deterministic_and_meets_the_budget(fresh_llama, base):
    kw = {"base_params": {"group_size": 8, "residual_length": 16}} if base == "kivi" else {}
    tables = []
    for _ in range(2):
        m = RateQuant(ratio=0.84375, base=base, cache=False, calib_queries=32, **kw)  # 2.5 bits
        m.calibrate(_ctx(fresh_llama))
        tables.append(m.bit_table.clone())
        assert 0 < m.fit["r2"] <= 1 and m.fit["beta"] > 1
    assert torch.equal(tables[0], tables[1])
    assert float(tables[0].float().mean()) == 2.5


def test_mismatched_uses_the_other_fit(fresh_llama):
    m = RateQuant(ratio=0.75, base="quarot", allocation="mismatched", cache=False, calib_queries=32)
    m.calibrate(_ctx(fresh_llama))
    assert m.fit["source"] == "kivi" and float(m.bit_table.float().mean()) == 4.0


@pytest.mark.parametrize("base,cls", [("quarot", QuaRot), ("uniform_int", UniformInt)])
def test_uniform_whole_bits_equals_the_base(tiny_llama, base, cls):
    prompts = random_prompts([25, 14])
    m = RateQuant(ratio=0.75, base=base, allocation="uniform")
    m.calibrate(_ctx(tiny_llama))
    out = run(tiny_llama, m, prompts, chunk=6, n_new=4)
    ref = run(tiny_llama, cls(ratio=0.75), prompts, chunk=6, n_new=4)
    assert out.tokens == ref.tokens
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(out.logits, ref.logits))


def test_bytes_stored_matches_formula(tiny_llama):
    spec = ModelSpec.from_config(tiny_llama.config)
    L, H, D = spec.n_layers, spec.n_kv_heads, spec.head_dim
    m = RateQuant(ratio=0.8125, base="uniform_int", base_params={"group_size": 16})  # 3 bits on average
    bits = torch.tensor([2, 4, 3, 3, 5, 1, 4, 2])  # (kind, layer, head) order, mean 3
    m.set_bits(bits, L, H)
    prompts = random_prompts([23, 17, 9])
    out = run(tiny_llama, m, prompts, chunk=7, n_new=3)
    tokens = sum(len(p) for p in prompts)
    per_bit_width = lambda b: D * b // 8 + 2 * (D // 16) * 2  # noqa: E731 codes + bf16 scale and zero per group
    expected = tokens * sum(per_bit_width(int(b)) for b in bits) + L * H * 2  # + the int8 bit table
    assert out.stats_context.bytes_stored == expected
    assert out.stats_context.bytes_full == L * H * tokens * 2 * D * 2


def test_ratio_honouring(tiny_llama):
    spec = ModelSpec.from_config(tiny_llama.config)  # 2 layers x 2 kv heads x K/V = 8 units
    assert RateQuant(ratio=0.84375).validate(spec) == []  # 2.5 bits x 8 units = 20 bits
    assert RateQuant(ratio=0.859375).validate(spec) == []  # 2.25 bits x 8 = 18 bits
    assert any("whole number" in r for r in RateQuant(ratio=0.86875).validate(spec))  # 2.1 bits x 8 = 16.8
    assert any("outside widths" in r for r in RateQuant(ratio=0.9375).validate(spec))  # 1 bit
