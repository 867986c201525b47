#!/usr/bin/env bash
# Rebuild the shipped adapters from scratch on the offline SmolLM2-135M-Instruct (CPU is enough).
#   bash adapters/train_all.sh            # data (bench/tasks.py) then 4 RoAd + 3 prompt vectors
# Deterministic given the seeds below; about 30-40 min on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f adapters/data/style_upper.jsonl ] || python bench/tasks.py --out adapters/data
ROAD_STEPS=${ROAD_STEPS:-120}
PROMPT_STEPS=${PROMPT_STEPS:-120}
for style in upper signoff bullets json; do
  hub train adapters/data/style_$style.jsonl -o adapters/$style --kind road --variant road_1 --group-size 64 \
    --target-modules q_proj k_proj v_proj o_proj gate_proj up_proj down_proj \
    --steps "$ROAD_STEPS" --lr 5e-3 --batch-size 4 --seed 0
done
# The three prompt vectors share one origin P0 (same seed), as in the task prompt vectors paper.
for domain in product movie restaurant; do
  hub train adapters/data/sentiment_$domain.jsonl -o adapters/sent_$domain --kind prompt --virtual-tokens 16 \
    --steps "$PROMPT_STEPS" --lr 3e-2 --batch-size 8 --seed 0
done
