"""The command line of the tiny model's training (``python -m scripts.train.tiny_model``): the flags, then one
run from start to end: tokenizer, length calibration, data workers, model, training loop, save, the report-only
generation check and the model directory's README.md."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import scripts.train.tiny_model as package
from scripts.train.tiny_model.batches import Producer, calibrate
from scripts.train.tiny_model.evaluation import _eval_prompts, format_table, generate_eval
from scripts.train.tiny_model.loop import build_model, save_model, train
from scripts.train.tiny_model.readme import write_readme
from scripts.train.tiny_model.recipe import (
    ARCH,
    CURRICULUM_TASKS,
    LENGTHS,
    MIX,
    NOTES_GAP,
    ROOT,
    STAGE0_MIX,
    STAGE0_TOKENS,
    TASK_ID,
    TRAIN_TASKS,
    WORD_VALUES,
)
from tasks import synthetic as S


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
    ap = argparse.ArgumentParser(description=package.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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


def prepare_tokenizer(args: argparse.Namespace, out: Path, log) -> None:
    """Copy ``--tokenizer`` into ``out`` or train one there (scripts/train/tiny_tokenizer.py), then add the
    ``--fuse-*`` tokens."""
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


class EvalPrompts:
    """The generation check's ``split="eval"`` prompts, tokenized by two forked processes while training runs
    (in-process at the end when there are no data workers)."""

    def __init__(self, args: argparse.Namespace, out: Path, n_workers: int):
        self.lengths = [int(n) for n in args.eval_lengths.split(",") if n] if args.eval_n > 0 else []
        tasks = [t for t in args.eval_tasks.split(",") if t]
        self.jobs = [(str(out), t, n, args.eval_n, 0) for n in self.lengths for t in tasks]
        self.pool = self.futures = None
        if self.jobs and n_workers > 0:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(max_workers=2, mp_context=mp.get_context("fork"))
            self.futures = [self.pool.submit(_eval_prompts, j) for j in self.jobs]

    def get(self) -> dict:
        """{(task, length): [(prompt ids, answers), ...]}"""
        if self.futures is not None:
            done = [f.result() for f in self.futures]
            self.pool.shutdown()
        else:
            done = [_eval_prompts(j) for j in self.jobs]
        return {(task, L): items for task, L, items in done}


def apply_recipe_flags(args: argparse.Namespace) -> None:
    """Set the recipe's module state from the flags; the data workers are forked after this."""
    parse_mix(args.stage0_mix, STAGE0_MIX, "--stage0-mix")
    parse_mix(args.mix, MIX, "--mix")
    if args.gate_tasks:
        CURRICULUM_TASKS[:] = [check_task(t, "--gate-tasks") for t in args.gate_tasks]
    NOTES_GAP[0] = args.notes_gap
    STAGE0_TOKENS[0] = args.stage0_tokens_per_step
    WORD_VALUES[0] = args.word_values


def eval_check(evals: EvalPrompts, out: Path, tokenizer, device, log) -> dict:
    """Report-only generation check on eval-split samples, with the saved bf16 weights upcast to fp32."""
    import torch
    from transformers import AutoModelForCausalLM

    if not evals.jobs:
        return {}
    prompts = evals.get()
    ev = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).to(device).eval()
    t_ev = time.time()
    results = generate_eval(ev, tokenizer, prompts, device)
    log(f"eval check ({time.time() - t_ev:.0f}s, fp32, greedy)\n" + format_table(results, evals.lengths))
    for (task, L), (_acc, _n, ex) in sorted(results.items()):
        if ex is not None:
            log(f"  e.g. {task}@{L}: {ex[0][:100]!r} (answers {ex[1]})")
    return results


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

    # 1. tokenizer, and characters per token of each task (cheap length estimates for training text)
    prepare_tokenizer(args, out, log)
    ratios = calibrate(str(out), args.seed)
    log("chars/token: " + ", ".join(f"{t}={r:.2f}" for t, r in ratios.items()))

    # 2. eval prompts (report only) and training data workers, forked before CUDA starts
    n_workers = args.workers if args.workers >= 0 else max(1, (os.cpu_count() or 4) - 3)
    evals = EvalPrompts(args, out, n_workers)
    apply_recipe_flags(args)
    producer = Producer(n_workers, str(out), ratios, args.seed, args.tokens_per_step, args.max_len, args.scaffold)
    log(f"{n_workers} data workers")

    # 3. model and training loop
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(out))
    model, config, device = build_model(args, tokenizer, log)

    def save(tag: str) -> None:
        save_model(model, config, tokenizer, out, log, tag)

    run = train(args, model, device, producer, lengths, t_start=t_start, save=save, log=log)
    producer.close()
    log(f"training done: {run['steps']} steps, {run['tokens']:,} tokens in {run['train_seconds']:.0f}s")
    save("final")

    # 4. report-only generation check, then the README and a JSON summary line
    results = eval_check(evals, out, tokenizer, device, log)
    summary = {
        "params": sum(p.numel() for p in model.parameters()),
        "config": {k: getattr(config, k) for k in ("num_hidden_layers", "intermediate_size", "hidden_size",
                                                   "num_attention_heads", "num_key_value_heads", "vocab_size")},
        "steps": run["steps"], "tokens": run["tokens"], "train_seconds": round(run["train_seconds"], 1),
        "total_seconds": round(time.time() - t_start, 1), "stages": run["stages"], "args": vars(args),
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "eval": {f"{t}@{n}": {"acc": a, "n": k} for (t, n), (a, k, _) in results.items()},
        "curve": run["curve"],
    }
    write_readme(out, summary, results, evals.lengths, command=command_line(summary["args"]))
    log(f"done in {time.time() - t_start:.0f}s")
    print(json.dumps({k: v for k, v in summary.items() if k != "curve"}, default=str))
    return 0
