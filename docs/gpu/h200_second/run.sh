#!/usr/bin/env bash
# This session's device run: 5.1M-token quality runs (AdamW, block default, block default with 8-bit
# moments; two seeds; fp32) beside the resume and CUDA-test parts of the GPU check, then the speed part.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/gpu.txt 2>&1
python -c "import torch, transformers; print(torch.__version__, transformers.__version__)" >> $OUT/gpu.txt 2>&1
T0=$(date +%s)
timeout 240 python tools/quality_run.py --preset llama_20m --steps 2500 --seeds 0,1 --eval_every 500 \
  --modes adamw,block,block_8bit --data .gpu/wiki-head-1500.jsonl.gz --jobs 6 \
  --out runs/q5m --extra --deepspeed_config ds_configs/fp32.json > $OUT/quality.log 2>&1 &
QPID=$!
python tools/gpu_check.py --parts resume,tests --budget_s 120 --out runs/check_rt > $OUT/check_rt.log 2>&1
wait $QPID; echo "quality exit $? after $(( $(date +%s) - T0 )) s" >> $OUT/quality.log
tar czf $OUT/q5m.tgz --exclude='checkpoints' --exclude='tensorboard' runs/q5m runs/check_rt 2>/dev/null
LEFT=$(( 560 - ($(date +%s) - T0) ))
echo "speed budget $LEFT s" > $OUT/check_speed.log
python tools/gpu_check.py --parts speed --budget_s $LEFT --out runs/check_speed >> $OUT/check_speed.log 2>&1
tar czf $OUT/speed.tgz --exclude='checkpoints' --exclude='tensorboard' runs/check_speed 2>/dev/null
echo "all done after $(( $(date +%s) - T0 )) s" >> $OUT/check_speed.log
