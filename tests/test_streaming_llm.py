"""streaming_llm: sinks + window, physically compacted at end_of_context."""

import copy

import torch

from harness.engine import Engine
from methods.full import Full
from methods.streaming_llm import StreamingLLM
from tests.helpers import random_prompts, run


def test_holds_exactly_sinks_plus_window_through_decode(tiny_llama):
    prompts = random_prompts([40, 25, 11])
    questions = random_prompts([4, 2, 6], seed=3)
    method = StreamingLLM(ratio=0.5, n_sink=4)
    engine = Engine(copy.deepcopy(tiny_llama), method, prefill_chunk=8)
    state = engine.new_state(3, 100)
    engine.run_segment(state, prompts, [0, 0, 0], chunk=8, want_last=[False] * 3, last_logits=None)
    state.end_of_context()
    kept = [method.kept_tokens(len(p)) for p in prompts]  # 20, 13, 6
    for layer in state.layers:
        assert layer.tokens_kept().tolist() == [[k] * 2 for k in kept]
        assert layer.k.shape[2] == max(kept) + 1  # physically compacted: kept + one free slot
    engine.run_segment(state, questions, [len(p) for p in prompts], chunk=8, want_last=[True] * 3, last_logits=None)
    for step in range(6):
        tok = torch.randint(0, 256, (3, 1))
        pos = torch.tensor([[len(p) + len(q) + step] for p, q in zip(prompts, questions)])
        engine.forward(state, tok, pos, torch.ones(3, 1, dtype=torch.bool), logits_at=torch.zeros(3, dtype=torch.long))
        for layer in state.layers:
            assert layer.tokens_kept().tolist() == [[k] * 2 for k in kept]
            assert layer.k.shape[2] == max(kept) + 1  # no growth during decode


def test_keeps_the_sinks_and_the_most_recent_tokens(tiny_llama):
    (p,) = random_prompts([30])
    full = Engine(copy.deepcopy(tiny_llama), Full())
    fs = full.new_state(1, 40)
    full.run_segment(fs, [p], [0], chunk=None, want_last=[False], last_logits=None)
    method = StreamingLLM(ratio=0.6, n_sink=3)  # keeps 12 = 3 sinks + 9 recent
    eng = Engine(copy.deepcopy(tiny_llama), method)
    ss = eng.new_state(1, 40)
    eng.run_segment(ss, [p], [0], chunk=None, want_last=[False], last_logits=None)
    ss.end_of_context()
    for fl, sl in zip(fs.layers, ss.layers):
        expect = torch.cat([fl.k[:, :, :3], fl.k[:, :, 30 - 9 : 30]], dim=2)  # (1, H_kv, 12, D)
        assert torch.equal(sl.k[:, :, :12], expect)
    # the next decode token replaces the oldest window token (position 21), never a sink
    for e, st in ((full, fs), (eng, ss)):
        e.forward(st, torch.tensor([[5]]), torch.tensor([[30]]), torch.ones(1, 1, dtype=torch.bool),
                  logits_at=torch.zeros(1, dtype=torch.long))
    expected_positions = [0, 1, 2, *range(22, 31)]
    for i, (fl, sl) in enumerate(zip(fs.layers, ss.layers)):
        occupied = sl._occupied()[0]  # (S,)
        kept = sl.k[0][:, occupied]  # (H_kv, 12, D)
        assert kept.shape[1] == 12
        # the new token's key equals full's only in layer 0 (deeper layers saw a different past)
        for pos in expected_positions if i == 0 else expected_positions[:-1]:
            assert (kept == fl.k[0][:, pos : pos + 1]).all(-1).any(-1).all(), pos


def test_ratio_zero_prefill_equals_full(tiny_llama):
    prompts = random_prompts([23, 17, 9])
    ref = run(tiny_llama, Full(), prompts, chunk=7, n_new=1)
    out = run(tiny_llama, StreamingLLM(ratio=0.0), prompts, chunk=7, n_new=1)
    assert out.tokens == ref.tokens
    assert max(float((a - b).abs().max()) for a, b in zip(out.logits, ref.logits)) <= 1e-5
    assert out.stats_context.bytes_stored == ref.stats_context.bytes_stored


def test_compression_changes_memory_physically(tiny_llama):
    prompts = random_prompts([40, 40])
    ref = run(tiny_llama, Full(), prompts, n_new=2)
    out = run(tiny_llama, StreamingLLM(ratio=0.75), prompts, n_new=2)
    assert out.stats_context.bytes_full == ref.stats_context.bytes_full
    assert out.stats_context.bytes_stored == ref.stats_context.bytes_stored // 4  # 10 of 40 tokens
    assert out.stats_context.bytes_allocated < ref.stats_context.bytes_allocated / 3
