"""Fine-tune a Llama checkpoint: zeroth-order sparse (SensZOQ, `optim.name zo`) or any optimizer of the
registry (adamw, block, galore, ...), on SST-2 by default.

    deepspeed launch/finetune.py --config configs/finetune_zo.yaml --model.path runs/tiny
    torchrun --nproc_per_node 2 launch/finetune.py --config configs/finetune_zo.yaml --model.path runs/tiny
    python launch/finetune.py --model.path out/hf_model --optim.name adamw --optim.lr 1e-4
    python launch/finetune.py --help
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from scaletrain.finetune import main  # noqa: E402

if __name__ == "__main__":
    main()
