#!/usr/bin/env bash
# What a CUDA machine must show, in under 8 minutes on one H100:
#   1. every fine-tuning method a few steps in bf16 (train.precision=bf16) on SST-2 with minilm-l6;
#   2. the GPTQ path: peftkit quantize with quant.method=gptq (4 bits, few calibration windows), then the apiq
#      fine-tune a few steps on that output;
#   3. FSDP on one GPU: torchrun --nproc_per_node=1 ... train.strategy=fsdp, full fine-tuning;
#   4. the GLUE quick grid on SST-2: peftkit bench glue --quick --set tasks=sst2;
#   5. the bf16 / fp32 step and its MFU: peftkit bench step --quick.
# Every command writes into OUT_DIR: runs/<name>/ (each run's metrics), logs/<name>.log, glue-quick.json and
# gpu-check.json (one row per command: name, exit code, seconds, the command line).
#
#   scripts/gpu_check.sh OUT_DIR             run everything (needs CUDA; exits 1 when a command failed)
#   scripts/gpu_check.sh --dry-run OUT_DIR   on any machine: print the commands and validate what can be checked
#                                            without a GPU (every recipe with its overrides through
#                                            `peftkit recipes show`, the bench's name and settings); exit 1 on the
#                                            first invalid one
# Data: PEFTKIT_DATA_DIR (GLUE) and PEFTKIT_WIKITEXT (wiki.*.tokens) as for any run; offline by default.
# Each command gets at most STEP_TIMEOUT seconds (default 300).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
if [[ ${1:-} == --dry-run ]]; then DRY=1; shift; fi
if [[ $# -ne 1 ]]; then
  echo "usage: scripts/gpu_check.sh [--dry-run] OUT_DIR" >&2
  exit 2
fi
OUT=$1
PEFTKIT=${PEFTKIT:-.venv/bin/peftkit}
PYTHON=${PYTHON:-.venv/bin/python}
TORCHRUN=${TORCHRUN:-.venv/bin/torchrun}
STEP_TIMEOUT=${STEP_TIMEOUT:-300}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1} TOKENIZERS_PARALLELISM=false

# every method of `peftkit methods` except apiq (needs a quantized base: the GPTQ path below)
METHODS=(full lora bitfit head-only pafi hiwi meft1 meft2 meft3 supertuning)
SHORT=(train.max_steps=5 train.eval_every=5 train.save_every=5 train.precision=bf16 data.limit=256
       data.eval_limit=128 output.overwrite=true)

COMMANDS=()  # "name|kind|recipe|arg ..." with kind: finetune, quantize, torchrun, bench
for m in "${METHODS[@]}"; do
  case $m in
    bitfit) recipe=full-minilm-sst2; extra=(method.name=bitfit) ;;
    pafi) recipe=pafi-r0.005-minilm-sst2; extra=() ;;
    *) recipe=$m-minilm-sst2; extra=() ;;
  esac
  COMMANDS+=("$m-bf16|finetune|$recipe|${extra[*]:-} ${SHORT[*]} output.dir=$OUT/runs/$m-bf16")
done
COMMANDS+=("gptq-quantize|quantize|quant-rtn-smollm2-2bit|quant.method=gptq quant.bits=4 quant.lora_r=16 calib.n_windows=8 output.overwrite=true output.dir=$OUT/runs/gptq-4bit")
COMMANDS+=("gptq-apiq-bf16|finetune|ft-wikitext2-smollm2-2bit-rtn|model.name=$OUT/runs/gptq-4bit train.max_steps=5 train.eval_every=5 train.save_every=5 train.precision=bf16 data.eval_limit=8 output.overwrite=true output.dir=$OUT/runs/gptq-apiq-bf16")
COMMANDS+=("fsdp-1gpu|torchrun|full-minilm-sst2|train.strategy=fsdp ${SHORT[*]} output.dir=$OUT/runs/fsdp-1gpu")
COMMANDS+=("glue-quick|bench|glue|tasks=sst2 work_dir=$OUT/runs/glue-quick")
COMMANDS+=("step-precision|bench|step|repeats=7")

command_line() {  # the argv of one entry, one word per line
  local kind=$1 recipe=$2 args=$3 name=$4
  case $kind in
    finetune) printf '%s\n' "$PEFTKIT" finetune "$recipe" $args ;;
    quantize) printf '%s\n' "$PEFTKIT" quantize "$recipe" $args ;;
    torchrun) printf '%s\n' "$TORCHRUN" --standalone --nproc_per_node=1 -m peftkit finetune "$recipe" $args ;;
    bench) printf '%s\n' "$PEFTKIT" bench "$recipe" --quick --json "$OUT/$name.json" $(printf -- '--set %s ' $args) ;;
  esac
}

validate_all() {  # what a dry run can check without a GPU, in one process: "kind|recipe|args" lines on stdin
  "$PYTHON" -c '
import sys
from peftkit.config.loader import load_recipe
from peftkit.utils.registry import BENCHES
bad = 0
for line in sys.stdin.read().splitlines():
    name, kind, recipe, args = line.split("|", 3)
    try:
        if kind == "bench":
            BENCHES.get(recipe).Settings.model_validate(dict(pair.split("=", 1) for pair in args.split()))
        else:
            load_recipe(recipe, args.split())
    except Exception as error:  # a UserError (bad recipe or option) or a validation error (bad bench setting)
        bad += 1
        print(f"!! {name}: invalid: {error}", file=sys.stderr)
sys.exit(1 if bad else 0)
'
}

mkdir -p "$OUT/logs" "$OUT/runs"
RESULTS="$OUT/gpu-check.jsonl"
[[ $DRY == 1 ]] || : >"$RESULTS"
failed=0
for entry in "${COMMANDS[@]}"; do
  IFS='|' read -r name kind recipe args <<<"$entry"
  mapfile -t argv < <(command_line "$kind" "$recipe" "$args" "$name")
  echo "== $name: ${argv[*]}"
  if [[ $DRY == 1 ]]; then
    command -v "${argv[0]}" >/dev/null || { echo "!! $name: ${argv[0]} is not an executable" >&2; exit 1; }
    continue
  fi
  start=$SECONDS
  timeout "$STEP_TIMEOUT" "${argv[@]}" >"$OUT/logs/$name.log" 2>&1
  rc=$?
  [[ $rc == 0 ]] || { failed=1; echo "!! $name failed ($rc); the end of $OUT/logs/$name.log:" >&2; tail -n 15 "$OUT/logs/$name.log" >&2; }
  "$PYTHON" -c 'import json, sys; print(json.dumps({"name": sys.argv[1], "exit_code": int(sys.argv[2]), "seconds": int(sys.argv[3]), "command": sys.argv[4:]}))' \
    "$name" "$rc" "$((SECONDS - start))" "${argv[@]}" >>"$RESULTS"
done
if [[ $DRY == 1 ]]; then
  printf '%s\n' "${COMMANDS[@]}" | validate_all 2>"$OUT/logs/dry-run.log" || {
    grep '^!! ' "$OUT/logs/dry-run.log" >&2
    exit 1
  }
  echo "dry run: ${#COMMANDS[@]} commands valid"
  exit 0
fi
"$PYTHON" - "$RESULTS" "$OUT/gpu-check.json" <<'EOF'
import json, sys
from peftkit.utils.env import environment
rows = [json.loads(line) for line in open(sys.argv[1])]
json.dump({"bench": "gpu-check", "machine": environment(), "command": "scripts/gpu_check.sh", "rows": rows},
          open(sys.argv[2], "w"), indent=2)
EOF
exit $failed
