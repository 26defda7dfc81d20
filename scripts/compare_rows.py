"""Do two results directories hold the same rows? (issue 24: a sweep spread over several GPUs must write the rows a
serial run writes.) Rows are matched by run_id; every column is compared except the environment, speed and
peak-memory columns and the resolved config (which a launcher does not change, but paths inside it may).

    python -m scripts.compare_rows results/one_gpu results/all_gpus     # exit 1 and the differences if any
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def rows(d: Path) -> dict[str, dict]:
    found = {}
    for f in sorted((d / "runs").glob("*.json")):
        r = json.loads(f.read_text())
        found[r["run_id"]] = r
    return found


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    from harness import results as R

    skip = set(R.ENV_COLUMNS) | set(R.SPEED_COLUMNS) | {"config", "peak_mem_prefill_bytes", "peak_mem_decode_bytes"}
    a, b = rows(Path(argv[0])), rows(Path(argv[1]))
    bad = [f"only in {argv[0] if k in a else argv[1]}: {k}" for k in sorted(set(a) ^ set(b))]
    for k in sorted(set(a) & set(b)):
        diff = {c: (a[k].get(c), b[k].get(c)) for c in set(a[k]) | set(b[k]) if c not in skip and a[k].get(c) != b[k].get(c)}
        if diff:
            bad.append(f"{k} ({a[k].get('method')} {a[k].get('ratio')} {a[k].get('task')}): {diff}")
    print(json.dumps({"rows": len(set(a) & set(b)), "identical": not bad, "ok": sum(r["status"] == "ok" for r in a.values())}))
    for line in bad:
        print(line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
