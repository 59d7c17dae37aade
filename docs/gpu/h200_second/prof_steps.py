"""Profile a few steps of launch/pretrain.py (throwaway, device session): python .gpu/profile.py OUT_PREFIX -- trainer args"""
import runpy
import sys

import torch
from torch.profiler import ProfilerActivity, profile, schedule


import scaletrain.distributed.engines as engines

out = sys.argv[1]
args = sys.argv[sys.argv.index("--") + 1:]
acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
prof = profile(activities=acts, schedule=schedule(wait=6, warmup=2, active=3), record_shapes=False)
for cls in (engines.SingleEngine, engines.DeepSpeedEngine):
    orig = cls.train_step

    def wrapped(self, *a, _orig=orig, **k):
        r = _orig(self, *a, **k)
        prof.step()
        return r
    cls.train_step = wrapped
prof.start()
sys.argv = ["launch/pretrain.py"] + args
try:
    runpy.run_path("launch/pretrain.py", run_name="__main__")
finally:
    prof.stop()
key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
with open(out + ".txt", "w") as f:
    f.write(prof.key_averages().table(sort_by=key, row_limit=45) + "\n")
    f.write(prof.key_averages().table(sort_by="cpu_time_total", row_limit=30) + "\n")
prof.export_chrome_trace(out + ".json")
