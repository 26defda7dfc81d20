# Source at the start of a GPU-machine command, from the repo root, with `.whl` in carry:
#     . scripts/gpu_env.sh || exit 1; python -m harness.run ...
# Installs the wheels in .whl/ (Hydra, lm-eval, datasets and the deps the GPU image lacks; see
# .whl/ on the dev box) into /tmp/site without touching the image's own packages, puts them and
# the repo on PYTHONPATH, and turns off all network access of the HF libraries.
# Build .whl/ on the dev box (pure-python py3 wheels for CPython 3.12, one version each).

if [ ! -d .whl ] || ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "gpu_env.sh: no .whl/*.whl here ($PWD); name .whl in carry" >&2
    return 1 2>/dev/null || exit 1
fi

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { echo "gpu_env.sh: wheel install failed" >&2; return 1 2>/dev/null || exit 1; }

export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1
# The workplace requires NVLink multicast to stay off (device/KINDS.md); keep it so explicitly.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
