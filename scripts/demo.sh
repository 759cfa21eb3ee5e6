#!/usr/bin/env bash
# `make demo`: train both stages on the bundled photos, evaluate (Table 1 protocol with the
# baselines and the consistency projection), sweep the number of sampling steps, write the
# report. About 15-19 minutes on 2 CPU cores. Outputs under $GPSR_DEMO_DIR (default: demo/).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=${GPSR_DEMO_DIR:-demo}
FLOW_STEPS=${FLOW_STEPS:-4000}
DDPM_STEPS=${DDPM_STEPS:-5000}
export WANDB_SILENT=true
rm -rf "$OUT"
step() { printf '\n=== %s ===\n' "$*"; }

step "1/5 flow stage ($FLOW_STEPS steps)"
$PY -m gpsr.train experiment=demo stage=flow trainer.max_steps="$FLOW_STEPS" \
    trainer.enable_progress_bar=false hydra.run.dir="$OUT/flow"

step "2/5 latent DDPM stage ($DDPM_STEPS steps)"
$PY -m gpsr.train experiment=demo stage=ddpm flow_ckpt="$OUT/flow/checkpoints/last.ckpt" \
    stage.module.ema_decay=0.999 trainer.max_steps="$DDPM_STEPS" \
    trainer.enable_progress_bar=false hydra.run.dir="$OUT/ddpm"
CKPT="$OUT/ddpm/checkpoints/last.ckpt"

step "3/5 evaluation: GPSR 7+1 NFEs, baselines, projection, 4 samples per image"
$PY -m gpsr.evaluate ckpt="$CKPT" sampler.steps=7 sampler.samples=4 sampler.project=true \
    progress=false hydra.run.dir="$OUT/eval"

step "4/5 NFE sweep"
$PY -m gpsr.evaluate -m ckpt="$CKPT" sampler.steps=1,2,4,7,20,100 progress=false \
    baselines='[bicubic,pseudoinverse,flow]' hydra.sweep.dir="$OUT/sweep"

step "5/5 report"
$PY -m gpsr.report "$OUT/sweep"
cat "$OUT/eval/metrics.md"
echo "Outputs: $OUT/ (flow/, ddpm/, eval/metrics.md, eval/panel.png, sweep/report.md, sweep/report.png)"
