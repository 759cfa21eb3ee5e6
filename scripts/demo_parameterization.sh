#!/usr/bin/env bash
# `make demo-parameterization`: the demo's latent DDPM trained with each output
# parameterization on the same flow, data and step budget, each evaluated at 7+1 and 100+1
# NFEs on the demo's test tiles (1 sample per image, seed 0). Needs `make demo` first: its
# flow ($GPSR_DEMO_DIR/flow) is shared, and its own DDPM ($GPSR_DEMO_DIR/ddpm, predicting x0)
# is the x0 row; eps (the paper's) and v are trained here with the same settings. Writes
# $GPSR_DEMO_DIR/parameterization/report.md (about 20 minutes on 2 CPU cores alone).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=${GPSR_DEMO_DIR:-demo}
DDPM_STEPS=${DDPM_STEPS:-5000}
FLOW="$OUT/flow/checkpoints/last.ckpt"
export WANDB_SILENT=true
[ -f "$FLOW" ] && [ -f "$OUT/ddpm/checkpoints/last.ckpt" ] || {
    echo "no demo flow / DDPM under $OUT: run 'make demo' first" >&2
    exit 1
}
CKPTS=("$OUT/ddpm/checkpoints/last.ckpt")
for p in eps v; do
    printf '\n=== latent DDPM, prediction=%s (%s steps) ===\n' "$p" "$DDPM_STEPS"
    rm -rf "$OUT/ddpm_$p"
    $PY -m gpsr.train experiment=demo stage=ddpm flow_ckpt="$FLOW" model.diffusion.prediction="$p" \
        stage.module.ema_decay=0.999 trainer.max_steps="$DDPM_STEPS" logger=csv \
        trainer.enable_progress_bar=false test_after_fit=false hydra.run.dir="$OUT/ddpm_$p"
    CKPTS+=("$OUT/ddpm_$p/checkpoints/last.ckpt")
done
rm -rf "$OUT/parameterization"
$PY -m gpsr.evaluate -m ckpt="$(IFS=,; echo "${CKPTS[*]}")" sampler.steps=7,100 \
    progress=false baselines='[bicubic,flow]' hydra.sweep.dir="$OUT/parameterization"
cat "$OUT/parameterization/report.md"
