"""The fused decode step (harness/fused_decoder.py) and its kernels (harness/kernels/layers.py, and the
store's K/V append, methods/kernels/append.py): kernels against their references on CPU under Triton's interpreter and on the GPU (fp32 and bf16), the engine's fused
step against the module path for every supported family, weights shared not copied, and refusals. ``gpu``
tests run on the GPU machine."""

from __future__ import annotations

import copy

import pytest
import torch

from harness.engine import Engine
from harness.models import build_random_model, tiny_config
from methods.full import Full

pytest.importorskip("triton", reason="the fused kernels need Triton (pip install -e '.[dev]' brings it)")

from harness import fused_decoder  # noqa: E402
from harness.kernels import layers as L  # noqa: E402
from methods.kernels import append as A  # noqa: E402
from tests.test_kernels import _prompts  # noqa: E402


def _check_kernels(device: str, dtype: torch.dtype, exact: bool) -> None:
    """Every kernel of harness.kernels.layers (and methods.kernels.append) against its reference: odd widths
    (masked tails), GQA heads, a finished row (valid False). ``exact``: elementwise kernels bit-equal, norms within one ulp."""
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=dtype)

    ulp = torch.finfo(dtype).eps
    for B, N in ((3, 300), (1, 4096), (2, 64)):
        x, d, w = rand(B, N), rand(B, N), rand(N)
        for delta in (d, None):
            want_x, want = L.add_rmsnorm_reference(x.clone(), delta, w, 1e-5)
            got_x = x.clone()
            got = L.add_rmsnorm(got_x, delta, w, 1e-5)
            torch.testing.assert_close(got_x, want_x, atol=0, rtol=0)  # the residual add rounds once: exact
            torch.testing.assert_close(got, want, atol=4 * ulp, rtol=2 * ulp)
    for B, H, D in ((2, 6, 64), (1, 40, 128), (3, 3, 16)):
        x, cos, sin = rand(B, H, D), rand(B, D), rand(B, D)
        want = L.rope_reference(x, cos, sin)
        got = x.clone()
        L.rope_(got, cos, sin)
        tol = 0 if exact else 2e-7  # fp32 on the GPU: the compiler may contract x*cos + rot*sin into an FMA
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    for B, N in ((2, 700), (1, 14336)):
        gu = rand(B, 2 * N)
        torch.testing.assert_close(L.silu_mul(gu), L.silu_mul_reference(gu), atol=2 * ulp, rtol=2 * ulp)
    for B, N, K in ((1, 70, 300), (3, 33, 96), (8, 40, 9000)):  # every gemv_config branch, ragged tiles
        if device == "cpu" and dtype != torch.float32 and L.gemv_config(B, K)["use_dot"]:
            continue  # Triton's interpreter computes a bf16 tl.dot wrongly; the GPU test covers it
        x, w, bias = rand(B, K), rand(N, K) / K**0.5, rand(N)
        for b in (bias, None):
            want = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float())
            # fp32: sums of up to 9,000 products in another order (~sqrt(K) x eps); bf16: the output's rounding
            tol = 5e-5 if dtype == torch.float32 else 3e-2
            torch.testing.assert_close(L.linear(x, w, b).float(), want, atol=tol, rtol=tol)
            small = L.gemv(x, w, b, block_n=16, block_k=64, num_warps=4, num_stages=2)  # fits any dtype
            torch.testing.assert_close(small.float(), want, atol=tol, rtol=tol)
    assert L.gemv_config(9, 4096) is None and L.gemv_config(1, 4096)["use_dot"] is False
    for B, H, D, S in ((2, 3, 16, 10), (4, 8, 128, 40)):
        K, V = torch.zeros(2, B, H, S, D, device=device, dtype=dtype)
        k, v = rand(B, H + 2, D)[:, 1 : H + 1], rand(B, H, D)  # k: a strided view (as from the QKV output)
        lengths = torch.randint(0, S - 1, (B,), generator=g, device=device)
        seen = lengths + 3
        valid = torch.arange(B, device=device) % 2 == 0
        K2, V2, l2, s2 = K.clone(), V.clone(), lengths.clone(), seen.clone()
        A.append_decode_reference(k, v, K, V, lengths, seen, valid)
        A.append_decode(k, v, K2, V2, l2, s2, valid)
        assert torch.equal(K2, K) and torch.equal(V2, V)
        assert torch.equal(l2, lengths) and torch.equal(s2, seen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layer_kernels_match_their_references(interpret, dtype):
    _check_kernels("cpu", dtype, exact=True)


def _random_biases(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and m.bias is not None:
            m.bias.data = torch.randn(m.bias.shape, generator=g) * 0.5


# llama in the default suite; qwen2 and mistral (about 12 s each under the interpreter) in `make test-slow` (CI runs
# both); qwen2's q/k/v biases stay in the default suite through test_fused_step_applies_every_bias_in_bf16
@pytest.mark.parametrize("arch", ["llama", pytest.param("qwen2", marks=pytest.mark.slow),
                                  pytest.param("mistral", marks=pytest.mark.slow)])
def test_fused_step_gives_the_module_paths_tokens_and_logits(interpret, arch):
    """Ragged batch (a finished row included), the fused store: the fused step gives the module path's greedy
    tokens, logits to 1e-4, forward passes, attention calls and stored bytes. qwen2 has q/k/v biases."""
    model = build_random_model(tiny_config(arch), seed=0)
    _random_biases(model)
    prompts = _prompts([13, 7, 10], q_len=3)
    for store in ("on",):  # the store the GPU runs; tests/test_contract.py runs every method's store
        outs = {}
        for layers in ("off", "on"):
            engine = Engine(copy.deepcopy(model), Full(fused=store), prefill_chunk=8, fused_layers=layers)
            assert (engine.fused is not None) == (layers == "on"), engine.fused_layers_reason
            outs[layers] = engine.generate(prompts, max_new_tokens=6, stop_ids=[7], return_logits=True)
        ref, fast = outs["off"], outs["on"]
        assert fast.tokens == ref.tokens and fast.stopped == ref.stopped
        for a, b in zip(ref.logits, fast.logits):
            torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
        assert (fast.n_forward, fast.attention_calls) == (ref.n_forward, ref.attention_calls)
        assert fast.stats_final.bytes_stored == ref.stats_final.bytes_stored
        assert torch.equal(fast.stats_final.tokens_kept, ref.stats_final.tokens_kept)


def test_fused_step_applies_every_bias_in_bf16(interpret):
    """Llama with attention and MLP biases (o_proj and down_proj included), in bf16, one row (the
    interpreter's bf16 tl.dot is unfaithful; one row takes the CUDA-core GEMV): the fused step rounds where
    the modules round, so the greedy tokens are the module path's and the logits agree to bf16 precision."""
    model = build_random_model(tiny_config("llama", attention_bias=True, mlp_bias=True), seed=0)
    _random_biases(model)
    model = model.to(torch.bfloat16)
    prompts = _prompts([15], q_len=3)
    outs = {}
    for layers in ("off", "on"):
        engine = Engine(copy.deepcopy(model), Full(fused="on"), fused_layers=layers)
        outs[layers] = engine.generate(prompts, max_new_tokens=6, return_logits=True)
    assert outs["on"].tokens == outs["off"].tokens
    torch.testing.assert_close(outs["on"].logits[0], outs["off"].logits[0], atol=0.05, rtol=0.02)


def test_selftest_passes_and_catches_a_kernel_that_computes_something_else(interpret, monkeypatch):
    fd = fused_decoder.for_model(build_random_model(tiny_config("qwen2"), seed=0))
    fd.selftest()
    monkeypatch.setattr(L, "linear", lambda x, w, b=None: torch.zeros(x.shape[0], w.shape[0], dtype=x.dtype))
    with pytest.raises(RuntimeError, match="gemv of qkv"):
        fd.selftest()


def test_fused_step_shares_the_models_weights(interpret):
    """Fusing re-points q/k/v and gate/up at views of one tensor each: no second copy, the same values,
    and the module path still computes the same logits. Moving the model rebuilds the fused decoder."""
    model = build_random_model(tiny_config("llama"), seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.tensor([[5, 9, 11, 3]])
    want = model(ids).logits
    fd = fused_decoder.for_model(model)
    assert fused_decoder.for_model(model) is fd  # cached on the model
    layer, attn = fd.layers[0], model.model.layers[0].self_attn
    assert attn.k_proj.weight.untyped_storage().data_ptr() == layer.wqkv.untyped_storage().data_ptr()
    assert model.model.layers[0].mlp.up_proj.weight.untyped_storage().data_ptr() == layer.wgu.untyped_storage().data_ptr()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert len(storages) == len(list(model.parameters())) - 3 * len(fd.layers)  # q,k,v -> 1 and gate,up -> 1
    torch.testing.assert_close(model(ids).logits, want, atol=0, rtol=0)
    model.to(torch.float64)
    assert not fd.intact() and fused_decoder.for_model(model) is not fd


def test_fused_step_refuses_what_it_does_not_compute(interpret, tiny_llama):
    qwen3 = build_random_model(tiny_config("qwen3"), seed=0)
    assert "model_type 'qwen3'" in fused_decoder.reasons(qwen3)[0]
    engine = Engine(copy.deepcopy(qwen3), Full())  # auto: the module path, with the reason
    assert engine.fused is None and "qwen3" in engine.fused_layers_reason
    with pytest.raises(ValueError, match="fused_layers=on, but: model_type 'qwen3'.*use fused_layers=auto or off"):
        Engine(copy.deepcopy(qwen3), Full(), fused_layers="on")
    gelu = build_random_model(tiny_config("llama", hidden_act="gelu"), seed=0)
    assert fused_decoder.reasons(gelu) == ["hidden_act 'gelu' is not silu"]
    auto = Engine(copy.deepcopy(tiny_llama), Full())  # CPU: auto keeps the module path
    assert auto.fused is None and "CUDA only" in auto.fused_layers_reason
    with pytest.raises(ValueError, match="fused_layers must be one of"):
        Engine(copy.deepcopy(tiny_llama), Full(), fused_layers="yes")


# -- GPU (run on the GPU machine: pytest -m gpu) ---------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layer_kernels_match_their_references_on_gpu(dtype):
    _check_kernels("cuda", dtype, exact=dtype != torch.float32)


@pytest.mark.gpu
def test_fused_graph_step_gives_the_plain_paths_tokens_on_the_tiny_model():
    """The embedded tiny model in bf16 on niah_single prompts: the fast path (fused step, fused store, CUDA
    graph) gives the plain path's (module path, reference store, eager) greedy tokens."""
    from harness.engine import Prompt
    from harness.evaluate import split_prompt, stop_ids
    from harness.loading import load
    from tasks.synthetic import make_samples, token_counter

    loaded = load({"path": "models/kvbench-tiny", "dtype": "bfloat16"}, device="cuda")
    model, tok = loaded.model, loaded.tokenizer
    samples = make_samples("niah_single", count_tokens=token_counter(tok), context_length=1024, n=8, seed=0)
    prompts = [Prompt(*split_prompt(tok, s["context"], s["question"])) for s in samples]
    stops = stop_ids(tok)
    outs = {}
    for name, method, layers, graph in (("plain", Full(fused="off"), "off", False), ("fast", Full(), "on", True)):
        engine = Engine(model, method, prefill_chunk=256, fused_layers=layers, cuda_graph=graph)
        outs[name] = engine.generate(prompts, max_new_tokens=16, stop_ids=stops)
        assert engine.graph_error is None
    assert outs["fast"].tokens == outs["plain"].tokens
    assert sum(map(len, outs["fast"].tokens)) > 8  # it answered something


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fused_graph_step_matches_the_module_path_on_gpu(arch):
    model = build_random_model(tiny_config(arch), seed=0)
    _random_biases(model)
    model = model.cuda()
    prompts = _prompts([300, 170])
    outs = {}
    for layers in ("off", "on"):
        engine = Engine(model, Full(), prefill_chunk=128, fused_layers=layers)
        outs[layers] = engine.generate(prompts, max_new_tokens=12, return_logits=True)
        assert engine.graph_error is None and (engine.fused is not None) == (layers == "on")
    assert outs["on"].tokens == outs["off"].tokens
    for a, b in zip(outs["off"].logits, outs["on"].logits):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
