"""Tests of tasks/: synthetic generators, perplexity documents, lm-eval task YAMLs (CPU, offline).

The tokenizer is a small byte-level BPE trained in memory on generated text (no download), wrapped
in ``transformers.PreTrainedTokenizerFast``, with a BOS post-processor so that counting without
special tokens is checked too.
"""

from __future__ import annotations

import collections
import hashlib
import importlib.util
import json
import os
import random
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.find_spec("tasks")
if _spec is None or _spec.origin is None or Path(_spec.origin).parent != ROOT / "tasks":
    sys.path.insert(0, str(ROOT))  # not installed (or installed before tasks/ had an __init__.py)

from tasks import TASK_DIR, lm_eval_task_name  # noqa: E402
from tasks import synthetic as S  # noqa: E402

RETRIEVAL = S.TASKS
# Llama-3's pre-tokenizer split (as Qwen2/tiktoken): it merges punctuation with following newlines.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LENGTHS = (512, 2048)


def words(text: str) -> int:
    """A cheap tokenizer-free count_tokens for tests that do not care about real tokens."""
    return len(text.split())


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    corpus = [S._filler_sentence(rng) for _ in range(2000)]
    corpus += [
        S.NEEDLE_TEMPLATE.format(key=S._draw_key(rng), value=S._draw_number(7)(rng)) for _ in range(200)
    ]
    corpus += [S._draw_uuid(rng) for _ in range(200)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1500,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<bos>", "<eos>"],
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", tok.token_to_id("<bos>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", model_max_length=256
    )


@pytest.fixture(scope="module")
def count(tokenizer):
    return S.token_counter(tokenizer)


def digest(samples: list[dict]) -> str:
    return hashlib.sha256(json.dumps(samples, sort_keys=True).encode()).hexdigest()


# -------------------------------------------------------------------------------------------------
# generators


def test_token_counter_excludes_special_tokens(tokenizer, count):
    text = "The quiet river carried the lamp."
    assert len(tokenizer(text)["input_ids"]) == count(text) + 1  # + <bos>
    assert count(text) == len(tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids)


@pytest.mark.parametrize("task", RETRIEVAL)
def test_deterministic(task, count):
    a = S.make_samples(task, count_tokens=count, context_length=512, n=3, seed=7)
    b = S.make_samples(task, count_tokens=count, context_length=512, n=3, seed=7)
    assert a == b
    assert S.make_sample(task, count_tokens=count, context_length=512, seed=7, index=2) == a[2]
    c = S.make_samples(task, count_tokens=count, context_length=512, n=3, seed=8)
    assert [s["context"] for s in a] != [s["context"] for s in c]
    assert len({s["context"] for s in a}) == 3
    assert len({s["id"] for s in a + c}) == 6


def test_sample_memo_gives_make_samples_and_tokenizes_once(tokenizer, count):
    """A grid's cells share a task's samples (tasks.synthetic.SAMPLES): the memo returns what
    make_samples does, fits each sample once per tokenizer object, and hands out copies."""
    calls = []

    class Counting:  # a tokenizer object that counts its encodes
        def encode(self, text, add_special_tokens=False):
            calls.append(1)
            return tokenizer.encode(text, add_special_tokens=add_special_tokens)

    memo, tok = S.SampleMemo(max_entries=2), Counting()
    first = memo.samples("niah_multikey", tok, context_length=512, n=3, seed=7)
    assert first == S.make_samples("niah_multikey", count_tokens=count, context_length=512, n=3, seed=7)
    made, expected = len(calls), [dict(x, answers=list(x["answers"])) for x in first[:2]]
    first[0]["answers"].append("mutated by a caller")
    again = memo.samples("niah_multikey", tok, context_length=512, n=2, seed=7)
    assert len(calls) == made and again == expected
    other = Counting()  # another tokenizer object never reads this one's samples
    memo.samples("niah_multikey", other, context_length=512, n=1, seed=7)
    assert len(calls) > made
    for seed in (1, 2, 3):  # beyond max_entries the oldest entry goes
        memo.samples("niah_single", tok, context_length=512, n=1, seed=seed)
    assert len(memo._entries) == 2
    with pytest.raises(ValueError, match="non-negative int"):
        memo.samples("niah_single", tok, context_length=512, n=-1, seed=0)


def test_deterministic_across_processes():
    """Same bytes in a fresh interpreter with another hash seed (string seeds are SHA-512 based)."""
    here = digest([S.make_samples(t, count_tokens=words, context_length=300, n=2, seed=3) for t in S.TASKS])
    code = (
        "import json, hashlib; from tasks import synthetic as S\n"
        "w = lambda t: len(t.split())\n"
        "d = [S.make_samples(t, count_tokens=w, context_length=300, n=2, seed=3) for t in S.TASKS]\n"
        "print(hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest())\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == here


def test_golden_sample():
    """Pins the data across machines and Python versions. If you change the generator on purpose, bump
    ``metadata.version`` in the task YAMLs and update these values."""
    s = S.make_sample("niah_single", count_tokens=words, context_length=200, seed=0, index=0)
    assert (s["answers"], s["keys"], s["num_units"], round(s["depth"], 4)) == GOLDEN
    assert hashlib.sha256(s["context"].encode()).hexdigest()[:16] == GOLDEN_CONTEXT


GOLDEN = (["9041304"], ["wet-hat"], 11, 0.1818)
GOLDEN_CONTEXT = "2e48ab86fc3f000a"


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("task", RETRIEVAL)
def test_prompt_fills_context_length(task, length, count):
    samples = S.make_samples(task, count_tokens=count, context_length=length, n=3, seed=0)
    band = S.length_tolerance(length)
    if task == "kv_retrieval":  # one JSON pair is the unit of length; with this tokenizer ~60 tokens
        band = max(
            band,
            count(' "' + S._draw_uuid(random.Random(0)) + '": "' + S._draw_uuid(random.Random(1)) + '",'),
        )
    for s in samples:
        n = count(s["context"] + s["question"])
        assert n == s["num_tokens"] <= length
        assert n >= length - band, (task, length, n, band)
        assert s["context_length"] == length


@pytest.mark.parametrize("task", RETRIEVAL)
def test_context_ends_on_a_token_boundary(task, tokenizer, count):
    """The harness splits the prompt's tokens at len(context); no token may straddle that point."""
    for s in S.make_samples(task, count_tokens=count, context_length=512, n=3, seed=0):
        enc = tokenizer(s["context"] + s["question"], add_special_tokens=False, return_offsets_mapping=True)
        assert len(s["context"]) in {start for start, _ in enc["offset_mapping"]}
    # the merge a question starting with "\n\n" would trip over: ".\n\n" is one pre-token
    pieces = tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(".\n\nWhat")
    assert [span for _, span in pieces] == [(0, 3), (3, 7)]


@pytest.mark.parametrize("task", RETRIEVAL)
def test_sample_fields(task, count):
    for s in S.make_samples(task, count_tokens=count, context_length=512, n=3, seed=1):
        assert s["task"] == task and s["split"] == "eval"
        assert s["context"].endswith("\n\n") and s["question"][0].isalpha()
        assert s["question"].endswith(s["answer_prefix"])
        assert s["answers"] and all(isinstance(a, str) and a for a in s["answers"])
        assert all(a in s["context"] for a in s["answers"]), "every answer must be in the context"
        assert all(a not in s["question"] for a in s["answers"]), "the question must not give the answer away"
        if task != "common_words":
            assert 0.0 <= s["depth"] <= 1.0 and all(0.0 <= d <= 1.0 for d in s["depths"])


def test_niah_needles(count):
    needle = re.compile(r"One of the special magic numbers for ([\w-]+) is: (\d+)\.")
    for task, n_needles in [
        ("niah_single", 1),
        ("niah_multikey", 4),
        ("niah_multivalue", 4),
        ("niah_multiquery", 4),
    ]:
        for s in S.make_samples(task, count_tokens=count, context_length=512, n=3, seed=2):
            found = needle.findall(s["context"])
            assert len(found) == n_needles, task
            by_key = collections.defaultdict(list)
            for k, v in found:
                by_key[k].append(v)
            expected = [v for k in s["keys"] for v in by_key[k]]
            assert sorted(expected) == sorted(s["answers"]), task
            assert all(k in s["question"] for k in s["keys"])


def test_variable_tracking_chain(count):
    for s in S.make_samples("variable_tracking", count_tokens=count, context_length=512, n=5, seed=0):
        value = s["keys"][0]
        holds: set[str] = set()
        for var, src in re.findall(r"VAR ([A-Z]{5}) = (\d+|VAR [A-Z]{5})\.", s["context"]):
            if src == value or src.removeprefix("VAR ") in holds:  # in text order: sources come first
                holds.add(var)
        assert holds == set(s["answers"]) and len(s["answers"]) == S.PARAMS.vt_hops + 1


def test_common_words_top_k(count):
    for length in (512, 4096):
        s = S.make_sample("common_words", count_tokens=count, context_length=length, seed=0, index=0)
        entries = re.findall(r"^(\d+)\. (\S+)$", s["context"], flags=re.M)
        assert [int(i) for i, _ in entries] == list(range(1, len(entries) + 1))
        freq = collections.Counter(w for _, w in entries)
        top = {w for w, _ in freq.most_common(S.PARAMS.cwe_top_k)}
        assert top == set(s["answers"])
        assert min(freq[w] for w in top) > max(c for w, c in freq.items() if w not in top)


def test_kv_retrieval_json(count):
    for s in S.make_samples("kv_retrieval", count_tokens=count, context_length=1024, n=3, seed=0):
        obj = json.loads(s["context"].split("JSON data:\n", 1)[1])
        assert obj[s["keys"][0]] == s["answers"][0]
        assert len(set(obj.values())) == len(obj) > 5


def test_needle_depth_is_uniform():
    depths = [
        S.make_sample("niah_single", count_tokens=words, context_length=400, seed=0, index=i)["depth"]
        for i in range(300)
    ]
    assert 0.44 < sum(depths) / len(depths) < 0.56
    assert sum(d < 0.1 for d in depths) > 10 and sum(d > 0.9 for d in depths) > 10


def test_train_and_eval_never_share_a_stream(count):
    for task in S.TASKS + ("ppl",):
        train = {S.sample_seed_key(task, "train", seed, i) for seed in range(-5, 20) for i in range(100)}
        evals = {S.sample_seed_key(task, "eval", seed, i) for seed in range(-5, 20) for i in range(100)}
        assert len(train) == len(evals) == 2500 and not train & evals
    a = S.make_samples("niah_single", count_tokens=count, context_length=512, n=5, seed=0, split="train")
    b = S.make_samples("niah_single", count_tokens=count, context_length=512, n=5, seed=0, split="eval")
    assert not {s["context"] for s in a} & {s["context"] for s in b}
    assert not {s["answers"][0] for s in a} & {s["answers"][0] for s in b}
    with pytest.raises(ValueError, match="split"):
        S.sample_seed_key("niah_single", "test", 0, 0)


def test_errors_say_what_to_do(count):
    with pytest.raises(ValueError, match="did you mean niah_single"):
        S.make_samples("niah_singel", count_tokens=count, context_length=512, n=1, seed=0)
    with pytest.raises(ValueError, match="too small"):
        S.make_samples("niah_multiquery", count_tokens=count, context_length=40, n=1, seed=0)


def test_score():
    assert S.score("niah_single", " 1234567.", ["1234567"]) == 1.0
    assert S.score("niah_single", "7654321", ["1234567"]) == 0.0
    assert S.score("kv_retrieval", "The value is ABCDEF-01", ["abcdef-01"]) == 1.0  # case-insensitive
    assert (
        S.score("niah_multivalue", "1111111 and 2222222", ["1111111", "2222222", "3333333", "4444444"]) == 0.5
    )
    assert S.score("variable_tracking", "", ["ABCDE"]) == 0.0
    with pytest.raises(ValueError, match="unknown synthetic task"):
        S.score("nope", "x", ["x"])


# -------------------------------------------------------------------------------------------------
# perplexity documents


def test_ppl_docs_synthetic(count):
    docs = S.make_ppl_docs(count_tokens=count, context_length=512, n=2, seed=0)
    assert len(docs) == 2 and docs[0]["text"] != docs[1]["text"]
    for d in docs:
        assert 512 - S.length_tolerance(512) <= count(d["text"]) == d["num_tokens"] <= 512
    train = S.make_ppl_docs(count_tokens=count, context_length=512, n=2, seed=0, split="train")
    assert not {d["text"] for d in docs} & {d["text"] for d in train}


def test_ppl_docs_from_file(tmp_path, count):
    rng = random.Random(0)
    text = "\n\n".join(" ".join(S._filler_sentence(rng) for _ in range(8)) for _ in range(60))
    path = tmp_path / "book.txt"
    path.write_text(text, encoding="utf-8")
    docs = S.make_ppl_docs(count_tokens=count, context_length=256, n=4, seed=0, file=str(path))
    pos = 0
    for d in docs:
        assert 256 - S.length_tolerance(256) <= count(d["text"]) == d["num_tokens"] <= 256
        at = text.index(d["text"], pos)
        assert text[pos:at].strip() == ""  # consecutive: only whitespace between chunks
        pos = at + len(d["text"])
    with pytest.raises(ValueError, match="too short.*longer file"):
        S.make_ppl_docs(count_tokens=count, context_length=256, n=1000, seed=0, file=str(path))
    with pytest.raises(FileNotFoundError, match="does not exist.*text file"):
        S.make_ppl_docs(
            count_tokens=count, context_length=256, n=1, seed=0, file=str(tmp_path / "missing.txt")
        )


# -------------------------------------------------------------------------------------------------
# lm-eval custom_dataset functions and task YAMLs


def test_custom_dataset_functions(tmp_path, tokenizer):
    from tasks import datasets as D

    out = D.niah_multivalue(
        tokenizer=tokenizer, context_length=512, n=2, seed=0, version=1.0, config_source="x"
    )
    ds = out["test"]
    assert len(ds) == 2 and {"id", "context", "question", "answers", "answer_prefix", "depth"} <= set(
        ds.column_names
    )
    assert (
        ds[0]["answers"]
        == S.make_sample(
            "niah_multivalue", count_tokens=S.token_counter(tokenizer), context_length=512, seed=0, index=0
        )["answers"]
    )
    tokenizer.save_pretrained(tmp_path / "tok")  # a local path string is loaded offline
    by_path = D.common_words(tokenizer=str(tmp_path / "tok"), context_length=512, limit=1)["test"]
    assert (
        by_path[0]["context"]
        == D.common_words(tokenizer=tokenizer, context_length=512, n=1)["test"][0]["context"]
    )
    assert len(D.ppl(pretrained=str(tmp_path / "tok"), context_length=256, n=2)["test"]) == 2
    with pytest.raises(ValueError, match="need a tokenizer"):
        D.niah_single(context_length=512)
    with pytest.raises(ValueError, match="context_length"):
        D.niah_single(tokenizer=tokenizer)
    with pytest.raises(OSError, match="not available offline"):
        D.niah_single(tokenizer=str(tmp_path / "no-such-tokenizer"), context_length=512)


def test_yamls_cover_every_task():
    names = {p.stem for p in TASK_DIR.glob("*.yaml")}
    assert names == set(S.TASKS) | {"ppl"}
    for t in S.TASKS:
        text = (TASK_DIR / f"{t}.yaml").read_text()
        assert f"task: {lm_eval_task_name(t)}\n" in text and f"!function datasets.{t}\n" in text


@pytest.fixture
def offline(monkeypatch):
    """HF offline switches on, and any attempt to open a network connection fails the test."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def no_network(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)


def test_lm_eval_offline(offline, tokenizer):
    import lm_eval
    from lm_eval.api.model import LM
    from lm_eval.tasks import TaskManager

    class FirstAnswerLM(LM):
        """Answers every generation with the doc's first answer; a constant log-likelihood otherwise."""

        def __init__(self):
            super().__init__()
            self.requests = []

        def generate_until(self, requests, disable_tqdm=False):
            self.requests += requests
            return [" " + r.doc["answers"][0] + "." for r in requests]

        def loglikelihood(self, requests, disable_tqdm=False):
            raise NotImplementedError

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            self.requests += requests
            return [-50.0 for _ in requests]

    lm = FirstAnswerLM()
    tm = TaskManager(
        include_path=str(TASK_DIR),
        include_defaults=False,
        metadata={"tokenizer": tokenizer, "context_length": 512, "n": 3, "seed": 0},
    )
    names = [lm_eval_task_name(t) for t in S.TASKS] + ["kvbench_ppl"]
    res = lm_eval.simple_evaluate(model=lm, tasks=names, limit=3, task_manager=tm, log_samples=False)
    acc = {t: res["results"][lm_eval_task_name(t)]["accuracy,none"] for t in S.TASKS}
    expected_first_answer_credit = {
        "niah_single": 1.0,
        "niah_multikey": 1.0,
        "kv_retrieval": 1.0,
        "niah_multivalue": 1 / S.PARAMS.multivalue_values,
        "niah_multiquery": 1 / S.PARAMS.multiquery_keys,
        "variable_tracking": 1 / (S.PARAMS.vt_hops + 1),
        "common_words": 1 / S.PARAMS.cwe_top_k,
    }
    assert acc == pytest.approx(expected_first_answer_credit)
    ppl = res["results"]["kvbench_ppl"]
    assert ppl["word_perplexity,none"] > 1 and ppl["bits_per_byte,none"] > 0
    gen = [r for r in lm.requests if r.request_type == "generate_until"]
    assert len(gen) == 3 * len(S.TASKS)
    for r in gen:
        prompt, kwargs = r.args
        assert prompt == r.doc["context"] + r.doc["question"]  # the harness splits at len(context)
        assert kwargs["do_sample"] is False and kwargs["max_gen_toks"] >= 32
    rolling = [r for r in lm.requests if r.request_type == "loglikelihood_rolling"]
    assert [r.args[0] for r in rolling] == [r.doc["text"] for r in rolling] and len(rolling) == 3
