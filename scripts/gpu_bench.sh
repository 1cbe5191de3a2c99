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
#     TRAIN_S, MODELS, SHAPES, COMPARE, STEPS, PROFILE, VARIANTS    lcsm bench train (VARIANTS: its
#                                                 --variants, e.g. "eager compile segments")
#     KPROFILE_S, KPROFILE_FORMS                  lcsm bench kernels --profile (per-kernel GPU times of
#                                                 the forward and fwd+bwd, ours and fla-core's; the
#                                                 first of KERNEL_SHAPES), before the train part
#     KERNELS_S, KERNEL_FORMS, KERNEL_SHAPES      lcsm bench kernels (timings)
#     FLA_S, FLA_MODELS, FLA_SHAPES               a last lcsm bench train --compare fla
#     TCACHE   the folder holding an earlier call's triton_cache.tgz.part* (copy the parts into an
#              ignored folder of the checkout, e.g. .tcache/, and carry it with .whl): compiled
#              kernels and autotuning results (TRITON_CACHE_AUTOTUNING=1) are reused, so the
#              minutes of first autotuning (fla's GLA kernels took most of 370 s on a fresh H200,
#              ours and fla-core's vector_k more than 150 s) are paid once per session, not per call
# What comes back (the device returns at most 8 files of 16 MiB): $OUT/results.tgz (every log and
# JSON of this call), $OUT/driver.log if the caller tees to it, and the Triton cache in parts of
# 15 MiB ($OUT/triton_cache.tgz.part00, ...; at most 3, so that they and the wheels fit the 64 MiB
# a call carries; a larger cache is left behind). results.tgz is rewritten after every part, so a
# call stopped at the device's limit still brings back what finished.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=/tmp/triton_cache TRITON_CACHE_AUTOTUNING=1
OUT=${OUT:-bench_out}
mkdir -p "$OUT" "$TRITON_CACHE_DIR"
if [[ -n "${TCACHE:-}" ]] && compgen -G "$TCACHE/triton_cache.tgz.part*" > /dev/null; then
  cat "$TCACHE"/triton_cache.tgz.part* | tar xz -C "$TRITON_CACHE_DIR" \
      && echo "triton cache: $(du -sh "$TRITON_CACHE_DIR" | cut -f1) from $TCACHE"
fi
LOGS=$(mktemp -d)  # every log and JSON, archived into $OUT/results.tgz after every part
archive() { tar czf "$OUT/results.tgz" -C "$LOGS" .; }
python3 -c "import torch, triton, fla; print('torch', torch.__version__, 'triton', triton.__version__, 'fla', fla.__version__, torch.cuda.get_device_name())" 2>&1 | tail -1 | tee "$LOGS/env.txt"
if (( ${CHECK_S:-150} > 0 )); then
  LCSM_AUTOTUNE=0 timeout "${CHECK_S:-150}" python3 -m lcsm.cli bench kernels --forms ${CHECK_FORMS:-delta delta_scalar delta_vector_k} \
      --check-only --shapes "${CHECK_SHAPE:-2,4096,8,128}" --finite-tokens "${FINITE:-65536}" --impl ours \
      --json "$LOGS/check.json" > "$LOGS/check.log" 2>&1
  tail -n 30 "$LOGS/check.log"
  archive
fi
if (( ${KPROFILE_S:-0} > 0 )); then
  timeout "$KPROFILE_S" python3 -m lcsm.cli bench kernels --profile --forms ${KPROFILE_FORMS:-delta_scalar} \
      --shapes ${KERNEL_SHAPES:-8,4096,16,128} > "$LOGS/kprofile.log" 2>&1
  grep -v "Warning\|warn" "$LOGS/kprofile.log" | tail -n 80
  archive
fi
if (( ${TRAIN_S:-330} > 0 )); then
  timeout "${TRAIN_S:-330}" python3 -m lcsm.cli bench train ${COMPARE---compare fla} \
      --models ${MODELS:-gla retnet hgrn2 gated_deltanet transformer mamba2 linear_attention deltanet} \
      --shapes "${SHAPES:-8x2048,2x8192,1x32768}" --steps "${STEPS:-10}" --profile "${PROFILE:-0}" ${VARIANTS:+--variants $VARIANTS} \
      --json "$LOGS/train.json" > "$LOGS/train.log" 2>&1
  grep -v '^{' "$LOGS/train.log" | tail -n 120
  archive
fi
if (( ${KERNELS_S:-150} > 0 )); then
  timeout "${KERNELS_S:-150}" python3 -m lcsm.cli bench kernels --forms ${KERNEL_FORMS:-vector_k delta delta_scalar delta_vector_k} \
      --shapes ${KERNEL_SHAPES:-8,4096,16,128} --no-torch --json "$LOGS/kernels.json" > "$LOGS/kernels.log" 2>&1
  tail -n 20 "$LOGS/kernels.log"
  archive
fi
if (( ${FLA_S:-0} > 0 )); then
  timeout "$FLA_S" python3 -m lcsm.cli bench train --compare fla --models ${FLA_MODELS:-gla} \
      --shapes "${FLA_SHAPES:-8x2048}" --json "$LOGS/train_fla.json" > "$LOGS/train_fla.log" 2>&1
  tail -n 20 "$LOGS/train_fla.log"
fi
archive
# the cache for the next call (TCACHE), in parts that fit what comes back from the device (at most 3
# beside results.tgz and driver.log)
tar czf - -C "$TRITON_CACHE_DIR" . | split -b 15M -d - "$OUT/triton_cache.tgz.part"
parts=$(ls "$OUT"/triton_cache.tgz.part* | wc -l)
if (( parts > 3 )); then
  # too large to bring back whole: the autotuning results alone (small) still spare the next call
  # the benchmarking of every configuration, only the chosen one is compiled again
  rm -f "$OUT"/triton_cache.tgz.part*
  (cd "$TRITON_CACHE_DIR" && find . -name "*.autotune.json" | tar czf - -T -) | split -b 15M -d - "$OUT/triton_cache.tgz.part"
  echo "triton cache: too large to bring back; its autotuning results in $(ls "$OUT"/triton_cache.tgz.part* | wc -l) part(s)"
else
  echo "triton cache: $parts part(s) in $OUT (carry them back as TCACHE)"
fi
