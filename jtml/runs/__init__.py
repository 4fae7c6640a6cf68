"""Run management: run directories and their records, checkpoints, data digests, provenance, W&B."""

from jtml.runs.checkpoints import (
    AtomicCheckpointIO,
    LastCheckpointEveryEpoch,
    checkpoint_class_path,
    latest_resumable_run,
    resume_checkpoint,
    sigint_deferred,
)
from jtml.runs.digests import (
    DATA_FILES,
    compare_data,
    data_file_digests,
    data_fingerprint,
    read_data_digests,
    write_data_digests,
)
from jtml.runs.records import (
    CONFIG,
    RUN_RECORD,
    RunInfo,
    config_differences,
    find_run_dirs,
    read_history,
    read_run,
    wandb_run_id,
)

__all__ = [
    "CONFIG",
    "DATA_FILES",
    "RUN_RECORD",
    "AtomicCheckpointIO",
    "LastCheckpointEveryEpoch",
    "RunInfo",
    "checkpoint_class_path",
    "compare_data",
    "config_differences",
    "data_file_digests",
    "data_fingerprint",
    "find_run_dirs",
    "latest_resumable_run",
    "read_data_digests",
    "read_history",
    "read_run",
    "resume_checkpoint",
    "sigint_deferred",
    "wandb_run_id",
    "write_data_digests",
]
