#!/usr/bin/env python3
"""Train the embedded default model ``models/kvbench-tiny``: a ~8M-parameter Llama that retrieves.

One seeded command trains the tokenizer (``scripts/train/tiny_tokenizer.py``) and a ``LlamaForCausalLM``
on text from the ``tasks/`` generators (``split="train"`` only, plus filler documents from
``make_ppl_docs(split="train")``) and writes a Hugging Face directory: ``config.json``, one bf16
``model.safetensors``, the tokenizer files, ``generation_config.json`` and ``README.md``.

    python -m scripts.train.tiny_model --out models/kvbench-tiny   # 530 s wall-clock budget by default

Recipe (following the token-level recall recipe, models/kvbench-tiny/README.md):

- dense supervision: after each context come several questions, each followed by its answer; the first
  is the task's own question in exactly the evaluation format (prompt = context + question, the model
  continues with ``" " + ", ".join(answers) + "\\n"`` and then EOS), the others ask about the other
  needles / JSON keys / variable chains of the same context; a ``dense_niah`` mix adds up to 12 extra
  needles to a multi-key haystack and asks 8 of them (30 % of the stage-0 mix); at stage 0 70 % of the
  extra niah questions use the needle's own words ("One of the special magic numbers for K is:"), 30 % at
  stage 1; an optional ``mqar`` warm-up (``--mqar-share``) asks back 8-16 needles whose keys and values are
  drawn from the whole vocabulary; ``--first-weight`` weights the first two tokens of every answer;
- a length curriculum 256 -> 512 -> 1K -> 2K -> 4K -> 8K that advances when teacher-forced answer
  accuracy (``--advance-at``, on key-conditional questions) at the current length passes a threshold or at a
  wall-clock deadline (stage 0 may keep 48 % of the time), with replay of the shorter lengths, and a constant
  token budget per step (98K tokens: 153 sequences of 256 + 384 question tokens);
- loss = mean cross-entropy over answer tokens (+ 0.1 x a 25 % sample of the other tokens after stage 0).

Status: no recipe so far forms key-conditional retrieval (copying a needle's value forms in ~500 steps; telling
needles apart by key does not). On random-token values this loop learned nothing, not even copying, until the
answers' trailing terminators ("\\n", EOS, the notes' DOT) were taken out of the stage-0 loss
(``--terminator-weight0 0``; the bisection against the one-off ``offset_probe.py``, since removed, is in models/kvbench-tiny/README.md,
"Training experiments so far", with runs 1-8 and the next GPU runs to make).
The defaults are run 3a's recipe; the shipped checkpoint is run 2's.

Training text is made by a pool of CPU worker processes (one padded batch per queue item) so the GPU
never waits; lengths are estimated from a per-task characters-per-token ratio and then tokenized for
real. The run stops on a wall-clock budget, saves the model, then generates greedily on a few
``split="eval"`` samples per task at 2K/4K/8K (for the report only) and prints a table.

GPU-side: imports neither lm-eval, wandb nor Hydra (torch, transformers, tokenizers, numpy only).
``--smoke`` runs a few CPU steps in seconds (tests/test_train_tiny.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import queue as queue_mod
import random
import re
import shutil
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ROOT = Path(__file__).resolve().parents[2]

import numpy as np  # noqa: E402

from tasks import synthetic as S  # noqa: E402

TRAIN_SPLIT = "train"  # the only split training text is ever drawn from
EVAL_SPLIT = "eval"  # used only by the report-only generation check at the end

TRAIN_TASKS: tuple[str, ...] = S.TASKS + ("dense_niah", "dense_vt", "mqar", "notes", "ppl")
NOTES_GAP = [0]  # --notes-gap (a list so forked workers see the value set in main)
NOTES_DOT = 7  # the `notes` task's end-of-value marker (a terminator, see --terminator-weight0)
STAGE0_TOKENS = [0]  # --stage0-tokens-per-step (0: --tokens-per-step), set in main before the workers fork
WORD_VALUES = [0.0]  # --word-values (share of stage-0 dense_niah haystacks with word values), set in main
TASK_ID = {t: i for i, t in enumerate(TRAIN_TASKS)}
# share of training sequences per task
MIX: dict[str, float] = {
    "niah_single": 0.10,
    "niah_multikey": 0.14,
    "niah_multivalue": 0.12,
    "niah_multiquery": 0.09,
    "variable_tracking": 0.16,
    "common_words": 0.05,
    "kv_retrieval": 0.13,
    "dense_niah": 0.14,
    "dense_vt": 0.0,  # --mix dense_vt=0.15 (run 13)
    "mqar": 0.04,
    "ppl": 0.03,
}
# share at the first (shortest) stage: mostly many needles and many questions per context
STAGE0_MIX: dict[str, float] = {
    "mqar": 0.0,  # run 4 in models/kvbench-tiny/README.md used 0.35 and learned nothing
    "notes": 0.0,  # the token-level recall task (models/kvbench-tiny/README.md; --stage0-mix only:notes=1)
    "dense_niah": 0.30,
    "niah_multikey": 0.08,
    "niah_multiquery": 0.05,
    "niah_single": 0.04,
    "niah_multivalue": 0.04,
    "kv_retrieval": 0.07,
    "variable_tracking": 0.07,
}
# tasks whose teacher-forced accuracy (all questions) drives the curriculum: key-conditional retrieval
# (--gate-tasks replaces them)
CURRICULUM_TASKS = ["niah_multikey", "dense_niah", "mqar", "notes"]
# answer tokens whose loss is multiplied by --first-weight: the first two, where the key decides
FIRST_TOKENS = 2
# evaluation settings, as in tasks/<task>.yaml: (stop strings, max new tokens)
GEN: dict[str, tuple[tuple[str, ...], int]] = {
    "niah_single": (("\n",), 32),
    "niah_multikey": (("\n",), 32),
    "niah_multivalue": ((), 64),
    "niah_multiquery": ((), 64),
    "variable_tracking": ((), 64),
    "common_words": ((), 96),
    "kv_retrieval": (("\n",), 64),
}

LENGTHS = (256, 512, 1024, 2048, 4096, 8192)
# a stage is entered at the latest at this fraction of the training time: stage 0 (where key matching
# forms, the slow part) keeps the first half unless it passes the accuracy bar sooner
DEADLINES = (0.0, 0.48, 0.54, 0.60, 0.66, 0.74)
# length mixture once the last stage is reached
FINAL_MIX = {1024: 0.10, 2048: 0.30, 4096: 0.35, 8192: 0.25}

# architecture (kept in code; config.json is written from it)
ARCH = dict(
    vocab_size=4096,
    hidden_size=384,
    intermediate_size=1024,
    num_hidden_layers=4,
    num_attention_heads=6,
    num_key_value_heads=2,
    head_dim=64,
    hidden_act="silu",
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    attention_bias=False,
    mlp_bias=False,
    initializer_range=0.02,
)

NEEDLE_RE = re.compile(r"One of the special magic numbers for ([a-z]+-[a-z]+) is: (\d+)\.")
VT_HEAD_RE = re.compile(r"VAR ([A-Z]{5}) = (\d+)\.")
VT_LINK_RE = re.compile(r"VAR ([A-Z]{5}) = VAR ([A-Z]{5})\.")
WORD_NEEDLE_RE = re.compile(r"One of the special magic numbers for ([a-z]+-[a-z]+) is: ([a-z]+ [a-z]+ [a-z]+)\.")
KV_RE = re.compile(r'"([0-9a-f-]{36})": "([0-9a-f-]{36})"')


# --------------------------------------------------------------------------------------------------
# Questions and answers (the evaluation format)


def niah_question(key: str) -> str:
    """The question of ``niah_single`` / ``niah_multikey`` for ``key`` (ends with its answer prefix)."""
    prefix = f"The special magic number for {key} mentioned in the text above is:"
    return f"What is the special magic number for {key} mentioned in the text above? {prefix}"


def scaffold_question(key: str) -> str:
    """The needle's own words up to the value: retrieval by plain induction (a warm-up for the real question)."""
    return f"One of the special magic numbers for {key} is:"


def kv_question(key: str) -> str:
    """The question of ``kv_retrieval`` for ``key``."""
    return f'What is the value of the key "{key}" in the JSON object above? The value of the key "{key}" is:'


def answer_text(answers: list[str]) -> str:
    """What the model is trained to continue with after the answer prefix (then EOS)."""
    return " " + ", ".join(answers) + "\n"


def ordered_answers(task: str, s: dict) -> list[str]:
    """The sample's answers in the order the model learns to produce them (scoring ignores order)."""
    ctx, answers = s["context"], list(s["answers"])
    if task == "niah_multivalue":  # order of appearance in the context
        return sorted(answers, key=lambda v: ctx.find(f"is: {v}."))
    if task == "common_words":  # order of first appearance in the list
        def first(w: str) -> int:
            m = re.search(rf"\. {re.escape(w)}(?:\n|$)", ctx)
            return m.start() if m else len(ctx)
        return sorted(answers, key=first)
    return answers  # multiquery: asked order; variable_tracking: chain order


def vt_chains(ctx: str) -> dict[str, list[str]]:
    """value -> variables of its chain, in assignment order, parsed from a variable_tracking context."""
    heads = VT_HEAD_RE.findall(ctx)
    links = dict((prev, cur) for cur, prev in VT_LINK_RE.findall(ctx))
    out = {}
    for var, value in heads:
        chain = [var]
        while chain[-1] in links and len(chain) < 64:
            chain.append(links[chain[-1]])
        out[value] = chain
    return out


def qa_pairs(task: str, s: dict, rng: random.Random) -> list[tuple[str, list[str]]]:
    """The sample's own question first (evaluation format), then extra questions about the same context."""
    ctx = s["context"]
    first = (s["question"], ordered_answers(task, s))
    extras: list[tuple[str, list[str]]] = []
    if task in ("niah_multikey", "niah_multiquery"):
        needles = [(k, v) for k, v in NEEDLE_RE.findall(ctx) if task == "niah_multiquery" or k != s["keys"][0]]
        rng.shuffle(needles)
        extras = [(niah_question(k), [v]) for k, v in needles]
    elif task == "kv_retrieval":
        pairs = [(k, v) for k, v in KV_RE.findall(ctx) if k != s["keys"][0]]
        rng.shuffle(pairs)
        extras = [(kv_question(k), [v]) for k, v in pairs[:16]]
    elif task == "variable_tracking":
        target = s["keys"][0]
        for value, chain in vt_chains(ctx).items():
            if value != target and target in s["question"]:
                extras.append((s["question"].replace(target, value), chain))
    return [first] + extras


def dense_niah(L: int, index: int, seed: int, count, rng: random.Random,
               words: list[str] | None = None) -> tuple[str, list]:
    """A niah_multikey training haystack with extra needles inserted; asks up to 8 of its needles.

    With ``words``, every needle's number is replaced by three words drawn from that list (``... for
    quick-river is: stone apple wide.``): the first value token is then one of ~1,000 rather than one of
    10 digits, so copying the asked needle's value (not just any needle's) is worth ~7 nats at the first
    token instead of ~0.5 and the key-matching circuit gets a gradient (--word-values, README)."""
    n_extra = min(rng.randint(2, 12), max(1, int(0.4 * L) // 20))
    s = S.make_sample("niah_multikey", count_tokens=count, context_length=max(L - 20 * n_extra, 160),
                      seed=seed + 7919, index=index, split=TRAIN_SPLIT)
    ctx = s["context"]
    taken = {k for k, _ in NEEDLE_RE.findall(ctx)}
    start = ctx.find("\n\n") + 2  # end of the instructions
    cuts = [m.end() for m in re.finditer(r"\. ", ctx) if m.end() > start] or [start]
    inserts = []
    while len(inserts) < n_extra:
        key = f"{rng.choice(S.ADJECTIVES)}-{rng.choice(S.NOUNS)}"
        if key in taken:
            continue
        taken.add(key)
        inserts.append((rng.choice(cuts), S.NEEDLE_TEMPLATE.format(key=key, value=rng.randint(10**6, 10**7 - 1)) + " "))
    for pos, text in sorted(inserts, key=lambda t: -t[0]):
        ctx = ctx[:pos] + text + ctx[pos:]
    if words:
        ctx = NEEDLE_RE.sub(lambda m: S.NEEDLE_TEMPLATE.format(
            key=m.group(1), value=" ".join(rng.choice(words) for _ in range(3))), ctx)
        needles = WORD_NEEDLE_RE.findall(ctx)
    else:
        needles = NEEDLE_RE.findall(ctx)
    rng.shuffle(needles)
    return ctx, [(niah_question(k), [v]) for k, v in needles[:8]]


# --------------------------------------------------------------------------------------------------
# Training batches (made in worker processes)


class BatchMaker:
    """Makes padded batches of training episodes. Pure Python + tokenizers + numpy (runs in workers)."""

    def __init__(self, tok_dir: str, ratios: dict[str, float], seed: int, worker: int, tokens_per_step: int,
                 max_len: int, scaffold: float = 0.0):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(Path(tok_dir) / "tokenizer.json"))
        cfg = json.loads((Path(tok_dir) / "tokenizer_config.json").read_text())
        self.eos = self.tok.token_to_id(cfg["eos_token"])
        self.pad = self.tok.token_to_id(cfg["pad_token"])
        self.terminators = frozenset([self.eos, *self.enc("\n")])  # what ends a text answer
        self.notes_terminators = frozenset([NOTES_DOT])
        self.ratios = ratios
        self.seed = seed
        self.worker = worker
        self.tokens_per_step = tokens_per_step
        self.max_len = max_len
        self.counter = 0
        self.rng = random.Random(f"kvbench-tiny-train|{seed}|{worker}")
        self.scaffold = scaffold
        self.stage = 0

    def enc(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def length_for(self, stage: int) -> int:
        lengths = [n for n in LENGTHS if n <= self.max_len]
        stage = min(stage, len(lengths) - 1)
        if stage == len(lengths) - 1 and stage > 0:
            mix = {n: w for n, w in FINAL_MIX.items() if n in lengths} or {lengths[-1]: 1.0}
            if lengths[-1] not in mix:
                mix[lengths[-1]] = 0.3
            ks = list(mix)
            return self.rng.choices(ks, weights=[mix[k] for k in ks])[0]
        if stage == 0 or self.rng.random() < 0.7:
            return lengths[stage]
        return self.rng.choice(lengths[:stage])

    @staticmethod
    def tail(L: int) -> int:
        """Tokens of extra questions allowed after a prompt of L tokens (8 or more at every length)."""
        return min(max(L, 384), 512)

    def episode(self, task: str, L: int) -> tuple[list[int], list[tuple[int, int, int]]] | None:
        """Token ids and answer spans (start, end, is_first) of one training sequence, or None."""
        index = self.worker * 10**8 + self.counter
        self.counter += 1
        ratio = self.ratios.get("variable_tracking" if task == "dense_vt" else task, self.ratios["niah_single"])

        def count(text: str) -> int:
            return int(len(text) / ratio) + 1

        cap = L + self.tail(L)
        if task == "mqar":
            return self.mqar(L, cap)
        if task == "notes":
            return self.notes(L, cap)
        try:
            if task == "ppl":
                doc = S.make_ppl_docs(count_tokens=count, context_length=cap - 8, n=1,
                                      seed=self.seed * 1_000_003 + index, split=TRAIN_SPLIT)[0]
                return self.enc(doc["text"])[:cap] + [self.eos], []
            rng = random.Random(S.sample_seed_key(task, TRAIN_SPLIT, self.seed, index) + "|questions")
            if task == "dense_vt":
                # variable_tracking with 2-6 chains (as many as the length holds), every chain asked back:
                # with two chains, picking a chain without matching the asked value is right half the time
                n = rng.randint(2, max(2, min(6, L // 128)))
                s = S.make_sample("variable_tracking", count_tokens=count, context_length=int(0.98 * L) - 8,
                                  seed=self.seed, index=index, split=TRAIN_SPLIT,
                                  params=dataclasses.replace(S.PARAMS, vt_chains=n))
                context, qas = s["context"], qa_pairs("variable_tracking", s, rng)
            elif task == "dense_niah":
                share = WORD_VALUES[0] * (1.0 if self.stage == 0 else 0.5 if self.stage == 1 else 0.25)
                words = self.value_words() if share and rng.random() < share else None
                context, qas = dense_niah(int(0.98 * L), index, self.seed, count, rng, words)
            else:
                s = S.make_sample(task, count_tokens=count, context_length=int(0.98 * L) - 8, seed=self.seed,
                                  index=index, split=TRAIN_SPLIT)
                context, qas = s["context"], qa_pairs(task, s, rng)
        except ValueError:  # too short for this task
            return None
        p = min(1.0, self.scaffold * (1.4 if self.stage == 0 else 0.6 if self.stage == 1 else 0.0))
        if p > 0:  # some extra niah questions in the needle's own words (never the first question)
            qas = qas[:1] + [(scaffold_question(m.group(1)) if rng.random() < p and (m := re.match(
                r"What is the special magic number for (\S+) mentioned", q)) else q, a) for q, a in qas[1:]]
        q0, a0 = qas[0]
        ids = self.enc(context + q0)  # the prompt, tokenized as a whole like the evaluation does
        spans = []
        for j, (q, answers) in enumerate(qas):
            qi = [] if j == 0 else self.enc(q)
            ai = self.enc(answer_text(answers)) + [self.eos]
            if j > 0 and len(ids) + len(qi) + len(ai) > cap:
                break
            ids += qi
            spans.append((len(ids), len(ids) + len(ai), int(j == 0)))
            ids += ai
        return ids, spans

    def trained_end(self, task: str, ids: list[int], st: int, en: int) -> int:
        """End of answer span [st, en) without its trailing terminators ("\n", EOS; the notes' DOT)."""
        stops = self.notes_terminators if task == "notes" else self.terminators
        while en > st and ids[en - 1] in stops:
            en -= 1
        return en

    def value_words(self) -> list[str]:
        """Lower-case words that are one token after a space (`` stone``) and are no key word: the values of
        --word-values needles."""
        if not hasattr(self, "_value_words"):
            keys = set(S.ADJECTIVES) | set(S.NOUNS)
            self._value_words = sorted(t[1:] for t in self.tok.get_vocab() if re.fullmatch("\u0120[a-z]{3,}", t)
                                       and t[1:] not in keys)
        return self._value_words

    def mqar(self, L: int, cap: int) -> tuple[list[int], list[tuple[int, int, int]]]:
        """Multi-query associative recall in the needle template, with keys and values drawn from the whole
        vocabulary: 8-16 needles ``One of the special magic numbers for <w1>-<w2> is: <value>.`` in random
        word-token filler, then every key asked back in the needle's own words. Keys far more varied than the
        task generators' (943 x 1379 word tokens) and no shared filler words make key matching the only way
        to lower the loss: this is where the key-matching circuit forms (models/kvbench-tiny/README.md, "The token-level recall recipe")."""
        if not hasattr(self, "_mq"):
            vocab = self.tok.get_vocab()
            self._mq = ([i for t, i in vocab.items() if re.fullmatch("\u0120[a-z]{3,}", t)],
                        [i for t, i in vocab.items() if re.fullmatch("[a-z]{3,}", t)],
                        self.enc("One of the special magic numbers for"), self.enc("-"), self.enc(" is:"),
                        self.enc(" "), self.enc("."), self.enc(" The special magic numbers are hidden below.\n\n"))
        words_sp, words, pre, dash, is_, space, dot, head = self._mq
        r = self.rng
        n = r.randint(8, 16)
        pairs, seen = [], set()
        while len(pairs) < n:
            k = (r.choice(words_sp), r.choice(words))
            if k in seen:
                continue
            seen.add(k)
            v = ([self.enc(str(r.randint(0, 9)))[0] for _ in range(7)] if r.random() < 0.5
                 else [r.choice(words) for _ in range(3)])
            pairs.append((k, v))
        needle_len = len(pre) + 3 + len(is_) + len(space) + 7 + len(dot)
        filler = max(0, L - len(head) - n * needle_len)
        cuts = sorted(r.randint(0, filler) for _ in range(n))
        ids, last = list(head), 0
        for (k, v), c in zip(pairs, cuts):
            ids += [r.choice(words_sp) for _ in range(c - last)]
            last = c
            ids += pre + [k[0]] + dash + [k[1]] + is_ + space + v + dot
        ids += [r.choice(words_sp) for _ in range(filler - last)] + self.enc("\n\n")
        order = list(range(n))
        r.shuffle(order)
        spans = []
        for j, q in enumerate(order):
            (k, v) = pairs[q]
            qi = pre + [k[0]] + dash + [k[1]] + is_
            ai = space + v + self.enc("\n") + [self.eos]
            if len(ids) + len(qi) + len(ai) > cap:
                break
            ids += qi
            spans.append((len(ids), len(ids) + len(ai), int(j == 0)))
            ids += ai
        return ids, spans

    def notes(self, L: int, cap: int) -> tuple[list[int], list[tuple[int, int, int]]]:
        """The token-level recall task (models/kvbench-tiny/README.md), the one recipe measured to form key
        matching in minutes: random filler tokens with 8 needles ``KEY k1 k2 IS v1 v2 v3 DOT``, then the 8 keys
        asked back in random order as ``Q k1 k2 IS`` -> ``v1 v2 v3 DOT``. ``--notes-gap`` inserts that many fixed
        tokens after IS (3 mimics ``is``, ``:``, `` `` of the text needles) to measure what the offset costs.
        Markers are the first byte tokens of the vocabulary; keys, values and filler are drawn from the rest."""
        r = self.rng
        n_vocab = self.tok.get_vocab_size()
        KEY, IS, Q, DOT = 4, 5, 6, NOTES_DOT
        FIX = list(range(8, 8 + NOTES_GAP[0]))
        lo = 8 + NOTES_GAP[0]
        draw = lambda k: [r.randrange(lo, n_vocab) for _ in range(k)]  # noqa: E731
        n = 8
        pairs = [(draw(2), draw(3)) for _ in range(n)]
        filler = draw(max(0, L - n * (7 + len(FIX))))
        cuts = sorted(r.randint(0, len(filler)) for _ in range(n))
        ids, last = [], 0
        for (k, v), c in zip(pairs, cuts):
            ids += filler[last:c] + [KEY] + k + [IS] + FIX + v + [DOT]
            last = c
        ids += filler[last:]
        spans = []
        for j in r.sample(range(n), n):
            k, v = pairs[j]
            ids += [Q] + k + [IS] + FIX
            if len(ids) + 4 > cap:
                break
            spans.append((len(ids), len(ids) + 4, int(not spans)))
            ids += v + [DOT]
        return ids, spans

    def batch(self, stage: int) -> dict:
        self.stage = stage
        L = self.length_for(stage)
        budget = STAGE0_TOKENS[0] if stage == 0 and STAGE0_TOKENS[0] else self.tokens_per_step
        B = max(1, budget // (L + self.tail(L)))
        mix = STAGE0_MIX if stage == 0 else MIX
        tasks, weights = list(mix), list(mix.values())
        eps = []
        while len(eps) < B:
            task = self.rng.choices(tasks, weights=weights)[0]
            ep = self.episode(task, L)
            if ep is not None:
                eps.append((task, *ep))
        T = max(len(ids) for _, ids, _ in eps)
        T = min(-(-T // 64) * 64, max(T, 64))
        x = np.full((B, T), self.pad, dtype=np.int32)
        lens = np.zeros(B, dtype=np.int32)
        span_tok = np.full((B, T), -1, dtype=np.int32)
        # 1 on the first FIRST_TOKENS tokens of each answer, 2 on its trailing terminators ("\n", EOS, notes' DOT)
        span_pos = np.zeros((B, T), dtype=np.int8)
        span_task, span_first = [], []
        for b, (task, ids, spans) in enumerate(eps):
            x[b, : len(ids)] = ids
            lens[b] = len(ids)
            for st, en, first in spans:
                span_tok[b, st:en] = len(span_task)
                span_pos[b, st : min(en, st + FIRST_TOKENS)] = 1
                span_pos[b, self.trained_end(task, ids, st, en):en] = 2
                span_task.append(TASK_ID[task])
                span_first.append(first)
        return {"L": L, "stage": stage, "x": x, "lens": lens, "span_tok": span_tok, "span_pos": span_pos,
                "span_task": np.array(span_task, dtype=np.int64), "span_first": np.array(span_first, dtype=np.int64)}


def _worker_main(args: tuple) -> None:
    tok_dir, ratios, seed, worker, tokens_per_step, max_len, scaffold, stage_value, out_q, stop_event = args
    out_q.cancel_join_thread()  # exit without flushing batches nobody will read
    maker = BatchMaker(tok_dir, ratios, seed, worker, tokens_per_step, max_len, scaffold)
    while not stop_event.is_set():
        b = maker.batch(stage_value.value)
        while not stop_event.is_set():
            try:
                out_q.put(b, timeout=0.5)
                break
            except queue_mod.Full:
                continue


class Producer:
    """Worker processes filling a bounded queue with batches at the current curriculum stage."""

    def __init__(self, n_workers: int, tok_dir: str, ratios: dict, seed: int, tokens_per_step: int, max_len: int,
                 scaffold: float = 0.0):
        import multiprocessing as mp

        self.n = n_workers
        if n_workers <= 0:  # in-process (tests, smoke)
            self.stage = 0
            self.maker = BatchMaker(tok_dir, ratios, seed, 0, tokens_per_step, max_len, scaffold)
            return
        ctx = mp.get_context("fork")
        self.stage_value = ctx.Value("i", 0, lock=False)
        self.q = ctx.Queue(maxsize=max(8, 2 * n_workers))
        self.stop_event = ctx.Event()
        self.procs = [
            ctx.Process(target=_worker_main, daemon=True,
                        args=((tok_dir, ratios, seed, w, tokens_per_step, max_len, scaffold, self.stage_value, self.q,
                               self.stop_event),))
            for w in range(n_workers)
        ]
        for p in self.procs:
            p.start()

    def set_stage(self, stage: int) -> None:
        if self.n <= 0:
            self.stage = stage
        else:
            self.stage_value.value = stage

    def get(self) -> dict:
        if self.n <= 0:
            return self.maker.batch(self.stage)
        return self.q.get()

    def qsize(self) -> int:
        try:
            return 0 if self.n <= 0 else self.q.qsize()
        except NotImplementedError:
            return -1

    def close(self) -> None:
        if self.n <= 0:
            return
        self.stop_event.set()
        for p in self.procs:  # the queue is not used again: no need to drain it
            p.terminate()
        for p in self.procs:
            p.join(timeout=1)


# --------------------------------------------------------------------------------------------------
# Evaluation samples (report only) and greedy generation


def _eval_prompts(args: tuple) -> tuple[str, int, list]:
    tok_dir, task, L, n, seed = args
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(tok_dir) / "tokenizer.json"))
    samples = S.make_samples(task, count_tokens=S.token_counter(tok), context_length=L, n=n, seed=seed,
                             split=EVAL_SPLIT)
    return task, L, [(tok.encode(s["context"] + s["question"], add_special_tokens=False).ids, s["answers"])
                     for s in samples]


def generate_eval(model, tokenizer, prompts: dict, device, *, batch_size: int = 16) -> dict:
    """Greedy generation with left padding; returns {(task, L): (mean score, n, example)}."""
    import torch

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    newline_ids = [i for i in range(len(tokenizer)) if "\n" in tokenizer.decode([i])]
    results = {}
    for (task, L), items in sorted(prompts.items(), key=lambda kv: (kv[0][1], TRAIN_TASKS.index(kv[0][0]))):
        until, max_new = GEN[task]
        stops = [eos] + (newline_ids if until else [])
        scores, example = [], None
        for s in range(0, len(items), batch_size):
            chunk = items[s : s + batch_size]
            T = max(len(p) for p, _ in chunk)
            x = torch.full((len(chunk), T), pad, dtype=torch.long)
            m = torch.zeros((len(chunk), T), dtype=torch.long)
            for b, (p, _) in enumerate(chunk):
                x[b, T - len(p):] = torch.tensor(p)
                m[b, T - len(p):] = 1
            with torch.inference_mode():
                out = model.generate(input_ids=x.to(device), attention_mask=m.to(device), max_new_tokens=max_new,
                                     do_sample=False, eos_token_id=stops, pad_token_id=pad)
            for b, (_, answers) in enumerate(chunk):
                toks = out[b, T:].tolist()
                cut = next((j for j, t in enumerate(toks) if t in stops), len(toks))
                text = tokenizer.decode(toks[:cut], skip_special_tokens=True)
                for u in until:
                    text = text.split(u)[0]
                scores.append(S.score(task, text, answers))
                if example is None:
                    example = (text, answers)
        results[(task, L)] = (float(np.mean(scores)) if scores else float("nan"), len(scores), example)
    return results


def format_table(results: dict, lengths: list[int]) -> str:
    lines = ["| task | " + " | ".join(str(n) for n in lengths) + " |", "|---|" + "---|" * len(lengths)]
    for task in S.TASKS:
        cells = []
        for n in lengths:
            r = results.get((task, n))
            cells.append("-" if r is None else f"{r[0]:.2f} (n={r[1]})")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Main


def parse_mix(spec: str, mix: dict[str, float], flag: str) -> None:
    """Apply ``task=w,...`` to ``mix`` (other weights kept); ``only:task=w,...`` keeps the listed tasks only."""
    if spec.startswith("only:"):
        spec = spec[5:]
        mix.clear()
    for item in filter(None, spec.split(",")):
        task, _, w = item.partition("=")
        mix[check_task(task, flag)] = float(w)


def check_task(task: str, flag: str) -> str:
    if task not in TASK_ID or task == "ppl":
        raise SystemExit(f"{flag}: unknown task {task!r}; choose from {', '.join(TRAIN_TASKS[:-1])}")
    return task


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "models" / "kvbench-tiny"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-budget", type=float, default=530.0,
                    help="wall-clock seconds for the whole command (tokenizer, training, saving, eval check)")
    ap.add_argument("--eval-reserve", type=float, default=45.0,
                    help="seconds kept for saving and the eval check at the end")
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: time only)")
    ap.add_argument("--tokens-per-step", type=int, default=98304)
    ap.add_argument("--stage0-tokens-per-step", type=int, default=0,
                    help="token budget of a stage-0 step (0: --tokens-per-step); the notes' recipe needs ~2,000 "
                         "key-conditional questions a step for key matching to form")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--stage0-mix", default="",
                    help="override stage-0 mix weights, e.g. 'mqar=0.35' (others kept) or 'only:notes=1' (nothing else)")
    ap.add_argument("--mix", default="",
                    help="override the mix after stage 0, same form as --stage0-mix (e.g. 'dense_vt=0.15')")
    ap.add_argument("--gate-tasks", default="", type=lambda v: [t for t in v.split(",") if t],
                    help="tasks whose teacher-forced accuracy advances the curriculum (default: "
                         + ",".join(CURRICULUM_TASKS) + ")")
    ap.add_argument("--notes-gap", type=int, default=0,
                    help="fixed tokens between IS and the value in the `notes` task (0: the notes' format)")
    ap.add_argument("--first-weight", type=float, default=1.0,
                    help="loss weight of the first two tokens of every answer (where the key decides) vs 1 for the rest")
    ap.add_argument("--terminator-weight0", type=float, default=1.0,
                    help="stage-0 loss weight of an answer's trailing terminators ('\\n', EOS, the notes' DOT); 1 after "
                         "stage 0. 0 lets copying form: the offset probe (models/kvbench-tiny/README.md) with PROBE_DOT=1 stalls at uniform value "
                         "tokens for 700+ steps where the same run without the DOT in the loss copies (README)")
    ap.add_argument("--lm-weight", type=float, default=0.1, help="weight of the all-token loss (after stage 0)")
    ap.add_argument("--lm-weight0", type=float, default=0.0, help="weight of the all-token loss at stage 0")
    ap.add_argument("--lm-frac", type=float, default=0.25, help="share of non-answer positions the LM loss samples")
    ap.add_argument("--word-values", type=float, default=0.0,
                    help="share of stage-0 dense_niah haystacks whose needle values are three words instead of a "
                         "number (half that at stage 1, a quarter after): digits give the first value token 10 "
                         "choices, too few for key matching to pay (README, session 4)")
    ap.add_argument("--scaffold", type=float, default=0.5,
                    help="share of extra niah questions in the needle's own words at stage 0 (half at stage 1)")
    ap.add_argument("--advance-at", type=float, default=0.85, help="teacher-forced accuracy to advance a stage")
    ap.add_argument("--max-len", type=int, default=8192, help="longest training context (a value in LENGTHS)")
    ap.add_argument("--max-position-embeddings", type=int, default=8704)
    ap.add_argument("--rope-theta", type=float, default=100000.0)
    ap.add_argument("--layers", type=int, default=ARCH["num_hidden_layers"])
    ap.add_argument("--intermediate-size", type=int, default=ARCH["intermediate_size"])
    ap.add_argument("--hidden-size", type=int, default=ARCH["hidden_size"])
    ap.add_argument("--heads", type=int, default=ARCH["num_attention_heads"], help="query heads (head_dim 64)")
    ap.add_argument("--kv-heads", type=int, default=ARCH["num_key_value_heads"])
    ap.add_argument("--fuse-is", action="store_true",
                    help="add ' is: ' and ' is:' to the tokenizer as single tokens, so a needle's value follows its "
                         "key two tokens later (`river`, ` is: `, `1`) instead of four")
    ap.add_argument("--fuse-token", action="append", default=[], metavar="TEXT",
                    help="add TEXT to the tokenizer as one token (repeatable), e.g. --fuse-token ' is:' so that "
                         "needle (`river`, ` is:`, ` `, `1`) and question (... ` is:` | ` `, `1`) put the value "
                         "at the same offset from the key")
    ap.add_argument("--fuse-space-digits", action="store_true",
                    help="add ' 0' ... ' 9' as single tokens: with --fuse-token ' is:' a needle reads `river`, ` is:`, "
                         "` 1` and its question ends `river`, ` is:` -> ` 1`, the offsets of the token-level recall recipe")
    ap.add_argument("--fuse-digit-groups", action="store_true",
                    help="add '000'...'999' and ' 000'...' 999' as single tokens (numbers split left to right in "
                         "groups of three, as in cl100k): a value's first token is one of 1,000, not one of 10, so "
                         "picking the wrong needle costs ~7 nats instead of ~2 and key matching has a gradient")
    ap.add_argument("--init-from", default=None,
                    help="continue from the weights of this saved model directory (same architecture; fresh optimizer)")
    ap.add_argument("--start-stage", type=int, default=0, help="curriculum stage to start at (with --init-from)")
    ap.add_argument("--workers", type=int, default=-1, help="data worker processes (-1: cores - 3; 0: in-process)")
    ap.add_argument("--tokenizer", default=None, help="copy this tokenizer instead of training one")
    ap.add_argument("--eval-n", type=int, default=16, help="eval-split samples per task and length (0: none)")
    ap.add_argument("--eval-lengths", default="2048,4096,8192")
    ap.add_argument("--eval-tasks", default=",".join(S.TASKS))
    ap.add_argument("--device", default=None)
    ap.add_argument("--smoke", action="store_true", help="a few CPU steps at 256 tokens (seconds)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.device = args.device or "cpu"
        args.max_steps = args.max_steps or 2
        args.tokens_per_step = 512
        args.max_len = 256
        args.warmup = 2
        args.workers = 0 if args.workers < 0 else args.workers
        args.eval_lengths = "256"
        args.eval_n = min(args.eval_n, 1)
        args.eval_tasks = "niah_single"
        args.eval_reserve = 0.0
        if args.tokenizer is None and (ROOT / "models" / "kvbench-tiny" / "tokenizer.json").is_file():
            args.tokenizer = str(ROOT / "models" / "kvbench-tiny")
    return args


def build_config(args, tok):
    from transformers import LlamaConfig

    return LlamaConfig(
        **{**ARCH, "num_hidden_layers": args.layers, "intermediate_size": args.intermediate_size,
           "hidden_size": args.hidden_size, "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads,
           "vocab_size": max(ARCH["vocab_size"], -(-len(tok) // 64) * 64)},
        max_position_embeddings=args.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": args.rope_theta},
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def calibrate(tok_dir: str, seed: int) -> dict[str, float]:
    """Characters per token of each task's text (cheap length estimates for training text)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(tok_dir) / "tokenizer.json"))
    ratios = {}
    for task in S.TASKS:
        s = S.make_sample(task, count_tokens=lambda t: len(t) // 4 + 1, context_length=1024, seed=seed,
                          index=10**9, split=TRAIN_SPLIT)
        text = s["context"] + s["question"]
        ratios[task] = len(text) / len(tok.encode(text, add_special_tokens=False).ids)
    return ratios


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lengths = [n for n in LENGTHS if n <= args.max_len]
    if args.max_len not in LENGTHS:
        raise SystemExit(f"--max-len must be one of {LENGTHS}")

    def log(msg: str) -> None:
        print(f"[{time.time() - t_start:7.1f}s] {msg}", flush=True)

    # 1. tokenizer
    if args.tokenizer:
        src = Path(args.tokenizer)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (src / name).is_file() and (src / name).resolve() != (out / name).resolve():
                shutil.copy(src / name, out / name)
        log(f"tokenizer copied from {src}")
    else:
        from scripts.train.tiny_tokenizer import train_tokenizer

        train_tokenizer(vocab_size=ARCH["vocab_size"], seed=args.seed).save_pretrained(str(out))
        log("tokenizer trained (scripts/train/tiny_tokenizer.py)")
    fused = ([" is: ", " is:"] if args.fuse_is else []) + args.fuse_token
    fused += [f" {d}" for d in range(10)] if args.fuse_space_digits else []
    fused += [f"{p}{n:03d}" for p in ("", " ") for n in range(1000)] if args.fuse_digit_groups else []
    if fused:
        from tokenizers import AddedToken
        from transformers import AutoTokenizer

        tk = AutoTokenizer.from_pretrained(str(out))
        added = tk.add_tokens([AddedToken(t, normalized=False) for t in fused if t not in tk.get_vocab()])
        tk.save_pretrained(str(out))
        log(f"fused tokens {fused[:16]!r}{' ...' if len(fused) > 16 else ''}: {added} added, vocabulary {len(tk)}")
    ratios = calibrate(str(out), args.seed)
    log("chars/token: " + ", ".join(f"{t}={r:.2f}" for t, r in ratios.items()))

    # 2. eval prompts (report only) and training data workers, forked before CUDA starts
    eval_lengths = [int(n) for n in args.eval_lengths.split(",") if n] if args.eval_n > 0 else []
    eval_tasks = [t for t in args.eval_tasks.split(",") if t]
    jobs = [(str(out), t, n, args.eval_n, 0) for n in eval_lengths for t in eval_tasks]
    n_workers = args.workers if args.workers >= 0 else max(1, (os.cpu_count() or 4) - 3)
    eval_pool = eval_futures = None
    if jobs and n_workers > 0:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        eval_pool = ProcessPoolExecutor(max_workers=2, mp_context=mp.get_context("fork"))
        eval_futures = [eval_pool.submit(_eval_prompts, j) for j in jobs]
    parse_mix(args.stage0_mix, STAGE0_MIX, "--stage0-mix")  # module state: workers are forked after this
    parse_mix(args.mix, MIX, "--mix")
    if args.gate_tasks:
        CURRICULUM_TASKS[:] = [check_task(t, "--gate-tasks") for t in args.gate_tasks]
    NOTES_GAP[0] = args.notes_gap
    STAGE0_TOKENS[0] = args.stage0_tokens_per_step
    WORD_VALUES[0] = args.word_values
    producer = Producer(n_workers, str(out), ratios, args.seed, args.tokens_per_step, args.max_len, args.scaffold)
    log(f"{n_workers} data workers")

    import torch
    import torch.nn.functional as F
    from transformers import AutoTokenizer, GenerationConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    config = build_config(args, tokenizer)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).to(device)
    if args.init_from:
        prev = LlamaForCausalLM.from_pretrained(args.init_from, dtype=torch.float32)
        try:
            model.load_state_dict(prev.state_dict())
        except RuntimeError as e:
            raise SystemExit(f"--init-from {args.init_from}: weights do not fit this architecture "
                             f"(pass the same --layers/--intermediate-size it was trained with): {e}") from None
        del prev
        log(f"weights loaded from {args.init_from}")
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params:,} parameters ({n_params * 2 / 2**20:.2f} MiB in bf16), device {device}")

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")
    amp = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def save(tag: str) -> None:
        m = LlamaForCausalLM(config)
        m.load_state_dict({k: v.detach().to("cpu") for k, v in model.state_dict().items()})
        m = m.to(torch.bfloat16)
        m.config.dtype = "bfloat16"
        m.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
        m.save_pretrained(str(out))
        log(f"saved ({tag}) -> {out}")

    # 3. training loop
    n_tasks = len(TRAIN_TASKS)
    stats = torch.zeros((len(lengths), n_tasks, 2, 2), device=device)  # [len, task, first, (correct, total)]
    loss_acc = torch.zeros(3, device=device)  # sum loss, ans, lm
    t_train0 = time.time()
    train_time = max(1.0, args.time_budget - args.eval_reserve - (t_train0 - t_start))
    stage = min(max(args.start_stage, 0), len(lengths) - 1)
    producer.set_stage(stage)
    stage_step0, step, tokens, wait_s = 0, 0, 0, 0.0
    stage_stats = torch.zeros(2, device=device)
    curriculum_ids = torch.tensor([TASK_ID[t] for t in CURRICULUM_TASKS], device=device)
    curve, stage_log = [], [(0, 0.0, lengths[stage])]
    last_log = last_save = time.time()
    log_every = 0.0 if args.smoke else 10.0
    log(f"training for {train_time:.0f}s, lengths {lengths}, {args.tokens_per_step} tokens/step")
    while True:
        now = time.time()
        frac = (now - t_train0) / train_time
        if frac >= 1.0 or (args.max_steps and step >= args.max_steps):
            break
        # curriculum: advance on accuracy (checked below) or at the deadline of the next stage
        if stage + 1 < len(lengths) and frac >= DEADLINES[stage + 1]:
            stage += 1
            stage_step0 = step
            stage_stats.zero_()
            producer.set_stage(stage)
            stage_log.append((step, now - t_train0, lengths[stage]))
            log(f"stage -> {lengths[stage]} (deadline)")
        # learning rate: warm-up, constant, then linear decay to 10 % over the last 30 % of the time
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (1.0 if frac < 0.7 else max(0.1, 1 - (frac - 0.7) / 0.3 * 0.9))
        for g in opt.param_groups:
            g["lr"] = lr

        t_get = time.time()
        b = producer.get()
        wait_s += time.time() - t_get
        x = torch.from_numpy(b["x"]).long()
        span_tok = torch.from_numpy(b["span_tok"]).long()
        span_pos = torch.from_numpy(b["span_pos"])
        lens = torch.from_numpy(b["lens"]).long()
        if device.type == "cuda":
            x, span_tok, lens, span_pos = (t.pin_memory().to(device, non_blocking=True)
                                           for t in (x, span_tok, lens, span_pos))
        span_task = torch.from_numpy(b["span_task"]).to(device, non_blocking=True)
        span_first = torch.from_numpy(b["span_first"]).to(device, non_blocking=True)
        B, T = x.shape
        tokens += int(b["lens"].sum())

        y = x[:, 1:]
        pos = torch.arange(1, T, device=device)
        valid = pos[None, :] < lens[:, None]
        sp = span_tok[:, 1:]
        ans = sp >= 0
        lm_w = args.lm_weight0 if stage == 0 else args.lm_weight
        # logits only where a loss is taken: answer tokens and a random share of the other tokens
        lm_sel = valid & ~ans & (torch.rand(valid.shape, device=device) < args.lm_frac) if lm_w > 0 else valid & False
        sel = ans | lm_sel
        with amp:
            h = model.model(input_ids=x).last_hidden_state[:, :-1]
            logits = model.lm_head(h[sel])
        ce = F.cross_entropy(logits.float(), y[sel], reduction="none")
        is_ans = ans[sel]
        sp_pos = span_pos[:, 1:][sel]
        term_w = args.terminator_weight0 if stage == 0 else 1.0
        w = torch.where(sp_pos == 1, args.first_weight, torch.where(sp_pos == 2, term_w, 1.0)) * is_ans
        ans_loss = (ce * w).sum() / w.sum().clamp(min=1)
        lm_loss = (ce * ~is_ans).sum() / (~is_ans).sum().clamp(min=1)
        loss = ans_loss + lm_w * lm_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1

        with torch.no_grad():
            # an answer is right when every token it is trained on is (terminators out of the loss do not count)
            wrong = ((logits[is_ans].argmax(-1) != y[sel][is_ans]) & (w[is_ans] > 0)).long()
            n_sp = span_task.numel()
            if n_sp:
                span_wrong = torch.zeros(n_sp, device=device, dtype=torch.long).index_add_(0, sp[ans], wrong)
                ok = (span_wrong == 0).float()
                li = lengths.index(b["L"])
                flat = stats[li].view(-1, 2)
                idx = span_task * 2 + span_first
                flat[:, 0].index_add_(0, idx, ok)
                flat[:, 1].index_add_(0, idx, torch.ones_like(ok))
                if b["L"] == lengths[stage]:
                    cur = torch.isin(span_task, curriculum_ids)
                    stage_stats[0] += (ok * cur).sum()
                    stage_stats[1] += cur.sum()
            loss_acc += torch.stack([loss.detach(), ans_loss.detach(), lm_loss.detach()])

        # curriculum check every 25 steps at the current length
        if stage + 1 < len(lengths) and step % 25 == 0 and step - stage_step0 >= 50:
            c, n = stage_stats.tolist()
            if n >= 200:
                if c / n >= args.advance_at:
                    stage += 1
                    stage_step0 = step
                    producer.set_stage(stage)
                    stage_log.append((step, time.time() - t_train0, lengths[stage]))
                    log(f"stage -> {lengths[stage]} (accuracy {c / n:.3f} over {int(n)} answers)")
                stage_stats.zero_()

        if time.time() - last_log >= log_every:
            el = time.time() - t_train0
            st = stats.cpu()
            la = (loss_acc / max(1, step - (curve[-1]["step"] if curve else 0))).tolist()
            first = {t: (st[:, TASK_ID[t], 1, 0].sum() / st[:, TASK_ID[t], 1, 1].sum().clamp(min=1)).item()
                     for t in S.TASKS}
            allq = {t: (st[:, TASK_ID[t], :, 0].sum() / st[:, TASK_ID[t], :, 1].sum().clamp(min=1)).item()
                    for t in TRAIN_TASKS if t != "ppl"}
            per_len = {n: (st[i, :, :, 0].sum() / st[i, :, :, 1].sum().clamp(min=1)).item()
                       for i, n in enumerate(lengths) if st[i, :, :, 1].sum() > 0}
            rec = {"step": step, "time": round(el, 1), "stage_len": lengths[stage], "loss": round(la[0], 4),
                   "ans_loss": round(la[1], 4), "lm_loss": round(la[2], 4), "lr": lr,
                   "tok_per_s": round(tokens / max(el, 1e-6)),
                   "acc_first": {t: round(v, 3) for t, v in first.items()},
                   "acc_all": {t: round(v, 3) for t, v in allq.items()},
                   "acc_by_len": {n: round(v, 3) for n, v in per_len.items()}}
            curve.append(rec)
            log(f"step {step} stage {lengths[stage]} batch {B}x{T} loss {la[0]:.3f} ans {la[1]:.3f} lm {la[2]:.3f} "
                f"lr {lr:.2e} tok/s {rec['tok_per_s']:,} q {producer.qsize()} data-wait {wait_s / max(el, 1e-6):.0%}\n"
                f"    acc(first q) " + " ".join(f"{t}={v:.2f}" for t, v in first.items())
                + f"\n    acc(all q) dense={allq['dense_niah']:.2f} dense_vt={allq['dense_vt']:.2f} mqar={allq['mqar']:.2f} notes={allq['notes']:.2f} kv={allq['kv_retrieval']:.2f} vt={allq['variable_tracking']:.2f}"
                + " by len " + " ".join(f"{n}={v:.2f}" for n, v in per_len.items()))
            stats.zero_()
            loss_acc.zero_()
            last_log = time.time()
        if time.time() - last_save >= 90.0:
            save(f"step {step}")
            last_save = time.time()

    train_s = time.time() - t_train0
    producer.close()
    log(f"training done: {step} steps, {tokens:,} tokens in {train_s:.0f}s")
    save("final")

    # 4. report-only generation check on eval-split samples, with the saved bf16 weights upcast to fp32
    from transformers import AutoModelForCausalLM

    results = {}
    if jobs:
        if eval_futures is not None:
            done = [f.result() for f in eval_futures]
            eval_pool.shutdown()
        else:
            done = [_eval_prompts(j) for j in jobs]
        prompts = {(task, L): items for task, L, items in done}
        ev = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).to(device).eval()
        t_ev = time.time()
        results = generate_eval(ev, tokenizer, prompts, device)
        log(f"eval check ({time.time() - t_ev:.0f}s, fp32, greedy)\n" + format_table(results, eval_lengths))
        for (task, L), (_acc, _n, ex) in sorted(results.items()):
            if ex is not None:
                log(f"  e.g. {task}@{L}: {ex[0][:100]!r} (answers {ex[1]})")

    summary = {
        "params": n_params, "config": {k: getattr(config, k) for k in ("num_hidden_layers", "intermediate_size", "hidden_size",
                                                   "num_attention_heads", "num_key_value_heads", "vocab_size")},
        "steps": step, "tokens": tokens, "train_seconds": round(train_s, 1),
        "total_seconds": round(time.time() - t_start, 1), "stages": stage_log, "args": vars(args),
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "eval": {f"{t}@{n}": {"acc": a, "n": k} for (t, n), (a, k, _) in results.items()},
        "curve": curve,
    }
    write_readme(out, summary, results, eval_lengths)
    log(f"done in {time.time() - t_start:.0f}s")
    print(json.dumps({k: v for k, v in summary.items() if k != "curve"}, default=str))
    return 0


def command_line(a: dict) -> str:
    """The command that repeats a run: its non-default arguments, quoted for a POSIX shell."""
    import shlex

    cmd = ["python", "-m", "scripts.train.tiny_model", "--out", "models/kvbench-tiny"]
    defaults = vars(parse_args([]))
    for k, v in a.items():
        if k == "out" or v == defaults.get(k):
            continue
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            cmd.append(flag)
        elif k == "fuse_token":  # repeatable
            for t in v:
                cmd += [flag, shlex.quote(t)]
        elif isinstance(v, list):  # comma-separated (--gate-tasks)
            cmd += [flag, ",".join(v)]
        else:
            cmd += [flag, shlex.quote(str(v))]
    return " ".join(cmd)


def write_readme(out: Path, summary: dict, results: dict, eval_lengths: list[int]) -> None:
    a = summary["args"]
    cmd = command_line(a)
    size = (out / "model.safetensors").stat().st_size if (out / "model.safetensors").is_file() else 0
    stages = ", ".join(f"{L} at step {s} ({t:.0f}s)" for s, t, L in summary["stages"])
    curve = summary["curve"]
    pick = [curve[i] for i in sorted({int(round(j * (len(curve) - 1) / 7)) for j in range(8)})] if curve else []
    rows = "\n".join(
        f"| {r['step']} | {r['time']:.0f} | {r['stage_len']} | {r['loss']:.3f} | {r['ans_loss']:.3f} | "
        f"{r['lm_loss']:.3f} | " + " ".join(f"{n}:{v:.2f}" for n, v in r["acc_by_len"].items()) + " |"
        for r in pick
    )
    text = f"""# kvbench-tiny

The embedded default model of kvbench: a tiny Llama trained from scratch, in a few minutes on one GPU,
to retrieve from long contexts in the format of the `tasks/` generators (RULER-style synthetic tasks).
It is a benchmark fixture, not a language model: it knows the filler text and the task formats only.

## Architecture

`LlamaForCausalLM`: {summary['config']['num_hidden_layers']} layers,
hidden size {summary['config']['hidden_size']}, {summary['config']['num_attention_heads']} query heads and
{summary['config']['num_key_value_heads']} key/value heads (GQA) of dim {ARCH['head_dim']}, SwiGLU MLP {summary['config']['intermediate_size']}, RMSNorm, RoPE
(theta {a['rope_theta']:g}), tied embeddings, vocabulary {summary['config']['vocab_size']} (byte-level BPE with one token per digit,
`scripts/train/tiny_tokenizer.py`, plus the `--fuse-token` / `--fuse-space-digits` tokens), max_position_embeddings {a['max_position_embeddings']} (8192-token prompts plus
the generated answer fit without truncation; trained positions reach 8192 + 512).

- parameters: {summary['params']:,}
- weights: one `model.safetensors` in bf16, {size:,} bytes ({size / 2**20:.2f} MiB)
- special tokens: `<|bos|>` = {0}, `<|eos|>` = 1, `<|pad|>` = 2; no BOS is added to prompts;
  `generation_config.json` has `eos_token_id` 1.

## Data

Only `split="train"` streams of `tasks/synthetic.py` (the evaluation uses `split="eval"`; the two never share
a random stream, see `sample_seed_key`), fitted to the training lengths with a characters-per-token
estimate and then tokenized:

- all seven tasks in their evaluation format: prompt = `context + question`, target =
  `" " + ", ".join(answers) + "\\n"` then `<|eos|>` (multi-value answers in order of appearance);
- dense supervision: after the first answer, more questions about the same context (the other needles of
  `niah_multikey`/`niah_multiquery`, other JSON keys of `kv_retrieval`, the distractor chain of
  `variable_tracking`), each followed by its answer and `<|eos|>`;
- `dense_niah`: a multi-key haystack with 2-12 extra needles, 8 of them asked (with `--word-values`, a share
  of them get three-word values instead of numbers at stage 0, half that at stage 1);
- `dense_vt`: a `variable_tracking` context with 2-6 chains (as many as the length holds), every chain asked;
- a few filler documents from `make_ppl_docs(split="train")`.

Mix after stage 0 (shares of sequences): {", ".join(f"{t} {w / sum(MIX.values()):.0%}" for t, w in MIX.items() if w)}. Loss: mean cross-entropy over answer tokens
+ {a['lm_weight']} x mean over all tokens. Curriculum over prompt lengths {LENGTHS[: LENGTHS.index(a['max_len']) + 1]},
advancing when teacher-forced answer accuracy at the current length reaches {a['advance_at']} (or at a wall-clock
deadline), 30 % replay of shorter lengths, then a final mix {FINAL_MIX}; {a['tokens_per_step']:,} tokens
per step (batch {a['tokens_per_step'] // 512} at 256 tokens down to {max(1, a['tokens_per_step'] // 8704)} at 8192).
AdamW (betas 0.9/0.95, weight decay 0.1), lr {a['lr']:g} with {a['warmup']} warm-up steps, constant, linear
decay to 10 % over the last 30 % of the time; bf16 autocast, SDPA attention, gradient clipping 1.0.

## Training run

- command: `{cmd}`
- device: {summary['device']}; {summary['steps']:,} steps, {summary['tokens']:,} tokens,
  {summary['train_seconds']:.0f} s of training, {summary['total_seconds']:.0f} s for the whole command
  (tokenizer, training, saving, eval check)
- stages reached: {stages}

| step | s | stage | loss | answer loss | LM loss | teacher-forced answer accuracy by length |
|---|---|---|---|---|---|---|
{rows}

## Quick generation check by the training script

Greedy generation on `split="eval"` samples (seed 0) with the saved weights upcast to fp32, stop strings and
token limits as in `tasks/*.yaml`; the fraction of answers contained in the output (n samples per cell).
Not the benchmark's number: see the next section.

{format_table(results, eval_lengths) if results else "(not run)"}

## Full-cache accuracy (measured through python -m harness.run)

_To be filled by the harness: full-cache accuracy per task at 2048 / 4096 / 8192 tokens._

| task | 2048 | 4096 | 8192 |
|---|---|---|---|
"""
    text += "\n".join(f"| {t} | | | |" for t in S.TASKS) + "\n"
    (out / "README.md").write_text(text)


if __name__ == "__main__":
    raise SystemExit(main())
