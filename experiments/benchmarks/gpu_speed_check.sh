#!/usr/bin/env bash
# The speed issue's accelerator measurements, as one prepared command per device call.
#
#   bash experiments/benchmarks/gpu_speed_check.sh cnn    # ~9.5 minutes on an H100/H200
#   bash experiments/benchmarks/gpu_speed_check.sh variants  # next steps (~9 min)
#   bash experiments/benchmarks/gpu_speed_check.sh htfl   # HtFE-img-8 against PyTorch (~9 min)
# PYTHON picks the Python (default python3), TORCH_PY the one with torch and jax (torch_htfl.py
# builds its data with fedjax_lib; default: PYTHON, as on the device machine's python3).
#   SMOKE=1 bash experiments/benchmarks/gpu_speed_check.sh cnn   # tiny sizes, any backend
#
# `cnn` runs, in order of priority and each only while its share of the time is left:
#   1. the CIFAR-shaped FedAvg round (bench_rounds.py) at 20 and 500 clients, vmap and chunked
#      executors (targets: <= 10 ms and <= 100 ms per round);
#   2. an 8-way seed sweep of the digits workload against one run (bench_scale.py sweep
#      --separate-runs 1; target: the sweep's s/round <= 3x the single run's);
#   3. 500 Cifar-100 clients (CIFAR-100's 60,000 images split evenly), FedAvg, chunked (the
#      uploads summed chunk by chunk since 2026-12-04), images held as uint8 (as the CLI holds
#      tfds sets) and as float32: XLA's peak_bytes_in_use with preallocation off (target: <= 2 GB);
#   4. the scaling curve (bench_scale.py memory): FedAvg and Ditto at 20/500/2,000 clients
#      and FedTGP at 20/100/500, 50 images per client;
#   5. with what is left, variants of the 500-client round: bfloat16 (mixed precision), then
#      chunk sizes 25 and 100.
# `variants` (~9 min) measures what the gaps call for next: 500 Cifar-100 clients' memory with
# the uploads summed per chunk (uint8 and float32 images), the 20- and 500-client rounds with the
# hybrid, patches and slices convolution lowerings (per-client kernels as batched matmuls),
# the 20-client round with its 10 local steps unrolled (no loop: one launch sequence, no
# per-iteration loop condition), vmap against chunks of 50 at 100 clients, the 8-way sweep in
# bfloat16 and with hybrid and slices convolutions (its 160 client slots' kernels as batched
# matmuls), and chunks of 100.
# `htfl` runs bench_htfl.py's Local on HtFE-img-8, PyTorch's sequential loop first (JAX's
# compilation of the eight architectures took 310 s on an H200 on 2026-11-30).
# Everything is written under $OUT (the device tool's result folder; ./gpu_out elsewhere):
# log.txt (all output), env.txt, and one file per measurement (at most 8 files in all).
set -u
part=${1:-cnn}
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false   # so peak_bytes_in_use is what the run needs
B=experiments/benchmarks
BUDGET=${BUDGET:-540}                          # seconds for the whole part
if [ "${SMOKE:-0}" = 1 ]; then
  small=1; BUDGET=${BUDGET_SMOKE:-900}
else
  small=0
fi
exec > >(tee -a "$OUT/log.txt") 2>&1

left() { echo $((BUDGET - SECONDS)); }
# step NAME SECONDS COMMAND...: runs COMMAND under a limit of SECONDS (or what is left).
step() {
  local name=$1 limit=$2
  shift 2
  local have
  have=$(left)
  if [ "$have" -lt 30 ]; then
    echo "== $name: skipped, ${have} s left"
    return
  fi
  [ "$limit" -gt "$have" ] && limit=$have
  echo "== $name (limit ${limit} s, $(date -u +%H:%M:%S))"
  timeout -k 10 "$limit" "$@"
  echo "== $name: exit $?, $SECONDS s into the part"
}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  $PY -c "import jax, flax, optax, sys; print('python', sys.version.split()[0], 'jax',
jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
  $PY -c "import torch; print('torch', torch.__version__, torch.cuda.is_available())" 2>&1
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

case $part in
  cnn)
    if [ $small = 1 ]; then
      clients=4,8; big=8; samples=800; seeds=0,1; scale=4,8; tgp=4; rounds=1; chunks=2,4
    else
      clients=20,500; big=500; samples=60000; seeds=0,1,2,3,4,5,6,7; scale=20,500,2000
      tgp=20,100,500; rounds=3; chunks=25,100
    fi
    step "FedAvg round, CIFAR-shaped" 200 $PY $B/bench_rounds.py --clients $clients \
      --executors vmap,chunked --chunk-size 50 --rounds $rounds --timeout 90 \
      --write "$OUT/rounds.md"
    step "8-way sweep against one run" 120 $PY $B/bench_scale.py sweep --seeds $seeds \
      --lrs 0.005 --rounds 5 --sweep-executors auto --separate-runs 1 --caches off \
      > "$OUT/sweep.md"
    cat "$OUT/sweep.md"
    step "500 Cifar-100 clients, memory" 110 $PY $B/bench_scale.py memory --clients $big \
      --samples $samples --algorithms FedAvg --executors chunked --images uint8,float32 \
      --timeout 50 --json "$OUT/cifar100.json"
    step "scaling curve" 170 $PY $B/bench_scale.py memory --clients $scale \
      --algorithms FedAvg,Ditto --per-client 50 --timeout 45 --json "$OUT/scaling.json"
    step "scaling curve, FedTGP" 100 $PY $B/bench_scale.py memory --clients $tgp \
      --algorithms FedTGP --per-client 50 --timeout 60 --json "$OUT/scaling_tgp.json"
    # what is left: variants of the largest round (bf16, other chunk sizes), for the gap to
    # the floor; rows are printed as they finish, so a cut-off step still leaves some
    step "largest round, variants" 200 $PY $B/bench_rounds.py --clients $big \
      --executors chunked --chunk-size 50 --dtypes bfloat16 --rounds $rounds --timeout 60 \
      --write "$OUT/variants.md"
    step "largest round, chunk sizes" 200 $PY $B/bench_rounds.py --clients $big \
      --executors chunked --chunk-size $chunks --rounds $rounds --timeout 60 \
      --write "$OUT/variants.md"
    ;;
  variants)
    # What the targets' gaps call for next (2026-12-04's H200 run): the memory of 500 Cifar-100
    # clients now that the chunked executor sums the uploads; convolution lowerings of the
    # 500-client round other than XLA's grouped convolutions; the executor at 100 clients
    # (to choose a GPU default); the 8-way sweep in bfloat16.
    if [ $small = 1 ]; then
      small_n=2; big=8; mid=4; samples=800; seeds=0,1; rounds=1
    else
      small_n=20; big=500; mid=100; samples=60000; seeds=0,1,2,3,4,5,6,7; rounds=3
    fi
    step "500 Cifar-100 clients, memory, uploads summed per chunk" 100 $PY $B/bench_scale.py \
      memory --clients $big --samples $samples --algorithms FedAvg --executors chunked \
      --images uint8,float32 --timeout 45 --json "$OUT/cifar100.json"
    step "20 and 500 clients, convolution lowerings" 220 $PY $B/bench_rounds.py \
      --clients $small_n,$big --executors chunked --chunk-size 50 \
      --conv-impls hybrid,patches,slices --rounds $rounds --timeout 50 --write "$OUT/conv.md"
    step "20 clients, local steps unrolled" 50 $PY $B/bench_rounds.py --clients $small_n \
      --executors vmap --unroll 0 --rounds $rounds --timeout 40 --write "$OUT/conv.md"
    step "100 clients, vmap against chunks of 50" 80 $PY $B/bench_rounds.py --clients $mid \
      --executors vmap,chunked --chunk-size 50 --rounds $rounds --timeout 35 --write "$OUT/mid.md"
    step "8-way sweep in bfloat16" 100 $PY $B/bench_scale.py sweep --seeds $seeds --lrs 0.005 \
      --rounds 5 --sweep-executors auto --separate-runs 1 --caches off \
      --cli-args "--dtype bfloat16" | tee -a "$OUT/sweeps.md"
    step "8-way sweep, hybrid convolutions" 100 $PY $B/bench_scale.py sweep --seeds $seeds \
      --lrs 0.005 --rounds 5 --sweep-executors auto --separate-runs 1 --caches off \
      --cli-args "--conv-impl hybrid" | tee -a "$OUT/sweeps.md"
    step "8-way sweep, slices convolutions" 100 $PY $B/bench_scale.py sweep --seeds $seeds \
      --lrs 0.005 --rounds 5 --sweep-executors auto --separate-runs 1 --caches off \
      --cli-args "--conv-impl slices" | tee -a "$OUT/sweeps.md"
    step "largest round, chunks of 100" 120 $PY \
      $B/bench_rounds.py --clients $big --executors chunked --chunk-size 100 --rounds $rounds \
      --timeout 40 --write "$OUT/more.md"
    step "largest round, bfloat16 with the hybrid lowering" 60 $PY $B/bench_rounds.py \
      --clients $big --executors chunked --chunk-size 50 --dtypes bfloat16 --conv-impls hybrid \
      --rounds $rounds --timeout 45 --write "$OUT/more.md"
    ;;
  htfl)
    if [ $small = 1 ]; then
      fam=(--family HtFE-img-2 --rounds 1); tt=300
    else
      fam=(--family HtFE-img-8 --rounds 2); tt=150
    fi
    step "HtFE-img-8, PyTorch and fedjax_lib" "$BUDGET" $PY $B/bench_htfl.py "${fam[@]}" \
      --impl torch,jax --algos Local --timeout $((BUDGET - tt - 30)) --torch-timeout $tt \
      --torch-python "${TORCH_PY:-$PY}" --json "$OUT/htfl.json" --write "$OUT/htfl.md"
    ;;
  *)
    echo "error: part '$part' is not one of: cnn, variants, htfl" >&2
    exit 2
    ;;
esac
echo "== done, $SECONDS s"
