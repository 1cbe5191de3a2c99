#!/usr/bin/env bash
# The GPU measurements of docs/benchmarks.md in one call of the device tool (one H200, about nine
# minutes): the delta-rule kernels' bf16 check, the end-to-end training table (beside fla's models
# with COMPARE="--compare fla", the default; with PROFILE=N also torch.profiler's kernel times per
# model), the kernels beside fla-core, and a last side-by-side row against fla (FLA_MODELS at
# FLA_SHAPES). Each part has its own time limit so that a slow part (fla's first autotuning takes
# minutes) cannot take the others with it; every benchmark writes its JSON after each row.
#   run from the repository root with the wheels of pydantic and fla in .whl/ (see the device notes)
#   environment (all optional; a limit of 0 skips its part):
#     CHECK_S, CHECK_FORMS, CHECK_SHAPE, FINITE   the bf16 check (LCSM_AUTOTUNE=0: it checks values,
#                                                 not speed), FINITE tokens in one sequence too
#     TRAIN_S, MODELS, SHAPES, COMPARE, STEPS, PROFILE    lcsm bench train
#     KERNELS_S, KERNEL_FORMS, KERNEL_SHAPES      lcsm bench kernels (timings)
#     FLA_S, FLA_MODELS, FLA_SHAPES               a last lcsm bench train --compare fla
#     TCACHE   a .tgz of Triton's cache from an earlier call (its $OUT/triton_cache.tgz): compiled
#              kernels and autotuning results (TRITON_CACHE_AUTOTUNING=1) are reused, so fla's
#              minutes of first autotuning are paid once per session, not once per call
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=/tmp/triton_cache TRITON_CACHE_AUTOTUNING=1
OUT=${OUT:-bench_out}
mkdir -p "$OUT" "$TRITON_CACHE_DIR"
if [[ -n "${TCACHE:-}" && -f "$TCACHE" ]]; then
  tar xzf "$TCACHE" -C "$TRITON_CACHE_DIR" && echo "triton cache: $(du -sh "$TRITON_CACHE_DIR" | cut -f1) from $TCACHE"
fi
python3 -c "import torch, triton, fla; print('torch', torch.__version__, 'triton', triton.__version__, 'fla', fla.__version__, torch.cuda.get_device_name())" 2>&1 | tail -1 | tee "$OUT/env.txt"
if (( ${CHECK_S:-150} > 0 )); then
  LCSM_AUTOTUNE=0 timeout "${CHECK_S:-150}" python3 -m lcsm.cli bench kernels --forms ${CHECK_FORMS:-delta delta_scalar delta_vector_k} \
      --check-only --shapes "${CHECK_SHAPE:-2,4096,8,128}" --finite-tokens "${FINITE:-65536}" --impl ours \
      --json "$OUT/check.json" > "$OUT/check.log" 2>&1
  tail -n 30 "$OUT/check.log"
fi
if (( ${TRAIN_S:-330} > 0 )); then
  timeout "${TRAIN_S:-330}" python3 -m lcsm.cli bench train ${COMPARE---compare fla} \
      --models ${MODELS:-gla retnet hgrn2 gated_deltanet transformer mamba2 linear_attention deltanet} \
      --shapes "${SHAPES:-8x2048,2x8192,1x32768}" --steps "${STEPS:-10}" --profile "${PROFILE:-0}" \
      --json "$OUT/train.json" > "$OUT/train.log" 2>&1
  grep -v '^{' "$OUT/train.log" | tail -n 120
fi
if (( ${KERNELS_S:-150} > 0 )); then
  timeout "${KERNELS_S:-150}" python3 -m lcsm.cli bench kernels --forms ${KERNEL_FORMS:-vector_k delta delta_scalar delta_vector_k} \
      --shapes ${KERNEL_SHAPES:-8,4096,16,128} --no-torch --json "$OUT/kernels.json" > "$OUT/kernels.log" 2>&1
  tail -n 20 "$OUT/kernels.log"
fi
if (( ${FLA_S:-0} > 0 )); then
  timeout "$FLA_S" python3 -m lcsm.cli bench train --compare fla --models ${FLA_MODELS:-gla} \
      --shapes "${FLA_SHAPES:-8x2048}" --json "$OUT/train_fla.json" > "$OUT/train_fla.log" 2>&1
  tail -n 20 "$OUT/train_fla.log"
fi
# the cache for the next call (TCACHE): only if it fits what comes back from the device (16 MiB a file)
tar czf "$OUT/triton_cache.tgz" -C "$TRITON_CACHE_DIR" . 2>/dev/null
if (( $(stat -c %s "$OUT/triton_cache.tgz") > 15 * 1024 * 1024 )); then
  echo "triton cache $(du -h "$OUT/triton_cache.tgz" | cut -f1): too large to bring back"; rm -f "$OUT/triton_cache.tgz"
fi
