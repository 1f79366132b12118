"""Child process of the kill-and-resume test: train, and after step ``STOP_AFTER`` wait to be killed.

``python train_child.py BASE_DIR PHOTOS RUN_DIR READY_FILE STOP_AFTER``. The test imports
:data:`SETTINGS` and :func:`job` from here, so the killed run and the reference runs cannot drift.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

SETTINGS = dict(preset="quick", steps=4, lr=1e-2, checkpoint_every=1, keep_checkpoints=2, num_class_images=2, class_image_steps=2)


def job(photos):
    from adapters.train import TrainJob

    return [TrainJob("carol", "mug", photos, "mug")]


def main(base_dir: str, photos: str, run_dir: str, ready: str, stop_after: str) -> None:
    import torch

    from adapters.train import resolve_config, train_adapters
    from gen.base import load_base

    torch.set_num_threads(1)
    base = load_base(base_dir)
    cfg = resolve_config(base, output_dir=run_dir, **SETTINGS)

    def progress(step, total, info):
        if info["phase"] == "train" and step == int(stop_after):
            Path(ready).write_text(str(step))  # checkpoint-<step> is complete: kill me now
            time.sleep(600)

    train_adapters(base, job(photos), cfg, progress=progress)


if __name__ == "__main__":
    main(*sys.argv[1:])
