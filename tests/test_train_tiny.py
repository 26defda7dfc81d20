"""Tests of scripts/train/tiny_model/ (CPU): the --smoke run writes a loadable Hugging Face directory,
training text comes from split="train" streams only, and the training format is the evaluation format."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from scripts.train.tiny_model import batches, cli, episodes, recipe
from tasks import synthetic as S

ROOT = Path(__file__).resolve().parents[1]

TOK_DIR = ROOT / "models" / "kvbench-tiny"


def words(text: str) -> int:
    return len(text.split())


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One --smoke run (in-process, no worker processes); records every seed key the generators use."""
    out = tmp_path_factory.mktemp("kvbench-tiny")
    keys: list[str] = []
    real = S.sample_seed_key

    def spy(task, split, seed, i):
        key = real(task, split, seed, i)
        keys.append(key)
        return key

    mp = pytest.MonkeyPatch()
    mp.setattr(S, "sample_seed_key", spy)
    try:
        rc = cli.main(["--smoke", "--out", str(out), "--tokenizer", str(TOK_DIR), "--eval-n", "1"])
    finally:
        mp.undo()
    assert rc == 0
    return out, keys


def test_smoke_output_loads(smoke):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = smoke
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    weights = out / "model.safetensors"
    assert weights.stat().st_size <= 16 * 2**20
    with safe_open(str(weights), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    model = AutoModelForCausalLM.from_pretrained(str(out))
    tok = AutoTokenizer.from_pretrained(str(out))
    cfg = model.config
    assert cfg.model_type == "llama"
    assert cfg.num_attention_heads // cfg.num_key_value_heads >= 2
    assert cfg.num_attention_heads % cfg.num_key_value_heads == 0
    assert cfg.head_dim in (64, 128) and cfg.num_hidden_layers >= 4
    assert cfg.max_position_embeddings >= 8192
    assert len(tok) <= cfg.vocab_size < len(tok) + 64  # embedding rows padded to a multiple of 64
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.eos_token_id == cfg.eos_token_id
    ids = tok("One of the special magic numbers for calm-fox is: 1234567.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert model(ids).logits.shape == (1, ids.shape[1], cfg.vocab_size)
    readme = (out / "README.md").read_text()
    assert "Full-cache accuracy (measured through python -m harness.run)" in readme
    assert "python -m scripts.train.tiny_model" in readme


def test_training_draws_only_from_the_train_split(smoke):
    _, keys = smoke
    parsed = [k.split("|") for k in keys]
    assert all(p[0] == "kvbench" and len(p) == 5 for p in parsed)
    eval_keys = {k for k, p in zip(keys, parsed) if p[2] == "eval"}
    train = [p for p in parsed if p[2] == "train"]
    # the only eval-split sample is the report-only generation check (1 sample of niah_single at 256)
    assert eval_keys == {S.sample_seed_key("niah_single", "eval", 0, 0)}
    assert len(train) >= 2 and len(train) + len(eval_keys) == len(keys)
    assert not {"|".join(p) for p in train} & eval_keys
    # and the code names no other split for its training text
    src = "".join(p.read_text() for p in sorted((ROOT / "scripts" / "train" / "tiny_model").glob("*.py")))
    assert src.count("split=TRAIN_SPLIT") >= 3 and src.count("split=EVAL_SPLIT") == 1
    assert recipe.TRAIN_SPLIT == "train" and recipe.EVAL_SPLIT == "eval"


def test_generation_settings_match_task_yamls():
    import yaml

    for task in S.TASKS:
        text = (ROOT / "tasks" / f"{task}.yaml").read_text()
        text = "\n".join(line for line in text.splitlines() if "!function" not in line)
        kw = yaml.safe_load(text)["generation_kwargs"]
        until, max_new = recipe.GEN[task]
        assert tuple(kw["until"]) == until and kw["max_gen_toks"] == max_new, task


def test_questions_are_the_evaluation_questions():
    for i in range(3):
        for task in ("niah_single", "niah_multikey"):
            s = S.make_sample(task, count_tokens=words, context_length=600, seed=1, index=i, split="train")
            assert episodes.niah_question(s["keys"][0]) == s["question"]
        s = S.make_sample("kv_retrieval", count_tokens=words, context_length=600, seed=1, index=i, split="train")
        assert episodes.kv_question(s["keys"][0]) == s["question"]
        s = S.make_sample("variable_tracking", count_tokens=words, context_length=600, seed=1, index=i,
                          split="train")
        chains = episodes.vt_chains(s["context"])
        assert chains[s["keys"][0]] == s["answers"] and len(chains) == S.PARAMS.vt_chains
        qas = episodes.qa_pairs("variable_tracking", s, random.Random(0))
        assert qas[0] == (s["question"], s["answers"]) and len(qas) == S.PARAMS.vt_chains


def test_episode_is_prompt_then_answer_then_eos():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TOK_DIR))
    ratios = {t: 4.0 for t in S.TASKS}
    maker = batches.BatchMaker(str(TOK_DIR), ratios, seed=3, worker=0, tokens_per_step=2048, max_len=512)
    for task in ("niah_multikey", "kv_retrieval", "niah_multivalue", "dense_niah"):
        ids, spans = maker.episode(task, 512)
        start, end, first = spans[0]
        assert first == 1 and all(f == 0 for _, _, f in spans[1:])
        prompt = tok.decode(ids[:start])
        assert prompt.endswith(" is:") or prompt.endswith(" are:")
        # the prompt is tokenized as a whole, exactly as the harness tokenizes context + question
        assert tok(prompt)["input_ids"] == ids[:start]
        answer = tok.decode(ids[start:end])
        assert answer.startswith(" ") and answer.endswith("\n<|eos|>")
        if task == "dense_niah":
            assert len(spans) >= 3
        b = maker.batch(1)
        assert b["x"].shape[0] == len(b["lens"]) and b["span_task"].shape == b["span_first"].shape


def test_notes_task_answers_are_the_asked_needles_values():
    """The token-level recall task: every answer span holds the value of the needle whose key was asked."""
    maker = batches.BatchMaker(str(TOK_DIR), {t: 4.0 for t in S.TASKS}, 0, 0, 4096, 256)
    for gap in (0, 3):
        recipe.NOTES_GAP[0] = gap
        try:
            ids, spans = maker.notes(128, 128 + 384)
        finally:
            recipe.NOTES_GAP[0] = 0
        KEY, IS = 4, 5
        needles = {tuple(ids[i + 1 : i + 3]): ids[i + 4 + gap : i + 7 + gap] for i, t in enumerate(ids[:200])
                   if t == KEY and ids[i + 3] == IS}
        assert len(needles) == 8 and len(spans) == 8
        for st, en, _ in spans:
            key = tuple(ids[st - 3 - gap : st - 1 - gap])
            assert ids[st : st + 3] == needles[key] and en - st == 4


def test_dense_vt_asks_every_chain_of_a_many_chain_context():
    """dense_vt: a variable_tracking context with more than the task's two chains (as the length allows), every
    chain asked in the evaluation's own question form, each answer that chain's variables in order."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TOK_DIR))
    maker = batches.BatchMaker(str(TOK_DIR), {t: 4.4 for t in S.TASKS}, seed=1, worker=0, tokens_per_step=4096,
                         max_len=2048)
    counts = []
    for _ in range(6):
        ids, spans = maker.episode("dense_vt", 1024)
        text = tok.decode(ids[: spans[0][0]])
        chains = episodes.vt_chains(text)
        counts.append(len(spans))
        assert len(chains) >= len(spans) >= 2
        for st, en, _ in spans:
            asked = re.findall(r"hold the value (\d+) are:$", tok.decode(ids[:st]))
            assert asked and tok.decode(ids[st:en]) == episodes.answer_text(chains[asked[-1]]) + "<|eos|>"
    assert max(counts) > S.PARAMS.vt_chains  # denser than the task itself


def test_mix_and_gate_flags_and_the_recorded_command(tmp_path):
    saved_mix, saved_gate = dict(recipe.MIX), list(recipe.CURRICULUM_TASKS)
    try:
        rc = cli.main(["--smoke", "--out", str(tmp_path), "--tokenizer", str(TOK_DIR), "--eval-n", "0",
                     "--mix", "dense_vt=0.35", "--gate-tasks", "dense_vt,dense_niah", "--fuse-token", " is:"])
        assert rc == 0 and recipe.MIX["dense_vt"] == 0.35 and recipe.CURRICULUM_TASKS == ["dense_vt", "dense_niah"]
        cmd = (tmp_path / "README.md").read_text()
        assert "--mix dense_vt=0.35 --gate-tasks dense_vt,dense_niah" in cmd and "--fuse-token ' is:'" in cmd
        with pytest.raises(SystemExit, match="--mix: unknown task 'nope'"):
            cli.main(["--smoke", "--out", str(tmp_path), "--tokenizer", str(TOK_DIR), "--mix", "nope=1"])
    finally:
        recipe.MIX.clear()
        recipe.MIX.update(saved_mix)
        recipe.CURRICULUM_TASKS[:] = saved_gate


def test_stage0_mix_rejects_unknown_tasks(tmp_path):
    with pytest.raises(SystemExit, match="unknown task 'nope'"):
        cli.main(["--smoke", "--out", str(tmp_path), "--tokenizer", str(TOK_DIR), "--stage0-mix", "nope=1"])


def test_fused_tokens_give_needle_and_question_the_notes_offsets(tmp_path):
    """--fuse-token ' is:' --fuse-space-digits: in a needle the key's last token is 2 before the value's first
    token (`river`, ` is:`, ` 1`) and the question's answer starts right after ` is:`, as in the notes' recipe;
    decoding gives the text back; the stage-0 batch budget follows --stage0-tokens-per-step."""
    from transformers import AutoTokenizer

    rc = cli.main(["--smoke", "--out", str(tmp_path), "--tokenizer", str(TOK_DIR), "--eval-n", "0",
                 "--fuse-token", " is:", "--fuse-space-digits", "--stage0-tokens-per-step", "4096"])
    assert rc == 0
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    needle = S.NEEDLE_TEMPLATE.format(key="bright-river", value=4165233)
    pieces = [tok.decode([i]) for i in tok(needle, add_special_tokens=False)["input_ids"]]
    k = pieces.index("river")
    assert pieces[k + 1 : k + 4] == [" is:", " 4", "1"]
    prompt = tok(episodes.niah_question("bright-river"), add_special_tokens=False)["input_ids"]
    assert tok.decode(prompt[-1:]) == " is:"
    answer = tok(episodes.answer_text(["4165233"]), add_special_tokens=False)["input_ids"]
    assert tok.decode(answer[:1]) == " 4" and tok.decode(answer) == episodes.answer_text(["4165233"])
    recipe.STAGE0_TOKENS[0] = 4096
    try:
        maker = batches.BatchMaker(str(tmp_path), {t: 4.0 for t in S.TASKS}, 0, 0, 512, 256)
        assert maker.batch(0)["x"].shape[0] == 4096 // (256 + maker.tail(256))
    finally:
        recipe.STAGE0_TOKENS[0] = 0


def test_terminators_are_marked_for_their_own_loss_weight():
    """span_pos is 2 on an answer's trailing terminators (the notes' DOT; "\\n" and EOS of text answers), 1 on its
    first tokens, so --terminator-weight0 can take them out of the stage-0 loss."""
    saved = dict(recipe.STAGE0_MIX)
    recipe.STAGE0_MIX.clear()
    recipe.STAGE0_MIX.update({"notes": 0.5, "niah_single": 0.5})
    try:
        maker = batches.BatchMaker(str(TOK_DIR), {t: 4.0 for t in S.TASKS}, 0, 0, 8 * 640, 256)
        b = maker.batch(0)
    finally:
        recipe.STAGE0_MIX.clear()
        recipe.STAGE0_MIX.update(saved)
    newline = maker.enc("\n")
    seen = set()
    for r in range(len(b["lens"])):
        for span in set(b["span_tok"][r][b["span_tok"][r] >= 0].tolist()):
            at = b["span_tok"][r] == span
            toks, pos = b["x"][r][at].tolist(), b["span_pos"][r][at].tolist()
            task = recipe.TRAIN_TASKS[b["span_task"][span]]
            tail = [recipe.NOTES_DOT] if task == "notes" else newline + [maker.eos]
            assert toks[-len(tail):] == tail and pos[-len(tail):] == [2] * len(tail), (task, toks, pos)
            assert 2 not in pos[: -len(tail)] and pos[0] == 1
            seen.add(task)
    assert seen == {"notes", "niah_single"}


def test_shipped_model_meets_the_architecture_and_tells_needles_apart():
    """models/kvbench-tiny itself: the issue's architecture bounds, and on held-out niah_multikey samples (four
    needles, one asked) it answers the asked needle's value, so the answer depends on the key, not on the template."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    weights = TOK_DIR / "model.safetensors"
    assert weights.stat().st_size <= 16 * 2**20
    with safe_open(str(weights), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    model = AutoModelForCausalLM.from_pretrained(str(TOK_DIR), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(TOK_DIR))
    cfg = model.config
    assert cfg.num_attention_heads // cfg.num_key_value_heads >= 2 and cfg.head_dim in (64, 128)
    assert cfg.num_hidden_layers >= 4 and cfg.max_position_embeddings >= 8192
    assert sum(p.numel() for p in model.parameters()) < 9_000_000

    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    right = 0
    samples = S.make_samples("niah_multikey", count_tokens=count, context_length=1024, n=6, seed=0)
    for s in samples:
        ids = tok(s["context"] + s["question"], return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id)
        right += s["answers"][0] in tok.decode(out[0, ids.shape[1]:])
    assert right >= 5, right  # a model that ignores the key gets ~1 in 4
