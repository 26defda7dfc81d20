#!/usr/bin/env bash
# Build .whl/ on the dev box: the wheels the GPU machine lacks to run `python -m harness.run`
# (Hydra, lm-eval, datasets and their missing deps; the image already has torch, transformers,
# pandas, pyarrow, numpy, scikit-learn, sacrebleu, aiohttp, ...). Pure-python, CPython 3.12.
# Then carry `.whl` in device runs and start the command with `. scripts/gpu_env.sh || exit 1;`.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}" -d .whl \
  lm_eval==0.4.13 hydra-core==1.3.8 omegaconf==2.3.1 hydra-joblib-launcher==1.2.0 datasets==5.2.0 \
  multiprocess==0.70.19 dill==0.4.1 evaluate==0.4.6 pytablewriter==1.2.1 typepy==1.3.5 dataproperty==1.1.1 \
  tabledata==1.3.5 tcolorpy==0.1.7 mbstrdecoder==1.1.5 pathvalidate==3.3.1 chardet==6.0.0.post1 pytz==2026.6 \
  more_itertools==11.2.1 nltk==3.10.4 defusedxml==0.7.1
# sdist-only packages: build pure-python wheels here
python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3 rouge_score==0.1.2 sqlitedict==2.1.0 word2number==1.1
ls -la .whl | tail -n +2
