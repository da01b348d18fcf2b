"""The names of the files gradlm writes, in one table: a run directory's, and the folders of lr-find and compare.

gradlm/rundir.py writes and reads runs by these names; gradlm/serving/watch.py reads them too and may not import torch,
so the table lives here, importing nothing (but the standard library).
"""

import os
from pathlib import Path

# a run directory (gradlm/rundir.py describes each file)
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
WEIGHTS = "model.safetensors"
BEST = "best.safetensors"
STATE = "state/trainer.pt"
PREVIOUS_STATE = "state/previous.pt"
BEST_STATE = "state/best.pt"
METRICS = "metrics.jsonl"
SAMPLES = "samples.jsonl"
SUMMARY = "summary.json"
TRAINING_PLOT = "plots/training.png"
LOCK = ".lock"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER = "adapter.safetensors"
BEST_ADAPTER = "best_adapter.safetensors"
TRACKERS = "trackers.json"
SNAPSHOTS = "snapshots"  # --snapshots N: the weights at N points of the run, step-NNNNNNN.safetensors (its path)
RUN_MARKERS = (CONFIG, METRICS)  # either one makes a folder a run directory (a run being written has one of them first)

# gradlm lr-find --out DIR, gradlm compare --out DIR
LR_FIND_ROWS, LR_FIND_RESULT = "lr_find.jsonl", "lr_find.json"
COMPARE = "compare.json"


def cache_dir() -> Path:
    """gradlm's cache ($GRADLM_CACHE, default ~/.cache/gradlm): datasets/ (downloaded corpora), prepared/ (tokenised
    text), inductor/ (torch.compile's compiled steps)."""
    return Path(os.environ.get("GRADLM_CACHE") or Path.home() / ".cache" / "gradlm")
