"""The lm-eval adapter: prompt splitting at a token boundary, continuation scoring, perplexity."""

import copy

import pytest
import torch
from transformers import AutoTokenizer

from harness.engine import Engine, Prompt
from harness.lm_eval_adapter import PromptSplitter
from harness.measure import PeakMemory
from methods.full import Full
from methods.streaming_llm import StreamingLLM
from tasks.synthetic import make_samples, token_counter


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained("models/kvbench-tiny")


@pytest.fixture(scope="module")
def tiny_model(tok):
    from harness.models import build_random_model, tiny_config

    return build_random_model(tiny_config("llama", vocab_size=len(tok)), seed=0)


def test_prompt_is_tokenized_once_and_split_at_a_token_boundary(tok):
    splitter = PromptSplitter(tokenizer=tok, context_field="context")
    for task in ("niah_single", "variable_tracking", "kv_retrieval"):
        for s in make_samples(task, count_tokens=token_counter(tok), context_length=300, n=3, seed=0):
            prompt = s["context"] + s["question"]
            ctx, q, found = splitter.encode(prompt, s)
            assert found
            assert ctx + q == tok(prompt)["input_ids"]  # one tokenization of the whole prompt
            assert tok.decode(ctx) == s["context"] and tok.decode(q) == s["question"]


def test_prompts_are_tokenized_once_per_process_and_tokenizer(tok):
    """A grid's cells share prompt tokenizations (lm_eval_adapter._TokenizedPrompts): a second splitter
    gets the same split without calling the tokenizer; another tokenizer object tokenizes itself."""
    from harness.lm_eval_adapter import _TokenizedPrompts

    calls = []

    class Counting:
        def __call__(self, text, **kw):
            calls.append(text)
            return tok(text, **kw)

    memo, counting = _TokenizedPrompts(max_entries=2), Counting()
    s = make_samples("niah_single", count_tokens=token_counter(tok), context_length=300, n=1, seed=0)[0]
    prompt, cut = s["context"] + s["question"], len(s["context"])
    first = memo.split(counting, prompt, add_special_tokens=True, cut=cut)
    assert memo.split(counting, prompt, add_special_tokens=True, cut=cut) == first and len(calls) == 1
    ids, i = first
    assert ids == tok(prompt)["input_ids"] and tok.decode(ids[i:]) == s["question"]
    memo.split(Counting(), prompt, add_special_tokens=True, cut=cut)
    assert len(calls) == 2
    assert memo.split(counting, prompt, add_special_tokens=True, cut=None) == (ids, len(ids))
    assert len(memo._memo) == 2  # least recently used out first


def test_middle_truncation_is_counted(tok):
    splitter = PromptSplitter(tokenizer=tok, context_field="context", max_length=100)
    (s,) = make_samples("niah_single", count_tokens=token_counter(tok), context_length=300, n=1, seed=0)
    ctx, q, _ = splitter.encode(s["context"] + s["question"], s, reserve=10)
    full, q_full, _ = PromptSplitter(tokenizer=tok, context_field="context").encode(s["context"] + s["question"], s)
    assert q == q_full
    assert len(ctx) + len(q) + 10 == 100 and splitter.n_truncated == 1
    assert ctx[:5] == full[:5] and ctx[-5:] == full[-5:]  # the middle went, both ends stayed


def test_continuation_scores_match_a_plain_forward(tiny_model):
    ids = torch.randint(0, 200, (30,), generator=torch.Generator().manual_seed(0)).tolist()
    conts = [[5, 6, 7], [9], [11, 12]]
    engine = Engine(copy.deepcopy(tiny_model), Full(), prefill_chunk=8)
    scores, _ = engine.score_continuations(Prompt(context=ids[:20], question=ids[20:]), conts)
    for cont, (logp, greedy) in zip(conts, scores):
        with torch.inference_mode():
            logits = tiny_model(input_ids=torch.tensor([ids + cont])).logits[0].float()
        lp = torch.log_softmax(logits[len(ids) - 1 : -1], -1)
        ref = float(lp.gather(1, torch.tensor(cont)[:, None]).sum())
        assert abs(logp - ref) < 1e-4
        assert greedy == bool((logits[len(ids) - 1 : -1].argmax(-1) == torch.tensor(cont)).all())


def test_rolling_perplexity_chunks_attend_to_the_compressed_past(tiny_model):
    tokens = torch.randint(0, 200, (100,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.inference_mode():
        logits = tiny_model(input_ids=torch.tensor([tokens])).logits[0, :-1].float()
    ref = float(torch.log_softmax(logits, -1).gather(1, torch.tensor(tokens[1:])[:, None]).sum())
    full = Engine(copy.deepcopy(tiny_model), Full())
    total, n, _ = full.score_rolling(tokens, chunk=32)
    assert n == 99 and abs(total - ref) < 1e-3  # full cache: chunking changes nothing
    evict = Engine(copy.deepcopy(tiny_model), StreamingLLM(ratio=0.75))
    total_e, _, stats = evict.score_rolling(tokens, chunk=32)
    assert abs(total_e - ref) > 1e-3  # later chunks saw only the kept tokens
    assert stats.tokens_kept[0, 0] == tiny_model.config.num_hidden_layers * 8  # 25% of the first 32


def test_cpu_peak_is_this_blocks_own_peak():
    from harness.measure import _rss_now

    base = _rss_now()
    big = torch.ones(64 * 2**20)  # 256 MB, freed before the block: the process's high-water mark holds it
    del big
    with PeakMemory(torch.device("cpu")) as pm:
        small = torch.ones(2**20)  # 4 MB
        del small
    assert pm.peak is not None and base is not None
    assert pm.peak < base + 128 * 2**20
