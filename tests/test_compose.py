"""compose: an eviction selector in front of a quantizer (methods/compose.py; issue 23 item 5)."""

import copy

import pytest
import torch

from harness.engine import Engine, Prompt
from methods import catalog
from methods.api import ModelSpec
from methods.compose import HeadStores
from methods.quantizers import UniformQuantizer
from methods.stores import walk_tensors
from tests.helpers import prefill, random_prompts, run

KIVI = {"group_size": 8, "residual_length": 8}  # the tiny test model: head_dim 32, prompts of tens of tokens


def compose(ratio=0.875, **kw):
    kw.setdefault("selector_params", {"window": 4})
    kw.setdefault("quantizer_params", KIVI if kw.get("quantizer", "kivi") == "kivi" else {})
    return catalog.build("compose", ratio=ratio, **kw)


@pytest.fixture(scope="module")
def spec(tiny_llama):
    return ModelSpec.from_config(tiny_llama.config)


# -- the ratio ------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio,keep", [(0.75, 1.0), (0.875, 0.5), (0.9375, 0.25), (0.96875, 0.125)])
def test_ratio_is_the_selectors_keep_times_the_quantizers_bytes(ratio, keep):
    m = compose(ratio)
    s, q = m.split()
    assert (1 - s, q) == (keep, 0.75) and m.ratio_reasons() == []
    assert (m.selector_method.ratio, m.quantizer_method.ratio) == (s, q)
    assert m.selector_method.window == 4 and m.quantizer_method.residual_length == 8  # the parts' knobs


def test_a_ratio_the_pair_cannot_honour_is_refused_with_the_reason():
    assert "use ratio >= 0.75" in compose(0.5).ratio_reasons()[0]  # the selector cannot keep more than everything
    m = compose(0.9, quantizer_ratio=None, selector_ratio=0.5)  # kivi would need 3.2 bits
    assert m.split() == (0.5, 0.8) and any("3.2 bits" in r for r in m.ratio_reasons())
    assert compose(0.875, quantizer_ratio=None, selector_ratio=0.5).split() == (0.5, 0.75)
    assert compose(0.875, selector_ratio=0.5).ratio_reasons() == []  # both given and consistent
    assert "set one of them" in compose(0.9, selector_ratio=0.5).ratio_reasons()[0]
    assert compose(1.0).ratio_reasons()  # the ratio rule of every method
    with pytest.raises(ValueError, match="set quantizer_ratio"):
        compose(quantizer_ratio=None)
    with pytest.raises(ValueError, match="did you mean snapkv"):
        compose(selector="snapkvv")


@pytest.mark.parametrize("selector,params,match", [
    ("h2o", {}, "evict_in_decode=false"),
    ("lkv", {"evict_in_decode": True}, "evicts during decode"),
    ("value_aware", {"support": "decode_queries", "window": 4}, "re-selects"),
    ("streaming_llm", {}, "no prefill-time plan"),
    ("quest", {}, "sparse read"),
    ("louver", {}, "sparse read"),
])
def test_selectors_whose_work_goes_on_after_the_context_are_refused(selector, params, match, spec):
    m = catalog.build("compose", ratio=0.875, selector=selector, selector_params=params, quantizer="uniform_int")
    assert any(match in r for r in m.validate(spec)), m.validate(spec)


def test_a_quantizer_must_be_a_quantizer_and_prefill_only_h2o_is_supported(spec):
    m = catalog.build("compose", ratio=0.875, selector="snapkv", quantizer="knorm", quantizer_ratio=0.5)
    assert any("quantization family" in r for r in m.validate(spec))
    m = catalog.build("compose", ratio=0.875, selector="h2o", selector_params={"evict_in_decode": False},
                      quantizer="uniform_int")
    assert m.validate(spec) == []


# -- bytes, selection, ingest ---------------------------------------------------------------------
def test_bytes_are_the_product_of_both_savings(tiny_llama):
    """Per-token codes (uniform_int): bytes stored = tokens kept x the quantizer's bytes per token, measured; the
    selector's own budgets decide the tokens kept."""
    prompts, qs = random_prompts([40, 33]), random_prompts([3, 3], seed=5)
    comp = run(tiny_llama, compose(0.875, quantizer="uniform_int"), prompts, n_new=4, chunk=8, questions=qs)
    alone = run(tiny_llama, catalog.build("uniform_int", ratio=0.75), prompts, n_new=4, chunk=8, questions=qs)
    sel = run(tiny_llama, catalog.build("snapkv", ratio=0.5, window=4), prompts, n_new=4, chunk=8, questions=qs)
    c, a = comp.stats_context, alone.stats_context
    assert torch.equal(c.tokens_kept, sel.stats_context.tokens_kept)
    assert torch.equal(c.tokens_seen, a.tokens_seen) and c.bytes_full == a.bytes_full
    per_token = a.bytes_stored / int(a.tokens_kept.sum())
    assert c.bytes_stored == per_token * int(c.tokens_kept.sum())
    keep = int(c.tokens_kept.sum()) / int(a.tokens_kept.sum())
    assert 1 - c.bytes_stored / c.bytes_full == pytest.approx(1 - keep * a.bytes_stored / a.bytes_full, abs=1e-12)
    f = comp.stats_final  # question and decode tokens: quantized on append, one token's bytes each
    assert f.bytes_stored == per_token * int(f.tokens_kept.sum())


@pytest.mark.parametrize("quantizer,ratio,qratio", [("kivi", 0.875, 0.75), ("uniform_int", 0.875, 0.75),
                                                    ("fp8", 0.75, 0.5), ("turboquant_kqv", 0.875, 0.75)])
def test_ingest_equals_the_quantizer_alone_on_the_kept_tokens(tiny_llama, spec, quantizer, ratio, qratio):
    """The quantizer's store after end_of_context holds exactly what the quantizer alone stores when it is given the
    kept tokens (KIVI's codes, scales and windows included), and decodes the same."""
    method = compose(ratio, quantizer=quantizer, quantizer_ratio=qratio)
    n, extra = 37, 8
    _, state = prefill(tiny_llama, method, random_prompts([n]), chunk=8, extra=extra)
    for i, layer in enumerate(state.layers):
        inp = layer.prefill.score_input()
        keep = method.selector_method.plan(inp).keep[0]  # (H_kv, S)
        kk = torch.stack([inp.keys[0, h][keep[h]] for h in range(spec.n_kv_heads)])[None]  # (1, H_kv, K, D)
        vv = torch.stack([inp.values[0, h][keep[h]] for h in range(spec.n_kv_heads)])[None]
        K, D = kk.shape[2], spec.head_dim
        alone = method.quantizer_method.new_layer(spec.layer(i), batch=1, capacity=K + extra, device="cpu",
                                                  dtype=torch.float32)
        alone.extend(torch.zeros(1, spec.n_q_heads, K, D), kk, vv, positions=torch.arange(K)[None],
                     valid=torch.ones(1, K, dtype=torch.bool), scaling=D**-0.5)
        layer.end_of_context()
        got = dict(walk_tensors(layer.store))
        for name, t in walk_tensors(alone):
            if name != "seen":
                assert torch.equal(got[name], t), (quantizer, i, name)
        assert int(layer.store.seen) == n and int(alone.seen) == K  # bytes_full counts every context token
        assert layer.stats().bytes_stored == alone.stats().bytes_stored
        g = torch.Generator().manual_seed(i)
        q1, k1, v1 = torch.randn(1, spec.n_q_heads, 1, D, generator=g), *torch.randn(2, 1, spec.n_kv_heads, 1, D,
                                                                                         generator=g)
        kw = dict(positions=torch.tensor([[n]]), valid=torch.ones(1, 1, dtype=torch.bool), scaling=D**-0.5)
        torch.testing.assert_close(layer.extend(q1, k1, v1, **kw), alone.extend(q1, k1, v1, **kw), atol=0, rtol=0)


def test_nothing_evicted_is_ever_quantized(tiny_llama, spec, monkeypatch):
    """The prefill is full precision (no encode call); end_of_context encodes exactly the kept tokens, in position
    order; a decode step encodes its one token."""
    encoded = []
    encode = UniformQuantizer.encode

    def spy(self, x, *, meta_dtype):
        encoded.append(x.detach().clone())
        return encode(self, x, meta_dtype=meta_dtype)

    monkeypatch.setattr(UniformQuantizer, "encode", spy)
    method = compose(0.875, quantizer="uniform_int")
    engine, state = prefill(tiny_llama, method, random_prompts([40]), chunk=8, extra=8)
    assert encoded == []
    plans = []
    for layer in state.layers:
        inp = layer.prefill.score_input()
        plans.append((method.selector_method.plan(inp).keep[0], inp.keys[0].clone(), inp.values[0].clone()))
    state.end_of_context()
    assert len(encoded) == 2 * spec.n_layers  # K then V of each layer, once
    for (keep, keys, values), ek, ev in zip(plans, encoded[0::2], encoded[1::2]):
        assert ek.shape[2] == int(keep[0].sum()) < keys.shape[1]
        for h in range(spec.n_kv_heads):
            assert torch.equal(ek[0, h], keys[h][keep[h]]) and torch.equal(ev[0, h], values[h][keep[h]])
    del encoded[:]
    engine.run_segment(state, [[7]], [40], chunk=None, want_last=[True], last_logits=None)  # one decode step
    assert len(encoded) == 2 * spec.n_layers and all(x.shape[2] == 1 for x in encoded)


@pytest.mark.parametrize("selector", ["snapkv", "adakv", "pyramidkv"])
def test_with_a_16_bit_quantizer_compose_is_the_selector_alone(tiny_llama, selector):
    """quantizer_ratio 0 stores the kept tokens unquantized: the selector alone's tokens, logits and bytes, through
    one store per layer or (AdaKV's per-head budgets) one per kv head."""
    params = {"window": 4}
    prompts, qs = random_prompts([40, 33]), random_prompts([3, 3], seed=5)
    method = catalog.build("compose", ratio=0.5, selector=selector, selector_params=params, quantizer="uniform_int",
                           quantizer_ratio=0.0)
    comp = run(tiny_llama, method, prompts, n_new=5, chunk=8, questions=qs)
    alone = run(tiny_llama, catalog.build(selector, ratio=0.5, **params), prompts, n_new=5, chunk=8, questions=qs)
    assert comp.tokens == alone.tokens
    for a, b in zip(alone.logits, comp.logits):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    for c, a in ((comp.stats_context, alone.stats_context), (comp.stats_final, alone.stats_final)):
        assert torch.equal(c.tokens_kept, a.tokens_kept) and c.bytes_stored == a.bytes_stored


def test_heads_keeping_different_counts_get_a_store_each(tiny_llama, spec):
    method = compose(0.875, selector="adakv", quantizer="kivi")
    _, state = prefill(tiny_llama, method, random_prompts([40, 33]), chunk=8, extra=8)
    state.end_of_context()
    split = [layer for layer in state.layers if isinstance(layer.store, HeadStores)]
    assert split, "AdaKV gave every head of the tiny model the same budget: the test lost its point"
    for layer in split:
        kept = layer.stats().tokens_kept  # (B, H_kv)
        assert kept.shape == (2, spec.n_kv_heads) and (kept[:, :1] != kept).any()
        assert layer.stats().bytes_stored == sum(st.stats().bytes_stored for st in layer.store.stores)
    forked = state.fork()  # the per-head stores fork too
    assert forked.stats().bytes_stored == state.stats().bytes_stored


def test_ratequant_behind_per_head_budgets_keeps_each_heads_widths(tiny_llama, spec):
    """AdaKV + RateQuant (the shape of LKV + RateQuant): one store per kv head, each at its own (K, V) widths with
    its row of the bit table counted; per-layer budgets (SnapKV) keep RateQuant's grouped layer store."""
    bits = torch.tensor([2, 3, 4, 3, 3, 2, 4, 3])  # mean 3 = quantizer_ratio 0.8125; units (K|V, layer, head)
    stores = {}
    for selector in ("adakv", "snapkv"):
        m = catalog.build("compose", ratio=0.90625, selector=selector, selector_params={"window": 4},
                          quantizer="ratequant", quantizer_ratio=0.8125, quantizer_params={"base": "uniform_int"})
        assert m.split() == (0.5, 0.8125)
        m.quantizer_method.set_bits(bits, spec.n_layers, spec.n_kv_heads)
        _, state = prefill(tiny_llama, m, random_prompts([40, 33]), chunk=8, extra=8)
        state.end_of_context()
        stores[selector] = [layer.store for layer in state.layers]
        table = m.quantizer_method.bit_table  # (L, H_kv, 2)
    split = [(i, st) for i, st in enumerate(stores["adakv"]) if isinstance(st, HeadStores)]
    assert split
    for i, st in split:
        for h, head in enumerate(st.stores):
            assert torch.equal(head.bits.cpu(), table[i, h : h + 1])
    assert not any(isinstance(st, HeadStores) for st in stores["snapkv"])


# -- through the runner ---------------------------------------------------------------------------
@pytest.mark.slow
def test_a_compose_row_through_the_runner(tmp_path):
    from harness.run import run_job
    from harness.sweep import compose as compose_config

    small = ["limit=2", "context_length=256", "prefill_chunk=64", "bench.enabled=false", "progress=false",
             f"results_dir={tmp_path}", "task=niah_single", "method=compose",
             "+method.quantizer_params.residual_length=32"]
    row = run_job(compose_config([*small, "ratio=0.875"]), method_name="compose")
    assert row["status"] == "ok", row["reason"]
    assert (row["family"], row["kernel"], row["memory"]) == ("composed", "reference", "physical")
    assert '"selector": "snapkv"' in row["method_params"] and '"residual_length": 32' in row["method_params"]
    # SnapKV keeps half, KIVI stores 4-bit codes + scales + its 32-token window of the kept ones
    assert 0.75 < row["ratio_achieved"] < 0.875 and row["kv_bytes_stored"] < row["kv_bytes_full"] / 4
    skipped = run_job(compose_config([*small, "ratio=0.5"]), method_name="compose")
    assert skipped["status"] == "skipped" and "ratio >= 0.75" in skipped["reason"]


# -- the fused paths (GPU) ------------------------------------------------------------------------
def _gpu_model():
    from harness.loading import load

    return load({"path": "models/kvbench-tiny", "dtype": "float32"}, device="cuda").model


def _gpu_prompts():
    g = torch.Generator().manual_seed(0)
    lengths = [300] * 4 + [170, 233, 64, 129]
    return [Prompt(context=torch.randint(3, 250, (n,), generator=g).tolist(),
                   question=torch.randint(3, 250, (8,), generator=g).tolist()) for n in lengths]


@pytest.mark.gpu
@pytest.mark.parametrize("selector,quantizer,ratio,qratio", [("snapkv", "kivi", 0.875, 0.75),
                                                             ("adakv", "uniform_int", 0.875, 0.75),
                                                             ("snapkv", "fp8", 0.75, 0.5)])
def test_the_quantizers_fused_decode_serves_the_kept_tokens_on_gpu(selector, quantizer, ratio, qratio):
    """The same selection (the selector's reference store) in front of the quantizer's fused and reference stores:
    the fused decode (CUDA graph) gives the reference's tokens and bytes; with every part on auto the row says
    fused."""
    model, prompts = _gpu_model(), _gpu_prompts()
    outs = {}
    for fused in ("off", "on"):
        method = catalog.build("compose", ratio=ratio, selector=selector, selector_params={"fused": "off"},
                               quantizer=quantizer, quantizer_ratio=qratio, quantizer_params={"fused": fused})
        engine = Engine(model, method, prefill_chunk=128)
        outs[fused] = engine.generate(prompts, max_new_tokens=24, return_logits=True)
        assert engine.graph_error is None
    ref, fast = outs["off"], outs["on"]
    assert fast.tokens == ref.tokens
    for a, b in zip(ref.logits, fast.logits):
        torch.testing.assert_close(b, a, atol=1e-3, rtol=1e-3)
    assert fast.stats_context.bytes_stored == ref.stats_context.bytes_stored
    method = catalog.build("compose", ratio=ratio, selector=selector, quantizer=quantizer, quantizer_ratio=qratio)
    engine = Engine(model, copy.deepcopy(method), prefill_chunk=128)
    out = engine.generate(prompts, max_new_tokens=8)
    assert engine.kernel == "fused" and engine.graph_error is None
    assert out.stats_context.bytes_stored < out.stats_context.bytes_full * (1 - ratio) * 1.6
