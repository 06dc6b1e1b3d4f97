#!/usr/bin/env bash
# The runs the merge bench reads: smollm2-135m quantized with ApiQ-bw at 4 and 2 bits (the committed quick recipes,
# configs/quantize/quant-apiq-bw-smollm2-{4,2}bit.yaml), then a short causal-LM LoRA fine-tune of each (60 steps
# of WikiText-2 windows, configs/lm/ft-wikitext2-smollm2-2bit-apiq-bw.yaml with its model swapped).
# Skips what exists. Logs: runs/logs/merge-*.log. THREADS (default 1), NICE (default 10).
set -euo pipefail
cd "$(dirname "$0")/.."
PEFTKIT=${PEFTKIT:-.venv/bin/peftkit}
THREADS=${THREADS:-1}
STEPS=${STEPS:-60}
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p runs/logs
for bits in ${BITS:-4 2}; do
  quant=runs/merge-quant-apiq-bw-smollm2-${bits}bit
  if [[ ! -f $quant/quantization.json ]]; then
    nice -n "${NICE:-10}" "$PEFTKIT" quantize quant-apiq-bw-smollm2-${bits}bit output.dir=$quant output.overwrite=true \
      >runs/logs/merge-quant-${bits}bit.log 2>&1
  fi
  run=runs/merge-ft-smollm2-${bits}bit
  if [[ ! -f $run/metrics.json ]]; then
    nice -n "${NICE:-10}" "$PEFTKIT" finetune ft-wikitext2-smollm2-2bit-apiq-bw model.name=$quant output.dir=$run \
      train.max_steps=$STEPS train.eval_every=$STEPS train.save_every=$STEPS data.eval_limit=8 train.threads=$THREADS \
      train.resume=auto >runs/logs/merge-ft-${bits}bit.log 2>&1
  fi
done
