#!/usr/bin/env bash
# Paper-size cost on a CUDA machine: the commands behind outputs/device/RESULTS.md.
#
#   bash scripts/device_bench.sh costs OUT_DIR     # solver overhead, MDEQ and Transformer steps
#   bash scripts/device_bench.sh compare OUT_DIR   # notebook 07's comparison, paper profile
#   bash scripts/device_bench.sh imagenet OUT_DIR  # MDEQ-small at 224 px, batch 112 and 28 (one GPU of 4)
#
# Each benchmark prints its table and writes OUT_DIR/<name>.json; everything printed also goes
# to OUT_DIR/<part>.log. torchdeq (the `bench` extra) must be importable for the comparison.
# Run from the repository root; PYTHON picks the interpreter (default python3).
set -uo pipefail
part=${1:?usage: scripts/device_bench.sh costs|compare|imagenet OUT_DIR}
out=${2:?usage: scripts/device_bench.sh costs|compare|imagenet OUT_DIR}
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$out"
log="$out/$part.log"
: >"$log"

step() {  # step NAME SECONDS ARGS...: one benchmark under a time limit; a failure does not stop the rest
    local name=$1 limit=$2
    shift 2
    echo "== $name: python -m deqlib.bench $*" | tee -a "$log"
    timeout "$limit" "$py" -m deqlib.bench "$@" --json "$out/$name.json" 2>&1 | tee -a "$log"
    echo "== $name: exit ${PIPESTATUS[0]}" | tee -a "$log"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } 2>&1 | tee -a "$log"
case $part in
    costs)
        # At most 8 minutes in all (the limits add up to 480 s). --check-every 8 adds rows with
        # the stop test kept on the device and read every 8 calls, beside the per-call rows.
        step solvers_b32 60 solvers --device cuda --check-every 8
        step solvers_b256 100 solvers --device cuda --batch 256 --check-every 8
        step mdeq_paper 100 mdeq --profile paper --batch 96
        step mdeq_paper_bf16 70 mdeq --profile paper --batch 96 --precision bf16
        step transformer_paper 150 transformer --profile paper --batch 15
        ;;
    imagenet)
        # MDEQ-small at 224 px (notebook 04's paper profile): the paper's batch of 112 on one GPU,
        # and 28, one GPU's share of 112 on 4; at most 5 minutes in all.
        step imagenet_b112 180 mdeq --experiment imagenet --profile paper --batch 112 --steps 3
        step imagenet_b28 120 mdeq --experiment imagenet --profile paper --batch 28 --steps 3
        ;;
    compare)
        step compare_paper 560 compare --profile paper
        ;;
    *)
        echo "unknown part $part: costs, compare or imagenet" >&2
        exit 2
        ;;
esac
