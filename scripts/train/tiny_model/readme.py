"""The trained model directory's README.md, written from the run's summary."""

from __future__ import annotations

from pathlib import Path

from scripts.train.tiny_model.evaluation import format_table
from scripts.train.tiny_model.recipe import ARCH, FINAL_MIX, LENGTHS, MIX
from tasks import synthetic as S


def write_readme(out: Path, summary: dict, results: dict, eval_lengths: list[int], *, command: str) -> None:
    """The model directory's README.md: architecture, data, the run (``command`` repeats it) and the generation
    check; the full-cache accuracy table is left for the harness to fill."""
    a = summary["args"]
    cmd = command
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
