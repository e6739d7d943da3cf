"""`layerpipe export RUN_DIR --out model.pt`: the model of a run's committed checkpoint as one
plain state_dict.

The checkpoint holds one file per stage (replica 0's: the replicas of a stage are identical);
their module states are verified against the marker's SHA-256s and merged, so that
`model.load_state_dict(torch.load("model.pt"))` works on the model the run trained, in one
process.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="merge a run's checkpoint into one state_dict file",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run folder (with checkpoint.json)")
    p.add_argument("--out", required=True, metavar="FILE", help="where to write the state_dict (atomically)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from layerpipe.report.records import atomic_torch_save
    from layerpipe.training.checkpoint import model_state_dict, read_marker

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        from layerpipe.errors import LayerpipeError

        raise LayerpipeError(f"{run_dir} is not a folder")
    marker = read_marker(run_dir)
    state = model_state_dict(run_dir)
    atomic_torch_save(state, args.out)
    print(f"{args.out}: {len(state)} tensors from epoch {marker['epoch']} "
          f"({marker['stages']} stage file(s), saved with {marker.get('dp', 1)} replica(s) per stage)")
    return 0
