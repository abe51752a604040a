#!/usr/bin/env bash
# Short training run on a tiny random Kontext model (CPU, about a minute), called by examples/demo.sh:
#   bash examples/demo_train.sh MANIFEST OUTDIR
# Builds OUTDIR/tiny-kontext (real diffusers classes, random weights), trains a LoRA on MANIFEST for 200 steps
# and prints where the LoRA and the validation strips are. No network.
set -euo pipefail
if [ $# -ne 2 ]; then
  echo "usage: $0 MANIFEST OUTDIR" >&2
  exit 2
fi
MANIFEST="$1"
OUTDIR="$2"
mkdir -p "$OUTDIR"
export HF_HUB_OFFLINE=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # tiny tensors: one thread is fastest, also on a busy machine

kontext-train make-tiny-model "$OUTDIR/tiny-kontext"

cat > "$OUTDIR/train-config.json" <<'JSON'
{
  // SimpleTuner-style keys, as in the Kontext quickstart (fp32 here: tiny model on the CPU)
  "model_family": "flux",
  "model_flavour": "kontext",
  "base_model_precision": "fp32",
  "gradient_checkpointing": true,
  "lora_rank": 8,
  "learning_rate": 2e-3,
  "optimizer": "adamw",
  "max_train_steps": 200,
  "train_batch_size": 2,
  "lr_scheduler": "constant",
  "lr_warmup_steps": 10,
  "validation_guidance": 2.5,
  "validation_steps": 100,
  "validation_num_inference_steps": 8,
  "checkpointing_steps": 100,
  "seed": 0
}
JSON

kontext-train "$MANIFEST" --model "$OUTDIR/tiny-kontext" --config "$OUTDIR/train-config.json" \
  --output-dir "$OUTDIR/lora" --lora-targets attention+ffs --validation-samples 2

echo
echo "LoRA (diffusers format): $OUTDIR/lora/pytorch_lora_weights.safetensors"
echo "Validation strips (reference | output | target): $OUTDIR/lora/validation/"
echo "Validation loss (the 'validation loss ... at step N' lines above; fixed sigmas and noise, so the steps compare):"
python - "$OUTDIR/lora/metrics.jsonl" <<'PY'
import json, sys
for m in map(json.loads, open(sys.argv[1])):
    if "val_loss" in m:
        print("  step %4d: validation %.4f, training samples %.4f" % (m["step"], m["val_loss"], m["train_eval_loss"]))
PY
echo "TensorBoard logs: tensorboard --logdir $OUTDIR/lora/logs"
