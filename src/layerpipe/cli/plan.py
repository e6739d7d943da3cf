"""`layerpipe plan`: partition a model into stages, show delays, memory and the tick schedule.

    layerpipe plan                                   # default model, 4 balanced stages
    layerpipe plan --layers 6 --stages 1,2,3 --schedule pipedream
    layerpipe plan --model mlp --stages 3 --balance time --json
    layerpipe plan --layers 4 --delays 7,5,3,0 --verify     # exit 0: legal (surplus allowed)
    layerpipe plan --layers 4 --delays 6,4,1,0 --verify     # exit 1: layer 3 (stage 2) needs 2 delays, has 1
    layerpipe plan --layers 4 --png schedule.png
    layerpipe plan --model gpt --stages 8 --model-option n_layer=6 --accumulate 1   # no accumulation

Exit status: 0 plan made (and its delays legal), 1 the delays fail the retiming check,
2 bad input (one line on stderr, printed by `layerpipe.cli.main`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from layerpipe.errors import LayerpipeError, PlanError
from layerpipe.plan.costs import BALANCE_MODES
from layerpipe.plan.delays import SCHEDULES
from layerpipe.plan.partition import parse_stages
from layerpipe.plan.planner import Plan, make_plan, parse_int_list

#: the strategies whose weight-history bytes the plan shows (formulas from their classes)
MEMORY_COLUMNS = ("stash", "ema", "latest")
from layerpipe.plan.retiming import RetimingReport, verify_delays
from layerpipe.schedule import build_schedule, format_grid, save_png

# the model `layerpipe plan` shows without arguments: the first of these the zoo offers
DEFAULT_MODELS = ("cnn1d", "mlp")
DEFAULT_STAGES = 4


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "plan",
        help="partition a model into pipeline stages; show delays, weight-history memory, schedule",
        description="Partition the layers of a model into pipeline stages and show, per layer, the "
        "delay the LayerPipe2 rule gives it (2 S(l) ticks; S(l) for pipedream), the weight "
        "versions and bytes that stash / ema / latest keep, and the tick schedule. Without "
        f"arguments: the default model ({' or '.join(DEFAULT_MODELS)}) in {DEFAULT_STAGES} stages.",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", metavar="NAME", help="a model of the zoo (layerpipe.models.MODEL_NAMES)")
    source.add_argument("--layers", metavar="N", help="plan N anonymous layers (no parameters)")
    parser.add_argument("--model-option", action="append", default=[], metavar="KEY=VALUE",
                        help="builder option of the --model, repeatable, as for `layerpipe train` (e.g. n_layer=6)")
    parser.add_argument(
        "--stages",
        metavar="K|N1,N2,...",
        help="K balanced stages, or the number of layers of each stage (default: one layer per "
        f"stage; {DEFAULT_STAGES} stages for the default model)",
    )
    parser.add_argument(
        "--balance", choices=BALANCE_MODES, default="params",
        help="cost that --stages K balances: parameter count or measured forward+backward time",
    )
    parser.add_argument("--schedule", choices=SCHEDULES, default=None,
                        help="delay rule: layerpipe 2 S(l), pipedream S(l) (default: the model's training recipe, "
                             "pipedream for gpt; layerpipe otherwise)")
    parser.add_argument("--delays", metavar="D0,D1,...", help="your own delay per stage, in ticks")
    parser.add_argument(
        "--verify", action="store_true",
        help="only check the delays with the retiming (exit 0 legal, 1 not, naming the first short layer)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--png", metavar="FILE", help="also draw the tick schedule into a PNG file")
    parser.add_argument(
        "--microbatches", metavar="M", help="microbatches in the schedule view (default: 2 x stages)"
    )
    parser.add_argument(
        "--accumulate", metavar="A",
        help="ticks per weight update (gradient accumulation): the weight versions count updates, "
             "ceil(delay / A) (default: what `layerpipe train --model X` runs at these delays, e.g. 4 for gpt; "
             "1 otherwise)")
    parser.set_defaults(run=run)
    return parser


def _positive_int(text: str, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise PlanError(f"{what} must be a positive integer, got {text!r}") from None
    if value < 1:
        raise PlanError(f"{what} must be a positive integer, got {text!r}")
    return value


def _default_model() -> str:
    from layerpipe.models import MODEL_NAMES  # lazy: the zoo imports torch

    return next((m for m in DEFAULT_MODELS if m in MODEL_NAMES), MODEL_NAMES[0])


def _fmt_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024  # type: ignore[assignment]
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


def _fmt_cost(cost: float, unit: str) -> str:
    if unit == "seconds":
        return f"{cost * 1e3:.3f} ms"
    return f"{cost:,.0f}" if float(cost).is_integer() else f"{cost:.3g}"


def _table(header: list[str], rows: list[list[str]], left: int = 0) -> str:
    """Columns right-aligned, except the first `left` ones."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for r in [header, *rows]:
        cells = [c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _csv(values: list[int]) -> str:
    return ",".join(map(str, values))


def render(plan: Plan, report: RetimingReport, grid: str, microbatches: int) -> str:
    """The human-readable output: layers, stages, totals, retiming verdict, schedule grid."""
    anonymous = not plan.model and not plan.totals()["params"]
    what = (f"model {plan.model}: " if plan.model else "") + f"{plan.num_layers} {'anonymous ' * anonymous}layers"
    how = {
        "params": "balanced by parameters" if plan.cost_unit == "params" else "balanced by layer count",
        "time": "balanced by measured time",
        "costs": "balanced by the given costs",
        "given": "as given",
        "one-per-stage": "one layer per stage",
    }[plan.balance]
    out = [f"{what} in {plan.num_stages} stages ({how}), schedule {plan.schedule}", ""]
    need = plan.delays_given
    header = ["layer", "name", "kind", "stage", "S", "delay", *(["needs"] if need else []), "versions",
              "params", *plan.strategies]
    rows = [
        [str(l.index + 1), l.name, l.kind, str(l.stage), str(l.downstream_stages), str(l.delay),
         *([str(l.required_delay)] if need else []), str(l.stash_versions), f"{l.params:,}",
         *(_fmt_bytes(l.bytes[s]) for s in plan.strategies)]
        for l in plan.layers
    ]
    out += [_table(header, rows, left=3), ""]
    header = ["stage", "layers", "S", "delay", *(["needs"] if need else []), "versions", "params",
              f"cost ({plan.cost_unit})", *plan.strategies]
    rows = []
    for s in plan.stages:
        span = f"{s.layers[0] + 1}" if len(s.layers) == 1 else f"{s.layers[0] + 1}-{s.layers[-1] + 1}"
        rows.append([str(s.stage), span, str(s.downstream_stages), str(s.delay),
                     *([str(s.required_delay)] if need else []), str(s.stash_versions), f"{s.params:,}",
                     _fmt_cost(s.cost, plan.cost_unit), *(_fmt_bytes(s.bytes[k]) for k in plan.strategies)])
    t = plan.totals()
    rows.append(["total", str(t["num_layers"]), "", "", *([""] if need else []), str(t["stash_versions"]),
                 f"{t['params']:,}", "max " + _fmt_cost(t["bottleneck_cost"], plan.cost_unit),
                 *(_fmt_bytes(t["bytes"][k]) for k in plan.strategies)])
    out += [_table(header, rows, left=2), ""]
    unit = "2 S" if plan.schedule == "layerpipe" else "S"
    kept = ("old weights exact stashing keeps" if plan.accumulate == 1 else
            f"old weights exact stashing keeps, one per update: ceil(delay / {plan.accumulate}) "
            f"(gradients of {plan.accumulate} ticks make one update)")
    out.append(f"S: stages downstream; delay: ticks from a forward to the update with its gradient "
               f"({unit} for {plan.schedule}); versions: {kept}")
    out.append(f"weights {_fmt_bytes(t['param_bytes'])}; weight history: stash versions x weights per stage, "
               "ema one buffer per delayed stage, latest none")
    out.append(f"retiming: {report.message()}")
    out += ["", f"tick schedule ({microbatches} microbatches; F forward, B backward + update):", grid]
    return "\n".join(out)


def render_verify(report: RetimingReport) -> str:
    """The --verify output when the delays are legal."""
    regs = report.registers()
    given, required = report.delays, report.required
    lines = [report.message(), f"delays per layer {_csv(given)}; required {_csv(required)}"]
    if any(report.surplus):
        lines.append(f"surplus {_csv(report.surplus)} stays on the gradient->update edges (the gradient waits "
                     "that many ticks before its update)")
    lines.append(f"registers after retiming: forward {_csv(regs['forward']) or '-'}; "
                 f"backward {_csv(regs['backward']) or '-'}; label {regs['label']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.png:
        from layerpipe.errors import require

        require("matplotlib", "plots", "plan --png")
    if args.png and not Path(args.png).resolve().parent.is_dir():
        # fail before planning (and before importing matplotlib), not after
        raise LayerpipeError(f"cannot write {args.png}: no such directory")
    if args.model is None and args.layers is None:
        source: str | int = _default_model()
        stages = parse_stages(args.stages) if args.stages is not None else DEFAULT_STAGES
    else:
        source = args.model if args.model is not None else _positive_int(args.layers, "--layers")
        stages = parse_stages(args.stages)
    if args.model_option and not isinstance(source, str):
        raise LayerpipeError("--model-option needs --model")
    from layerpipe.cli.common import parse_model_options

    model_options = parse_model_options(args.model_option)
    delays = parse_int_list(args.delays, "--delays") if args.delays is not None else None
    given_mb = _positive_int(args.microbatches, "--microbatches") if args.microbatches is not None else None
    from layerpipe.weights import memory_formulas  # lazy: torch

    schedule = args.schedule
    if schedule is None:  # what `layerpipe train --model X` would run
        from layerpipe.training.config import recipe  # lazy: torch

        schedule = recipe(source)["schedule"] if isinstance(source, str) else "layerpipe"
    accumulate: Any = 1
    if args.accumulate is not None:
        accumulate = _positive_int(args.accumulate, "--accumulate")
    elif isinstance(source, str):  # the recipe's, at the plan's delays
        from layerpipe.training.config import TrainConfig  # lazy: torch

        accumulate = TrainConfig(model=source).accumulation
    plan = make_plan(source, stages, schedule, balance=args.balance, delays=delays,
                     memory=memory_formulas(MEMORY_COLUMNS), accumulate=accumulate, model_options=model_options)
    report = verify_delays(plan.stage_sizes, plan.stage_delays, plan.schedule)
    microbatches = given_mb or 2 * plan.num_stages
    ticks = build_schedule(plan.num_stages, microbatches, plan.stage_delays)
    if args.png:
        try:
            path = save_png(ticks, plan.num_stages, args.png, title=f"{plan.schedule}: delays {_csv(plan.stage_delays)}")
        except OSError as exc:
            raise LayerpipeError(f"cannot write {args.png}: {exc.strerror or exc}") from None
        print(f"schedule chart written to {path}", file=sys.stderr)
    status = 0 if report.legal else 1

    if args.json:
        doc = plan.to_dict()
        doc["retiming"] = report.to_dict()
        doc["tick_schedule"] = {
            "microbatches": microbatches,
            "delays": plan.stage_delays,
            "ticks": [[str(a) for a in ticks[t]] for t in sorted(ticks)],
        }
        print(json.dumps(doc, indent=2))
    elif args.verify:
        # the verdict is the output: one line naming the first short layer, or the summary
        print(render_verify(report) if report.legal else report.message())
    else:
        print(render(plan, report, format_grid(ticks, plan.num_stages), microbatches))
    return status
