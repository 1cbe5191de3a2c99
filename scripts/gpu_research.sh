#!/usr/bin/env bash
# The three studies of docs/results.md in one GPU session: Mixture-of-Memories on recall
# (mom_recall), the EOS ablations with their learning-rate selection and two seeds
# (mqar_oscillation, mqar_data_dependence, lm_*), and the scaling law (scaling), every one
# `lcsm ablate ... --reduced`, many small training processes sharing one GPU.
#
#   bash scripts/gpu_research.sh        # from the repository root, in one device call
#
# Carry corpora/debian-docs (python scripts/make_corpus.py builds it, 24 MB; without it the
# scaling study is skipped). Installs nothing. Environment (all optional):
#   BUDGET_S   seconds for the whole script, setup to archive (default 450)
#   JOBS       worker processes on the GPU (default 14)
#   OUT        where the results go (the device's return folder; default ./gpu_out)
#   RESUME     a results.tgz of an earlier session: its finished points are kept, not retrained
#   STUDIES    which studies, in order (default "mom scaling eos")
#   MOM_MODELS the mom_recall models (default: the reduced grid's, less those this tree's zoo
#              lacks); a second session: MOM_MODELS=gla_active,gated_deltanet_active
#   SMOKE=1    a check of this script on a CPU: 2 steps per point on tiny data, scaling at its two
#              smallest sizes (the numbers mean nothing)
#
# Phases, each `lcsm ablate` under `timeout -s INT` (at the limit the running points save, the
# report is written from the finished ones, and the same command continues them later):
#   0. setup (~15 s): GPU check, the corpus copied to a fixed path (the points' recipes name it,
#      and a finished point is reused only under the same recipe), MQAR data into the cache.
#   1. mom_recall (10 of 14 workers) beside scaling (4), until 45% of the budget.
#   2. mqar_oscillation, mqar_data_dependence and the five lm_* grids (JOBS workers), until the
#      budget less 30 s.
#   3. every report rebuilt (lcsm ablate --report); $OUT/results.tgz (the ablation folders without
#      checkpoints: results.csv, results.md, PNGs, ablation.json and each point's config.yaml,
#      eval.json, metrics.jsonl, point.json), $OUT/summary.md (every results.md), $OUT/log.txt.
#
# Estimated wall time, from per-process step rates measured on one H200 with ~15 processes
# sharing it (docs/ablations/*/results.csv and docs/results.md of 2026-11-29: the ablation
# layer at batch 128 runs 21.7 steps/s at d_model 64 and 17.3 at 128 on 128-token MQAR, 15.8 at
# 256 tokens; the LM base 11-15 steps/s; gla 8.1 and mom_gla 4.3 steps/s at d_model 256), scaled
# by CPU measurements where no GPU one exists (docs/results.md, "Budgets"), in worker-seconds:
#   mom_recall   30 points x 500 steps   ~1600   (mom_gla 8.4, gla 16, gated delta 5.3 and 10.7,
#                                                 attention 20 steps/s; ~750 without the delta rule)
#   scaling      20 points, 128-480 steps  ~600  (8-15 steps/s, 0.5M-7.9M bytes, longest ~60 s)
#   mqar_*      168 points x <=250 steps  ~2250  (17-22 steps/s, ~220 steps each with early stop)
#   lm_*         60 points x 150 steps     ~800  (13 steps/s)
# plus 2-3 s per point outside its steps (included). With 14 workers: setup ~20 s, phase 1
# ~180 s, phase 2 ~230 s, reports and archive ~15 s: ~450 s. The
# estimates are good to perhaps +-50%: the limits end every phase on time whatever the rates,
# and the lm_* points (the cheapest, so started last) are the first to be cut.
set -uo pipefail

BUDGET_S=${BUDGET_S:-450}
JOBS=${JOBS:-14}
OUT=${OUT:-$PWD/gpu_out}
WORK=/tmp/lcsm_research # fixed: the points' recipes hold the corpus path
RESUME=${RESUME:-}
STUDIES=${STUDIES:-mom scaling eos}
ABL=$WORK/ablations
LOG=$WORK/log.txt
T0=$SECONDS
mkdir -p "$OUT" "$ABL"
: >"$LOG"
rm -f "$WORK"/log-*.txt
export LCSM_AUTOTUNE=0           # tiny models: autotuning every kernel in every worker costs more than it saves
export LCSM_CACHE=$WORK/cache    # generated MQAR data, shared by the workers
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this tree's lcsm, installed or not
LCSM=(python -m lcsm.cli)

say() { echo "[$((SECONDS - T0))s] $*" | tee -a "$LOG"; }
left() { echo $((BUDGET_S - (SECONDS - T0))); }
has() { [[ " $STUDIES " == *" $1 "* ]]; }
# lcsm ablate with a limit: SIGINT at the limit, SIGKILL 40 s later if it has not stopped; its
# output in $WORK/log-<first recipe>.txt. threads=1: a worker's CPU side is one Python thread, and
# torch's default (cores / workers per process) oversubscribes when two grids run side by side.
ablate_until() {
  local limit=$1 rc
  shift
  if ((limit < 20)); then
    say "skipped (only ${limit}s left): lcsm ablate $*"
    return 0
  fi
  say "lcsm ablate $* (limit ${limit}s)"
  timeout -s INT -k 40 "$limit" "${LCSM[@]}" ablate "$@" --reduced --set threads=1 --out "$ABL" >>"$WORK/log-$1.txt" 2>&1
  rc=$?
  case $rc in
    0) say "lcsm ablate $1 ...: finished" ;;
    124 | 137) say "lcsm ablate $1 ...: stopped at its limit (the same command continues it)" ;;
    *) say "lcsm ablate $1 ...: exit $rc (failed points or an error: see log-$1.txt)" ;;
  esac
}

# ------------------------------------------------------------------ 0. setup
say "budget ${BUDGET_S}s, ${JOBS} workers, studies: $STUDIES"
python - <<'EOF' 2>&1 | tee -a "$LOG"
import torch, lcsm
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "(no GPU: the grids would run on the CPU)")
EOF
if [[ -n "$RESUME" ]]; then
  tar xzf "$RESUME" -C "$WORK" ablations && say "resumed from $RESUME: $(find "$ABL" -name eval.json | wc -l) finished points"
fi
if has scaling; then
  if [[ -d corpora/debian-docs ]]; then
    rm -rf "$WORK/corpus" && mkdir -p "$WORK/corpus" && cp -r corpora/debian-docs "$WORK/corpus/"
    say "corpus: $(du -sh "$WORK/corpus/debian-docs" | cut -f1) in $WORK/corpus/debian-docs"
  else
    say "no corpora/debian-docs (carry it; python scripts/make_corpus.py builds it): scaling skipped"
    STUDIES=${STUDIES//scaling/}
  fi
fi
MOM_ARGS=()
if has mom; then
  if [[ -z "${MOM_MODELS:-}" ]]; then
    # the reduced grid's models that this tree's zoo has (the gated-delta ones need the delta rule)
    MOM_MODELS=$(python - <<'EOF'
from lcsm.config.ablation import load_grid
from lcsm.config.paths import zoo_paths
grid, _ = load_grid("mom_recall")
variants = {v["label"]: v for v in grid.grid["model"]}
print(",".join(l for l in grid.reduced.grid["model"] if variants[l]["set"]["model"]["base"] in zoo_paths()))
EOF
)
  fi
  if [[ -n "$MOM_MODELS" ]]; then
    MOM_ARGS=(--grid "model=[$MOM_MODELS]")
    say "mom_recall models: $MOM_MODELS"
  else
    say "mom_recall: none of its models is in this zoo: skipped"
    STUDIES=${STUDIES//mom/}
  fi
fi
EOS=(mqar_oscillation mqar_data_dependence lm_oscillation lm_data_dependence lm_feature_maps lm_tau lm_ssm)
SMOKE_MOM=() SMOKE_SCALING=() SMOKE_EOS=()
if [[ "${SMOKE:-}" == 1 ]]; then
  SMOKE_EOS=(--set steps=2 --set eval_every=2 --set batch_size=4 --set schedule.warmup_steps=0)
  SMOKE_MOM=("${SMOKE_EOS[@]}")
  for i in 0 1 2; do SMOKE_MOM+=(--set "task.train.$i.num_examples=64" --set "task.test.$i.num_examples=16"); done
  SMOKE_SCALING=(--grid "size=[d32,d48]")
  say "SMOKE=1: tiny runs, a check of the script only"
fi
WARM=()
has mom && WARM+=(mom_recall)
has eos && WARM+=(mqar_oscillation mqar_data_dependence)
if ((${#WARM[@]})) && [[ "${SMOKE:-}" != 1 ]]; then
  timeout 90 python scripts/warm_cache.py --reduced --jobs "$JOBS" "${MOM_ARGS[@]}" "${WARM[@]}" 2>&1 | tee -a "$LOG"
fi

# ------------------------------------------------------------------ 1. mom_recall beside scaling
# phase 1 ends at 45% of the budget when the EOS grids follow, else it has all but the reports' 30 s
if has eos; then P1_END=$((BUDGET_S * 45 / 100)); else P1_END=$((BUDGET_S - 30)); fi
limit1=$((P1_END - (SECONDS - T0)))
# scaling's 20 points need about a quarter of phase 1's worker time: 4 of 14 workers
SCALING_JOBS=$((JOBS * 2 / 7 > 0 ? JOBS * 2 / 7 : 1))
pids=()
if has mom; then
  jobs=$JOBS
  has scaling && jobs=$((JOBS - SCALING_JOBS > 0 ? JOBS - SCALING_JOBS : 1))
  ablate_until "$limit1" mom_recall --jobs "$jobs" "${MOM_ARGS[@]}" "${SMOKE_MOM[@]}" &
  pids+=($!)
fi
if has scaling; then
  jobs=$SCALING_JOBS
  has mom || jobs=$JOBS
  ablate_until "$limit1" scaling --jobs "$jobs" --set "task.corpus=$WORK/corpus/debian-docs" "${SMOKE_SCALING[@]}" &
  pids+=($!)
fi
for p in "${pids[@]}"; do wait "$p"; done

# ------------------------------------------------------------------ 2. the EOS grids
if has eos; then
  ablate_until $(($(left) - 30)) "${EOS[@]}" --jobs "$JOBS" "${SMOKE_EOS[@]}"
fi

# ------------------------------------------------------------------ 3. reports and the archive
for d in "$ABL"/*/; do
  [[ -f "$d/ablation.json" ]] && "${LCSM[@]}" ablate --report "$d" >>"$LOG" 2>&1
done
{
  echo "# GPU session $(date -u +%Y-%m-%dT%H:%MZ), ${BUDGET_S}s budget, ${JOBS} workers"
  echo
  for f in "$ABL"/*/results.md; do cat "$f"; echo; done
} >"$OUT/summary.md"
say "done: $(find "$ABL" -name eval.json | wc -l) finished points"
# one log: the driver's lines, then each grid's output
for f in "$WORK"/log-*.txt; do
  [[ -f "$f" ]] && { echo; echo "=== $(basename "$f")"; cat "$f"; } >>"$LOG"
done
tar czf "$OUT/results.tgz" -C "$WORK" --exclude=checkpoint --exclude='*.tmp' ablations log.txt
cp "$LOG" "$OUT/log.txt"
echo "[$((SECONDS - T0))s] $OUT: results.tgz $(du -h "$OUT/results.tgz" | cut -f1), summary.md, log.txt"
