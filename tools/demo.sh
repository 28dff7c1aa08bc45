#!/usr/bin/env bash
# The whole chain on CPU with tiny random Cosmos models, once per family (Predict2, then Predict2.5): checkpoint,
# synthetic clips, (Predict2.5: a caption per clip from its text encoder,) latent cache, LoRA training, sampling,
# evaluation against the base.
set -euo pipefail
PY=${PY:-python}
DEMO=${DEMO:-demo_output}
CLIP=(--num_frames 17 --height 64 --width 112)

$PY tools/make_synthetic_clips.py --output_dir "$DEMO/clips" --num_videos 6 --seconds 4 --captions
for FAMILY in predict2 predict2.5; do
  OUT=$DEMO/$FAMILY
  $PY tools/make_random_cosmos.py --family "$FAMILY" --size tiny --output_dir "$OUT/tiny-cosmos"
  CAPTIONS=()
  if [ "$FAMILY" = predict2.5 ]; then
    # A caption per clip from the checkpoint's own text encoder (a Qwen2.5-VL with a vision tower). Its weights are
    # random, so the captions are gibberish; the path (frames of each clip -> VLM -> captions -> cache) is the real one.
    $PY caption_clips.py --caption_model "$OUT/tiny-cosmos" --video_dir "$DEMO/clips/videos" \
        --output_dir "$OUT/captions" "${CLIP[@]}" --clip_stride_seconds 1 --max_new_tokens 16 --num_workers 2
    echo "demo: the tiny random captioner writes gibberish, e.g. $(head -c 300 "$OUT/captions/shard_00000/captions.jsonl")"
    CAPTIONS=(--captions_file "$OUT/captions")
  fi
  $PY cache_latents.py --pretrained_model_name_or_path "$OUT/tiny-cosmos" --video_dir "$DEMO/clips/videos" \
      --output_dir "$OUT/cache" "${CLIP[@]}" --clip_stride_seconds 1 --num_workers 2 --verify ${CAPTIONS[@]+"${CAPTIONS[@]}"}
  $PY -m accelerate.commands.launch --config_file accelerate_configs/cpu.yaml train_cosmos_lora.py \
      --pretrained_model_name_or_path "$OUT/tiny-cosmos" --cache_dir "$OUT/cache" --output_dir "$OUT/lora" \
      --max_train_steps 20 --checkpointing_steps 10 --validation_steps 10 --num_validation_clips 2 \
      --train_batch_size 2 --learning_rate 1e-3 --dataloader_num_workers 0 --report_to tensorboard
  # The guardrail downloads its own models, which a CPU demo without internet cannot do.
  $PY sample.py --pretrained_model_name_or_path "$OUT/tiny-cosmos" --lora_path "$OUT/lora" --from_cache "$OUT/cache" \
      --num_videos 2 --num_inference_steps 10 "${CLIP[@]}" --output_dir "$OUT/samples" --disable_safety_checker
  $PY evaluate.py --pretrained_model_name_or_path "$OUT/tiny-cosmos" --lora_path "$OUT/lora" \
      --from_cache "$OUT/cache" --num_videos 2 --seeds 2 --num_inference_steps 10 "${CLIP[@]}" \
      --output_dir "$OUT/evaluation" --disable_safety_checker
done
echo "demo done: $DEMO/predict2/samples and $DEMO/predict2.5/samples (video_grid.mp4, contact_sheet.png), and" \
     "$DEMO/predict2/evaluation/index.html and $DEMO/predict2.5/evaluation/index.html. The models are random, so" \
     "the pictures are noise, the Predict2.5 captions gibberish and the PSNR means nothing: the demo proves that" \
     "captioning, caching, training, export, reloading, sampling and evaluation run end to end for both families," \
     "not that anything was learned."
