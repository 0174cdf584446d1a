"""Training: `python -m launch CONFIG.yaml` or `accelerate launch [flags] -m launch CONFIG.yaml`.

    train.py          setup() → main() → fit(), with validate(), get_lr() and train_step() beside them
    environment.py    the Accelerator, the world size check, the run-folder lock, the environment report
    checkpointing.py  what every process does to save and restore a checkpoint (gpt/checkpoint.py
                      owns the format, the pointers and the pruning)
    flops.py          the GPUs' peak FLOP/s, for MFU
    metrics.py        metrics.jsonl, appended while training and trimmed on resume
    console.py        the live console of the main process
"""


class TrainingError(RuntimeError):
    """Training cannot go on. The message says why and what to do."""
