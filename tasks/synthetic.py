"""Synthetic long-context retrieval tasks in the style of RULER, sized in the model's own tokens.

Every generator here is pure Python (no torch, no tokenizer library): it is handed a
``count_tokens(text) -> int`` callable and fits each prompt to ``context_length`` tokens of that
tokenizer. A sample is fully determined by ``(task, split, seed, index)`` and ``context_length``:
its random streams are seeded from the string :func:`sample_seed_key` returns, and string seeds
of :class:`random.Random` are hashed with SHA-512, so they are stable across Python runs,
``PYTHONHASHSEED`` values and machines. The needles, keys, values and depths of a sample do not
depend on ``context_length``; only the amount of haystack around them does.

Tasks (``TASKS``):

- ``niah_single``: one needle "One of the special magic numbers for {key} is: {value}." in a haystack
  of varied filler sentences; asks for the value.
- ``niah_multikey``: the target needle plus ``3`` distractor needles with other keys; asks for the
  target key's value.
- ``niah_multivalue``: ``4`` needles with the same key and different values; every value must be
  answered.
- ``niah_multiquery``: ``4`` needles with different keys; asks all ``4`` keys at once.
- ``variable_tracking``: a chain ``VAR ABCDE = 12345.`` -> ``VAR FGHIJ = VAR ABCDE.`` -> ... (``4``
  hops) plus one distractor chain with another value, statements scattered in order over the
  haystack; asks for every variable that holds the target value.
- ``common_words``: a numbered list of words in which ``10`` words appear much more often than the
  rest; asks for those ``10`` words.
- ``kv_retrieval``: a one-line JSON object of UUID-like hex keys and values; asks for the value of
  one key.

Prompt = ``context + question``. ``context`` ends with the separator ``"\\n\\n"`` and ``question``
starts with a letter, so ``len(context)`` falls on a token boundary in common tokenizers (see
``_SEPARATOR``) and a harness can split the prompt there and prefill the context before it sees the
question. ``question`` ends with ``answer_prefix`` (the start of the answer the model continues).
The prompt is at most ``context_length`` tokens and at least ``context_length - length_tolerance``
(max(3 %, 32 tokens)); in practice within 64 tokens. Only when one haystack unit is longer than that
band (a JSON pair of ``kv_retrieval`` at short lengths with a tokenizer that splits hex finely) can
it end up to one unit short.

``score`` is RULER's ``string_match_all``: the fraction of answers found (case-insensitively) in
the prediction. ``make_ppl_docs`` makes perplexity documents from the same filler generator (its own
held-out stream) or from consecutive chunks of a user text file.
"""

from __future__ import annotations

import difflib
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "TASKS",
    "SPLITS",
    "TaskParams",
    "PARAMS",
    "sample_seed_key",
    "make_sample",
    "make_samples",
    "SampleMemo",
    "SAMPLES",
    "make_ppl_docs",
    "score",
    "token_counter",
    "length_tolerance",
]

CountTokens = Callable[[str], int]

TASKS: tuple[str, ...] = (
    "niah_single",
    "niah_multikey",
    "niah_multivalue",
    "niah_multiquery",
    "variable_tracking",
    "common_words",
    "kv_retrieval",
)
SPLITS: tuple[str, ...] = ("train", "eval")

# --------------------------------------------------------------------------------------------------
# Word list and sentence templates of the filler haystack (a few hundred common English words).

NOUNS: tuple[str, ...] = tuple(
    """
    apple river garden window teacher doctor farmer painter baker sailor soldier pilot student
    child mother father sister brother friend neighbor stranger king queen village city country
    forest mountain valley island ocean lake bridge road street market shop school library museum
    hospital station church castle tower house kitchen table chair door wall floor roof candle lamp
    mirror clock letter book story song poem picture camera radio engine wheel bicycle wagon boat
    ship train horse dog cat bird fish rabbit sheep cow goat lion tiger bear wolf fox owl eagle
    flower tree leaf stone rock sand cloud storm rain snow wind sun moon star sky field hill path
    fence gate basket bottle cup plate spoon knife blanket pillow jacket shoe hat coat ribbon coin
    key box bag map ticket lantern kettle hammer rope ladder bucket drum violin piano guitar
    festival dinner breakfast journey lesson question answer promise secret idea dream memory
    """.split()
)
ADJECTIVES: tuple[str, ...] = tuple(
    """
    quiet bright dark heavy light small large tiny huge old young ancient modern gentle rough
    smooth warm cold cool hot wet dry clean dusty empty full busy lazy brave shy proud humble
    clever honest curious friendly lonely cheerful gloomy calm noisy silent sudden slow quick
    careful strange ordinary rare common simple plain fancy golden silver wooden stone green blue
    red yellow purple brown gray white pale deep shallow narrow wide tall short round sharp soft
    hard sweet bitter fresh stale rich poor early late hidden open famous distant nearby hungry
    sleepy tired happy patient polite
    """.split()
)
VERBS: tuple[tuple[str, str], ...] = tuple(
    tuple(pair.split("/"))  # type: ignore[misc]
    for pair in """
    carry/carried find/found move/moved watch/watched follow/followed paint/painted repair/repaired
    build/built open/opened close/closed clean/cleaned fill/filled lift/lifted push/pushed
    pull/pulled visit/visited greet/greeted answer/answered borrow/borrowed return/returned
    count/counted measure/measured collect/collected polish/polished wrap/wrapped hide/hid
    describe/described remember/remembered forget/forgot admire/admired sell/sold buy/bought
    bring/brought leave/left catch/caught throw/threw draw/drew write/wrote read/read study/studied
    guard/guarded protect/protected share/shared mend/mended sketch/sketched feed/fed wash/washed
    plant/planted gather/gathered inspect/inspected deliver/delivered discover/discovered
    explore/explored cross/crossed climb/climbed join/joined
    """.split()
)
ADVERBS: tuple[str, ...] = tuple(
    """
    quickly slowly quietly carefully gently suddenly happily eagerly calmly boldly patiently
    softly loudly neatly proudly politely bravely warmly briefly rarely often again together
    """.split()
)
PLACES: tuple[str, ...] = tuple(
    """
    harbor meadow orchard square corner pier cellar attic porch barn workshop courtyard cottage
    canal tunnel shore cliff wharf plaza alley stable greenhouse bakery lighthouse marketplace
    riverbank hillside crossroads lobby balcony
    """.split()
)
TIMES: tuple[str, ...] = tuple("morning evening night winter summer spring autumn afternoon".split())

SENTENCE_TEMPLATES: tuple[str, ...] = (
    "The {adj} {noun} {past} the {noun2} {adv} near the {place}.",
    "A {noun} from the {place} was {adj} and {adj2}.",
    "In the {time}, the {noun} {past} a {adj} {noun2}.",
    "Nobody expected the {noun} to be so {adj}, yet it {past} the {noun2} anyway.",
    "She {past} the {adj} {noun} while the {noun2} waited by the {place}.",
    "Every {time} the {noun} {past} the {noun2} {adv}, and the {noun3} {past2} it too.",
    "He said the {noun} at the {place} looked {adj} after it {past} the {noun2}.",
    "There was a {adj} {noun} behind the {place}, and someone {past} it {adv}.",
    "They {past} the {noun} {adv} because the {noun2} seemed {adj}.",
    "If the {noun} is {adj}, the {noun2} will {verb} the {noun3} before the {time} ends.",
    "Our {noun} never {past} the {adj} {noun2} in the {place}.",
    "Why would a {adj} {noun} {verb} the {noun2} so {adv}?",
    "The {noun2} in the {place} was {adj2}, but the {noun} stayed {adj}.",
    "Long ago a {adj} {noun} {past} a {noun2} and {past2} the {noun3}.",
)

NEEDLE_TEMPLATE = "One of the special magic numbers for {key} is: {value}."

# Ends every context. The separator belongs to the context, not to the question: pre-tokenizers of
# Llama-3, Qwen2 and tiktoken merge punctuation with the newlines after it (".\n\n" is one token),
# so a question starting with "\n\n" would put a token across the split point, while a newline
# followed by a letter is a token boundary in every common tokenizer.
_SEPARATOR = "\n\n"

_NIAH_PREFIX = (
    "Some special magic numbers are hidden inside the following text. Read it carefully and "
    "remember them, because you will be asked about them afterwards.\n\n"
)
_VT_PREFIX = (
    "The following text hides one or more chains of variable assignments. Keep track of every "
    "assignment, because you will be asked about them afterwards.\n\n"
)
_CWE_PREFIX = (
    "Below is a numbered list of words. Some words appear in it more often than others. "
    "Memorize the list, because you will be asked about it afterwards.\n\n"
)
_KV_PREFIX = "Find the value that belongs to the requested key in the JSON object below.\n\nJSON data:\n{"


@dataclass(frozen=True)
class TaskParams:
    """Difficulty knobs of the synthetic tasks: RULER's defaults, except one distractor chain in
    ``variable_tracking`` and word frequencies that scale with length in ``common_words`` (RULER
    fixes 30/3, which cannot fit short contexts).

    Attributes:
        multikey_distractors: distractor needles (other keys) in ``niah_multikey``.
        multivalue_values: values sharing one key in ``niah_multivalue``.
        multiquery_keys: keys asked at once in ``niah_multiquery``.
        vt_hops: assignments after the first in each ``variable_tracking`` chain.
        vt_chains: chains in ``variable_tracking`` (one target, the rest distractors).
        cwe_top_k: words to answer in ``common_words``.
        cwe_common_share: target share of list entries taken by the ``cwe_top_k`` common words.
        cwe_max_common_freq: cap on how often a common word appears.
        paragraph_prob: chance that a filler sentence ends its paragraph.
    """

    multikey_distractors: int = 3
    multivalue_values: int = 4
    multiquery_keys: int = 4
    vt_hops: int = 4
    vt_chains: int = 2
    cwe_top_k: int = 10
    cwe_common_share: float = 0.15
    cwe_max_common_freq: int = 30
    paragraph_prob: float = 0.1

    def __post_init__(self) -> None:
        counts = {
            "multikey_distractors": (self.multikey_distractors, 0),
            "multivalue_values": (self.multivalue_values, 1),
            "multiquery_keys": (self.multiquery_keys, 1),
            "vt_hops": (self.vt_hops, 0),
            "vt_chains": (self.vt_chains, 1),
            "cwe_top_k": (self.cwe_top_k, 1),
            "cwe_max_common_freq": (self.cwe_max_common_freq, 2),
        }
        for name, (value, least) in counts.items():
            if value < least:
                raise ValueError(f"TaskParams.{name} must be at least {least}, got {value}")
        if not 0.0 < self.cwe_common_share < 1.0 or not 0.0 <= self.paragraph_prob < 1.0:
            raise ValueError("TaskParams.cwe_common_share must be in (0, 1) and paragraph_prob in [0, 1)")


PARAMS = TaskParams()


# --------------------------------------------------------------------------------------------------
# Small public helpers


def sample_seed_key(task: str, split: str, seed: int, i: int) -> str:
    """The string every random stream of sample ``i`` is seeded from.

    The key embeds ``split``, so train and eval keys differ for any seeds and indices: a training
    sample and an evaluation sample never share a random stream. Task names contain no ``|``, so
    the key parses back uniquely into ``(task, split, seed, i)``.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if "|" in task:
        raise ValueError(f"task name {task!r} must not contain '|'")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if isinstance(i, bool) or not isinstance(i, int) or i < 0:
        raise TypeError(f"sample index must be a non-negative int, got {i!r}")
    return f"kvbench|{task}|{split}|{seed}|{i}"


def length_tolerance(context_length: int) -> int:
    """How far below ``context_length`` a prompt may end: max(3 %, 32 tokens)."""
    return max(math.ceil(0.03 * context_length), 32)


def token_counter(tokenizer) -> CountTokens:
    """A ``count_tokens`` callable for a tokenizer object, without special tokens.

    Accepts a ``transformers`` tokenizer (slow or fast), a ``tokenizers.Tokenizer`` (whose
    ``encode`` returns an ``Encoding``) or any object whose ``encode(text, add_special_tokens=False)``
    returns a sequence of ids.
    """
    encode = getattr(tokenizer, "encode", None)
    if not callable(encode):
        raise TypeError(f"cannot count tokens with {type(tokenizer).__name__}: it has no encode() method")
    is_hf = hasattr(tokenizer, "model_max_length")

    def count_tokens(text: str) -> int:
        if is_hf:  # verbose=False: no "sequence longer than model_max_length" warning
            out = encode(text, add_special_tokens=False, verbose=False)
        else:
            out = encode(text, add_special_tokens=False)
        return len(getattr(out, "ids", out))

    return count_tokens


def score(task: str, prediction: str, answers: list[str]) -> float:
    """Fraction of ``answers`` contained in ``prediction``, case-insensitively.

    RULER's ``string_match_all``: 0 or 1 for single-answer tasks (``niah_single``,
    ``niah_multikey``, ``kv_retrieval``), partial credit for the others.
    """
    _check_task(task)
    if not answers:
        raise ValueError(f"{task}: a sample needs at least one answer to score")
    text = (prediction or "").lower()
    return sum(a.lower() in text for a in answers) / len(answers)


# --------------------------------------------------------------------------------------------------
# Random building blocks


def _pick(r: Callable[[], float], seq: tuple) -> str:
    return seq[int(r() * len(seq))]


def _filler_sentence(rng: random.Random) -> str:
    """One filler sentence: a random template with random words (two distinct nouns, adjectives, verbs).

    Indexes with ``rng.random()`` rather than ``rng.choice``/``rng.sample``: three times faster, and
    a haystack of 128K tokens has about 9,000 sentences.
    """
    r = rng.random
    nn, na, nv = len(NOUNS), len(ADJECTIVES), len(VERBS)
    n1 = int(r() * nn)
    n2 = (n1 + 1 + int(r() * (nn - 1))) % nn
    a1 = int(r() * na)
    a2 = (a1 + 1 + int(r() * (na - 1))) % na
    v1 = int(r() * nv)
    v2 = (v1 + 1 + int(r() * (nv - 1))) % nv
    sentence = _pick(r, SENTENCE_TEMPLATES).format(
        noun=NOUNS[n1],
        noun2=NOUNS[n2],
        noun3=_pick(r, NOUNS),
        adj=ADJECTIVES[a1],
        adj2=ADJECTIVES[a2],
        verb=VERBS[v1][0],
        past=VERBS[v1][1],
        past2=VERBS[v2][1],
        adv=_pick(r, ADVERBS),
        place=_pick(r, PLACES),
        time=_pick(r, TIMES),
    )
    return _A_BEFORE_VOWEL.sub(r"\1n ", sentence)


_A_BEFORE_VOWEL = re.compile(r"\b([Aa]) (?=[aeiou])")


class _Stream:
    """A lazily extended list of haystack units drawn from one random stream.

    Unit ``j`` is the same however many units were asked for, so growing a haystack keeps its
    beginning.
    """

    def __init__(self, make: Callable[[random.Random], str], rng: random.Random):
        self._make = make
        self._rng = rng
        self._units: list[str] = []

    def take(self, k: int) -> list[str]:
        while len(self._units) < k:
            self._units.append(self._make(self._rng))
        return self._units[:k]


def _filler_stream(rng: random.Random, *, paragraph_prob: float) -> _Stream:
    """Filler sentences, each ending with its separator (a space or a paragraph break)."""

    def make(r: random.Random) -> str:
        return _filler_sentence(r) + ("\n\n" if r.random() < paragraph_prob else " ")

    return _Stream(make, rng)


def _distinct(rng: random.Random, n: int, draw: Callable[[random.Random], str], taken: set[str]) -> list[str]:
    """``n`` new strings from ``draw`` that are not in ``taken`` (which is updated)."""
    out: list[str] = []
    while len(out) < n:
        s = draw(rng)
        if s not in taken:
            taken.add(s)
            out.append(s)
    return out


def _draw_key(rng: random.Random) -> str:
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def _draw_number(digits: int) -> Callable[[random.Random], str]:
    def draw(rng: random.Random) -> str:
        return str(rng.randint(10 ** (digits - 1), 10**digits - 1))

    return draw


def _draw_uuid(rng: random.Random) -> str:
    h = f"{rng.getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _draw_var(rng: random.Random) -> str:
    return "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))


def _join_list(items: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


# --------------------------------------------------------------------------------------------------
# Haystack bodies: body(k) -> text with k units, plus the needles' realised depths


class _Haystack:
    """``k`` units from a stream with fixed texts inserted at fractional depths.

    An insert of depth ``d`` in [0, 1) goes before unit ``round(d * k)``; inserts at the same
    position keep the order of their depths. ``depths(k)`` reports the realised depth of each insert
    (in the order given) as a fraction of the units before it.
    """

    def __init__(self, stream: _Stream, inserts: list[tuple[float, str]], *, joiner: str, strip: bool):
        self._stream = stream
        self._inserts = inserts
        self._order = sorted(range(len(inserts)), key=lambda j: inserts[j][0])
        self._joiner = joiner
        self._strip = strip

    def _positions(self, k: int) -> list[int]:
        return [min(k, round(d * k)) for d, _ in self._inserts]

    def text(self, k: int) -> str:
        units = self._stream.take(k)
        pos = self._positions(k)
        parts: list[str] = []
        start = 0
        for j in self._order:
            parts.extend(units[start : pos[j]])
            parts.append(self._inserts[j][1])
            start = pos[j]
        parts.extend(units[start:])
        body = self._joiner.join(parts)
        return body.rstrip() if self._strip else body

    def depths(self, k: int) -> list[float]:
        return [p / k if k else 0.0 for p in self._positions(k)]


class _WordList:
    """The ``common_words`` list: ``top_k`` words ``freq_common`` times each, plus ``k`` other words
    ``freq_rare`` times each, in a fixed random order, numbered and one per line.

    Each entry draws its sort key once, when it is created, so adding words inserts entries at
    random places without reordering the others.
    """

    def __init__(
        self, rng: random.Random, common: list[str], *, freq_common: int, freq_rare: int, taken: set[str]
    ):
        self._rng = rng
        self._taken = taken
        self._common = common
        self._freq_rare = freq_rare
        self._entries: list[tuple[float, int, str]] = []
        for w in common:
            self._add(w, freq_common)
        self._n_common = len(self._entries)
        self._real = [w for w in _WORD_POOL if w not in taken]
        rng.shuffle(self._real)
        self._n_rare = 0

    def _add(self, word: str, times: int) -> None:
        for _ in range(times):
            self._entries.append((self._rng.random(), len(self._entries), word))

    def _overlaps(self, word: str) -> bool:
        """Whether ``word`` contains a common word or the reverse ("calm"/"calmly"): substring scoring
        would credit one for the other."""
        return any(c in word or word in c for c in self._common)

    def _next_word(self) -> str:
        while self._real:
            w = self._real.pop()
            if w not in self._taken and not self._overlaps(w):
                self._taken.add(w)
                return w
        while True:
            w = _distinct(self._rng, 1, _pseudo_word, self._taken)[0]
            if not self._overlaps(w):
                return w

    def text(self, k: int) -> str:
        while self._n_rare < k:
            self._add(self._next_word(), self._freq_rare)
            self._n_rare += 1
        entries = sorted(self._entries[: self._n_common + k * self._freq_rare])
        return "\n".join(f"{i}. {w}" for i, (_, _, w) in enumerate(entries, start=1))

    @staticmethod
    def depths(k: int) -> list[float]:
        return []


_WORD_POOL: tuple[str, ...] = tuple(
    dict.fromkeys(NOUNS + ADJECTIVES + tuple(v for pair in VERBS for v in pair) + PLACES + ADVERBS)
)
_SYLLABLES: tuple[str, ...] = tuple(c + v for c in "bdfgklmnprstvz" for v in "aeiou")


def _pseudo_word(rng: random.Random) -> str:
    """A pronounceable made-up word for long word lists (the real word pool runs out)."""
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))) + rng.choice(("", "n", "r", "l"))


# --------------------------------------------------------------------------------------------------
# Fitting a prompt to a token budget


def _fit_units(measure: Callable[[int], int], *, target: int, what: str) -> tuple[int, int]:
    """A number of haystack units ``k`` whose prompt fills ``target`` tokens, and its measure.

    ``measure(k)`` is the token count of the whole prompt with ``k`` units; it grows about linearly.
    The result satisfies ``measure(k) <= target`` and either ``measure(k) >= target - slack`` (slack
    = half of :func:`length_tolerance`, at most 64 tokens) or ``measure(k + 1) > target`` (the units
    are too coarse to get closer). A probe at 64 units estimates tokens per unit; then each step
    aims at the middle of the accepted window by interpolating between the closest measurements
    (bisecting if that stalls), so a prompt is counted about 3 times, O(log k) at worst. The search
    path depends only on ``measure``, so the result is deterministic.
    """
    slack = min(length_tolerance(target) // 2, 64)
    goal = target - slack // 2
    v0 = measure(0)
    if v0 > target:
        raise ValueError(
            f"context_length={target} is too small for {what}: the instructions, needles and question "
            f"alone take {v0} tokens; use a context_length of at least {v0 + 2 * slack}"
        )
    lo, lo_v = 0, v0
    hi: int | None = None
    hi_v = 0
    k = 64
    steps = 0
    while lo_v < target - slack and (hi is None or hi - lo > 1):
        v = measure(k)
        if v <= target:
            lo, lo_v = k, v
        else:
            hi, hi_v = k, v
        steps += 1
        if hi is None:  # extrapolate from the average tokens per unit so far
            per = max((lo_v - v0) / lo, 1e-3)
            k = min(lo + max(1, round((goal - lo_v) / per)), lo + target - lo_v + 1)  # a unit adds >= 1 token
        else:
            if steps <= 6:  # interpolate towards the goal
                k = lo + round((goal - lo_v) * (hi - lo) / max(hi_v - lo_v, 1))
            else:  # the interpolation stalls: bisect
                k = (lo + hi) // 2
            k = min(max(k, lo + 1), hi - 1)
    return lo, lo_v


@dataclass
class _Spec:
    """One sample before it is fitted: everything except how much haystack surrounds the needles."""

    prefix: str
    body: _Haystack | _WordList
    suffix: str
    question: str
    answers: list[str]
    answer_prefix: str
    meta: dict = field(default_factory=dict)

    def context(self, k: int) -> str:
        return self.prefix + self.body.text(k) + self.suffix


# --------------------------------------------------------------------------------------------------
# Task builders


def _niah(task: str, rng: random.Random, hay_rng: random.Random, p: TaskParams) -> _Spec:
    taken: set[str] = set()
    numbers: set[str] = set()
    if task == "niah_single":
        keys, values = _distinct(rng, 1, _draw_key, taken), _distinct(rng, 1, _draw_number(7), numbers)
        needles = [(keys[0], values[0])]
        asked, answers = keys[:1], values
    elif task == "niah_multikey":
        n = 1 + p.multikey_distractors
        keys, values = _distinct(rng, n, _draw_key, taken), _distinct(rng, n, _draw_number(7), numbers)
        needles = list(zip(keys, values, strict=True))
        asked, answers = keys[:1], values[:1]
    elif task == "niah_multivalue":
        key = _distinct(rng, 1, _draw_key, taken)[0]
        values = _distinct(rng, p.multivalue_values, _draw_number(7), numbers)
        needles = [(key, v) for v in values]
        asked, answers = [key], values
    else:  # niah_multiquery
        n = p.multiquery_keys
        keys, values = _distinct(rng, n, _draw_key, taken), _distinct(rng, n, _draw_number(7), numbers)
        needles = list(zip(keys, values, strict=True))
        asked, answers = keys, values
    inserts = [(rng.random(), NEEDLE_TEMPLATE.format(key=k, value=v) + " ") for k, v in needles]
    what = _join_list(asked)
    if len(answers) == 1:
        answer_prefix = f"The special magic number for {what} mentioned in the text above is:"
        ask = f"What is the special magic number for {what} mentioned in the text above?"
    else:
        answer_prefix = f"The special magic numbers for {what} mentioned in the text above are:"
        ask = f"What are all the special magic numbers for {what} mentioned in the text above?"
    stream = _filler_stream(hay_rng, paragraph_prob=p.paragraph_prob)
    return _Spec(
        prefix=_NIAH_PREFIX,
        body=_Haystack(stream, inserts, joiner="", strip=True),
        suffix=_SEPARATOR,
        question=f"{ask} {answer_prefix}",
        answers=list(answers),
        answer_prefix=answer_prefix,
        meta={"keys": list(asked)},
    )


def _variable_tracking(rng: random.Random, hay_rng: random.Random, p: TaskParams) -> _Spec:
    names = _distinct(rng, p.vt_chains * (p.vt_hops + 1), _draw_var, set(w.upper() for w in _WORD_POOL))
    values = _distinct(rng, p.vt_chains, _draw_number(5), set())
    inserts: list[tuple[float, str]] = []
    chains: list[list[str]] = []
    for c in range(p.vt_chains):
        chain = names[c * (p.vt_hops + 1) : (c + 1) * (p.vt_hops + 1)]
        chains.append(chain)
        depths = sorted(rng.random() for _ in chain)
        statements = [f"VAR {chain[0]} = {values[c]}."]
        statements += [f"VAR {cur} = VAR {prev}." for prev, cur in zip(chain, chain[1:], strict=False)]
        inserts += [(d, s + " ") for d, s in zip(depths, statements, strict=True)]
    answer_prefix = (
        f"Following the assignments in the text above, the variables that hold the value {values[0]} are:"
    )
    stream = _filler_stream(hay_rng, paragraph_prob=p.paragraph_prob)
    return _Spec(
        prefix=_VT_PREFIX,
        body=_Haystack(stream, inserts, joiner="", strip=True),
        suffix=_SEPARATOR,
        question=(
            f"Question: Which variables are assigned the value {values[0]}, directly or through "
            f"other variables, in the text above? Answer: {answer_prefix}"
        ),
        answers=chains[0],
        answer_prefix=answer_prefix,
        meta={"keys": [values[0]]},
    )


def _common_words(rng: random.Random, hay_rng: random.Random, p: TaskParams, *, capacity: float) -> _Spec:
    """``capacity``: estimated number of list entries that fit, which sets the word frequencies."""
    pool = list(_WORD_POOL)
    rng.shuffle(pool)
    common = [w for w in pool if len(w) >= 4][: p.cwe_top_k]
    freq_common = min(p.cwe_max_common_freq, max(2, round(p.cwe_common_share * capacity / p.cwe_top_k)))
    freq_rare = min(3, max(1, freq_common // 6))
    body = _WordList(hay_rng, common, freq_common=freq_common, freq_rare=freq_rare, taken=set(common))
    k = p.cwe_top_k
    answer_prefix = f"The {k} most common words in the list above are:"
    return _Spec(
        prefix=_CWE_PREFIX,
        body=body,
        suffix=_SEPARATOR,
        question=f"Question: What are the {k} most common words in the list above? Answer: {answer_prefix}",
        answers=common,
        answer_prefix=answer_prefix,
        meta={"keys": [], "freq_common": freq_common, "freq_rare": freq_rare},
    )


def _kv_retrieval(rng: random.Random, hay_rng: random.Random, p: TaskParams) -> _Spec:
    taken: set[str] = set()
    key, value = _distinct(rng, 2, _draw_uuid, taken)

    def pair(r: random.Random) -> str:
        k, v = _distinct(r, 2, _draw_uuid, taken)
        return f'"{k}": "{v}"'

    inserts = [(rng.random(), f'"{key}": "{value}"')]
    answer_prefix = f'The value of the key "{key}" is:'
    return _Spec(
        prefix=_KV_PREFIX,
        body=_Haystack(_Stream(pair, hay_rng), inserts, joiner=", ", strip=False),
        suffix="}" + _SEPARATOR,
        question=f'What is the value of the key "{key}" in the JSON object above? {answer_prefix}',
        answers=[value],
        answer_prefix=answer_prefix,
        meta={"keys": [key]},
    )


def _check_task(task: str) -> None:
    if task not in TASKS:
        close = difflib.get_close_matches(task, TASKS, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ValueError(f"unknown synthetic task {task!r}; {hint}available: {', '.join(TASKS)}")


def _check_length(context_length: int) -> None:
    if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length <= 0:
        raise ValueError(f"context_length must be a positive int (tokens), got {context_length!r}")


def make_sample(
    task: str,
    *,
    count_tokens: CountTokens,
    context_length: int,
    seed: int,
    index: int,
    split: str = "eval",
    params: TaskParams = PARAMS,
) -> dict:
    """Sample ``index`` of ``task``: see :func:`make_samples` for the fields."""
    _check_task(task)
    _check_length(context_length)
    key = sample_seed_key(task, split, seed, index)
    rng = random.Random(key)  # needles, keys, values, depths
    hay_rng = random.Random(key + "|haystack")  # the haystack, independent of the needles
    if task.startswith("niah_"):
        spec = _niah(task, rng, hay_rng, params)
    elif task == "variable_tracking":
        spec = _variable_tracking(rng, hay_rng, params)
    elif task == "kv_retrieval":
        spec = _kv_retrieval(rng, hay_rng, params)
    else:  # common_words: frequencies depend on how many entries fit
        probe = "\n".join(f"{i}. {w}" for i, w in enumerate(_WORD_POOL[:64], start=1000))
        per_entry = max(count_tokens(probe) / 64, 1e-3)
        scaffold = count_tokens(_CWE_PREFIX) + 2 * params.cwe_top_k + 40
        capacity = max(context_length - scaffold, 0) / per_entry
        spec = _common_words(rng, hay_rng, params, capacity=capacity)

    def measure(k: int) -> int:
        return count_tokens(spec.context(k) + spec.question)

    k, num_tokens = _fit_units(measure, target=context_length, what=f"task {task}")
    depths = spec.body.depths(k)
    return {
        "id": f"{task}:{context_length}:{split}:{seed}:{index}",
        "task": task,
        "split": split,
        "seed": seed,
        "index": index,
        "context": spec.context(k),
        "question": spec.question,
        "answers": spec.answers,
        "answer_prefix": spec.answer_prefix,
        "context_length": context_length,
        "num_tokens": num_tokens,
        "num_units": k,
        "depth": depths[0] if depths else -1.0,
        "depths": depths,
        "keys": spec.meta["keys"],
    }


def make_samples(
    task: str,
    *,
    count_tokens: CountTokens,
    context_length: int,
    n: int,
    seed: int,
    split: str = "eval",
) -> list[dict]:
    """``n`` deterministic samples of a synthetic retrieval task, fitted to ``context_length`` tokens.

    Args:
        task: one of ``TASKS``.
        count_tokens: tokens of a string in the model's tokenizer, without special tokens
            (see :func:`token_counter`).
        context_length: token budget of the whole prompt ``context + question``.
        n: number of samples (indices ``0 .. n-1``).
        seed: selects an independent family of samples.
        split: ``"eval"`` or ``"train"``; the two never share a random stream.

    Returns:
        One dict per sample: ``id``, ``task``, ``split``, ``seed``, ``index``, ``context`` (instructions
        and haystack with the needles), ``question`` (follows the context's closing ``"\\n\\n"``,
        ends with ``answer_prefix``), ``answers`` (every string the output must contain), ``answer_prefix``,
        ``context_length`` (the budget), ``num_tokens`` (measured tokens of ``context + question``,
        at most ``context_length``), ``num_units`` (haystack units), ``depth`` (realised depth of the
        target needle as a fraction of the haystack, ``-1.0`` for ``common_words``), ``depths`` (all
        needles in the order they were drawn: target first; for ``variable_tracking`` the target
        chain's statements, then the distractor chain's) and ``keys`` (what is
        asked: needle keys, the tracked value, or the JSON key).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    return [
        make_sample(
            task, count_tokens=count_tokens, context_length=context_length, seed=seed, index=i, split=split
        )
        for i in range(n)
    ]


class SampleMemo:
    """:func:`make_samples` for a tokenizer object, remembered sample by sample within one process.

    Fitting a sample to its token budget tokenizes its whole prompt three or four times (``_fit_units``);
    at 4096 tokens that is about 40 ms a sample on one CPU core, 4 s for a 100-sample cell, which every
    method's cell of a grid (scripts/leaderboard.py runs hundreds in one process) repeated identically.
    A sample depends only on (task, tokenizer, context_length, seed, split, index), so it is made once;
    callers get deep copies. The tokenizer is held by the entry and compared by identity, so another
    tokenizer never reads this one's samples; the least recently made entries go first beyond
    ``max_entries`` (task, tokenizer, length, seed, split) combinations.
    """

    def __init__(self, max_entries: int = 32) -> None:
        self.max_entries = max_entries
        self._entries: dict[tuple, tuple[object, CountTokens, dict[int, dict]]] = {}

    def samples(self, task: str, tokenizer: object, *, context_length: int, n: int, seed: int,
                split: str = "eval") -> list[dict]:
        """The same list :func:`make_samples` returns for ``token_counter(tokenizer)``."""
        import copy

        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        key = (task, id(tokenizer), context_length, seed, split)
        entry = self._entries.pop(key, None)
        if entry is None or entry[0] is not tokenizer:
            entry = (tokenizer, token_counter(tokenizer), {})
        self._entries[key] = entry  # most recently used last
        while len(self._entries) > self.max_entries:
            self._entries.pop(next(iter(self._entries)))
        _, count, made = entry
        for i in range(n):
            if i not in made:
                made[i] = make_sample(task, count_tokens=count, context_length=context_length, seed=seed,
                                      index=i, split=split)
        return [copy.deepcopy(made[i]) for i in range(n)]


SAMPLES = SampleMemo()
"""The process's memo of fitted samples (tasks/datasets.py reads every kvbench task through it)."""


# --------------------------------------------------------------------------------------------------
# Perplexity documents


def make_ppl_docs(
    *,
    count_tokens: CountTokens,
    context_length: int,
    n: int,
    seed: int,
    split: str = "eval",
    file: str | None = None,
) -> list[dict]:
    """``n`` documents of about ``context_length`` tokens (at most that many) for perplexity.

    Without ``file``: filler text from the haystack generator, on random streams of its own
    (task ``ppl``), so no document repeats a retrieval haystack or a document of the other split.
    With ``file``: consecutive chunks of that UTF-8 text file, from its start, each cut at
    whitespace; ``seed`` is unused and ``split`` only appears in the ids.

    Returns:
        dicts with ``id``, ``text`` and ``num_tokens``.
    """
    _check_length(context_length)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if file is not None:
        return _ppl_from_file(
            Path(file), count_tokens=count_tokens, context_length=context_length, n=n, split=split
        )
    docs = []
    for i in range(n):
        key = sample_seed_key("ppl", split, seed, i)
        hay = _Haystack(
            _filler_stream(random.Random(key), paragraph_prob=PARAMS.paragraph_prob),
            [],
            joiner="",
            strip=True,
        )
        k, num_tokens = _fit_units(
            lambda k, hay=hay: count_tokens(hay.text(k)), target=context_length, what="ppl"
        )
        docs.append(
            {"id": f"ppl:{context_length}:{split}:{seed}:{i}", "text": hay.text(k), "num_tokens": num_tokens}
        )
    return docs


def read_text_file(path: Path) -> str:
    """The contents of a UTF-8 text file; anything else is refused with what to do.

    Text in another encoding is not decoded with replacement characters (a Latin-1 file read that way
    gives a perplexity of 1e22 that looks like a result), and binary data is not text at all."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist or is not a file; pass the path of a UTF-8 text file")
    data = path.read_bytes()
    if b"\x00" in data[: 1 << 16]:
        raise ValueError(f"{str(path)!r} is binary data (it holds NUL bytes), not text; pass a UTF-8 text file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{str(path)!r} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start} is not valid "
            f"UTF-8); convert it first, e.g. `iconv -f latin1 -t utf-8 {path} > {path.stem}.utf8{path.suffix}`"
        ) from None


def _ppl_from_file(
    path: Path, *, count_tokens: CountTokens, context_length: int, n: int, split: str
) -> list[dict]:
    """Consecutive whitespace-cut chunks of a text file, each within the length band."""
    if not path.is_file():
        raise FileNotFoundError(
            f"perplexity text file {str(path)!r} does not exist: pass the path of a UTF-8 text file holding "
            f"at least n * context_length = {n * context_length} tokens, or leave the file unset to use the "
            "built-in synthetic filler text"
        )
    text = read_text_file(path)
    floor = context_length - length_tolerance(context_length)
    docs: list[dict] = []
    pos = 0
    window = 8 * context_length  # characters; grown until it holds more than context_length tokens
    while len(docs) < n:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos >= len(text):
            break
        while True:
            chunk = text[pos : pos + window]
            at_end = pos + len(chunk) >= len(text)
            if at_end or count_tokens(chunk) > context_length:
                break
            window *= 2
        cuts = [m.start() for m in re.finditer(r"\s+", chunk)]
        if at_end:
            cuts.append(len(chunk))
        cuts = [c for c in cuts if c > 0]
        if not cuts:
            break

        def measure(k: int, chunk: str = chunk, cuts: list[int] = cuts) -> int:
            if k > len(cuts):  # past the window: "too long" by construction
                return context_length + 1
            return count_tokens(chunk[: cuts[k - 1]]) if k else 0

        k, num_tokens = _fit_units(measure, target=context_length, what="ppl")
        if k == 0 or num_tokens < floor:
            break
        piece = chunk[: cuts[k - 1]]
        docs.append(
            {"id": f"ppl-file:{context_length}:{split}:{len(docs)}", "text": piece, "num_tokens": num_tokens}
        )
        pos += len(piece)
    if len(docs) < n:
        raise ValueError(
            f"perplexity text file {str(path)!r} is too short: it yields {len(docs)} chunk(s) of about "
            f"{context_length} tokens but {n} were asked for; use a longer file (at least "
            f"{n * context_length} tokens), fewer documents or a shorter context_length"
        )
    return docs
