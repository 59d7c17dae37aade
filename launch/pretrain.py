"""Pretrain a Llama on C4.

    deepspeed launch/pretrain.py                                   # tiny default, shipped C4 sample
    deepspeed --num_gpus 8 launch/pretrain.py --config configs/blockllm_paper.yaml
    torchrun --nproc_per_node 2 launch/pretrain.py
    python launch/pretrain.py --help
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from scaletrain.trainer import main  # noqa: E402

if __name__ == "__main__":
    main()
