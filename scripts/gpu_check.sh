#!/usr/bin/env bash
# GPU check of issue 21 (item 6), in one call on a CUDA machine: the gpu-marked tests, then the benchmark.
#
# The machine may have another torch (the device image: torch 2.11, Python 3.12) and no internet. Nothing is
# fetched: the only install is from wheel files carried in .whl/ (git-ignored: .gitignore and
# .git/info/exclude). reformer_infer needs torch and safetensors alone here (it imports tokenizers and
# sentencepiece only for checkpoints that carry tokenizer files; the bundled model and the enwik8-shape model
# have none); tests/test_gpu.py and bench/bench_gpu.py add transformers (the random-init enwik8-shape model and
# the baseline) and pytest. The device image has torch, safetensors 0.8.0, transformers 5.17.0, pytest,
# pytest-timeout, huggingface_hub 1.33, tokenizers 0.23.2, regex, typer, numpy, pyyaml, tqdm, packaging
# (device KINDS.md): carry only the repo's own pin of transformers, whose requirements those satisfy
# (huggingface-hub>=1.31,<3; tokenizers>=0.23.1,<0.24; safetensors>=0.8.0). Prepare, in the repo root:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl transformers==5.23.0
#
# (13 MB; checked to download on 2026-12-07. The same command fetches safetensors==0.8.0, pytest==9.0.3 or
# pytest-timeout==2.4.0 if an image ever lacks them; keep one version of each in .whl/.) Without .whl/ the
# image's own transformers is used, and the log says which.
#
# Run it with the device tool (see docs/benchmarks.md, "GPU check"):
#   run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=600)
# It writes $OUT/gpu_check.md (the table), $OUT/gpu_tests.log and $OUT/gpu_bench.log when OUT is set, else
# under runs/gpu_check/. Phases have their own time limits (install 45 s, nvidia-smi 20 s, imports 45 s,
# tests 170 s, benchmark 190 s: 470 s in all, under 8 minutes; on SIGTERM the benchmark writes its table
# with the cells it measured and marks the rest).
# Without a CUDA device the tests skip, the script says so and exits 0 (GPU_CHECK_DRY_RUN=1 also runs the
# benchmark's tiny CPU dry run, to exercise the table's path). Exit status: 0 when every phase passed.
set -u -o pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PY=${PYTHON:-python3}
DEST=${OUT:-$REPO/runs/gpu_check}
mkdir -p "$DEST"
export PYTHONUNBUFFERED=1
# the random-init enwik8-shape model is built once and shared by the tests and the benchmark
export REFORMER_GPU_CHECK_MODEL_DIR=${REFORMER_GPU_CHECK_MODEL_DIR:-/tmp/gpu_check_models}
SITE=/tmp/gpu_check_site
rm -f /tmp/gpu_check_cuda
START=$(date +%s)
say() { echo "== gpu_check [$(( $(date +%s) - START ))s] $*"; }

# ---- 1. wheels carried along (never the network) --------------------------------------------------
PYPATH=$REPO
if compgen -G ".whl/*.whl" >/dev/null; then
  say "installing $(ls .whl/*.whl | wc -l) carried wheel(s) into $SITE: $(cd .whl && ls *.whl | tr '\n' ' ')"
  rm -rf "$SITE"
  if ! timeout -k 5 45 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" .whl/*.whl; then
    say "FAILED: pip install from .whl/ (see above)"; exit 1
  fi
  PYPATH=$SITE:$REPO
else
  say "no .whl/ wheels carried: using the installed packages as they are"
fi
export PYTHONPATH=$PYPATH${PYTHONPATH:+:$PYTHONPATH}

# ---- 2. environment ------------------------------------------------------------------------------
command -v nvidia-smi >/dev/null && timeout 20 nvidia-smi -L
cat > /tmp/gpu_check_env.py <<'EOF'
import platform

import reformer_infer
import safetensors
import torch
import transformers
from transformers import ReformerModelWithLMHead  # noqa: F401

cuda = torch.cuda.is_available()
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"safetensors {safetensors.__version__}, transformers {transformers.__version__} from "
      f"{transformers.__file__.rsplit('/', 2)[0]}, reformer_infer from {reformer_infer.__file__.rsplit('/', 2)[0]}")
print(f"device: {torch.cuda.get_device_name() if cuda else 'no CUDA device'}")
open("/tmp/gpu_check_cuda", "w").write(str(int(cuda)))
EOF
if ! timeout -k 5 45 "$PY" /tmp/gpu_check_env.py; then
  if [ "$PYPATH" != "$REPO" ]; then
    say "the carried wheels do not import with this torch (above): trying the image's own packages"
    export PYTHONPATH=$REPO
    timeout -k 5 45 "$PY" /tmp/gpu_check_env.py || { say "FAILED: the packages the check needs do not import"; exit 1; }
  else
    say "FAILED: the packages the check needs do not import (above)"; exit 1
  fi
fi
HAVE_CUDA=$(cat /tmp/gpu_check_cuda 2>/dev/null || echo 0)

# ---- 3. GPU tests --------------------------------------------------------------------------------
TEST_LIMIT=170
# a dry run of the tests' logic on a (shared, slow) CPU may take longer; on a GPU the limit stays
[ "$HAVE_CUDA" != 1 ] && [ "${REFORMER_GPU_TESTS_ON_CPU:-0}" = 1 ] && TEST_LIMIT=420
say "tests: python -m pytest -m gpu tests/test_gpu.py (limit $TEST_LIMIT s)"
timeout -k 10 $TEST_LIMIT "$PY" -m pytest -m gpu tests/test_gpu.py -v -s -rs -p no:cacheprovider 2>&1 | tee "$DEST/gpu_tests.log"
TESTS_RC=${PIPESTATUS[0]}
[ "$TESTS_RC" = 124 ] && say "tests: TIMED OUT after $TEST_LIMIT s"
say "tests: exit status $TESTS_RC"

if [ "$HAVE_CUDA" != 1 ]; then
  if [ "${REFORMER_GPU_TESTS_ON_CPU:-0}" = 1 ]; then
    say "NO CUDA DEVICE: the GPU tests ran on the CPU at tiny sizes (REFORMER_GPU_TESTS_ON_CPU=1: a dry run of their logic); the GPU benchmark was not run (nothing was measured)."
  else
    say "NO CUDA DEVICE: the GPU tests were skipped and the GPU benchmark was not run (nothing was measured)."
  fi
  if [ "${GPU_CHECK_DRY_RUN:-0}" = 1 ]; then
    say "GPU_CHECK_DRY_RUN=1: the benchmark's tiny CPU dry run (not a GPU figure)"
    timeout -k 10 300 "$PY" bench/bench_gpu.py --cpu-dry-run --out "$DEST/gpu_check.md" 2>&1 | tee "$DEST/gpu_bench.log"
    say "dry run: exit status ${PIPESTATUS[0]}; table in $DEST/gpu_check.md"
  fi
  [ "$TESTS_RC" = 0 ] || [ "$TESTS_RC" = 5 ] || { say "tests failed"; exit 1; }
  exit 0
fi

# ---- 4. benchmark --------------------------------------------------------------------------------
say "benchmark: bench/bench_gpu.py (limit 190 s; cells not started by 150 s are skipped and say so)"
timeout -k 10 190 "$PY" bench/bench_gpu.py --budget-s 150 --out "$DEST/gpu_check.md" 2>&1 | tee "$DEST/gpu_bench.log"
BENCH_RC=${PIPESTATUS[0]}
[ "$BENCH_RC" = 124 ] && say "benchmark: TIMED OUT after 190 s (on SIGTERM it writes the table with what it measured)"
say "benchmark: exit status $BENCH_RC; table in $DEST/gpu_check.md"
say "done: tests $TESTS_RC, benchmark $BENCH_RC"
[ "$TESTS_RC" = 0 ] && [ "$BENCH_RC" = 0 ]
