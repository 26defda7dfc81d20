"""Questions and answers in the evaluation format: the task's own question first, then extra questions about
the same context (dense supervision), and the ``dense_niah`` haystacks."""

from __future__ import annotations

import random
import re

from scripts.train.tiny_model.recipe import TRAIN_SPLIT
from tasks import synthetic as S

NEEDLE_RE = re.compile(r"One of the special magic numbers for ([a-z]+-[a-z]+) is: (\d+)\.")
VT_HEAD_RE = re.compile(r"VAR ([A-Z]{5}) = (\d+)\.")
VT_LINK_RE = re.compile(r"VAR ([A-Z]{5}) = VAR ([A-Z]{5})\.")
WORD_NEEDLE_RE = re.compile(r"One of the special magic numbers for ([a-z]+-[a-z]+) is: ([a-z]+ [a-z]+ [a-z]+)\.")
KV_RE = re.compile(r'"([0-9a-f-]{36})": "([0-9a-f-]{36})"')


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
