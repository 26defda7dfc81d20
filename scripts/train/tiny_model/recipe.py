"""The training recipe's settings: tasks and their mixes, the length curriculum, the loss's answer tokens,
the evaluation's generation settings and the architecture. The flags of :mod:`.cli` change some of them in
place before the data workers fork (the list-valued ones are lists so that forked workers see the value)."""

from __future__ import annotations

from pathlib import Path

from tasks import synthetic as S

ROOT = Path(__file__).resolve().parents[3]

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
