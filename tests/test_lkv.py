"""LKV (paper 4): budget arithmetic, the differentiable top-k, RoPE un-rotation, the method in the
engine (physical per-head budgets, ratio 0 = full), refusals, and the training / evaluation scripts."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from methods.api import CalibrationContext, ModelSpec
from methods.full import Full
from methods.lkv import (
    LKV,
    LKVWeights,
    head_budgets,
    head_fractions,
    read_meta,
    save_weights,
    soft_keep,
    unrotate,
    weights_fingerprint,
)
from methods.selectors import keep_count
from tests.helpers import prefill, random_prompts, run

REPO = Path(__file__).resolve().parent.parent


def fake_weights(model, path, ratios=(0.5,), variants=("joint",), seed=0, n_sink=4, window=32, overwrite=False):
    """A weights file for ``model`` with random scorers and skewed budgets (what training writes)."""
    spec = ModelSpec.from_config(model.config)
    L, H, D = spec.n_layers, spec.n_kv_heads, spec.head_dim
    g = torch.Generator().manual_seed(seed)
    entries = {}
    for r in ratios:
        theta = torch.randn(L, H, generator=g)
        for v in variants:
            entries[(v, r)] = LKVWeights(torch.randn(L, H, 2 * D + 2, 8, generator=g), torch.zeros(L, H, 8),
                                         torch.randn(L, H, 8, generator=g), torch.zeros(L, H),
                                         head_fractions(theta, 1 - r, 0.2))
    meta = {"model": "test", "spec": {"n_layers": L, "n_kv_heads": H, "head_dim": D},
            "fingerprint": weights_fingerprint(model), "n_sink": n_sink, "window": window}
    save_weights(path, meta, entries, overwrite=overwrite)
    return entries


def ready(method, model):
    spec = ModelSpec.from_config(model.config)
    assert method.validate(spec) == []
    method.calibrate(CalibrationContext(model=model, spec=spec, samples=[], device="cpu", dtype=torch.float32))
    return method


# -- arithmetic ------------------------------------------------------------------------------------
def test_head_budgets_meet_the_budget_function_exactly_after_rounding():
    g = torch.Generator().manual_seed(0)
    for L, H in ((4, 2), (3, 5), (32, 8)):
        for ratio in (0.1, 0.5, 0.75, 0.85, 0.9, 0.99):
            rho = head_fractions(3 * torch.randn(L, H, generator=g), 1 - ratio, 0.2)
            for n in (1, 2, 7, 100, 2047, 8192):
                b = head_budgets(n, ratio, rho, L, H)
                flat = [x for row in b for x in row]
                assert sum(flat) == L * H * keep_count(n, ratio), (L, H, ratio, n)
                assert all(1 <= x <= n for x in flat)
                assert head_budgets(n, ratio, None, L, H) == [[keep_count(n, ratio)] * H] * L


def test_head_fractions_have_the_target_mean_a_floor_and_a_cap():
    g = torch.Generator().manual_seed(1)
    for mean in (0.15, 0.5, 0.9):
        for scale in (0.0, 1.0, 8.0):
            theta = scale * torch.randn(4, 8, generator=g)
            rho = head_fractions(theta, mean, 0.2)
            assert abs(float(rho.mean()) - mean) < 1e-5
            assert float(rho.min()) >= 0.2 * mean - 1e-6 and float(rho.max()) <= 1 + 1e-6
    theta = torch.zeros(2, 2, requires_grad=True)
    head_fractions(theta, 0.5, 0.2)[0, 0].backward()
    assert float(theta.grad.abs().sum()) > 0, "budgets are learned through the softmax"


def test_soft_keep_sums_to_the_budget_with_implicit_gradients():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(3, 2, 50, generator=g, requires_grad=True)
    keep = torch.tensor([[5.0, 12.5], [1.0, 30.0], [20.0, 0.5]], requires_grad=True)
    valid = torch.rand(3, 2, 50, generator=g) > 0.2
    for temp in (1.0, 0.05):
        m = soft_keep(s, keep, valid, temp)
        assert torch.allclose(m.sum(-1), keep, atol=1e-3)
        assert float(m.detach()[~valid].abs().max()) == 0.0
        gs, gk = torch.autograd.grad(m.sum(), (s, keep))
        assert float(gs.abs().max()) < 1e-4, "moving one score cannot change how many are kept"
        assert torch.allclose(gk, torch.ones_like(gk), atol=1e-4), "one more token of budget keeps one more"


def test_unrotate_inverts_the_models_rope(tiny_llama):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from methods.lkv import rope_of

    g = torch.Generator().manual_seed(3)
    D = ModelSpec.from_config(tiny_llama.config).head_dim
    k = torch.randn(2, 2, 11, D, generator=g)
    pos = torch.tensor([list(range(11)), list(range(100, 111))])
    cos, sin = tiny_llama.model.rotary_emb(k, pos)
    _, k_rot = apply_rotary_pos_emb(k, k, cos, sin)
    inv, scale = rope_of(tiny_llama)
    assert torch.allclose(unrotate(k_rot, pos[:, None], inv, scale), k, atol=1e-5)


# -- the method in the engine ------------------------------------------------------------------------


@pytest.mark.parametrize("knobs", [{}, {"allocation": "uniform"}, {"scorer": "uniform"}, {"evict_in_decode": True}],
                         ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "learned")
def test_kept_tokens_per_head_are_the_learned_budgets_physically(knobs, tiny_llama, tmp_path):
    path = tmp_path / "w.safetensors"
    fake_weights(tiny_llama, path, ratios=(0.6,), variants=("joint", "scorer_only"), n_sink=2, window=3)
    method = ready(LKV(ratio=0.6, weights=str(path), n_sink=2, window=3, **knobs), tiny_llama)
    spec = ModelSpec.from_config(tiny_llama.config)
    prompts = random_prompts([40, 23, 9])
    engine, state = prefill(tiny_llama, method, prompts)
    state.end_of_context()
    for li, layer in enumerate(state.layers):
        want = [head_budgets(len(p), 0.6, method._w.rho if knobs.get("allocation") != "uniform" else None,
                             spec.n_layers, spec.n_kv_heads)[li] for p in prompts]
        assert layer.tokens_kept().tolist() == want
        assert layer.k.dim() == 2 and layer.k.shape[0] == int(layer.sizes.sum())  # flat, prefill buffer gone
    total = state.stats().tokens_kept.sum(1)  # per row, over layers and heads
    assert total.tolist() == [spec.n_layers * spec.n_kv_heads * keep_count(len(p), 0.6) for p in prompts]
    st = state.stats()
    assert abs((1 - st.bytes_stored / st.bytes_full) - 0.6) < 0.03


def test_the_kept_set_is_the_scorers_top_k_and_deterministic(tiny_llama, tmp_path):
    path = tmp_path / "w.safetensors"
    fake_weights(tiny_llama, path, ratios=(0.5,), n_sink=0, window=0)
    prompts = random_prompts([33, 20])
    kept = []
    for batch in (prompts, prompts[:1]):
        method = ready(LKV(ratio=0.5, weights=str(path), n_sink=0, window=0), tiny_llama)
        _, state = prefill(tiny_llama, method, batch)
        layer = state.layers[1]
        inp = layer.score_input()
        scores = method.scores(inp)
        sel = method.plan(inp)
        keep, budget = sel.keep, sel.budget
        for b in range(len(batch)):  # the budget's highest scores, nothing else
            for h in range(keep.shape[1]):
                n = len(batch[b])
                top = set(scores[b, h, :n].argsort(descending=True)[: int(budget[b, h])].tolist())
                assert set(keep[b, h].nonzero().flatten().tolist()) == top
        kept.append(keep[0])
    assert torch.equal(kept[0][:, :33], kept[1][:, :33]), "a row's selection does not depend on its batch"


def test_ratio_zero_equals_full(tiny_llama):
    prompts = random_prompts([23, 17, 9])
    questions = random_prompts([3, 5, 2], seed=5)
    ref = run(tiny_llama, Full(), prompts, chunk=7, questions=questions, n_new=4)
    method = ready(LKV(ratio=0.0, weights="/nonexistent.safetensors"), tiny_llama)  # ratio 0 needs no weights
    out = run(tiny_llama, method, prompts, chunk=7, questions=questions, n_new=4)
    assert out.tokens == ref.tokens
    assert max(float((a - b).abs().max()) for a, b in zip(out.logits, ref.logits)) <= 1e-5


def test_decode_eviction_keeps_each_head_within_its_budget(tiny_llama, tmp_path):
    path = tmp_path / "w.safetensors"
    fake_weights(tiny_llama, path, ratios=(0.5,), n_sink=2, window=3)
    method = ready(LKV(ratio=0.5, weights=str(path), n_sink=2, window=3, evict_in_decode=True), tiny_llama)
    engine, state = prefill(tiny_llama, method, random_prompts([40]), extra=20)
    state.end_of_context()
    base = state.layers[0].tokens_kept()[0].clone()
    for step in range(10):
        engine.forward(state, torch.tensor([[7]]), torch.tensor([[40 + step]]), torch.ones(1, 1, dtype=torch.bool),
                       logits_at=torch.zeros(1, dtype=torch.long))
        grow = keep_count(40 + step + 1, 0.5) - keep_count(40, 0.5)  # the budget function's share of new tokens
        assert torch.equal(state.layers[0].tokens_kept()[0], base + grow), step  # 10 new tokens, 5 more kept
    layer = state.layers[0]
    occ, _, _ = layer._occupied()
    assert layer.score is not None and bool(torch.isfinite(layer.score[occ]).all())  # new tokens scored when written


# -- refusals ----------------------------------------------------------------------------------------
def test_missing_weights_and_untrained_ratios_are_skipped_with_the_training_command(tiny_llama, tmp_path):
    spec = ModelSpec.from_config(tiny_llama.config)
    reasons = LKV(ratio=0.5, weights=str(tmp_path / "none.safetensors")).validate(spec)
    assert len(reasons) == 1 and "python -m scripts.train.lkv" in reasons[0] and "--ratios 0.5" in reasons[0]
    path = tmp_path / "w.safetensors"
    fake_weights(tiny_llama, path, ratios=(0.5,))
    reasons = LKV(ratio=0.75, weights=str(path)).validate(spec)
    assert len(reasons) == 1 and "no weights for ratio 0.75" in reasons[0] and "joint/0.5" in reasons[0]


def test_weights_trained_for_another_model_are_refused(tiny_llama, tmp_path):
    from harness.models import build_random_model, tiny_config

    path = tmp_path / "w.safetensors"
    fake_weights(tiny_llama, path, ratios=(0.5,))
    other = build_random_model(tiny_config("llama"), seed=1)  # same shape, other weights
    method = LKV(ratio=0.5, weights=str(path))
    spec = ModelSpec.from_config(other.config)
    assert method.validate(spec) == []  # the shape matches ...
    with pytest.raises(ValueError, match="fingerprint"):  # ... the weights do not
        method.calibrate(CalibrationContext(model=other, spec=spec, samples=[], device="cpu", dtype=torch.float32))
    wide = ModelSpec(**{**spec.__dict__, "head_dim": spec.head_dim * 2})
    reasons = LKV(ratio=0.5, weights=str(path)).validate(wide)
    assert len(reasons) == 1 and "were trained for model" in reasons[0]


def test_a_weights_file_keeps_other_ratios_when_extended_and_is_never_silently_replaced(tiny_llama, tmp_path):
    from harness.models import build_random_model, tiny_config

    path = tmp_path / "w.safetensors"
    fake_weights(tiny_llama, path, ratios=(0.5,))
    fake_weights(tiny_llama, path, ratios=(0.75,), variants=("scorer_only",))
    assert read_meta(path)["entries"] == ["joint/0.5", "scorer_only/0.75"]
    other = build_random_model(tiny_config("llama"), seed=1)
    with pytest.raises(ValueError, match="another model"):
        fake_weights(other, path, ratios=(0.9,))
    assert read_meta(path)["entries"] == ["joint/0.5", "scorer_only/0.75"]
    fake_weights(other, path, ratios=(0.9,), overwrite=True)
    assert read_meta(path)["entries"] == ["joint/0.9"]


def test_protected_tokens_must_match_training(tiny_llama, tmp_path):
    path = tmp_path / "w.safetensors"
    fake_weights(tiny_llama, path, ratios=(0.5,), n_sink=4, window=32)
    reasons = LKV(ratio=0.5, weights=str(path), n_sink=4, window=8).validate(ModelSpec.from_config(tiny_llama.config))
    assert len(reasons) == 1 and "window=32" in reasons[0]


# -- scripts -------------------------------------------------------------------------------------------
NO_GPU_IMPORTS = "assert not {'lm_eval', 'wandb', 'hydra'} & set(sys.modules), sorted({'lm_eval', 'wandb', 'hydra'} & set(sys.modules))"


@pytest.mark.slow
def test_train_lkv_smoke_is_deterministic_writes_weights_the_method_loads_and_a_falling_curve(tmp_path):
    w, c, w2 = tmp_path / "w.safetensors", tmp_path / "curve.json", tmp_path / "again.safetensors"
    args = "'--smoke', '--ratios', '0.5', '--variants', 'joint'"
    code = (f"import sys; import scripts.train.lkv as t; "
            f"t.main([{args}, '--weights', {str(w)!r}, '--curve', {str(c)!r}]); "
            f"t.main([{args}, '--weights', {str(w2)!r}, '--curve', {str(tmp_path / 'c2.json')!r}]); "
            f"{NO_GPU_IMPORTS}")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    from safetensors.torch import load_file

    a, b = load_file(str(w)), load_file(str(w2))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "same seed, same weights"
    curve = json.loads(c.read_text())
    (res,) = curve["runs"]
    assert res["variant"] == "joint" and res["ratio"] == 0.5 and len(res["curve"]) >= 2
    assert res["eval_after"]["seen_tasks"]["kl"] < res["eval_before"]["seen_tasks"]["kl"]
    assert abs(sum(map(sum, res["rho"])) / sum(map(len, res["rho"])) - 0.5) < 1e-4
    meta = read_meta(w)
    assert meta["entries"] == ["joint/0.5"] and meta["held_out"] == ["niah_multikey", "common_words"]
    from harness.loading import load

    model = load({"path": "models/kvbench-tiny"}, device="cpu").model
    method = ready(LKV(ratio=0.5, weights=str(w), window=8), model)  # the smoke trains with window 8
    assert method._w.rho.shape == (4, 2)


def test_held_out_tasks_cannot_be_trained_on():
    out = subprocess.run([sys.executable, "-m", "scripts.train.lkv", "--tasks", "niah_single,niah_multikey"], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 2 and "held out" in out.stderr


@pytest.mark.slow
def test_length_generalization_smoke_prints_its_table_with_the_committed_weights(tmp_path):
    code = (f"import sys; import scripts.experiments.lkv_length_generalization as g; g.main(['--smoke', '--out', {str(tmp_path)!r}]); "
            f"{NO_GPU_IMPORTS}")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(summary["mean"]) == {"seen@256", "seen@512", "held_out@256", "held_out@512"}
    assert "| split | task | length | full | lkv |" in out.stdout
    rows = list(__import__("csv").DictReader(open(tmp_path / "smoke.csv")))
    assert len(rows) == 2 * 2 * 6  # tasks x lengths x methods
    for r in rows:
        if r["method"] != "full":
            assert abs(float(r["ratio_achieved"]) - 0.85) < 0.03, r


def test_fused_store_scores_new_tokens_and_evicts_as_the_reference(interpret, tiny_llama, tmp_path):
    """LKV on the fused store (the learned scorer of each decode token inside the step, the eviction arg-min on the
    device) keeps and generates what the reference store does."""
    from harness.engine import Engine, Prompt

    path = tmp_path / "w.safetensors"
    fake_weights(tiny_llama, path, ratios=(0.5,), n_sink=2, window=3)
    prompts = [Prompt(context=p) for p in random_prompts([30, 30])]
    outs = {}
    for fused in ("off", "on"):
        method = ready(LKV(ratio=0.5, weights=str(path), n_sink=2, window=3, evict_in_decode=True, fused=fused),
                       tiny_llama)
        engine = Engine(copy.deepcopy(tiny_llama), method, prefill_chunk=8)
        outs[fused] = engine.generate(prompts, max_new_tokens=5, return_logits=True)
        assert engine.kernel == ("fused" if fused == "on" else "reference")
    assert outs["on"].tokens == outs["off"].tokens
    for a, b in zip(outs["off"].logits, outs["on"].logits):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    assert torch.equal(outs["on"].stats_final.tokens_kept, outs["off"].stats_final.tokens_kept)
