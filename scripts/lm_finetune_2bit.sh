#!/usr/bin/env bash
# Causal-LM fine-tune (WikiText-2) from each 2-bit start of smollm2-135m, plus the FP LoRA reference:
#   1. peftkit quantize quant-{rtn,nf,loftq,apiq-lw,apiq-bw}-smollm2-2bit   (skipped when runs/<name> holds a result)
#   2. peftkit finetune ft-wikitext2-smollm2-2bit-<method> and ft-wikitext2-smollm2-lora
#      (skipped when runs/<name>/metrics.json exists; an interrupted run continues: train.resume=auto)
#   3. scripts/collect_runs.py -> docs/results/lm-finetune-2bit.json, and the table (method, bits, ppl before/after)
# Run from anywhere: scripts/lm_finetune_2bit.sh [override ...]   (overrides go to every finetune, e.g.
# train.max_steps=10 for a smoke run; delete runs/ft-wikitext2-* to re-run). Logs: runs/logs/<name>.log.
# THREADS (default 1) sets torch's threads; NICE (default 10) the scheduling priority. CPU: ~1 h on one core.
set -euo pipefail
cd "$(dirname "$0")/.."
PEFTKIT=${PEFTKIT:-.venv/bin/peftkit}
PYTHON=${PYTHON:-.venv/bin/python}
THREADS=${THREADS:-1}
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
METHODS=(rtn nf loftq apiq-lw apiq-bw)
mkdir -p runs/logs

step() {  # step NAME COMMAND...: run with its log in runs/logs/NAME.log, report the wall time
  local name=$1 start=$SECONDS
  shift
  echo "== $name: $*"
  if ! nice -n "${NICE:-10}" "$@" >"runs/logs/$name.log" 2>&1; then
    echo "!! $name failed; the end of runs/logs/$name.log:" >&2
    tail -n 20 "runs/logs/$name.log" >&2
    exit 1
  fi
  echo "   done in $((SECONDS - start)) s"
}

for m in "${METHODS[@]}"; do
  name=quant-$m-smollm2-2bit
  if [[ -f runs/$name/quantization.json ]]; then echo "== $name: exists, skipped"; continue; fi
  step "$name" "$PEFTKIT" quantize "$name" output.overwrite=true  # a half-written dir of a killed run is replaced
done

runs=()
for name in "${METHODS[@]/#/ft-wikitext2-smollm2-2bit-}" ft-wikitext2-smollm2-lora; do
  runs+=("runs/$name")
  if [[ -f runs/$name/metrics.json ]]; then echo "== $name: finished before, skipped"; continue; fi
  step "$name" "$PEFTKIT" finetune "$name" train.resume=auto train.threads="$THREADS" "$@"
done

"$PYTHON" scripts/collect_runs.py lm-finetune-2bit "${runs[@]}" \
  --title "Causal-LM fine-tune from 2-bit starts (smollm2-135m, WikiText-2)" \
  --command "scripts/lm_finetune_2bit.sh${*:+ $*}" \
  --note "Start points: peftkit quantize configs/quantize/quant-<method>-smollm2-2bit.yaml (2 bits, group 64, LoRA r 64 alpha 16); fp = the unquantized model with a fresh LoRA of the same rank (configs/lm/ft-wikitext2-smollm2-lora.yaml); bits 16 = not quantized (fp32 weights)." \
  --note "Fine-tune: configs/lm/ft-wikitext2-smollm2-2bit-<method>.yaml, method apiq (LoRA only; the quantized base stays frozen), 100 steps x 4 windows x 128 tokens of wiki.valid.tokens (the quantizers calibrate on the same file: it is the only non-test split here), AdamW lr 1e-3 (the ApiQ script: 3e-4 over ~100x more tokens), wd 0.1, cosine, 3% warm-up; the final model is the last step (no selection on the test windows)." \
  --note "ppl_before / ppl_after: WikiText-2 test perplexity on the first 40 non-overlapping windows of 128 tokens (eval column), before any step and after the last; seconds = training loop only, quant_seconds = the quantizer." \
  --note "smollm2-135m's weights were Q4_1-quantized once before we see them; fp is their dequantized fp32 copy."
"$PYTHON" - <<'EOF'
import json

from peftkit.bench.harness import format_table

rows = json.load(open("docs/results/lm-finetune-2bit.json"))["rows"]
print(format_table([{k: r[k] for k in ("method", "bits", "ppl_before", "ppl_after", "steps", "seconds")} for r in rows]))
EOF
