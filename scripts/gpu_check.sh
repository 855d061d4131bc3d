#!/usr/bin/env bash
# The figures issues 13 and 14 ask of a real GPU, in one run of about six
# minutes on a 16-core machine with one GPU (the build included), each command
# bounded by `timeout` so that one hung step cannot take the rest with it:
#   13: `rwkv compare`, the default pair (RWKV-7 0.1B shape against SmolLM2-135M)
#       and the RWKV paper's pair (RWKV-4 169M against Pythia-160M), decode
#       latency and memory from 256 to 32768 tokens; and at 32768 with
#       RWKV_PROFILE=1, the attention kernel's KV-cache bytes per second against
#       the matrix kernels' weight bytes per second (profiled dispatches wait
#       one by one, so on a GPU also compare the latency slope from 4096 to 32768);
#   14: `rwkv bench` at the 0.1B and 1.5B shapes, f16 / int8 / 4-bit, decode
#       (batch 1 and 8) and prefill, all in one process per format.
# Results: one JSON file per command in $OUT (or ./gpu-check), with the device
# and the adapter; a command that fails leaves its stderr there instead.
# Usage, from the repository root: bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-check}"
mkdir -p "$out"
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
(nvidia-smi -L || true) > "$out/device.txt" 2>&1
cargo build --release --quiet 2> "$out/build.stderr" || { echo "build failed"; tail -20 "$out/build.stderr"; exit 1; }
rwkv=target/release/rwkv
"$rwkv" inspect 2>&1 | head -3 >> "$out/device.txt"

# run NAME SECONDS ARGS...: the command's JSON to NAME.json, its stderr to NAME.stderr.
run() {
    local name=$1 secs=$2
    shift 2
    local t0=$SECONDS
    if timeout "$secs" "$rwkv" "$@" --json > "$out/$name.json" 2> "$out/$name.stderr"; then
        echo "$name: ok in $((SECONDS - t0)) s"
    else
        echo "$name: FAILED (rc $?, $((SECONDS - t0)) s): $(tail -1 "$out/$name.stderr")"
    fi
}

run compare-default 150 compare --repeat 3
run compare-paper 120 compare --rwkv L12-D768-V50277 --rwkv-version 4 --transformer pythia-160m --repeat 3
RWKV_PROFILE=1 run compare-profile-32k 90 compare --contexts 32768 --tg 8 --repeat 1
for quant in f16 int8 4bit; do
    q=()
    [ "$quant" != f16 ] && q=(--quant "$quant")
    run "bench-0.1b-$quant" 60 bench --shape L12-D768-V65536 --pp 512 --tg 128 --batch 1,8 --repeat 3 "${q[@]}"
    run "bench-1.5b-$quant" 120 bench --shape L24-D2048-V65536 --pp 512 --tg 64 --batch 1,8 --repeat 3 "${q[@]}"
done
ls -l "$out"
