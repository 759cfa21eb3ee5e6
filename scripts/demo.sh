#!/usr/bin/env bash
# `make demo`: train both stages on the bundled photos and the LR noise model of noise-aware
# sampling, evaluate (Table 1 protocol with the baselines and the consistency projection),
# sweep the number of sampling steps, write the report. About 20 minutes on 2 CPU cores.
# Outputs under $GPSR_DEMO_DIR (default: demo/).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=${GPSR_DEMO_DIR:-demo}
FLOW_STEPS=${FLOW_STEPS:-4000}
DDPM_STEPS=${DDPM_STEPS:-5000}
NOISE_STEPS=${NOISE_STEPS:-3000}
export WANDB_SILENT=true
rm -rf "$OUT"
step() { printf '\n=== %s ===\n' "$*"; }

step "1/6 flow stage ($FLOW_STEPS steps)"
$PY -m gpsr.train experiment=demo stage=flow trainer.max_steps="$FLOW_STEPS" \
    trainer.enable_progress_bar=false hydra.run.dir="$OUT/flow"

step "2/6 latent DDPM stage ($DDPM_STEPS steps)"
$PY -m gpsr.train experiment=demo stage=ddpm flow_ckpt="$OUT/flow/checkpoints/last.ckpt" \
    stage.module.ema_decay=0.999 trainer.max_steps="$DDPM_STEPS" \
    trainer.enable_progress_bar=false hydra.run.dir="$OUT/ddpm"
CKPT="$OUT/ddpm/checkpoints/last.ckpt"

step "3/6 LR noise model for noisy inputs ($NOISE_STEPS steps; used by make demo-trust and sampler.sigma_y)"
$PY -m gpsr.train experiment=demo stage=noise trainer.max_steps="$NOISE_STEPS" data.batch_size=32 \
    stage.module.optimizer.lr=1e-3 trainer.enable_progress_bar=false hydra.run.dir="$OUT/noise"

step "4/6 evaluation: GPSR 7+1 NFEs, baselines, projection, 4 samples per image"
$PY -m gpsr.evaluate ckpt="$CKPT" sampler.steps=7 sampler.samples=4 sampler.project=true \
    progress=false hydra.run.dir="$OUT/eval"

step "5/6 NFE sweep"
$PY -m gpsr.evaluate -m ckpt="$CKPT" sampler.steps=1,2,4,7,20,100 progress=false \
    baselines='[bicubic,pseudoinverse,flow]' hydra.sweep.dir="$OUT/sweep"

step "6/6 report"
$PY -m gpsr.report "$OUT/sweep"
cat "$OUT/eval/metrics.md"
echo "Outputs: $OUT/ (flow/, ddpm/, noise/, eval/metrics.md, eval/panel.png, sweep/report.md, sweep/report.png)"
