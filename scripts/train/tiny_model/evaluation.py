"""The report-only generation check at the end of a run: ``split="eval"`` prompts (tokenized in worker
processes while training runs) and greedy generation with the saved weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from scripts.train.tiny_model.recipe import EVAL_SPLIT, GEN, TRAIN_TASKS
from tasks import synthetic as S


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
