"""Checkpoints: the one front door. The rest of the project imports from here, never a submodule.

    out_dir/checkpoints/step-0000100/   model.safetensors, optimizer.safetensors, rng.safetensors,
                                        trainer_state.json, manifest.json (written last: sizes, sha256)
    out_dir/checkpoints/latest, training_history.json

Inside, each file is one idea, and imports only those above it in this list:

- ``format``: the files, the manifest, writing/reading/verifying, and the three records:
  ``CheckpointInfo`` (what a checkpoint is and where), ``Snapshot`` (its content in host
  memory), ``SaveResult`` (how a write went);
- ``capture``: model, optimizer, scaler and RNG state copied to host buffers, and back;
- ``writer``: the background thread that writes one snapshot at a time;
- ``store``: a run's checkpoints folder: rotation, ``latest``, history, reconcile after a kill;
- ``resume``: which checkpoint a run continues from (--resume auto | PATH) and what it warns;
- ``portable``: a checkpoint as one JSON file, and back, bit for bit.
"""
from trainer.checkpoints.capture import load_checkpoint, save_checkpoint
from trainer.checkpoints.format import (MANIFEST_FILE, MODEL_FILE, OPTIMIZER_FILE, RNG_FILE, STATE_FILE,
                                        CheckpointInfo, SaveResult, Snapshot, read_checkpoint, read_info,
                                        verify_checkpoint)
from trainer.checkpoints.portable import export_json, import_json
from trainer.checkpoints.resume import ResumePlan, plan_resume, precheck_resume, report_resume, resume_notes
from trainer.checkpoints.store import HISTORY_FILE, LATEST_FILE, CheckpointStore, scan

__all__ = [
    # records
    "CheckpointInfo", "SaveResult", "Snapshot",
    # one checkpoint directory
    "MANIFEST_FILE", "MODEL_FILE", "OPTIMIZER_FILE", "RNG_FILE", "STATE_FILE",
    "save_checkpoint", "load_checkpoint", "read_checkpoint", "read_info", "verify_checkpoint",
    # a run's checkpoints folder
    "HISTORY_FILE", "LATEST_FILE", "CheckpointStore", "scan",
    # resuming
    "ResumePlan", "plan_resume", "precheck_resume", "report_resume", "resume_notes",
    # one portable JSON file
    "export_json", "import_json",
]
