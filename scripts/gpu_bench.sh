#!/usr/bin/env bash
# The GPU measurements of docs/benchmarks.md in one call of the device tool (one H200, about nine
# minutes): the delta-rule kernels' bf16 check, the end-to-end training table (beside fla's models
# with COMPARE="--compare fla", the default), the delta-rule kernels beside fla-core, and a last
# side-by-side row against fla (FLA_MODELS at FLA_SHAPES). Each part has its own time limit so that
# a slow part (fla's first autotuning takes minutes) cannot take the others with it; every benchmark
# writes its JSON after each row.
#   run from the repository root with the wheels of pydantic and fla in .whl/ (see the device notes)
#   environment: MODELS, SHAPES, COMPARE, CHECK_S, TRAIN_S, KERNELS_S, FLA_S (0 skips), FLA_MODELS, FLA_SHAPES
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
python3 -c "import torch, triton, fla; print('torch', torch.__version__, 'triton', triton.__version__, 'fla', fla.__version__, torch.cuda.get_device_name())" 2>&1 | tail -1 | tee "$OUT/env.txt"
timeout "${CHECK_S:-60}" python3 -m lcsm.cli bench kernels --forms delta delta_scalar delta_vector_k --check-only \
    --shapes 8,4096,16,128 --impl ours > "$OUT/check.log" 2>&1
tail -n 15 "$OUT/check.log"
timeout "${TRAIN_S:-330}" python3 -m lcsm.cli bench train ${COMPARE---compare fla} \
    --models ${MODELS:-gla retnet hgrn2 gated_deltanet transformer mamba2 linear_attention deltanet} \
    --shapes "${SHAPES:-8x2048,2x8192,1x32768}" --json "$OUT/train.json" > "$OUT/train.log" 2>&1
tail -n 30 "$OUT/train.log"
if (( ${KERNELS_S:-150} > 0 )); then
  timeout "${KERNELS_S:-150}" python3 -m lcsm.cli bench kernels --forms vector_k delta delta_scalar delta_vector_k \
      --shapes 8,4096,16,128 --no-torch --json "$OUT/kernels.json" > "$OUT/kernels.log" 2>&1
  tail -n 20 "$OUT/kernels.log"
fi
if (( ${FLA_S:-0} > 0 )); then
  timeout "$FLA_S" python3 -m lcsm.cli bench train --compare fla --models ${FLA_MODELS:-gla} \
      --shapes "${FLA_SHAPES:-8x2048}" --json "$OUT/train_fla.json" > "$OUT/train_fla.log" 2>&1
  tail -n 20 "$OUT/train_fla.log"
fi
