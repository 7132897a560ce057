#!/usr/bin/env bash
# Extraction on a GPU: the CUDA tests (nvJPEG decode, a whole store against the CPU's), then the
# stage against the bare forward (benchmarks/extraction_throughput.py) with JPEGs decoded on the
# device (jpeg_decode: device) and in the decode workers (the default), at the default shard size
# and at 32-image shards.
#
# Usage: benchmarks/gpu_extraction.sh PHOTOS OUT   (PHOTOS: JPEGs in class sub-folders; OUT: logs)
# RESULTS.md section 1f was made with it on one H200 (16 CPU cores).
set -uo pipefail
photos=${1:?PHOTOS}
out=${2:?OUT}
python=${PYTHON:-python3}
bench=(benchmarks/extraction_throughput.py --device cuda --photos "$photos" --images 2048
       --batch-size 64 --threads 8 --num-workers 6 --repeats 3)

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
nproc | tee -a "$out/gpu.txt"
timeout 200 "$python" -m pytest -p no:cacheprovider -q -s tests/test_decode.py -k "cuda or threads" \
    tests/test_shard_writer.py 2>&1 | tee "$out/tests.log"
run() {  # name, extra arguments
    local name=$1
    shift
    echo "== $name: $*" | tee -a "$out/bench.log"
    timeout 150 "$python" "${bench[@]}" --json "$out/$name.json" "$@" 2>&1 | tee -a "$out/bench.log"
}
run nvjpeg-256 --shard-size 256 --jpeg-decode device
run workers-256 --shard-size 256
run nvjpeg-32 --shard-size 32 --jpeg-decode device
run nvjpeg-256-all --shard-size 256 --all-default-backbones --jpeg-decode device
