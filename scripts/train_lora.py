"""Train a user's LoRA adapter under ``accelerate launch`` (data-parallel over processes or GPUs).

    accelerate launch scripts/train_lora.py --user alice --concept robo --class-word robot --images photos/
    accelerate launch --multi_gpu --num_processes 2 scripts/train_lora.py ...   # no GPU: 2 CPU processes, gloo

The flags are exactly those of ``bespoke train`` (one definition, in ``demo/cli_train.py``). Every
process loads the base on its own device and trains on its own rows; DDP averages gradients; the
main process writes the registry, and every process prints the record it got.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from demo.cli_train import build_train_parser, process_state, run_train
    from gen.errors import BespokeError

    args = build_train_parser().parse_args(argv)
    try:
        record = run_train(args)
    except BespokeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    state = process_state(args.device)
    # One write per line: launchers run the processes unbuffered, where print() writes the text and the newline
    # separately and two processes' lines can interleave on the shared pipe.
    sys.stdout.write(f"[process {state.process_index + 1}/{state.num_processes}] {record.user}/{record.concept} v{record.version} ({record.sha256[:12]})\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
