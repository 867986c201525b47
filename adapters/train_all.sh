#!/usr/bin/env bash
# Rebuild the shipped adapters from scratch on the offline SmolLM2-135M-Instruct (CPU is enough).
#   bash adapters/train_all.sh            # data (bench/tasks.py) then every adapter below (RoAd, prompt vectors, LoRA)
#   bash adapters/train_all.sh json       # only the named adapters
# Deterministic given the seeds below. The four style adapters are trained in disjoint subspaces of the 2D pairs
# (slots 0-3 of 4, seed 0: each moves a quarter of every layer's pairs, the rest stay exactly at the identity);
# about 16-20 min each on 2 idle CPU cores. The *_anchored adapters are trained with the anchored objective (loss
# only on the tokens the base model would not produce, KL to the base elsewhere; hub train's default), which add far
# better; about 1.5x the time (13-17 min each with one thread, two at once). opener (the reply starts with "Happy to
# help!") exists only anchored and shares slot 0 with upper, which it replaces in the composition set (upper case
# loses the content on this model; see the README).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f adapters/data/style_opener.jsonl ] || python bench/tasks.py --out adapters/data
[ -f adapters/data/pair_upper_signoff.jsonl ] || python bench/tasks.py --pairs --out adapters/data
declare -A STEPS=([upper]=120 [opener]=120 [signoff]=120 [bullets]=120 [json]=120
                  [sent_product]=60 [sent_movie]=60 [sent_restaurant]=60 [lora_signoff]=120 [lora_json]=60)
declare -A SLOT=([upper]=0/4 [opener]=0/4 [signoff]=1/4 [bullets]=2/4 [json]=3/4)
ONLY=("$@")
want() { [ ${#ONLY[@]} -eq 0 ] || [[ " ${ONLY[*]} " == *" $1 "* ]]; }
# Every shipped LoRA: rank 8 (lora_alpha 16) on the 7 projections, lr 2e-3, batch 4, seed 0.
LORA=(--kind lora --rank 8 --target-modules q_proj k_proj v_proj o_proj gate_proj up_proj down_proj --lr 2e-3
      --batch-size 4 --seed 0)
for style in upper signoff bullets json; do
  want "$style" || continue
  hub train adapters/data/style_$style.jsonl -o adapters/$style --kind road --variant road_1 --group-size 64 \
    --target-modules q_proj k_proj v_proj o_proj gate_proj up_proj down_proj \
    --steps "${STEPS[$style]}" --lr 5e-3 --batch-size 4 --seed 0 --subspace "${SLOT[$style]}" --subspace-seed 0 \
    --objective plain
done
for style in upper opener signoff bullets json; do
  want "${style}_anchored" || continue
  hub train adapters/data/style_$style.jsonl -o adapters/${style}_anchored --kind road --variant road_1 --group-size 64 \
    --target-modules q_proj k_proj v_proj o_proj gate_proj up_proj down_proj \
    --steps "${STEPS[$style]}" --lr 5e-3 --batch-size 4 --seed 0 --subspace "${SLOT[$style]}" --subspace-seed 0 \
    --objective anchored
done
# The three prompt vectors share one origin P0 (same seed), as in the task prompt vectors paper.
for domain in product movie restaurant; do
  want "sent_$domain" || continue
  hub train adapters/data/sentiment_$domain.jsonl -o adapters/sent_$domain --kind prompt --virtual-tokens 16 \
    --steps "${STEPS[sent_$domain]}" --lr 3e-2 --batch-size 8 --seed 0
done
# LoRA counterparts of two style adapters (rank 8 on the same 7 projections, lora_alpha 16), so RoAd and LoRA can be
# set side by side on the same tasks (10 and 6 min on this CPU beside another job).
for style in signoff json; do
  want "lora_$style" || continue
  hub train adapters/data/style_$style.jsonl -o adapters/lora_$style "${LORA[@]}" --steps "${STEPS[lora_$style]}" \
    --objective plain
done
# Trained with companions (hub train --with): the library's anchored adapters applied, frozen, on half of the steps,
# with the pair's combined examples, so that add with them keeps both behaviours (160 steps: about 26 min each with
# one thread, two at once). companion NAME DATA SLOT --with ADAPTER=PAIRS ...: one such RoAd adapter.
companion() {
  local name=$1 data=$2 slot=$3
  shift 3
  want "$name" || return 0
  hub train "adapters/data/$data" -o "adapters/$name" --kind road --variant road_1 --group-size 64 --steps 160 \
    --lr 5e-3 --batch-size 4 --seed 0 --subspace "$slot" --subspace-seed 0 "$@"
}
companion signoff_companion style_signoff.jsonl 1/4 \
  --with adapters/opener_anchored=adapters/data/pair_opener_signoff.jsonl \
  --with adapters/bullets_anchored=adapters/data/pair_signoff_bullets.jsonl \
  --with adapters/json_anchored=adapters/data/pair_signoff_json.jsonl
companion opener_companion style_opener.jsonl 0/4 \
  --with adapters/signoff_anchored=adapters/data/pair_opener_signoff.jsonl \
  --with adapters/bullets_anchored=adapters/data/pair_opener_bullets.jsonl \
  --with adapters/json_anchored=adapters/data/pair_opener_json.jsonl
# Second generation: trained with the companion-trained signoff and opener applied (sixth session; 27 min each with one
# thread beside other jobs).
companion json_companion style_json.jsonl 3/4 \
  --with adapters/signoff_companion=adapters/data/pair_signoff_json.jsonl \
  --with adapters/opener_companion=adapters/data/pair_opener_json.jsonl
companion bullets_companion style_bullets.jsonl 2/4 \
  --with adapters/signoff_companion=adapters/data/pair_signoff_bullets.jsonl \
  --with adapters/opener_companion=adapters/data/pair_opener_bullets.jsonl
# The opener on wider data (seventh session): its file plus 160 examples of 8 more training forms (bench/tasks.py
# --wide; WIDE_FORMS share no words with the unseen forms), trained like opener_companion (9 min with two threads).
[ -f adapters/data/style_opener_wide.jsonl ] || python bench/tasks.py --wide --out adapters/data
companion opener_wide style_opener_wide.jsonl 0/4 \
  --with adapters/signoff_anchored=adapters/data/pair_opener_signoff.jsonl \
  --with adapters/bullets_anchored=adapters/data/pair_opener_bullets.jsonl \
  --with adapters/json_anchored=adapters/data/pair_opener_json.jsonl
# JSON trained against signoff_companion and opener_wide (seventh session; 10 min with two threads).
companion json_companion_wide style_json.jsonl 3/4 \
  --with adapters/signoff_companion=adapters/data/pair_signoff_json.jsonl \
  --with adapters/opener_wide=adapters/data/pair_opener_json.jsonl
# Third round (eighth session): the opener trained on the wider forms against the companion-trained partners, then
# json and bullets on their own wider forms (bench/tasks.py --wide STYLE) against that opener (14 min each, one
# thread). opener_mutual, signoff_companion, bullets_wide and json_wide: the set whose every pair composes.
companion opener_mutual style_opener_wide.jsonl 0/4 \
  --with adapters/signoff_companion=adapters/data/pair_opener_signoff.jsonl \
  --with adapters/bullets_companion=adapters/data/pair_opener_bullets.jsonl \
  --with adapters/json_companion_wide=adapters/data/pair_opener_json.jsonl
[ -f adapters/data/style_json_wide.jsonl ] || python bench/tasks.py --wide json --out adapters/data
companion json_wide style_json_wide.jsonl 3/4 \
  --with adapters/signoff_companion=adapters/data/pair_signoff_json.jsonl \
  --with adapters/opener_mutual=adapters/data/pair_opener_json.jsonl
[ -f adapters/data/style_bullets_wide.jsonl ] || python bench/tasks.py --wide bullets --out adapters/data
companion bullets_wide style_bullets_wide.jsonl 2/4 \
  --with adapters/signoff_companion=adapters/data/pair_signoff_bullets.jsonl \
  --with adapters/opener_mutual=adapters/data/pair_opener_bullets.jsonl
# LoRA companions (eighth session): the LoRA pair trained as the RoAd companions were, anchored (hub train's default),
# signoff with the plain lora_json applied, then json with that signoff applied (9 min each with one thread).
want lora_signoff_companion && hub train adapters/data/style_signoff.jsonl -o adapters/lora_signoff_companion \
  "${LORA[@]}" --steps 120 --with adapters/lora_json=adapters/data/pair_signoff_json.jsonl
want lora_json_companion && hub train adapters/data/style_json.jsonl -o adapters/lora_json_companion \
  "${LORA[@]}" --steps 120 --with adapters/lora_signoff_companion=adapters/data/pair_signoff_json.jsonl
# LoRA openers (ninth session), trained with both LoRA companions applied: on the opener's own 8 forms, like them
# (10 min with one thread beside another job), the one to mix; on the 16 wider forms, the start of the three-style
# few-shot result in the README (14 min; it keeps its own style worse: 72% against 91%).
want lora_opener_companion && hub train adapters/data/style_opener.jsonl -o adapters/lora_opener_companion \
  "${LORA[@]}" --steps 120 --with adapters/lora_signoff_companion=adapters/data/pair_opener_signoff.jsonl \
  --with adapters/lora_json_companion=adapters/data/pair_opener_json.jsonl
[ -f adapters/data/style_opener_wide.jsonl ] || python bench/tasks.py --wide --out adapters/data
want lora_opener_wide && hub train adapters/data/style_opener_wide.jsonl -o adapters/lora_opener_wide \
  "${LORA[@]}" --steps 120 --with adapters/lora_signoff_companion=adapters/data/pair_opener_signoff.jsonl \
  --with adapters/lora_json_companion=adapters/data/pair_opener_json.jsonl
# A task adapter that composes with a style (the skill section of the bench): restaurant-review labels as RoAd,
# trained with the two frame-style companions applied (python bench/tasks.py --skill writes their data).
[ -f adapters/data/skill_restaurant_signoff.jsonl ] || python bench/tasks.py --skill --out adapters/data
want sent_restaurant_road && hub train adapters/data/sentiment_restaurant.jsonl -o adapters/sent_restaurant_road \
  --kind road --variant road_1 --group-size 64 --steps 80 --lr 5e-3 --batch-size 4 --seed 0 --subspace 3/4 \
  --subspace-seed 0 --with adapters/signoff_companion=adapters/data/skill_restaurant_signoff.jsonl \
  --with adapters/opener_wide=adapters/data/skill_restaurant_opener.jsonl
true
