#!/usr/bin/env bash
# One device call: bf16 CUDA test suite (methods, padded batches, kernels), kernel microbenchmarks, decode latency.
# Usage on the GPU machine: bash benchmarks/gpu_run.sh [stage...]   (stages: mass128 zoohazard zoostep zooprofile prefill128dhsa maskprobe tests familytests familyc32 familyc128 prefillcudnn pdltests fasttests breakdown7 profile128ts profile32b8c fast128at zoo8192 fast128 fast128min fast32min fast32b8 kernels7 profile32c sparsetests attnkernels prefill32 prefill128 kernels decode32 decode128 decode32b8 decode64b8 profile32 profile128 family32 family128 prefill decode32q decode128q)
# Logs and JSON go to $OUT (or results/gpu when OUT is unset).
set -uo pipefail
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/card.txt"
stages=${*:-tests kernels decode32 decode128}
for s in $stages; do
  case $s in
    tests)
      ATTNKIT_TEST_DEVICE=cuda ATTNKIT_TEST_DTYPE=bfloat16 python3 -m pytest -q -p no:cacheprovider \
        tests/test_kernels.py tests/test_methods.py tests/test_api.py tests/test_padded_batch.py tests/test_static_decode.py 2>&1 | tail -40 | tee "$OUT/tests.log" ;;
    kernels)
      python3 benchmarks/decode_kernels.py --out "$OUT/kernels.json" 2>&1 | tail -40 | tee "$OUT/kernels.log" ;;
    decode32)
      python3 benchmarks/decode_latency.py --context 32768 --new-tokens 32 --out "$OUT/decode_32k.json" 2>&1 | tail -14 | tee "$OUT/decode_32k.log" ;;
    decode128)
      python3 benchmarks/decode_latency.py --context 131072 --new-tokens 32 --out "$OUT/decode_128k.json" 2>&1 | tail -14 | tee "$OUT/decode_128k.log" ;;
    profile32)
      (cd benchmarks && python3 decode_profile.py --context 32768 --out "$OUT/profile_32k.json") 2>&1 | grep -v Warning | tail -14 | tee "$OUT/profile_32k.log" ;;
    profile128)
      (cd benchmarks && python3 decode_profile.py --context 131072 --out "$OUT/profile_128k.json") 2>&1 | grep -v Warning | tail -14 | tee "$OUT/profile_128k.log" ;;
    decode64b8)
      python3 benchmarks/decode_latency.py --context 65536 --batch 8 --new-tokens 32 --skip-hf --skip-compile --out "$OUT/decode_64k_b8.json" 2>&1 | tail -14 | tee "$OUT/decode_64k_b8.log" ;;
    decode128q)
      python3 benchmarks/decode_latency.py --context 131072 --new-tokens 32 --skip-compile --out "$OUT/decode_128k_q.json" 2>&1 | tail -14 | tee "$OUT/decode_128k_q.log" ;;
    decode32q)
      python3 benchmarks/decode_latency.py --context 32768 --new-tokens 32 --skip-hf --skip-compile --out "$OUT/decode_32k_q.json" 2>&1 | tail -14 | tee "$OUT/decode_32k_q.log" ;;
    prefill)
      python3 benchmarks/prefill_probe.py 2>&1 | tail -6 | tee "$OUT/prefill_probe.log" ;;
    family32|family128)
      ctx=$([ "$s" = family32 ] && echo 32768 || echo 131072)
      python3 benchmarks/decode_latency.py --context $ctx --new-tokens 32 --skip-hf --skip-compile \
        --methods full,quest,tokenselect,tidaldecode,fasa,recycled_attention,snapkv,pyramidkv,streaming_llm \
        --out "$OUT/family_$ctx.json" 2>&1 | tail -16 | tee "$OUT/family_$ctx.log" ;;
    familytests)  # issue 8: the per-query-head sparse kernel (TidalDecode, FASA), their methods and graph == eager in bf16
      ATTNKIT_TEST_DEVICE=cuda ATTNKIT_TEST_DTYPE=bfloat16 timeout ${ATTNKIT_STAGE_SECONDS:-150} python3 -m pytest -q -p no:cacheprovider \
        tests/test_kernels.py tests/test_methods.py tests/test_static_decode.py tests/test_compiled_decode.py tests/test_selection_family.py \
        -k "sparse or tidal or fasa or head_scores or recycled or snapkv or pyramid or h2o or spatten or mass" 2>&1 | tail -12 | tee "$OUT/familytests.log" ;;
    familyc32|familyc128)  # issue 8 item 3: every method compiled (the fast path) against attnkit full, one run per context
      ctx=$([ "$s" = familyc32 ] && echo 32768 || echo 131072)
      timeout ${ATTNKIT_STAGE_SECONDS:-540} python3 benchmarks/decode_latency.py --context $ctx --new-tokens 32 --skip-hf --skip-compile \
        --methods ${ATTNKIT_FAMILY:-full,full+c,quest+c,quest/p64+c,tokenselect+c,tidaldecode+c,fasa+c,recycled_attention+c,spatten+c,pyramidkv+c,snapkv+c,h2o+c,streaming_llm+c,window+c} \
        --out "$OUT/familyc_$ctx.json" 2>&1 | grep -v Warn | tail -24 | tee "$OUT/familyc_$ctx.log" ;;
    prefill32|prefill128)  # issue 10: sparse prefill methods, one prefill chunk (time to first token, prefill s)
      ctx=$([ "$s" = prefill32 ] && echo 32768 || echo 131072)
      python3 benchmarks/decode_latency.py --context $ctx --new-tokens 2 --prefill-chunk $ctx --skip-hf --skip-compile --warm \
        --methods full,token_sparse,dhsa,rectified,tca --out "$OUT/prefill_$ctx.json" 2>&1 | grep -v Warn | tail -16 | tee "$OUT/prefill_$ctx.log" ;;
    prefill128dhsa)  # issue 10's first target with one DHSA setting: the speed rows ran fixed 32-token chunks, the
                     # Gemma-3 RULER cells DHSA's defaults (mass boundaries, 64); both at 128K here, then the
                     # attention kernel table's flex rows for dhsa and tca at 128K
      # DHSA's mass boundaries through the Triton kernels (ATTNKIT_MASS_KERNEL=triton; the torch pass is ~13 s at 128K)
      ATTNKIT_MASS_KERNEL=triton timeout ${ATTNKIT_STAGE_SECONDS:-280} python3 benchmarks/decode_latency.py --context 131072 --new-tokens 2 \
        --prefill-chunk 131072 --skip-hf --skip-compile --warm --methods full,dhsa,dhsa:boundaries=mass:chunk=64 \
        --out "$OUT/prefill_128k_dhsa.json" 2>&1 | grep -v Warn | tail -10 | tee "$OUT/prefill_128k_dhsa.log"
      [ -f /root/attention_kernels.csv ] || cp -p docs/results/attention_kernels.csv /root/ 2>/dev/null
      timeout 120 python3 benchmarks/attention_kernels.py --lengths 131072 --masks dhsa,tca --kernels flex \
        --no-backward --seconds 80 --out /root/attention_kernels.csv 2>&1 | grep -v Warn | tail -6 | tee -a "$OUT/prefill_128k_dhsa.log"
      cp /root/attention_kernels.csv "$OUT"/ ;;
    mass128)  # DHSA's defaults (mass boundaries, 64) at 128K against full, after the host-side mass_chunks; then where
              # the mass labelling's time goes (Triton passes, band sums, host NMS) on random q / k
      ATTNKIT_MASS_KERNEL=triton timeout ${ATTNKIT_STAGE_SECONDS:-170} python3 benchmarks/decode_latency.py --context 131072 \
        --new-tokens 2 --prefill-chunk 131072 --skip-hf --skip-compile --warm --methods full,dhsa:boundaries=mass:chunk=64 \
        --out "$OUT/prefill_128k_dhsa_mass.json" 2>&1 | grep -v Warn | tail -8 | tee "$OUT/prefill_128k_dhsa_mass.log"
      timeout 90 python3 benchmarks/dhsa_mass_timing.py 2>&1 | grep -v Warn | tee -a "$OUT/prefill_128k_dhsa_mass.log" ;;
    zoohazard)  # issue 11: torch's round-robin pool streams put one thread's kernels into another's capture
      timeout 90 python3 benchmarks/zoo_stream_hazard.py 2>&1 | grep -v Warn | tee "$OUT/zoo_stream_hazard.log" ;;
    zoostep)  # issue 11: the CUDA-graph training step against eager (tests, then ms per step at the V 8192 settings)
      ATTNKIT_TEST_DEVICE=cuda timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_zoo_step.py 2>&1 | tail -3 | tee "$OUT/zoo_step.log"
      timeout 120 python3 benchmarks/zoo_graph_step.py 2>&1 | tee -a "$OUT/zoo_step.log" ;;
    zooconc)  # issue 11: runs side by side in one process on their own streams (zoo sweep --concurrent): the CUDA test
              # against runs one by one, then steps per second for 1, 2, 4, 8 runs at the V 8192 settings
      ATTNKIT_TEST_DEVICE=cuda timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_zoo_step.py 2>&1 | tail -3 | tee "$OUT/zoo_conc.log"
      timeout 240 python3 benchmarks/zoo_concurrent.py 2>&1 | grep -v Warn | tee -a "$OUT/zoo_conc.log" ;;
    zooprofile)  # issue 11: ms per step, float32 against TF32 (ATTNKIT_ZOO_PRECISION=tf32 in zoo8192), then the
                 # step's top kernels per mixer (the graph gained 1.01-1.03x: kernel work, not launches)
      timeout 150 python3 benchmarks/zoo_step_profile.py 2>&1 | grep -v Warn | tee "$OUT/zoo_step_profile.log" ;;
    prefillcudnn)  # cuDNN as the dense prefill kernel (opt-in): its bf16 test, then 128K time to first token with
                   # flash (full only, the baseline) and with cuDNN (full and the sparse methods) in this call
      ATTNKIT_TEST_DEVICE=cuda ATTNKIT_TEST_DTYPE=bfloat16 timeout 120 python3 -m pytest -q -p no:cacheprovider \
        tests/test_kernels.py -k "bottom_right or split_causal" 2>&1 | tail -8 | tee "$OUT/prefillcudnn_tests.log"
      for k in flash cudnn; do
        m=$([ $k = flash ] && echo full || echo full,token_sparse,dhsa,rectified)
        ATTNKIT_PREFILL_KERNEL=$k timeout ${ATTNKIT_STAGE_SECONDS:-200} python3 benchmarks/decode_latency.py --context 131072 \
          --new-tokens 2 --prefill-chunk 131072 --skip-hf --skip-compile --warm --methods $m \
          --out "$OUT/prefill_131072_$k.json" 2>&1 | grep -v Warn | tail -10 | tee "$OUT/prefill_131072_$k.log"
      done ;;
    attnkernels)  # issue 10: masks x kernels, 8K-128K (resumable CSV, bounded)
      [ -f /root/attention_kernels.csv ] || cp -p docs/results/attention_kernels.csv /root/ 2>/dev/null
      python3 benchmarks/attention_kernels.py --seconds ${ATTNKIT_KERNEL_SECONDS:-480} --out /root/attention_kernels.csv \
        2>&1 | grep -v Warn | tail -60 | tee "$OUT/attention_kernels.log"
      cp /root/attention_kernels.csv "$OUT"/ ;;
    fasttests)  # issue 7: compiled steps (Inductor), the fused Quest kernel, graph replay == eager static steps
      ATTNKIT_TEST_DEVICE=cuda ATTNKIT_TEST_DTYPE=bfloat16 timeout ${ATTNKIT_STAGE_SECONDS:-300} python3 -m pytest -q -p no:cacheprovider \
        tests/test_compiled_decode.py tests/test_static_decode.py tests/test_kernels.py -k "compile or trace or quest or graph or static or votes" \
        2>&1 | tail -30 | tee "$OUT/fasttests.log" ;;
    fast128)  # issue 7: compiled steps and the fused Quest kernel at 128K, against attnkit full in the same run
      timeout ${ATTNKIT_STAGE_SECONDS:-420} python3 benchmarks/decode_latency.py --context 131072 --new-tokens 32 --skip-hf --skip-compile \
        --flash-prefill --methods full,full+c,streaming_llm+c,quest/p64+c,quest+c,tokenselect+c --out "$OUT/fast_128k.json" \
        2>&1 | grep -v Warn | tail -16 | tee "$OUT/fast_128k.log" ;;
    fast128at)  # streaming_llm's last 0.32 ms to the 1.3x target: Inductor's max-autotune (it also times its own GEMV kernels)
      timeout ${ATTNKIT_STAGE_SECONDS:-420} python3 benchmarks/decode_latency.py --context 131072 --new-tokens 32 --skip-hf --skip-compile \
        --compile-mode max-autotune-no-cudagraphs --methods full,streaming_llm+c --out "$OUT/fast_128k_at.json" \
        2>&1 | grep -v Warn | tail -12 | tee "$OUT/fast_128k_at.log" ;;
    fast128min)  # the same, fewest rows: full with and without compile, streaming_llm and Quest (64-token pages) compiled
      timeout ${ATTNKIT_STAGE_SECONDS:-300} python3 benchmarks/decode_latency.py --context 131072 --new-tokens 32 --skip-hf --skip-compile \
        --flash-prefill --methods full,full+c,streaming_llm+c,quest/p64+c --out "$OUT/fast_128k.json" \
        2>&1 | grep -v Warn | tail -14 | tee "$OUT/fast_128k.log" ;;
    fast32min)  # the smallest useful check: compile's effect at 32K (the small kernels do not depend on the context)
      timeout ${ATTNKIT_STAGE_SECONDS:-200} python3 benchmarks/decode_latency.py --context 32768 --new-tokens 32 --skip-hf --skip-compile \
        --methods full,full+c,streaming_llm+c,quest/p64+c --out "$OUT/fast_32k.json" 2>&1 | grep -v Warn | tail -12 | tee "$OUT/fast_32k.log" ;;
    fast32b8)
      timeout ${ATTNKIT_STAGE_SECONDS:-420} python3 benchmarks/decode_latency.py --context 32768 --batch 8 --new-tokens 16 --skip-hf --skip-compile \
        --methods full,full+c,quest/p64+c,quest+c,streaming_llm+c --out "$OUT/fast_32k_b8.json" 2>&1 | grep -v Warn | tail -14 | tee "$OUT/fast_32k_b8.log" ;;
    kernels7)  # issue 7's per-layer targets: 128K and 512K, attnkit against SDPA flash and FlexAttention
      timeout ${ATTNKIT_STAGE_SECONDS:-240} python3 benchmarks/decode_kernels.py --contexts 131072,524288 --no-breakdown \
        --out "$OUT/kernels7.json" 2>&1 | grep -v Warn | tail -40 | tee "$OUT/kernels7.log" ;;
    breakdown7)  # where the fused Quest step's 21 us (128K, H100) go: scoring, top-k and sparse read timed apart
      timeout ${ATTNKIT_STAGE_SECONDS:-300} python3 benchmarks/decode_kernels.py --contexts 131072,524288 \
        --out "$OUT/breakdown7.json" 2>&1 | grep -v Warn | tail -60 | tee "$OUT/breakdown7.log" ;;
    profile128ts)  # TokenSelect at 128K (0.77x full on the H100): kernel classes of its compiled step, Quest beside it
      (cd benchmarks && timeout ${ATTNKIT_STAGE_SECONDS:-300} python3 decode_profile.py --context 131072 --compile \
        --methods tokenselect,quest/p64 --out "$OUT/profile_128k_ts.json") 2>&1 | grep -v Warn | tail -16 | tee "$OUT/profile_128k_ts.log" ;;
    zoo8192)  # issue 11: the MQAR frontier in Zoology's setting (V 8192, its five training segments and seven test
              # configs), resumable across calls through the tracked db; learning rates ATTNKIT_ZOO_LRS (default:
              # Zoology's logspace(-3, -1.5, 4))
              # ATTNKIT_ZOO_SHARDS processes (default 2) share the GPU: a run takes ~195 s alone (its batch-256 steps are
              # 8-33 ms of kernel work; a CUDA graph gains 1.01-1.03x, sixteenth session) and 9 processes time-slicing
              # the H200 finished none of theirs in 500 s (fifteenth session): bound the stage by whole runs
      [ -f docs/results/zoo_v8192.db ] && cp docs/results/zoo_v8192.db "$OUT/zoo_v8192.db"
      # eager vs CUDA-graph steps (measured: 1.01-1.03x), ~60 s of the call: only when asked
      [ "${ATTNKIT_ZOO_GRAPH_STEP:-0}" = 1 ] && python3 benchmarks/zoo_graph_step.py 2>&1 | tee "$OUT/zoo_step.log"
      # every model is a BaseConv layer then the mixer's, as Zoology's Hybrid configs (BASED without a conv of its own):
      # without positions or the conv's token shift, softmax alone stalled at 0.45-0.55 on 256x16 (zoo_v8192.db)
      # ATTNKIT_ZOO_CONCURRENT runs side by side in each shard's process, on streams of their own (1.1-1.24x, zooconc)
      # --time-limit: the sweep ends by itself 40 s before the bound (no run starts later, running ones stop between
      # epochs and an epoch still running at the limit is dropped; checkpoints and the drawn MQAR sets go to
      # results/zoo-state, an ignored folder of the checkout, kept between calls while the machine is warm: /root
      # was not, three calls of session 25 found no checkpoints there);
      # ATTNKIT_ZOO_WHOLE=1 for a session's last call: runs that cannot finish in it give way to ones that can
      ZP=${ATTNKIT_ZOO_SHARDS:-2}
      ZS=${ATTNKIT_STAGE_SECONDS:-540}
      ZEND=$(( $(date +%s) + ZS - 40 ))
      # session 25: three calls stalled with four runs side by side (no epoch for minutes after the first ones):
      # --stall-dump prints every thread's stack and ends the sweep after 180 s without a log line; after that or
      # any other failed end, the loop resumes the sweep one run at a time without CUDA graphs for the call's
      # remaining time: no threads and no capture, the plainest path (it gives up the streams' 1.1-1.24x and the
      # graph's 1.01-1.03x)
      ZE=${ATTNKIT_ZOO_EAGER:-0}
      ZC=${ATTNKIT_ZOO_CONCURRENT:-1}
      ZARGS=(--db "$OUT/zoo_v8192.db" --checkpoints results/zoo-state --vocab-size 8192 --train-mix zoology
             --test-mix zoology --epochs 32 --batch-size 256
             --mixers base_conv+softmax,base_conv+based,base_conv+sliding_window --set based.conv_kernel=0
             --d-models 64,128,256 --lrs ${ATTNKIT_ZOO_LRS:-1e-3,3.162e-3,1e-2,3.162e-2}
             --precision ${ATTNKIT_ZOO_PRECISION:-float32})
      python3 -m attnkit zoo sweep "${ZARGS[@]}" --list > "$OUT/zoo8192.all.log" 2>&1  # where each run stands
      for attempt in 1 2 3 4; do
        left=$(( ZEND - $(date +%s) )); [ $left -lt 60 ] && break
        echo "--- attempt $attempt: ${left} s, eager $ZE, concurrent $ZC" >> "$OUT/zoo8192.all.log"
        pids=()
        for i in $(seq 0 $((ZP - 1))); do
          timeout $((left + 35)) python3 -m attnkit zoo sweep "${ZARGS[@]}" --device cuda --time-limit $left \
            $([ "${ATTNKIT_ZOO_WHOLE:-0}" = 1 ] && echo --whole-runs) $([ $ZE = 1 ] && echo --eager) \
            --stall-dump ${ATTNKIT_ZOO_STALL:-180} --shard $i/$ZP --concurrent $ZC --no-progress \
            > "$OUT/zoo8192.shard$i.log" 2>&1 &
          pids+=($!)
        done
        ok=1; for p in "${pids[@]}"; do wait $p || ok=0; done
        cat "$OUT"/zoo8192.shard*.log >> "$OUT/zoo8192.all.log"
        [ $ok = 1 ] && break  # every shard ended by itself: the time is up or all its runs are done
        ZE=1; ZC=1
      done
      # each run's start (its set-up time), epochs and stop, timestamped (--no-progress), then the finished runs
      mv "$OUT/zoo8192.all.log" "$OUT/zoo8192.log"; rm -f "$OUT"/zoo8192.shard*.log
      [ -d results/zoo-state ] && ls -la results/zoo-state | tail -n +2 >> "$OUT/zoo8192.log"
      grep -v "^| " "$OUT/zoo8192.log" | tail -60
      python3 -m attnkit zoo report "$OUT/zoo_v8192.db" -o "$OUT/zoo8192-report" 2>&1 | tail -1 | tee -a "$OUT/zoo8192.log" ;;
    profile32b8c)  # batch 8 at 32K: quest/p64 compiled took 9.39 ms against a 5.29 ms weights floor (H100): where the rest goes
      (cd benchmarks && PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout ${ATTNKIT_STAGE_SECONDS:-300} \
        python3 decode_profile.py --context 32768 --batch 8 --prefill-chunk 2048 --compile --compiled-only \
        --methods quest/p64,full --out "$OUT/profile_32k_b8_c.json") 2>&1 | grep -v Warn | tail -16 | tee "$OUT/profile_32k_b8_c.log" ;;
    profile32c)
      (cd benchmarks && timeout ${ATTNKIT_STAGE_SECONDS:-300} python3 decode_profile.py --context 32768 --compile \
        --methods full,streaming_llm,quest/p64 --out "$OUT/profile_32k_c.json") 2>&1 | grep -v Warn | tail -16 | tee "$OUT/profile_32k_c.log" ;;
    pdltests)  # programmatic dependent launch: the kernel chain in a CUDA graph, then graph == eager for every method with it on
      ATTNKIT_TEST_DEVICE=cuda ATTNKIT_TEST_DTYPE=bfloat16 timeout 70 python3 -m pytest -q -p no:cacheprovider \
        tests/test_kernels.py tests/test_sparse_prefill.py tests/test_tokenselect_cache.py \
        -k "pdl_chain or votes or mass_ratios or cached_static" 2>&1 | tail -8 | tee "$OUT/pdltests.log"
      ATTNKIT_PDL=1 ATTNKIT_TEST_DEVICE=cuda ATTNKIT_TEST_DTYPE=bfloat16 timeout 80 python3 -m pytest -q \
        -p no:cacheprovider tests/test_static_decode.py -k graph 2>&1 | tail -8 | tee -a "$OUT/pdltests.log" ;;
    maskprobe)  # why Gemma-3's sliding layers ran SDPA's math path at 16K (twelfth session), and the chunked path's memory
      python3 benchmarks/masked_prefill_probe.py 2>&1 | grep -v "^ *warnings.warn" | tee "$OUT/maskprobe.log"
      ATTNKIT_TEST_DEVICE=cuda ATTNKIT_TEST_DTYPE=bfloat16 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py \
        tests/test_sparse_prefill.py tests/test_weighing.py -k "masked_sdpa or pads_to_few or flex or efficient_kernel or mass_kernels" 2>&1 | tail -5 | tee -a "$OUT/maskprobe.log" ;;
    sparsetests)  # issue 10's kernels and methods on CUDA (flex compiled, bf16)
      ATTNKIT_TEST_DEVICE=cuda ATTNKIT_TEST_DTYPE=bfloat16 python3 -m pytest -q -p no:cacheprovider tests/test_sparse_prefill.py \
        tests/test_methods.py tests/test_padded_batch.py -k "token_sparse or dhsa or rectified or tca or sparse_prefill" 2>&1 | tail -30 | tee "$OUT/sparsetests.log" ;;
    decode32b8)
      python3 benchmarks/decode_latency.py --context 32768 --batch 8 --new-tokens 16 --skip-hf --skip-compile --out "$OUT/decode_32k_b8.json" 2>&1 | tail -14 | tee "$OUT/decode_32k_b8.log" ;;
  esac
done
