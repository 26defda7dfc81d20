"""Training batches: episodes of every task packed into padded batches at the current curriculum stage, made
by worker processes (pure Python + tokenizers + numpy) so the GPU never waits."""

from __future__ import annotations

import dataclasses
import json
import queue as queue_mod
import random
import re
from pathlib import Path

import numpy as np

from scripts.train.tiny_model.episodes import answer_text, dense_niah, qa_pairs, scaffold_question
from scripts.train.tiny_model.recipe import (
    FINAL_MIX,
    FIRST_TOKENS,
    LENGTHS,
    MIX,
    NOTES_DOT,
    NOTES_GAP,
    STAGE0_MIX,
    STAGE0_TOKENS,
    TASK_ID,
    TRAIN_SPLIT,
    WORD_VALUES,
)
from tasks import synthetic as S


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
