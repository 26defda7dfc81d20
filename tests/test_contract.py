"""The method contract (methods/api.py) and the engine's model checks."""

import copy
import subprocess
import sys

import pytest
import torch

from harness.engine import Engine, UnsupportedModel
from harness.models import build_random_model, tiny_config
from methods import catalog
from methods.api import KVMethod, LayerKV, ModelSpec
from methods.full import Full
from tests.helpers import random_prompts


def _ratequant():
    m = catalog.build("ratequant", ratio=0.8125, base="kivi", base_params={"group_size": 8, "residual_length": 8})
    m.set_bits(torch.tensor([2, 3, 4, 3, 3, 2, 4, 3]), 2, 2)  # the tiny test model: 2 layers x 2 kv heads
    return m


# Catalogue methods held to the contract, built as the runner builds them (conf/method defaults), with
# knobs small enough for the tiny test model (2 layers, 2 kv heads, head_dim 32, prompts of 13-20 tokens).
CONTRACT: dict[str, tuple[float, dict]] = {
    "full": (0.0, {}),
    "uniform_int": (0.75, {}),
    "streaming_llm": (0.5, {"n_sink": 2}),
    "snapkv": (0.5, {"window": 4}),
    "adakv": (0.5, {"window": 4}),
    "h2o": (0.5, {}),
    "value_aware": (0.5, {"support": "decode_queries", "window": 4}),
    "louver": (0.5, {"n_subspaces": 4, "merge_every": 2}),
    "quest": (0.5, {"page_size": 4, "dense_layers": 1}),
    "fp8": (0.5, {"scale": "head"}),
    "kivi": (0.875, {"group_size": 8, "residual_length": 8}),
    "quarot": (0.8125, {}),
    "turboquant_qkqv": (0.75, {}),
    "compose": (0.875, {"selector_params": {"window": 4}, "quantizer_params": {"group_size": 8, "residual_length": 8}}),
}
# every other catalogue method: its conf/method defaults at its family's ratio (a new YAML is covered
# with no edit here; add it to CONTRACT only if its defaults do not fit the tiny test model)
FAMILY_RATIO = {"none": 0.0, "eviction": 0.5, "quantization": 0.75, "sparse": 0.5, "composed": 0.875}
BUILT_ELSEWHERE = {"ratequant": _ratequant}  # needs a bit allocation (calibration) before its stores


def _build(name: str):
    if name in BUILT_ELSEWHERE:
        return BUILT_ELSEWHERE[name]()
    ratio, knobs = CONTRACT.get(name, (FAMILY_RATIO[catalog.family(name)], {}))
    return catalog.build(name, ratio=ratio, **knobs)


# held to the contract elsewhere: lkv needs weights trained for the model (tests/test_lkv.py builds it on
# this tiny model with generated weights)
ELSEWHERE = {"lkv"}
METHODS = [_build(name) for name in catalog.names() if name not in ELSEWHERE]


def test_the_contract_covers_every_family_of_the_catalogue():
    assert set(CONTRACT) <= set(catalog.names())
    assert [m.name for m in METHODS] == [n for n in catalog.names() if n not in ELSEWHERE]
    assert {catalog.family(n) for n in catalog.names()} <= set(FAMILY_RATIO), "give the new family a ratio"


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
def test_methods_satisfy_the_protocols(method, tiny_llama):
    assert isinstance(method, KVMethod)
    spec = ModelSpec.from_config(tiny_llama.config)
    store = method.new_layer(spec.layer(0), batch=2, capacity=16, device="cpu", dtype=torch.float32)
    assert isinstance(store, LayerKV)
    assert method.family in ("none", "quantization", "eviction", "sparse", "composed")
    assert method.memory in ("physical", "simulated")


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
def test_fork_is_independent(method, tiny_llama):
    prompts = random_prompts([20, 13])
    engine = Engine(copy.deepcopy(tiny_llama), method, prefill_chunk=6)
    state = engine.new_state(2, 64)
    engine.run_segment(state, prompts, [0, 0], chunk=6, want_last=[False, False], last_logits=None)
    state.end_of_context()
    before = [{n: t.clone() for n, t in vars(layer).items() if isinstance(t, torch.Tensor)} for layer in state.layers]
    stats_before = state.stats()

    def continue_(st):
        cont = random_prompts([5, 5], seed=11)
        return engine.run_segment(st, cont, [20, 13], chunk=None, want_last=[True, True], last_logits=None)

    forked = state.fork()
    a = continue_(forked)
    for layer, saved in zip(state.layers, before):  # the original is untouched
        for name, t in saved.items():
            assert torch.equal(getattr(layer, name), t), name
    assert state.stats().bytes_stored == stats_before.bytes_stored
    assert torch.equal(state.stats().tokens_kept, stats_before.tokens_kept)
    b = continue_(state)  # and continuing the original gives what the fork gave
    assert torch.allclose(a, b, atol=1e-6)


def test_sliding_window_layer_is_refused():
    config = tiny_config("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1)
    spec = ModelSpec.from_config(config)
    assert spec.layer_types == ("full_attention", "sliding_attention")
    for method in METHODS:
        reasons = method.validate(spec)
        assert any("sliding_attention" in r for r in reasons), reasons
    with pytest.raises(UnsupportedModel, match="full attention"):
        Engine(build_random_model(config), Full())


def test_mistral_sliding_window_field_is_read_when_layer_types_absent():
    assert "sliding_attention" in ModelSpec.from_config(tiny_config("mistral", sliding_window=64)).layer_types
    assert set(ModelSpec.from_config(tiny_config("mistral")).layer_types) == {"full_attention"}
    # Qwen2 sets sliding_window only when use_sliding_window is on: layer_types decides
    assert set(ModelSpec.from_config(tiny_config("qwen2")).layer_types) == {"full_attention"}


def test_no_torch_work_or_registration_at_import():
    code = (
        "import sys, methods.api; assert 'torch' not in sys.modules, 'methods.api imported torch';"
        "import harness.engine, methods.full, methods.uniform_int, methods.streaming_llm, methods.eviction,"
        " methods.value_aware, methods.louver, methods.quest, methods.fp8, methods.kivi, methods.quarot,"
        " methods.ratequant, methods.turboquant;"
        "from transformers import AttentionInterface;"
        "assert 'kvbench' not in AttentionInterface._global_mapping, 'registered at import'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_switch_is_per_model(tiny_llama):
    other = copy.deepcopy(tiny_llama)
    Engine(copy.deepcopy(tiny_llama), Full())
    assert other.config._attn_implementation == "sdpa"
    with torch.inference_mode():
        other(input_ids=torch.tensor([[1, 2, 3]]))  # still runs through sdpa, no kv_state needed


def test_kvbench_model_called_without_state_says_what_to_do(tiny_llama):
    model = copy.deepcopy(tiny_llama)
    Engine(model, Full())
    with pytest.raises(RuntimeError, match="through harness.engine.Engine"):
        with torch.inference_mode():
            model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=False)


def test_capacity_overflow_is_an_error(tiny_llama):
    engine = Engine(copy.deepcopy(tiny_llama), Full())
    state = engine.new_state(1, 4)
    with pytest.raises(RuntimeError, match="capacity"):
        engine.run_segment(state, [[1, 2, 3, 4, 5]], [0], chunk=None, want_last=[False], last_logits=None)


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
def test_every_store_serves_the_fused_decode_step(interpret, method, tiny_llama):
    """On CUDA every method's decode steps run harness/fused_decoder.py (q, k, v reach ``extend`` as views
    into the fused QKV output): same greedy tokens and logits as the module path, same bytes stored."""
    from harness.engine import Prompt

    qs = random_prompts([3, 3], seed=5)
    prompts = [Prompt(context=c, question=q) for c, q in zip(random_prompts([20, 13]), qs)]
    outs = {}
    for layers in ("off", "on"):
        engine = Engine(copy.deepcopy(tiny_llama), copy.deepcopy(method), prefill_chunk=8, fused_layers=layers)
        outs[layers] = engine.generate(prompts, max_new_tokens=4, return_logits=True)
    assert outs["on"].tokens == outs["off"].tokens
    for a, b in zip(outs["off"].logits, outs["on"].logits):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    assert outs["on"].stats_final.bytes_stored == outs["off"].stats_final.bytes_stored
