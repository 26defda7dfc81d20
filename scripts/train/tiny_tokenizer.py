"""Train the embedded tiny model's tokenizer (Hugging Face ``tokenizers``, byte-level BPE).

Digits are split one per token (numbers and hex keys become digit tokens, which a small model
copies reliably); everything else is byte-level BPE trained on text from the ``tasks/`` generators
(training split only) plus filler. Deterministic for a given seed.

    python -m scripts.train.tiny_tokenizer --out models/kvbench-tiny --vocab-size 4096
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

SPECIAL = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>", "unk_token": "<|unk|>"}


def corpus(*, n_per_task: int = 40, context_length: int = 1500, seed: int = 0) -> Iterator[str]:
    """Training-split task prompts and answers (never the evaluation split)."""
    from tasks.synthetic import TASKS, make_ppl_docs, make_samples

    def count(s: str) -> int:  # a rough count is enough to size training text
        return len(s) // 4 + 1

    for task in TASKS:
        for s in make_samples(task, count_tokens=count, context_length=context_length, n=n_per_task, seed=seed,
                              split="train"):
            yield s["context"] + s["question"] + " " + " ".join(s["answers"])
    for d in make_ppl_docs(count_tokens=count, context_length=context_length, n=n_per_task, seed=seed, split="train"):
        yield d["text"]


def train_tokenizer(*, vocab_size: int = 4096, seed: int = 0, model_max_length: int = 8192):
    """A ``PreTrainedTokenizerFast`` trained on the generators' training split."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(seed=seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=model_max_length, **SPECIAL)
    fast.add_bos_token = False
    return fast


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    tok = train_tokenizer(vocab_size=args.vocab_size, seed=args.seed)
    tok.save_pretrained(args.out)
    print(f"tokenizer with {len(tok)} tokens -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
