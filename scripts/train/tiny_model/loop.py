"""The model and the training loop: a ``LlamaForCausalLM`` from :data:`.recipe.ARCH` (or ``--init-from``), AdamW,
bf16 autocast on CUDA, the length curriculum, teacher-forced answer accuracy, a curve record every
``log_every`` seconds and a save every 90 s."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scripts.train.tiny_model.batches import Producer
from scripts.train.tiny_model.recipe import ARCH, CURRICULUM_TASKS, DEADLINES, TASK_ID, TRAIN_TASKS
from tasks import synthetic as S

Log = Callable[[str], None]


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


def build_model(args: argparse.Namespace, tokenizer: Any, log: Log) -> tuple[Any, Any, Any]:
    """(model, config, device): seeded, SDPA attention, fp32 weights (``--init-from``'s when given)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(args.seed)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
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
    return model, config, device


def save_model(model: Any, config: Any, tokenizer: Any, out: Path, log: Log, tag: str) -> None:
    """The weights as one bf16 ``model.safetensors`` with a generation config, into ``out``."""
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    m = LlamaForCausalLM(config)
    m.load_state_dict({k: v.detach().to("cpu") for k, v in model.state_dict().items()})
    m = m.to(torch.bfloat16)
    m.config.dtype = "bfloat16"
    m.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                           eos_token_id=tokenizer.eos_token_id,
                                           pad_token_id=tokenizer.pad_token_id)
    m.save_pretrained(str(out))
    log(f"saved ({tag}) -> {out}")


def learning_rate(args: argparse.Namespace, step: int, frac: float) -> float:
    """Warm-up, constant, then linear decay to 10 % over the last 30 % of the time (``frac`` of it spent)."""
    return args.lr * min(1.0, (step + 1) / args.warmup) * (1.0 if frac < 0.7 else max(0.1, 1 - (frac - 0.7) / 0.3 * 0.9))


class Trainer:
    """One optimizer step per batch, with the answer-accuracy counters the curriculum and the curve read:
    ``stats[length, task, first, (correct, total)]`` since the last log and ``stage_stats`` (correct, total) of
    the curriculum tasks at the current stage's length."""

    def __init__(self, args: argparse.Namespace, model: Any, device: Any, lengths: list[int]):
        import torch

        self.args, self.model, self.device, self.lengths = args, model, device, lengths
        decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
        no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                     lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")
        self.amp = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
        self.stats = torch.zeros((len(lengths), len(TRAIN_TASKS), 2, 2), device=device)
        self.loss_acc = torch.zeros(3, device=device)  # sum loss, ans, lm
        self.stage_stats = torch.zeros(2, device=device)
        self.curriculum_ids = torch.tensor([TASK_ID[t] for t in CURRICULUM_TASKS], device=device)

    def set_lr(self, lr: float) -> None:
        for g in self.opt.param_groups:
            g["lr"] = lr

    def step(self, b: dict, stage: int) -> tuple[int, int]:
        """Train on batch ``b`` at curriculum ``stage``; returns its (B, T)."""
        import torch
        import torch.nn.functional as F

        args, device, model = self.args, self.device, self.model
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

        y = x[:, 1:]
        pos = torch.arange(1, T, device=device)
        valid = pos[None, :] < lens[:, None]
        sp = span_tok[:, 1:]
        ans = sp >= 0
        lm_w = args.lm_weight0 if stage == 0 else args.lm_weight
        # logits only where a loss is taken: answer tokens and a random share of the other tokens
        lm_sel = valid & ~ans & (torch.rand(valid.shape, device=device) < args.lm_frac) if lm_w > 0 else valid & False
        sel = ans | lm_sel
        with self.amp:
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
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        self.opt.step()

        with torch.no_grad():
            # an answer is right when every token it is trained on is (terminators out of the loss do not count)
            wrong = ((logits[is_ans].argmax(-1) != y[sel][is_ans]) & (w[is_ans] > 0)).long()
            n_sp = span_task.numel()
            if n_sp:
                span_wrong = torch.zeros(n_sp, device=device, dtype=torch.long).index_add_(0, sp[ans], wrong)
                ok = (span_wrong == 0).float()
                li = self.lengths.index(b["L"])
                flat = self.stats[li].view(-1, 2)
                idx = span_task * 2 + span_first
                flat[:, 0].index_add_(0, idx, ok)
                flat[:, 1].index_add_(0, idx, torch.ones_like(ok))
                if b["L"] == self.lengths[stage]:
                    cur = torch.isin(span_task, self.curriculum_ids)
                    self.stage_stats[0] += (ok * cur).sum()
                    self.stage_stats[1] += cur.sum()
            self.loss_acc += torch.stack([loss.detach(), ans_loss.detach(), lm_loss.detach()])
        return B, T

    def record(self, *, step: int, elapsed: float, stage_len: int, lr: float, tokens: int, since: int
               ) -> tuple[dict, dict]:
        """(the curve's record, its unrounded figures) of the steps since the last record (``since`` of them);
        then the counters restart."""
        st = self.stats.cpu()
        raw = {
            "loss": (self.loss_acc / max(1, since)).tolist(),  # total, answer, LM
            "first": {t: (st[:, TASK_ID[t], 1, 0].sum() / st[:, TASK_ID[t], 1, 1].sum().clamp(min=1)).item()
                      for t in S.TASKS},
            "all": {t: (st[:, TASK_ID[t], :, 0].sum() / st[:, TASK_ID[t], :, 1].sum().clamp(min=1)).item()
                    for t in TRAIN_TASKS if t != "ppl"},
            "by_len": {n: (st[i, :, :, 0].sum() / st[i, :, :, 1].sum().clamp(min=1)).item()
                       for i, n in enumerate(self.lengths) if st[i, :, :, 1].sum() > 0},
        }
        self.stats.zero_()
        self.loss_acc.zero_()
        la = raw["loss"]
        rec = {"step": step, "time": round(elapsed, 1), "stage_len": stage_len, "loss": round(la[0], 4),
               "ans_loss": round(la[1], 4), "lm_loss": round(la[2], 4), "lr": lr,
               "tok_per_s": round(tokens / max(elapsed, 1e-6)),
               "acc_first": {t: round(v, 3) for t, v in raw["first"].items()},
               "acc_all": {t: round(v, 3) for t, v in raw["all"].items()},
               "acc_by_len": {n: round(v, 3) for n, v in raw["by_len"].items()}}
        return rec, raw


def log_line(rec: dict, raw: dict, *, B: int, T: int, queued: int, wait_share: float) -> str:
    la, first, allq, per_len = raw["loss"], raw["first"], raw["all"], raw["by_len"]
    return (f"step {rec['step']} stage {rec['stage_len']} batch {B}x{T} loss {la[0]:.3f} ans {la[1]:.3f} lm {la[2]:.3f} "
            f"lr {rec['lr']:.2e} tok/s {rec['tok_per_s']:,} q {queued} data-wait {wait_share:.0%}\n"
            f"    acc(first q) " + " ".join(f"{t}={v:.2f}" for t, v in first.items())
            + f"\n    acc(all q) dense={allq['dense_niah']:.2f} dense_vt={allq['dense_vt']:.2f} mqar={allq['mqar']:.2f} notes={allq['notes']:.2f} kv={allq['kv_retrieval']:.2f} vt={allq['variable_tracking']:.2f}"
            + " by len " + " ".join(f"{n}={v:.2f}" for n, v in per_len.items()))


def train(args: argparse.Namespace, model: Any, device: Any, producer: Producer, lengths: list[int], *,
          t_start: float, save: Callable[[str], None], log: Log) -> dict:
    """Train until the time budget is spent (``--time-budget`` from ``t_start``, the command's start, less
    ``--eval-reserve``) or ``--max-steps``: the curriculum advances when the
    curriculum tasks' teacher-forced accuracy at the current length reaches ``--advance-at`` (checked every 25
    steps, 50 steps into a stage, over 200 answers or more) or at the next stage's deadline. Returns steps,
    tokens, seconds, the stages reached and the curve."""
    trainer = Trainer(args, model, device, lengths)
    t_train0 = time.time()
    train_time = max(1.0, args.time_budget - args.eval_reserve - (t_train0 - t_start))
    stage = min(max(args.start_stage, 0), len(lengths) - 1)
    producer.set_stage(stage)
    stage_step0, step, tokens, wait_s = 0, 0, 0, 0.0
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
            trainer.stage_stats.zero_()
            producer.set_stage(stage)
            stage_log.append((step, now - t_train0, lengths[stage]))
            log(f"stage -> {lengths[stage]} (deadline)")
        lr = learning_rate(args, step, frac)
        trainer.set_lr(lr)

        t_get = time.time()
        b = producer.get()
        wait_s += time.time() - t_get
        B, T = trainer.step(b, stage)
        tokens += int(b["lens"].sum())
        step += 1

        # curriculum check every 25 steps at the current length
        if stage + 1 < len(lengths) and step % 25 == 0 and step - stage_step0 >= 50:
            c, n = trainer.stage_stats.tolist()
            if n >= 200:
                if c / n >= args.advance_at:
                    stage += 1
                    stage_step0 = step
                    producer.set_stage(stage)
                    stage_log.append((step, time.time() - t_train0, lengths[stage]))
                    log(f"stage -> {lengths[stage]} (accuracy {c / n:.3f} over {int(n)} answers)")
                trainer.stage_stats.zero_()

        if time.time() - last_log >= log_every:
            el = time.time() - t_train0
            rec, raw = trainer.record(step=step, elapsed=el, stage_len=lengths[stage], lr=lr, tokens=tokens,
                                      since=step - (curve[-1]["step"] if curve else 0))
            curve.append(rec)
            log(log_line(rec, raw, B=B, T=T, queued=producer.qsize(), wait_share=wait_s / max(el, 1e-6)))
            last_log = time.time()
        if time.time() - last_save >= 90.0:
            save(f"step {step}")
            last_save = time.time()
    return {"steps": step, "tokens": tokens, "train_seconds": time.time() - t_train0, "stages": stage_log,
            "curve": curve}
