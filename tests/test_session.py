"""One evaluation session (harness/session.py): validate -> calibrate -> engine, for the runner and the scripts."""

from types import SimpleNamespace

import pytest
import torch

from harness.calibration import engine_runner
from harness.session import Unsupported, open_session, probe_batch
from methods.api import MethodBase
from methods.full import Full
from methods.ratequant import Capture, RateQuant
from tests.helpers import random_prompts


class _Recorder(Full):
    """A full cache that keeps the CalibrationContext it was given."""

    def calibrate(self, ctx):
        self.ctx = ctx


def test_calibration_prefills_in_the_runs_chunks(fresh_llama):
    m = _Recorder()
    session = open_session(model=fresh_llama, tokenizer=None, method=m, device="cpu", dtype=torch.float32, seed=3,
                           prefill_chunk=16)
    assert m.ctx.prefill_chunk == 16 and m.ctx.seed == 3 and session.engine.prefill_chunk == 16
    assert m.ctx.make_samples is not None and session.calibrate_ms >= 0
    sample = torch.tensor(random_prompts([40])[0])
    chunked = m.ctx.run(Capture(), [sample])[0]
    whole = engine_runner(fresh_llama)(Capture(), [sample])[0]
    assert chunked.n_forward == 3 and whole.n_forward == 1  # 16 + 16 + 8 tokens: the run's chunks


def test_capture_keeps_every_chunk(fresh_llama):
    """A capture in chunks holds the whole sequence's q, k, v (not the last chunk's), equal to one pass."""
    sample = torch.tensor(random_prompts([40])[0])
    caps = {}
    for chunk in (None, 16):
        cap = Capture()
        engine_runner(fresh_llama, prefill_chunk=chunk)(cap, [sample])
        caps[chunk] = cap.captured
        engine_runner(fresh_llama, prefill_chunk=chunk)(cap, [sample])  # a second sample starts afresh
        assert [t[1].shape[2] for t in cap.captured] == [40] * len(cap.captured)
    for whole, chunked in zip(caps[None], caps[16]):
        for a, b in zip(whole, chunked):
            assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)


def test_an_unsupported_method_is_refused_before_calibration(fresh_llama):
    class Refuses(_Recorder):
        def validate(self, model):
            return ["not on this model"]

    m = Refuses()
    with pytest.raises(Unsupported, match="not on this model"):
        open_session(model=fresh_llama, tokenizer=None, method=m, device="cpu", dtype=torch.float32, seed=0,
                     prefill_chunk=None)
    assert not hasattr(m, "ctx")


def test_probe_batch_follows_batch_size_unless_bench_sets_it():
    assert probe_batch({"batch_size": 4, "bench": {"batch_size": None}}) == (4, "batch_size")
    assert probe_batch({"batch_size": 4, "bench": {"batch_size": 1}}) == (1, "bench.batch_size")


def test_the_evaluator_calibrates_ratequant(tmp_path):
    """The Evaluator prepares a method as the runner does: RateQuant fits on held-out samples in chunks."""
    from harness.evaluate import Evaluator

    args = SimpleNamespace(n=2, seed=0, protocol="query_agnostic", max_new_tokens=4, prefill_chunk=32, batch_size=2,
                           device="cpu", context_length=128)
    ev = Evaluator(args, tmp_path, tag="test")
    m = RateQuant(ratio=0.75, base="uniform_int", cache=False, calib_samples=1, calib_length=64, calib_queries=16)
    scores, kv = ev.scores("tiny", "niah_single", m, "ratequant")
    assert len(scores) == 2 and m.fit.get("beta", 0) > 1 and float(m.bit_table.float().mean()) == 4.0
    assert kv["ratio_achieved"] > 0.5
    assert isinstance(m, MethodBase)
