"""An lm-eval ``LM`` that runs every request through kvbench's engine with the run's method.

- ``generate_until``: context -> compress -> question -> greedy decode (docs/ARCHITECTURE.md §3).
- ``loglikelihood``: compress the context once, ``fork`` per continuation, teacher-force it.
- ``loglikelihood_rolling``: feed the text in ``ppl_chunk`` chunks; each attends to the compressed past.

The prompt is tokenized once and split at a token boundary (offset mapping) where the doc's
context ends, never by tokenizing context and question separately. A task that names neither a
context field nor a split pattern runs ``query_aware`` (everything is context) and says so.
Instruct models get their chat template; prompts longer than the model's window are truncated in
the middle of the context, and ``n_truncated`` counts them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from lm_eval.api.model import LM
from tqdm import tqdm

from methods.api import KVStats

from .engine import Engine, Prompt


@dataclass
class KVTotals:
    """Sums of per-sample store statistics over the accuracy pass."""

    n: int = 0
    bytes_full: int = 0
    bytes_stored: int = 0
    bytes_stored_final: int = 0
    bytes_read_per_step: int = 0
    bytes_full_final: int = 0

    def add(self, ctx: KVStats | None, final: KVStats | None = None, *, n: int = 1) -> None:
        if ctx is None:
            return
        self.n += n
        self.bytes_full += ctx.bytes_full
        self.bytes_stored += ctx.bytes_stored
        fin = final or ctx
        self.bytes_stored_final += fin.bytes_stored
        self.bytes_read_per_step += fin.bytes_read_per_step
        self.bytes_full_final += fin.bytes_full

    def columns(self) -> dict[str, Any]:
        if not self.n:
            return {}
        return {
            "kv_bytes_full": self.bytes_full // self.n,
            "kv_bytes_stored": self.bytes_stored // self.n,
            "ratio_achieved": 1.0 - self.bytes_stored / self.bytes_full if self.bytes_full else None,
            "kv_bytes_stored_final": self.bytes_stored_final // self.n,
            "kv_bytes_read_per_step": self.bytes_read_per_step // self.n,
            "read_ratio_achieved": 1.0 - self.bytes_read_per_step / self.bytes_full_final if self.bytes_full_final else None,
        }


@dataclass
class PromptSplitter:
    """Tokenizes a prompt once and splits it where the compressible context ends."""

    tokenizer: Any
    context_field: str | None = None
    question_field: str | None = None
    split_pattern: str | None = None
    chat_template: bool = False
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    max_length: int | None = None  # prompt + generation budget in tokens
    fallbacks: int = 0  # prompts that could not be split (ran query_aware)
    n_truncated: int = 0

    def _split_char(self, prompt: str, doc: dict | None) -> int | None:
        if doc is not None and self.context_field and isinstance(doc.get(self.context_field), str):
            ctx = doc[self.context_field]
            if prompt.startswith(ctx):
                return len(ctx)
            pos = prompt.find(ctx)  # a task template may put text before the context
            if pos >= 0:
                return pos + len(ctx)
        if self.split_pattern:
            m = re.search(self.split_pattern, prompt, flags=re.S)
            if m:
                return m.start()
        return None

    def encode(self, prompt: str, doc: dict | None, *, reserve: int = 0) -> tuple[list[int], list[int], bool]:
        """-> (context ids, question ids, split_found). ``reserve`` tokens are kept free for output."""
        split = self._split_char(prompt, doc)
        text, offset = prompt, 0
        if self.chat_template and getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True,
                **self.chat_template_kwargs,
            )
            offset = text.find(prompt)
            if offset < 0:
                split, offset = None, 0
        ids, i = _TOKENIZED.split(self.tokenizer, text, add_special_tokens=not self.chat_template,
                                  cut=None if split is None else offset + split)
        if split is None:
            self.fallbacks += 1
            ctx, q, found = ids, [], False
        else:
            ctx, q, found = ids[:i], ids[i:], True
        if self.max_length is not None and len(ctx) + len(q) + reserve > self.max_length:
            excess = len(ctx) + len(q) + reserve - self.max_length
            if excess >= len(ctx):
                raise ValueError(
                    f"prompt of {len(ctx) + len(q)} tokens cannot fit {self.max_length} with {reserve} "
                    "tokens to generate even without its context; raise model.max_length or lower context_length"
                )
            keep = len(ctx) - excess
            ctx = ctx[: keep // 2] + ctx[len(ctx) - (keep - keep // 2):]  # drop the middle
            self.n_truncated += 1
        return ctx, q, found


class _TokenizedPrompts:
    """Prompt ids and split points, remembered per tokenizer object within one process.

    Every cell of a grid (scripts/leaderboard.py: hundreds in one process) tokenizes the same task
    prompts again, about 8 ms per 4096-token prompt on one CPU core; the memo keeps each prompt's ids
    (4 bytes a token) and the index of its first token at or after the split, for ``max_entries``
    prompts, least recently used out first. The tokenizer is held and compared by identity."""

    def __init__(self, max_entries: int = 2048) -> None:
        from collections import OrderedDict

        self.max_entries = max_entries
        self._memo: OrderedDict[tuple, tuple[Any, Any, int | None]] = OrderedDict()

    def split(self, tokenizer: Any, text: str, *, add_special_tokens: bool, cut: int | None) -> tuple[list[int], int]:
        """-> (ids of ``text``, index of the first token that starts at or after character ``cut``; specials
        (offsets (0, 0)) stay before it; ``len(ids)`` when ``cut`` is None or past the end)."""
        from array import array

        key = (id(tokenizer), add_special_tokens, cut, text)
        hit = self._memo.get(key)
        if hit is not None and hit[0] is tokenizer:
            self._memo.move_to_end(key)
            return hit[1].tolist(), hit[2]
        enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=add_special_tokens)
        ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
        i = len(ids) if cut is None else next((j for j, (a, b) in enumerate(offsets) if a >= cut and b > a), len(ids))
        self._memo[key] = (tokenizer, array("q", ids), i)
        while len(self._memo) > self.max_entries:
            self._memo.popitem(last=False)
        return ids, i


_TOKENIZED = _TokenizedPrompts()


class KVBenchLM(LM):
    """lm-eval model whose every request runs through ``engine``."""

    def __init__(
        self,
        *,
        engine: Engine,
        tokenizer: Any,
        splitter: PromptSplitter,
        batch_size: int = 1,
        protocol: str = "query_agnostic",
        ppl_chunk: int = 512,
        progress: bool = True,
    ):
        super().__init__()
        self.engine = engine
        self.tokenizer = tokenizer
        self.splitter = splitter
        self.batch_size = max(1, int(batch_size))
        self.protocol = protocol
        self.ppl_chunk = int(ppl_chunk)
        self.progress = progress
        self.totals = KVTotals()
        self._stop_cache: dict[tuple[str, ...], list[int]] = {}

    # -- helpers --------------------------------------------------------------------------------
    def _eos_ids(self) -> list[int]:
        eos = self.tokenizer.eos_token_id
        ids = eos if isinstance(eos, list) else [eos]
        gen_eos = getattr(getattr(self.engine.model, "generation_config", None), "eos_token_id", None)
        if gen_eos is not None:
            ids += gen_eos if isinstance(gen_eos, list) else [gen_eos]
        return sorted({int(i) for i in ids if i is not None})

    def _stop_token_ids(self, until: tuple[str, ...]) -> list[int]:
        """Tokens whose text contains a stop string: once generated, the answer is cut there anyway."""
        if until not in self._stop_cache:
            ids = []
            if until:
                for i in range(len(self.tokenizer)):
                    piece = self.tokenizer.decode([i])
                    if any(u and u in piece for u in until):
                        ids.append(i)
            self._stop_cache[until] = ids
        return self._stop_cache[until]

    def _bar(self, total: int, desc: str):
        return tqdm(total=total, desc=desc, disable=not self.progress, leave=False)

    # -- lm-eval API ----------------------------------------------------------------------------
    def generate_until(self, requests) -> list[str]:
        items = []
        for i, req in enumerate(requests):
            prompt, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = tuple([until] if isinstance(until, str) else until)
            max_new = int(kwargs.get("max_gen_toks") or kwargs.get("max_new_tokens") or 256)
            ctx, q, _ = self.splitter.encode(prompt, getattr(req, "doc", None), reserve=max_new)
            items.append((i, ctx, q, until, max_new))
        # batch prompts that share generation settings, longest first
        items.sort(key=lambda t: (t[3], t[4], -(len(t[1]) + len(t[2]))))
        out: list[str] = [""] * len(items)
        bar = self._bar(len(items), "generate")
        for s in range(0, len(items), self.batch_size):
            batch = items[s : s + self.batch_size]
            groups: dict[tuple, list] = {}
            for it in batch:
                groups.setdefault((it[3], it[4]), []).append(it)
            for (until, max_new), group in groups.items():
                res = self.engine.generate(
                    [Prompt(context=c, question=q) for _, c, q, _, _ in group],
                    max_new_tokens=max_new,
                    stop_ids=self._eos_ids() + self._stop_token_ids(until),
                    protocol=self.protocol,
                )
                self.totals.add(res.stats_context, res.stats_final, n=len(group))
                for (i, *_), toks in zip(group, res.tokens):
                    text = self.tokenizer.decode(toks, skip_special_tokens=True)
                    for u in until:
                        if u and u in text:
                            text = text[: text.index(u)]
                    out[i] = text
            bar.update(len(batch))
        bar.close()
        return out

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        by_context: dict[str, list[tuple[int, str, Any]]] = {}
        for i, req in enumerate(requests):
            context, continuation = req.args
            by_context.setdefault(context, []).append((i, continuation, getattr(req, "doc", None)))
        out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        bar = self._bar(len(requests), "loglikelihood")
        for context, conts in by_context.items():
            doc = conts[0][2]
            ctx, q, _ = self.splitter.encode(context, doc)
            cont_ids = []
            for _, cont, _ in conts:
                whole = self.tokenizer(context + cont, add_special_tokens=not self.splitter.chat_template)["input_ids"]
                n_cont = max(1, len(self.tokenizer(cont, add_special_tokens=False)["input_ids"]))
                cont_ids.append(list(whole[-n_cont:]))
            scores, stats = self.engine.score_continuations(Prompt(context=ctx, question=q), cont_ids,
                                                            protocol=self.protocol)
            self.totals.add(stats)
            for (i, _, _), sc in zip(conts, scores):
                out[i] = sc
            bar.update(len(conts))
        bar.close()
        return out

    def loglikelihood_rolling(self, requests) -> list[float]:
        out = []
        prefix = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id
        for req in tqdm(requests, desc="perplexity", disable=not self.progress, leave=False):
            (text,) = req.args[:1]
            tokens = [prefix] + list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            total, _, stats = self.engine.score_rolling(tokens, chunk=self.ppl_chunk)
            self.totals.add(stats)
            out.append(total)
        return out
