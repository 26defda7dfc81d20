"""Engine behaviour: stop tokens, protocols, input checks."""

import copy

import pytest
import torch

from harness.engine import Engine, Prompt
from methods.full import Full
from methods.streaming_llm import StreamingLLM
from tests.helpers import random_prompts, run


def test_stop_tokens_end_each_row_on_its_own(tiny_llama):
    prompts = random_prompts([15, 22])
    free = run(tiny_llama, Full(), prompts, n_new=10)
    stop = free.tokens[0][3]
    first = free.tokens[0].index(stop)
    out = Engine(copy.deepcopy(tiny_llama), Full()).generate(
        [Prompt(context=p) for p in prompts], max_new_tokens=10, stop_ids=[stop]
    )
    assert out.tokens[0] == free.tokens[0][:first] and out.stopped[0]
    if stop in free.tokens[1]:
        assert out.tokens[1] == free.tokens[1][: free.tokens[1].index(stop)]
    else:
        assert out.tokens[1] == free.tokens[1] and not out.stopped[1]


def test_protocols(tiny_llama):
    prompts = random_prompts([30, 20])
    questions = random_prompts([5, 4], seed=5)
    a = run(tiny_llama, Full(), prompts, questions=questions, protocol="query_agnostic")
    b = run(tiny_llama, Full(), prompts, questions=questions, protocol="query_aware")
    assert a.tokens == b.tokens  # a full cache does not care when compression would happen
    s = StreamingLLM(ratio=0.5)
    a = run(tiny_llama, s, prompts, questions=questions, protocol="query_agnostic")
    b = run(tiny_llama, s, prompts, questions=questions, protocol="query_aware")
    # query-aware compresses context + question together: the budget counts the question too
    L = tiny_llama.config.num_hidden_layers  # KVState.stats sums over layers
    assert b.stats_context.tokens_kept[:, 0].tolist() == [L * s.kept_tokens(35), L * s.kept_tokens(24)]
    assert a.stats_context.tokens_kept[:, 0].tolist() == [L * s.kept_tokens(30), L * s.kept_tokens(20)]


def test_bad_inputs_say_what_to_do(tiny_llama):
    engine = Engine(copy.deepcopy(tiny_llama), Full())
    with pytest.raises(ValueError, match="protocol"):
        engine.generate([Prompt(context=[1, 2])], max_new_tokens=2, protocol="aware")
    with pytest.raises(ValueError, match="empty"):
        engine.generate([Prompt(context=[])], max_new_tokens=2)
    with pytest.raises(ValueError, match="prefill_chunk"):
        Engine(copy.deepcopy(tiny_llama), Full(), prefill_chunk=0)


def test_context_chunks_compute_no_logits(tiny_llama, monkeypatch):
    """Context chunks never call the LM head; only the chunk holding a row's last token does."""
    engine = Engine(copy.deepcopy(tiny_llama), Full(), prefill_chunk=4)
    calls = []
    head = engine.lm_head
    monkeypatch.setattr(engine, "lm_head", lambda h: (calls.append(tuple(h.shape)), head(h))[1])
    engine.generate([Prompt(context=random_prompts([17])[0], question=[3, 4])], max_new_tokens=1)
    assert calls == [(1, tiny_llama.config.hidden_size)]  # one row, once: the question's last token


@pytest.mark.gpu
@pytest.mark.parametrize("method", [Full(), StreamingLLM(ratio=0.5)], ids=lambda m: m.name)
def test_decode_step_does_not_sync_with_host(tiny_llama, method):
    model = copy.deepcopy(tiny_llama).cuda()
    engine = Engine(model, method)
    state = engine.new_state(2, 64)
    engine.run_segment(state, random_prompts([20, 13]), [0, 0], chunk=None, want_last=[True, True], last_logits=None)
    state.end_of_context()
    tok = torch.tensor([[1], [2]], device="cuda")
    pos = torch.tensor([[20], [13]], device="cuda")
    valid = torch.ones(2, 1, dtype=torch.bool, device="cuda")
    at = torch.zeros(2, dtype=torch.long, device="cuda")
    engine.forward(state, tok, pos, valid, logits_at=at)  # warm-up
    torch.cuda.set_sync_debug_mode("error")
    try:
        engine.forward(state, tok, pos + 1, valid, logits_at=at)
    finally:
        torch.cuda.set_sync_debug_mode("default")
