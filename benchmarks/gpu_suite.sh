#!/usr/bin/env bash
# Issue 4's throughput measurements on one GPU, one named stage per command (each < 9 minutes on
# an H100 with the Llama-3.1-8B shape and dummy weights):
#
#   bash benchmarks/gpu_suite.sh STAGE [STAGE ...]
#
#   offline-random       anyserve, 1000 requests, prompts 1024 / outputs 512 tokens (fixed), ignore_eos,
#                        + transformers generate on the first 64 prompts (batches of 32); ratio. ~4 min
#   offline-sharegpt     anyserve, 1000 sharegpt-synthetic requests; next to the published
#                        16,215 tok/s (SGLang, AIMultiple). ~2 min
#   offline-hf-baseline  anyserve and transformers on the same 128 prompts (1024/512; batches of 64). ~3 min
#   ratio-overlap        200 requests 1024/512, overlap scheduler on vs --disable-overlap-schedule. ~2.5 min
#   ratio-graphs         the same, device graphs on vs --disable-cuda-graph. ~3 min
#   ratios               ratio-overlap then ratio-graphs. ~5.5 min
#   kv-fp8               1000 requests 1024/512, --kv-cache-dtype auto vs fp8_e4m3 (twice the KV
#                        tokens, half the attention reads). ~4 min
#   serving              one server, max concurrency 1/16/64 with 8/64/256 requests of 1024/512. ~3 min
#   serving-overlap      serving for a server with and one without the overlap scheduler. ~6 min
#   mixed-chunk          offline-sharegpt with the defaults, then with --schedule-policy lof
#                        --enable-mixed-chunk and $MIXED_ARGS (default: 192 running, 1024-token
#                        chunks), in one call. ~2 min
#   piecewise            offline-sharegpt with --schedule-policy lof --enable-mixed-chunk and
#                        $MIXED_ARGS, then the same with --enable-piecewise-cuda-graph (extend and
#                        mixed steps replayed as graph pieces around the attention). ~2.5 min
#   ab-kernel-config     offline-sharegpt with the platform's kernel config, then with $KERNEL_CONFIG
#                        (default '{"balance_splits": 4}'), in one call. ~2.5 min
#   decode-ab            batch-1 decode (bench_decode.py, 512/256) with the platform's kernel config,
#                        with $KERNEL_CONFIG, and with the platform's again (one machine: differences
#                        of ~1% are visible; across machines they are not). ~2 min
#   grammar              bench_grammar.py: decode batches 1/8/32 unconstrained, all with a JSON schema and
#                        one with a schema, overlap scheduler on and off for each. ~3 min
#   summary              one markdown table of every result JSON in $OUT (no device work)
#
# Estimates assume: model load ~20 s, graph capture ~15 s, anyserve ~10-15k output tok/s at large
# batch (a 1000 x 1024/512 run: ~45 s of decode + ~25 s of prefill), transformers ~20-30 tok/s per
# sequence. Results: $OUT/<stage>.json and $OUT/<stage>.log (OUT defaults to ./bench-out); each stage
# ends with a compact table.
#
# Environment:
#   OUT=DIR                  where results go (default ./bench-out)
#   MODEL_DIR=DIR            model folder (default: $OUT/llama-3.1-8b, config + tokenizer, made here)
#   OFFLINE_EXTRA="..."      extra flags for every `anyserve bench offline`, e.g.
#                            "--server-arg attention_backend=triton --server-arg mem_fraction_static=0.85"
#   MIXED_ARGS="..."         the mixed-chunk stage's flags besides lof and mixing (default
#                            "--max-running-requests 192 --chunked-prefill-size 1024")
#   SERVING_EXTRA="..."      extra flags for bench_serving_gpu.py, e.g. "--server-arg cuda_graph_max_bs=256"
#   ANYSERVE_SUITE_SMOKE=1   CPU wiring check: --device cpu, the tiny llama (make-model), 8 requests of
#                            32/16 tokens, concurrency 1/4; seconds per stage, figures meaningless.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-./bench-out}
PY=${PYTHON:-python}
SMOKE=${ANYSERVE_SUITE_SMOKE:-0}
mkdir -p "$OUT"

if [[ "$SMOKE" == "1" ]]; then
  MODEL_DIR=${MODEL_DIR:-$OUT/llama-tiny}
  DEVICE=cpu; DTYPE=float32
  N_BIG=8; N_RATIO=8; N_HF=4; HF_BS=2; N_SAME=4; SAME_BS=2
  RANDOM_LENS=(--random-input-len 32 --random-output-len 16 --random-range-ratio 1.0)
  SHAREGPT=(--sharegpt-context-len 256)
  SERVE_LEVELS=(--concurrency 1,4 --num-prompts 2,8 --random-input-len 32 --random-output-len 16)
  DECODE_ARGS=(--shape qwen2.5-0.5b --prompt-len 16 --output-len 8)
  GRAMMAR_ARGS=(--shape qwen2.5-0.5b --batch-sizes 2 --prompt-len 8 --output-len 5 --overlap-ab)
else
  MODEL_DIR=${MODEL_DIR:-$OUT/llama-3.1-8b}
  DEVICE=auto; DTYPE=bfloat16
  N_BIG=1000; N_RATIO=200; N_HF=64; HF_BS=32; N_SAME=128; SAME_BS=64
  RANDOM_LENS=(--random-input-len 1024 --random-output-len 512 --random-range-ratio 1.0)
  SHAREGPT=()
  SERVE_LEVELS=(--concurrency 1,16,64 --num-prompts 8,64,256 --random-input-len 1024 --random-output-len 512)
  DECODE_ARGS=(--shape llama-3.1-8b)
  GRAMMAR_ARGS=(--shape llama-3.1-8b --batch-sizes 1,8,32 --output-len 128 --repeats 2)
fi
KERNEL_CONFIG=${KERNEL_CONFIG:-'{"balance_splits": 4}'}
read -r -a OFFLINE_EXTRA_ARR <<< "${OFFLINE_EXTRA:-}"
read -r -a SERVING_EXTRA_ARR <<< "${SERVING_EXTRA:-}"

model_dir() {
  if [[ ! -f "$MODEL_DIR/config.json" ]]; then
    if [[ "$SMOKE" == "1" ]]; then
      $PY -m engine.entrypoints.cli make-model --arch llama --size tiny "$MODEL_DIR" >/dev/null
    else
      $PY benchmarks/make_shape_folder.py llama-3.1-8b "$MODEL_DIR" >/dev/null
    fi
  fi
}

environment() {
  {
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    echo "commit $(git rev-parse --short HEAD 2>/dev/null), $(git status --porcelain --untracked-files=no 2>/dev/null | wc -l) modified files"
    $PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  } > "$OUT/env.txt" 2>&1 || true
}

# offline NAME ARGS...: `anyserve bench offline` on the model, log and JSON under $OUT
offline() {
  local name=$1; shift
  echo "=== $name ==="
  $PY -m engine.entrypoints.cli bench offline --model-path "$MODEL_DIR" --device "$DEVICE" --dtype "$DTYPE" \
    --load-format dummy --output-file "$OUT/$name.json" "$@" ${OFFLINE_EXTRA_ARR[@]+"${OFFLINE_EXTRA_ARR[@]}"} 2>&1 | tee "$OUT/$name.log"
}

serving() {
  local name=$1; shift
  echo "=== $name ==="
  $PY benchmarks/bench_serving_gpu.py --model-path "$MODEL_DIR" --device "$DEVICE" --dtype "$DTYPE" \
    --load-format dummy "${SERVE_LEVELS[@]}" --log-dir "$OUT/$name-logs" --output-file "$OUT/$name.json" \
    "$@" ${SERVING_EXTRA_ARR[@]+"${SERVING_EXTRA_ARR[@]}"} 2>&1 | tee "$OUT/$name.log"
}

run_stage() {
  case "$1" in
    offline-random)
      offline offline-random --num-prompts "$N_BIG" "${RANDOM_LENS[@]}" \
        --hf-num-prompts "$N_HF" --hf-batch-size "$HF_BS" --isolate ;;
    offline-sharegpt)
      offline offline-sharegpt --dataset sharegpt-synthetic --num-prompts "$N_BIG" ${SHAREGPT[@]+"${SHAREGPT[@]}"} --skip-hf ;;
    offline-hf-baseline)
      offline offline-hf-baseline --num-prompts "$N_SAME" "${RANDOM_LENS[@]}" --hf-batch-size "$SAME_BS" --isolate ;;
    ratio-overlap)
      offline ratio-overlap --num-prompts "$N_RATIO" "${RANDOM_LENS[@]}" --skip-hf --isolate \
        --compare disable_overlap_schedule ;;
    ratio-graphs)
      offline ratio-graphs --num-prompts "$N_RATIO" "${RANDOM_LENS[@]}" --skip-hf --isolate \
        --compare disable_cuda_graph ;;
    ratios)
      run_stage ratio-overlap; run_stage ratio-graphs ;;
    kv-fp8)
      offline kv-fp8 --num-prompts "$N_BIG" "${RANDOM_LENS[@]}" --skip-hf --isolate \
        --compare kv_cache_dtype=fp8_e4m3 ;;
    serving)
      serving serving ;;
    serving-overlap)
      serving serving-overlap --compare disable_overlap_schedule ;;
    mixed-chunk)
      local mixed_args
      read -r -a mixed_args <<< "${MIXED_ARGS:---max-running-requests 192 --chunked-prefill-size 1024}"
      offline mixed-chunk-default --dataset sharegpt-synthetic --num-prompts "$N_BIG" ${SHAREGPT[@]+"${SHAREGPT[@]}"} --skip-hf
      offline mixed-chunk-lof-mixed --dataset sharegpt-synthetic --num-prompts "$N_BIG" ${SHAREGPT[@]+"${SHAREGPT[@]}"} \
        --skip-hf --server-arg schedule_policy=lof --server-arg enable_mixed_chunk=true "${mixed_args[@]}" ;;
    piecewise)
      local mixed_args
      read -r -a mixed_args <<< "${MIXED_ARGS:---max-running-requests 192 --chunked-prefill-size 1024}"
      offline piecewise-off --dataset sharegpt-synthetic --num-prompts "$N_BIG" ${SHAREGPT[@]+"${SHAREGPT[@]}"} \
        --skip-hf --server-arg schedule_policy=lof --server-arg enable_mixed_chunk=true "${mixed_args[@]}"
      offline piecewise-on --dataset sharegpt-synthetic --num-prompts "$N_BIG" ${SHAREGPT[@]+"${SHAREGPT[@]}"} \
        --skip-hf --server-arg schedule_policy=lof --server-arg enable_mixed_chunk=true "${mixed_args[@]}" \
        --server-arg enable_piecewise_cuda_graph=true ;;
    ab-kernel-config)
      offline ab-default --dataset sharegpt-synthetic --num-prompts "$N_BIG" ${SHAREGPT[@]+"${SHAREGPT[@]}"} --skip-hf
      offline ab-kernel-config --dataset sharegpt-synthetic --num-prompts "$N_BIG" ${SHAREGPT[@]+"${SHAREGPT[@]}"} \
        --skip-hf --server-arg "kernel_config=$KERNEL_CONFIG" ;;
    decode-ab)
      local extra run
      extra=$($PY -c 'import json, sys; print(json.dumps({"kernel_config": sys.argv[1]}))' "$KERNEL_CONFIG")
      for run in default kernel-config default-again; do
        local args=("${DECODE_ARGS[@]}" --output-file "$OUT/decode-ab-$run.json")
        [[ $run == kernel-config ]] && args+=(--extra "$extra")
        echo "=== decode-ab $run ==="
        $PY benchmarks/bench_decode.py --device "$DEVICE" --dtype "$DTYPE" "${args[@]}" 2>&1 \
          | tee "$OUT/decode-ab-$run.log" | tail -2
      done ;;
    grammar)
      echo "=== grammar ==="
      $PY benchmarks/bench_grammar.py --device "$DEVICE" "${GRAMMAR_ARGS[@]}" --output-file "$OUT/grammar.json" \
        2>&1 | tee "$OUT/grammar.log" ;;
    summary)
      $PY benchmarks/suite_summary.py "$OUT" ;;
    *)
      echo "unknown stage '$1'; stages: offline-random offline-sharegpt offline-hf-baseline ratio-overlap" \
           "ratio-graphs ratios kv-fp8 serving serving-overlap mixed-chunk piecewise ab-kernel-config decode-ab grammar summary" >&2
      return 2 ;;
  esac
}

if [[ $# -eq 0 ]]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exit 2
fi
model_dir
environment
for stage in "$@"; do
  run_stage "$stage"
done
