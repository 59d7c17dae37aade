#!/usr/bin/env bash
# Device run 2: profile 3 steps of AdamW and the block default at llama_350m bf16; the CUDA tests
# with bitsandbytes and galore-torch importable (copied beside the repo: the image has neither).
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
T0=$(date +%s)
for mode in adamw block; do
  timeout 100 python .gpu/prof_steps.py $OUT/prof_$mode -- --run_dir runs/prof_$mode --model.preset llama_350m \
    --deepspeed_config ds_configs/gpu_bf16.json --data.tokenizer llama32k --train.steps 12 --train.log_every 4 \
    --train.warmup_steps 0 --train.eval_windows 2 --checkpoint.every_steps -1 --optim.name $mode > $OUT/prof_$mode.log 2>&1
  rm -f $OUT/prof_$mode.json
  echo "$mode done at $(( $(date +%s) - T0 )) s" >> $OUT/times.txt
done
PYTHONPATH=$PWD:$PWD/.gpu/site timeout 150 python -m pytest -m cuda -q -p no:cacheprovider tests > $OUT/pytest_cuda_bnb.log 2>&1
echo "tests done at $(( $(date +%s) - T0 )) s" >> $OUT/times.txt
PYTHONPATH=$PWD:$PWD/.gpu/site timeout 40 python - > $OUT/codec.txt 2>&1 <<'PY'
import time, torch
from scaletrain.optim import quant8
x = torch.randn(32000 * 1024, device="cuda").abs() * 1e-3
for name, q, dq in (("bitsandbytes", quant8.quantize, quant8.dequantize), ("torch", quant8.quantize_torch, quant8.dequantize_torch)):
    for _ in range(3): c, a = q(x, False); y = dq(c, a, False)
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(20): c, a = q(x, False); y = dq(c, a, False)
    torch.cuda.synchronize(); print(name, "quantize+dequantize of 32.8M values: %.2f ms" % ((time.perf_counter() - t) / 20 * 1e3))
PY
