"""`layerpipe simulate`: predicted throughput, bubble and memory of pipeline schedules.

    layerpipe simulate --stages 2,4,8 --microbatches 8 --forward 1.0 --backward 2.0
    layerpipe simulate --stages 8,16,32 --forward 0.76e-3 --backward 1.52e-3 --whole-model --png sim.png
    layerpipe simulate --profile mlp --stages 2,3 --microbatches 4,8 --json -
    layerpipe simulate --times times.json --stages 4                 # costs from a file

Times are seconds per microbatch per stage (any unit: throughput is then per that unit);
a comma list gives one value per stage (only with a single K). Exit status: 0, or 2 for
bad input (one line on stderr, printed by `layerpipe.cli.main`).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

from layerpipe.errors import LayerpipeError

SCHEDULE_NAMES = ("layerpipe", "pipedream", "gpipe", "1f1b", "zb-h1")  # = simulate.SCHEDULES
DEFAULT_STAGES = "2,4,8,16,32"
TIME_KEYS = ("forward", "backward", "weight_grad", "update", "transfer")
BYTE_KEYS = ("weight_bytes", "optimizer_bytes", "activation_bytes")
DEFAULTS: dict[str, Any] = {"forward": 1.0, "backward": 2.0, "weight_grad": None, "update": 0.0, "transfer": 0.0,
                            "weight_bytes": float(1 << 20), "optimizer_bytes": None, "activation_bytes": float(1 << 20)}
_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 1 << 10, "mib": 1 << 20,
          "gib": 1 << 30, "tib": 1 << 40}


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "simulate",
        help="predict throughput, bubble and peak memory of pipeline schedules from per-stage times",
        description="Simulate, as an event-driven list schedule with one worker per stage, the asynchronous "
        "LayerPipe pipeline (delays 2 S(k): 'layerpipe'; PipeDream's S(k): 'pipedream') against the synchronous "
        "GPipe, 1F1B (PipeDream-Flush, torch Schedule1F1B) and a zero-bubble ZB-H1-like schedule (backward split "
        "into input gradient B and weight gradient W, W filling the bubbles). For every K and M it prints "
        "throughput, bubble (share of stage-time idle) and peak memory per stage = weights + optimizer state + "
        "activations x microbatches in flight + weight history (stash: d_k copies, ema: one when d_k > 0, "
        "latest: none). Costs come from flags, from --times FILE, or are measured with --profile MODEL.",
        epilog="Flags given explicitly override --times; --profile measures every time and byte count itself "
        "(only --transfer and --update may override it). Units: seconds and bytes; sizes accept KB, MB, GB, "
        "KiB, MiB, GiB.",
    )
    g = parser.add_argument_group("pipeline")
    g.add_argument("--stages", metavar="K1,K2,...", default=DEFAULT_STAGES,
                   help=f"numbers of stages K to simulate (default {DEFAULT_STAGES}; 1 to 64 each)")
    g.add_argument("--microbatches", metavar="M1,M2,...", default="8",
                   help="microbatches M per step of the synchronous schedules, and per epoch (fill and drain "
                   "included) for the asynchronous ones' epoch throughput in --json (default 8)")
    g.add_argument("--schedules", metavar="S1,S2,...", default=",".join(SCHEDULE_NAMES),
                   help=f"schedules to simulate (default all: {', '.join(SCHEDULE_NAMES)})")
    g.add_argument("--accumulate", type=int, default=1, metavar="A",
                   help="the asynchronous schedules update once every A microbatches, their gradients summed "
                   "(as `accumulate:every=A` or --max-stale-samples in training; A = M: the samples per update "
                   "of the synchronous schedules at M). Default 1: an update per microbatch")
    g.add_argument("--weights", choices=("stash", "ema", "latest"), default="ema",
                   help="weight history the asynchronous schedules keep, for the memory columns (default ema); "
                   "--json gives all three")
    t = parser.add_argument_group("per-stage times (seconds per microbatch; a comma list: one per stage)")
    t.add_argument("--forward", metavar="T", help="forward time F_k (default 1.0)")
    t.add_argument("--backward", metavar="T",
                   help="whole backward time B_k + W_k: input gradient plus weight gradient (default 2.0)")
    t.add_argument("--weight-grad", dest="weight_grad", metavar="T",
                   help="the weight-gradient part W_k of --backward (default half of it); only zb-h1 schedules "
                   "it apart, the others send the input gradient after the whole backward")
    t.add_argument("--update", metavar="T", help="optimizer step U_k (default 0)")
    t.add_argument("--transfer", metavar="T",
                   help="time to move one activation or gradient across a stage boundary (default 0; a comma "
                   "list: one per boundary, K-1 values)")
    t.add_argument("--whole-model", dest="whole_model", action="store_true",
                   help="the given times and byte counts are the whole model's: each of K stages gets 1/K "
                   "(a perfectly balanced partition); --transfer stays per boundary")
    m = parser.add_argument_group("memory (bytes per stage; with --whole-model, of the whole model)")
    m.add_argument("--weight-bytes", dest="weight_bytes", metavar="BYTES",
                   help="weights (default 1MiB, so that memory reads in units of the weights)")
    m.add_argument("--optimizer-bytes", dest="optimizer_bytes", metavar="BYTES",
                   help="optimizer state (default = --weight-bytes: SGD momentum; Adam: 2x)")
    m.add_argument("--activation-bytes", dest="activation_bytes", metavar="BYTES",
                   help="activations one microbatch keeps for its backward (default 1MiB)")
    d = parser.add_argument_group("data-parallel replicas (an all-reduce added to every update)")
    d.add_argument("--replicas", type=int, default=1, metavar="R",
                   help="data-parallel replicas of each stage (default 1: no all-reduce); the all-reduce of a "
                   "stage's gradients costs latency + 2 (R-1)/R x weight bytes / bandwidth (ring)")
    d.add_argument("--allreduce-latency", dest="allreduce_latency", type=float, default=0.0, metavar="S",
                   help="seconds per all-reduce (default 0)")
    d.add_argument("--allreduce-bandwidth", dest="allreduce_bandwidth", metavar="BYTES_PER_S",
                   help="all-reduce bandwidth in bytes/s, e.g. 100GB (needed with --replicas > 1)")
    s = parser.add_argument_group("sources and outputs")
    s.add_argument("--times", metavar="FILE",
                   help="JSON with any of forward, backward, weight_grad, update, transfer, weight_bytes, "
                   "optimizer_bytes, activation_bytes (a number or a per-stage list), whole_model (true/false); "
                   "or {\"stages\": {\"K\": {...}}} per K, as --json writes under \"costs\"")
    s.add_argument("--profile", metavar="MODEL",
                   help="measure per-stage forward, backward (B and W), update, transfer and bytes of a zoo model "
                   "split into K stages (balanced by parameters), one thread, a few repeats (imports torch)")
    s.add_argument("--profile-repeats", dest="profile_repeats", type=int, default=5, metavar="N",
                   help="timed repeats per measurement with --profile (median; default 5)")
    s.add_argument("--batch", type=int, metavar="B",
                   help="samples per microbatch: throughput in samples/s (default 1: microbatches/s); the "
                   "microbatch --profile measures (default 32)")
    s.add_argument("--samples-factor", dest="samples_factor", type=float, default=1.0, metavar="X",
                   help="samples an asynchronous (delayed-gradient) run needs per sample of synchronous training "
                   "to reach the same quality; adds an 'effective' column = throughput / X for layerpipe and "
                   "pipedream (default 1.0: no penalty; measured elsewhere)")
    s.add_argument("--json", metavar="FILE|-", help="write every result (and the costs used) as JSON; - for stdout")
    s.add_argument("--png", metavar="FILE", help="draw throughput and bubble against K into a PNG file")
    parser.set_defaults(run=run)
    return parser


def parse_size(text: str | float, what: str) -> float:
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        match = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([A-Za-z]*)\s*", str(text))
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise LayerpipeError(f"{what}: cannot read {text!r} as a size (a number, optionally KB, MB, GB, KiB, MiB, GiB)")
        try:
            value = float(match.group(1)) * _UNITS[unit]
        except ValueError:
            raise LayerpipeError(f"{what}: cannot read {text!r} as a size") from None
    if not math.isfinite(value) or value < 0:
        raise LayerpipeError(f"{what} must be finite and >= 0, got {text!r}")
    return value


def _int_list(text: str, what: str, lo: int = 1, hi: int | None = None) -> list[int]:
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise LayerpipeError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values or any(v < lo or (hi is not None and v > hi) for v in values):
        raise LayerpipeError(f"{what} must be integers from {lo}{f' to {hi}' if hi else ''}, got {text!r}")
    return values


def _values(raw: Any, what: str, size: bool = False) -> float | list[float]:
    """A number or a per-stage list, from a flag's text or a JSON value."""
    items = raw if isinstance(raw, list) else (str(raw).split(",") if isinstance(raw, str) else [raw])
    out = []
    for item in items:
        if size:
            out.append(parse_size(item, what))
            continue
        try:
            v = float(item)
        except (TypeError, ValueError):
            raise LayerpipeError(f"{what} must be a number or comma-separated numbers, got {raw!r}") from None
        if not math.isfinite(v) or v < 0:
            raise LayerpipeError(f"{what} must be finite and >= 0, got {raw!r}")
        out.append(v)
    return out[0] if len(out) == 1 and not isinstance(raw, list) else out


def _load_times(path: str) -> dict[str, Any]:
    try:
        doc = json.loads(Path(path).read_text())
    except OSError as exc:
        raise LayerpipeError(f"cannot read --times {path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise LayerpipeError(f"--times {path} is not JSON: {exc.msg} (line {exc.lineno})") from None
    if not isinstance(doc, dict):
        raise LayerpipeError(f"--times {path} must hold a JSON object")
    if "costs" in doc and isinstance(doc["costs"], dict):  # the --json output of an earlier run
        doc = {"stages": doc["costs"]}
    return doc


def _normalise(d: dict[str, Any], where: str) -> dict[str, Any]:
    """The keys of a --times object; backward_input + backward_weight (as --json writes) become
    backward + weight_grad."""
    d = dict(d)
    d.pop("meta", None)
    d.pop("allreduce", None)
    if "backward_input" in d or "backward_weight" in d:
        bi, bw = d.pop("backward_input", 0.0), d.pop("backward_weight", 0.0)
        bi_l, bw_l = (bi if isinstance(bi, list) else [bi]), (bw if isinstance(bw, list) else [bw])
        if len(bi_l) != len(bw_l):
            raise LayerpipeError(f"{where}: backward_input and backward_weight differ in length")
        total = [float(a) + float(b) for a, b in zip(bi_l, bw_l)]
        d["backward"], d["weight_grad"] = (total, bw_l) if isinstance(bi, list) else (total[0], bw_l[0])
    unknown = sorted(set(d) - set(TIME_KEYS) - set(BYTE_KEYS) - {"whole_model"})
    if unknown:
        raise LayerpipeError(f"{where}: unknown key {unknown[0]!r}; known: {', '.join(TIME_KEYS + BYTE_KEYS)}, "
                             "whole_model")
    return d


def costs_for(args: argparse.Namespace, k: int, times: dict[str, Any] | None) -> Any:
    """The StageCosts of K = k stages from --profile, or flags over --times over defaults."""
    from layerpipe.simulate.costs import AllReduce, StageCosts

    allreduce = None
    if args.replicas > 1:
        if args.allreduce_bandwidth is None:
            raise LayerpipeError("--replicas > 1 needs --allreduce-bandwidth")
        allreduce = AllReduce(args.allreduce_latency, parse_size(args.allreduce_bandwidth, "--allreduce-bandwidth")
                              or math.inf, 2 * (args.replicas - 1) / args.replicas)
    if args.profile:
        from layerpipe.simulate.profile import profile_model

        c = profile_model(args.profile, k, batch=args.batch or 32, repeats=args.profile_repeats)
        over: dict[str, Any] = {}
        for key, n in (("transfer", k - 1), ("update", k)):
            raw = getattr(args, key)
            if raw is not None:
                v = _values(raw, f"--{key}")
                v = tuple(v) if isinstance(v, list) else (v,) * n
                if len(v) != n:
                    raise LayerpipeError(f"--{key}: {len(v)} values given for {n} {'boundaries' if n == k - 1 else 'stages'}")
                over[key] = v
        if over or allreduce:
            import dataclasses

            c = dataclasses.replace(c, allreduce=allreduce, **over)
        return c
    values: dict[str, Any] = {}
    whole = args.whole_model
    if times:
        block = times
        if "stages" in times:
            per_k = times["stages"]
            if not isinstance(per_k, dict) or str(k) not in per_k:
                raise LayerpipeError(f"--times has no costs for K={k} (it has K={', '.join(map(str, per_k))})")
            block = per_k[str(k)]
        block = _normalise(block, f"--times (K={k})")
        whole = whole or bool(block.pop("whole_model", False))
        for key, raw in block.items():
            values[key] = _values(raw, f"--times {key}", size=key in BYTE_KEYS)
    for key in TIME_KEYS + BYTE_KEYS:
        raw = getattr(args, key)
        if raw is not None:
            values[key] = _values(raw, f"--{key.replace('_', '-')}", size=key in BYTE_KEYS)
        elif key not in values:
            values[key] = DEFAULTS[key]
    if values["optimizer_bytes"] is None:
        values["optimizer_bytes"] = values["weight_bytes"]
    meta = {"source": "times file" if times else "flags", "whole_model": whole}
    if whole:
        if any(isinstance(values[key], list) for key in values if key != "transfer"):
            raise LayerpipeError("--whole-model takes one number per quantity, not per-stage lists")
        return StageCosts.split_whole(k, allreduce=allreduce, meta=meta, **values)
    return StageCosts.make(k, allreduce=allreduce, meta=meta, **values)


def run(args: argparse.Namespace) -> int:
    from layerpipe.simulate.report import render_table, save_png, sweep
    from layerpipe.simulate.schedules import SCHEDULES

    if args.png:
        from layerpipe.errors import require

        require("matplotlib", "plots", "simulate --png")
    for flag in ("png", "json"):
        path = getattr(args, flag)
        if path and path != "-" and not Path(path).resolve().parent.is_dir():
            raise LayerpipeError(f"cannot write {path}: no such directory")
    stages = _int_list(args.stages, "--stages", 1, 64)
    microbatches = _int_list(args.microbatches, "--microbatches", 1, 4096)
    schedules = [s.strip() for s in args.schedules.split(",") if s.strip()]
    bad = [s for s in schedules if s not in SCHEDULES]
    if bad or not schedules:
        raise LayerpipeError(f"unknown schedule {bad[0] if bad else args.schedules!r}; choose from: {', '.join(SCHEDULES)}")
    if args.batch is not None and args.batch < 1:
        raise LayerpipeError(f"--batch must be a positive integer, got {args.batch}")
    if not (args.samples_factor > 0 and math.isfinite(args.samples_factor)):
        raise LayerpipeError(f"--samples-factor must be a positive number, got {args.samples_factor}")
    if args.accumulate < 1:
        raise LayerpipeError(f"--accumulate must be at least 1 microbatch per update, got {args.accumulate}")
    if args.replicas < 1:
        raise LayerpipeError(f"--replicas must be >= 1, got {args.replicas}")
    if args.profile_repeats < 1:
        raise LayerpipeError(f"--profile-repeats must be >= 1, got {args.profile_repeats}")
    if args.profile:
        clash = [f"--{k.replace('_', '-')}" for k in ("forward", "backward", "weight_grad", *BYTE_KEYS)
                 if getattr(args, k) is not None] + (["--times"] if args.times else []) + \
                (["--whole-model"] if args.whole_model else [])
        if clash:
            raise LayerpipeError(f"--profile measures the costs itself; drop {', '.join(clash)}")
    times = _load_times(args.times) if args.times else None
    costs = {k: costs_for(args, k, times) for k in stages}
    results = sweep(costs.__getitem__, stages, microbatches, schedules, args.accumulate)
    batch = args.batch or 1
    if args.png:
        try:
            path = save_png(results, args.png, batch=batch, title="SIMULATED" + (f": {args.profile}" if args.profile else ""))
        except OSError as exc:
            raise LayerpipeError(f"cannot write {args.png}: {exc.strerror or exc}") from None
        print(f"chart written to {path}", file=sys.stderr)
    if args.json:
        doc = {"simulated": True, "samples_per_microbatch": batch, "samples_factor": args.samples_factor,
               "accumulate": args.accumulate,
               "weights": args.weights, "results": [r.to_dict() for r in results],
               "costs": {str(k): c.to_dict() for k, c in costs.items()}}
        text = json.dumps(doc, indent=2)
        if args.json == "-":
            print(text)
            return 0
        try:
            Path(args.json).write_text(text + "\n")
        except OSError as exc:
            raise LayerpipeError(f"cannot write {args.json}: {exc.strerror or exc}") from None
        print(f"results written to {args.json}", file=sys.stderr)
    print(render_table(results, args.weights, batch=batch, samples_factor=args.samples_factor))
    if args.replicas > 1:  # the table is one replica's pipeline; the replicas run side by side
        print(f"data parallelism: {args.replicas} replicas of the pipeline (K x {args.replicas} devices); samples/s "
              f"above is one replica's, each update including its all-reduce: the whole run does "
              f"{args.replicas} x that.")
    return 0
