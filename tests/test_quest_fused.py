"""quest's fused store (sparse-read kernels) against its reference store: same tokens, logits, bytes and reads, on CPU
under Triton's interpreter and (``gpu`` marker) through a CUDA graph on the GPU."""

from __future__ import annotations

import copy

import pytest
import torch

from harness.engine import Engine, Prompt
from methods.quest import FusedQuestStore, Quest, QuestStore
from tests.helpers import graph_steps_without_sync

pytest.importorskip("triton", reason="the fused kernels need Triton (pip install -e '.[dev]' brings it)")

TINY = "models/kvbench-tiny"


def _prompts(lengths, q_len=6, seed=0, vocab=250):
    g = torch.Generator().manual_seed(seed)
    return [Prompt(context=torch.randint(3, vocab, (n,), generator=g).tolist(),
                   question=torch.randint(3, vocab, (q_len,), generator=g).tolist()) for n in lengths]


def _both(model, method_kw, prompts, n_new, device="cpu", graph=False, chunk=16):
    outs, kernels = {}, {}
    for fused in ("off", "on"):
        engine = Engine(copy.deepcopy(model).to(device), Quest(fused=fused, **method_kw), prefill_chunk=chunk,
                        cuda_graph=graph)
        outs[fused] = engine.generate(prompts, max_new_tokens=n_new, return_logits=True)
        kernels[fused] = engine.kernel
        assert getattr(engine, "graph_error", None) is None
    assert kernels == {"off": "reference", "on": "fused"}
    return outs["off"], outs["on"]


def _same(ref, fast, tol):
    assert fast.tokens == ref.tokens
    for a, b in zip(ref.logits, fast.logits):
        torch.testing.assert_close(b.float(), a.float(), atol=tol, rtol=tol)
    for s_ref, s_fast in ((ref.stats_context, fast.stats_context), (ref.stats_final, fast.stats_final)):
        assert s_fast.bytes_stored == s_ref.bytes_stored
        assert s_fast.bytes_read_per_step == s_ref.bytes_read_per_step
        assert torch.equal(s_fast.tokens_kept.cpu(), s_ref.tokens_kept.cpu())


@pytest.mark.parametrize("lengths,gqa", [([37, 37], "per_head"), ([37, 26], "group")], ids=["equal", "ragged"])
def test_fused_quest_gives_the_reference_tokens_logits_and_reads(interpret, tiny_llama, lengths, gqa):
    """Equal lengths run the fused prefill, a ragged batch the reference prefill; layer 0 decodes densely, layer 1
    through the page kernels; the question closes a page and decode closes another."""
    kw = {"ratio": 0.7, "page_size": 4, "dense_layers": 1, "gqa": gqa}
    ref, fast = _both(tiny_llama, kw, _prompts(lengths, q_len=5), n_new=5)
    _same(ref, fast, 1e-4)
    assert ref.stats_final.bytes_read_per_step < ref.stats_final.bytes_stored  # pages were skipped


def test_fused_quest_store_is_chosen_and_graph_safe(interpret, tiny_llama):
    engine = Engine(copy.deepcopy(tiny_llama), Quest(fused="on", page_size=4))
    state = engine.new_state(1, 40)
    assert all(type(layer) is FusedQuestStore for layer in state.layers) and state.graph_safe
    engine = Engine(copy.deepcopy(tiny_llama), Quest())  # auto: the reference on CPU
    assert all(type(layer) is QuestStore for layer in engine.new_state(1, 40).layers)
    with pytest.raises(ValueError, match="page_size 6"):
        Engine(copy.deepcopy(tiny_llama), Quest(fused="on", page_size=6)).new_state(1, 40)
    with pytest.raises(ValueError, match="gqa"):
        Quest(gqa="mean")


def _trained_prompts(task, n, context_length, *, ragged=False):
    """n samples of ``task``; ``ragged``: each 32 tokens shorter than the one before (the prefill takes the
    reference path, only the decode is fused: fast under the interpreter)."""
    from transformers import AutoTokenizer

    from tasks.synthetic import make_sample, token_counter

    tok = AutoTokenizer.from_pretrained(TINY, local_files_only=True)
    prompts = []
    for i in range(n):
        n_tok = context_length - 32 * i if ragged else context_length
        s = make_sample(task, count_tokens=token_counter(tok), context_length=n_tok, seed=0, index=i)
        n_ctx = len(tok(s["context"], add_special_tokens=False)["input_ids"])
        ids = tok(s["context"] + s["question"], add_special_tokens=False)["input_ids"]
        prompts.append(Prompt(context=ids[:n_ctx], question=ids[n_ctx:]))
    return prompts


def _trained(dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(TINY, dtype=dtype, local_files_only=True)


@pytest.mark.slow  # end to end (make test-slow; CI runs it): keeps make test under 5 minutes
def test_fused_quest_on_the_trained_model_gives_the_reference_tokens(interpret):
    """The embedded model on its own task at ratio 0.9 (quest's defaults: pages of 16, two dense layers), two
    samples: greedy tokens identical, logits within 1e-3."""
    prompts = _trained_prompts("niah_single", 2, 352, ragged=True)
    ref, fast = _both(_trained(), {"ratio": 0.9}, prompts, n_new=4, chunk=512)
    _same(ref, fast, 1e-3)


# -- GPU (pytest -m gpu on the GPU machine) ---------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("gqa", ["per_head", "group"])
@pytest.mark.parametrize("lengths", [[300, 300], [300, 170]], ids=["equal", "ragged"])
def test_cuda_graph_quest_gives_the_reference_tokens(tiny_llama, lengths, gqa):
    kw = {"ratio": 0.8, "page_size": 16, "dense_layers": 1, "gqa": gqa}
    ref, fast = _both(tiny_llama, kw, _prompts(lengths), n_new=40, device="cuda", graph=True, chunk=128)
    _same(ref, fast, 1e-4)


@pytest.mark.gpu
def test_quest_graph_decode_step_does_not_sync_with_host(tiny_llama):
    engine = Engine(copy.deepcopy(tiny_llama).cuda(), Quest(ratio=0.8, page_size=16, dense_layers=1))
    state = engine.new_state(2, 128)
    engine.run_segment(state, [p.context for p in _prompts([70, 70])], [0, 0], chunk=None, want_last=[True, True],
                       last_logits=None)
    state.end_of_context()
    assert all(type(layer) is FusedQuestStore for layer in state.layers)
    graph_steps_without_sync(engine, state, start=70, steps=3)
    assert state.layers[0].lengths.tolist() == [73, 73] and state.layers[0].hi == 73


@pytest.mark.gpu
@pytest.mark.parametrize("gqa", ["per_head", "group"])
def test_cuda_graph_quest_on_the_trained_model_gives_the_reference_tokens(gqa):
    """16 samples of the tiny model's tasks at 2048 tokens (fp32; the bf16 parity is measured by
    scripts/bench_sparse.py --parity): greedy tokens identical, logits within 1e-3."""
    prompts = []
    for task in ("niah_single", "niah_multikey", "niah_multivalue", "variable_tracking"):
        prompts += _trained_prompts(task, 4, 2048)
    ref, fast = _both(_trained(), {"ratio": 0.9, "gqa": gqa}, prompts, n_new=12, device="cuda", graph=True,
                      chunk=1024)
    _same(ref, fast, 1e-3)


@pytest.mark.parametrize("make", [lambda: Quest(fused="on", ratio=0.7, page_size=4, dense_layers=1),
                                  lambda: __import__("methods.louver", fromlist=["Louver"]).Louver(
                                      fused="on", index="grid", ratio=0.7, sample_size=32, merge_every=2)],
                         ids=["quest", "louver_grid"])
def test_fused_decode_step_reads_nothing_back_to_the_host(interpret, tiny_llama, monkeypatch, make):
    """The fused stores' decode step never turns a tensor into a Python value (what a CUDA graph cannot replay and
    what would synchronise with the GPU): bool(), int(), float(), .item() and .tolist() raise inside it."""
    engine = Engine(copy.deepcopy(tiny_llama), make(), prefill_chunk=16)
    state = engine.new_state(2, 48)
    prompts = [p.context for p in _prompts([30, 30])]
    engine.run_segment(state, prompts, [0, 0], chunk=16, want_last=[False, False], last_logits=None)
    state.end_of_context()
    assert state.graph_safe

    def refuse(*a, **k):
        raise AssertionError("host sync in the fused decode step")

    for layer in state.layers:
        orig = layer._fused_decode

        def decode(*a, orig=orig, **k):
            with monkeypatch.context() as m:
                for name in ("__bool__", "__int__", "__float__", "__index__", "item", "tolist"):
                    m.setattr(torch.Tensor, name, refuse)
                return orig(*a, **k)

        layer._fused_decode = decode
    for step in range(3):
        tok = torch.tensor([[5], [7]])
        pos = torch.full((2, 1), 30 + step)
        engine.forward(state, tok, pos, torch.ones(2, 1, dtype=torch.bool), logits_at=torch.zeros(2, dtype=torch.long))
    assert state.layers[1].lengths.tolist() == [33, 33]
