#!/usr/bin/env bash
# Your own data vs the built-in GLUE task, same recipe and seed: SST-2's rows written as a CSV with other column
# names (review, sentiment) and label names (negative, positive), then `peftkit finetune lora-minilm-sst2` on the CSV
# and on the GLUE task with the same max_steps; the two validation accuracies go to docs/results/own-data-sst2.json.
#   bash scripts/own_data_sst2.sh [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS="${1:-250}"
PY="${PY:-.venv/bin/python}"
GLUE="${PEFTKIT_DATA_DIR:-../shared/data/glue}"
WORK=runs/own-data-sst2
mkdir -p "$WORK"
"$PY" - "$GLUE/sst2" "$WORK" <<'EOF'
import csv, json, sys
from pathlib import Path
source, work = Path(sys.argv[1]), Path(sys.argv[2])
for split in ("train", "validation"):
    with open(work / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["review", "sentiment"])
        for line in (source / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            writer.writerow([row["sentence"], "positive" if int(row["label"]) == 1 else "negative"])
EOF
COMMON=(train.max_steps="$STEPS" train.eval_every="$STEPS" output.overwrite=true)
"$PY" -m peftkit finetune lora-minilm-sst2 data.task=dataset data.train_file="$WORK/train.csv" \
    data.validation_file="$WORK/validation.csv" data.text_columns=[review] data.label_column=sentiment \
    "${COMMON[@]}" output.dir="$WORK/csv"
"$PY" -m peftkit finetune lora-minilm-sst2 "${COMMON[@]}" output.dir="$WORK/glue"
"$PY" scripts/collect_runs.py own-data-sst2 "$WORK/csv" "$WORK/glue" \
    --command "bash scripts/own_data_sst2.sh $STEPS" \
    --title "Your own data vs the GLUE task: SST-2 as a CSV (review, sentiment; negative/positive) and as the GLUE task, same recipe and seed"
