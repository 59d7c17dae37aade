"""Checkpoints that survive a crash at any moment, and find the newest good one on resume.

Layout (`<run_dir>/checkpoints/`):

    step_00000100/
        dcp/                     torch.distributed.checkpoint (DCP): every rank writes its own
            __<rank>_0.distcp    part of the weights ("model/<name>") and optimizer state
            .metadata            ("optim/..."); replicated tensors (weights at ZeRO <= 2) are
                                 written once (DCP's dedup spreads them over the ranks), FSDP2
                                 DTensors and block-optimizer state (by its owner) sharded
        rng_rank00000.pt         torch / numpy / python RNG states of that rank
        trainer.pt               step, LR-schedule state, data-loader position, optimizer
                                 metadata (kind, param groups, block selection): global, small
        config.yaml, ds_config.json
        manifest.json            written last inside the directory: sha256 and size of every file
    latest                       name of the newest committed checkpoint, replaced atomically

A save writes into `.tmp-step_...`; each rank hashes the files it wrote and sends that short
list to rank 0, which writes the manifest, renames the directory into place (atomic on POSIX),
then replaces `latest`. A crash before the rename leaves only a `.tmp-*` directory, which resume
ignores; a crash after it leaves a complete checkpoint. On resume every candidate is verified
against its manifest (each rank hashes a share of the files); a bad one is named in the log and
the previous complete one is used. At load each rank reads only the tensors it needs (DCP
reshards to the new world size and backend); no collective is needed. Dense AdamW under
DeepSpeed ZeRO-1/2 keeps a contiguous range of the flattened parameters on each rank: each rank
saves its range of each parameter's state as a piece of its own ("<key>@<start>-<stop>",
pieces.py), and a resuming rank reads only the pieces (or, from another backend's checkpoint, the
saved chunks: row_reads.py) that overlap its range, one parameter at a time; every other reader
gets whole tensors assembled from the pieces.

Modules: files.py (format, errors, durable writes, RNG), save.py (write and commit, background
saver), load.py (verify, find, read), pieces.py (dense state saved as element ranges),
row_reads.py (part of a saved tensor), state.py (model and optimizer state by name).
"""
from scaletrain.checkpoint.files import (DCP_DIR, FORMAT_VERSION, PAUSE_BEFORE_COMMIT_ENV, STEP_DIR,  # noqa: F401
                                         CheckpointError, CheckpointFormatError, rng_state, set_rng_state)
from scaletrain.checkpoint.load import (SavedState, find_checkpoint, load_model_state, load_rng_state,  # noqa: F401
                                        load_trainer_state, verify)
from scaletrain.checkpoint.save import AsyncCheckpointer, save_checkpoint  # noqa: F401
from scaletrain.checkpoint.state import (dense_optimizer_fragments, model_shard, optimizer_shard,  # noqa: F401
                                         restore_model, restore_optimizer)
