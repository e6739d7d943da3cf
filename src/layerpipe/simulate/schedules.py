"""The schedules, built as per-stage op orders (or choices), and what they achieve.

    >>> from layerpipe.simulate.costs import StageCosts
    >>> c = StageCosts.uniform(4, forward=1.0, backward=2.0)
    >>> r = simulate(c, "1f1b", microbatches=8)
    >>> round(r.bubble, 4) == round(3 / 11, 4)       # (K-1)/(M+K-1)
    True
    >>> simulate(c, "layerpipe", microbatches=8).bubble
    0.0

Schedules (one worker per stage; F forward, B input gradient, W weight gradient, U update):

- `layerpipe`: asynchronous, method.md sec 3 with d_k = 2 S(k): stage k's tick t runs
  F(t-k), then B, W, U of microbatch t-k-d_k. No flush; an update per microbatch.
- `pipedream`: the same with PipeDream's 1F1B timing d_k = S(k) (the gradient is passed on
  within the tick, so a transfer is on the critical loop).
- `gpipe`: per step of M microbatches all forwards, then all backwards, one update (flush).
- `1f1b`: synchronous 1F1B (PipeDream-Flush, torch `Schedule1F1B`): K-1-k warm-up forwards,
  then one forward / one backward, cool-down backwards, one update per step.
- `zb-h1`: zero-bubble-like: 1F1B with the backward split into B and W, W run whenever a
  stage has nothing else to do (greedy), at most K-k microbatches between F and B and at
  most K between F and W on any stage (1F1B's activation memory), one update per step.

Memory per stage = weights + optimizer state + activation bytes x peak microbatches in
flight (from the forward's start to the end of its last backward op, W) + weight history
(asynchronous schedules: `stash` d_k copies of the weights, `ema` one when d_k > 0,
`latest` none; synchronous schedules: none).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from layerpipe.errors import LayerpipeError
from layerpipe.plan.delays import delay_in_updates, stage_delays
from layerpipe.simulate.costs import StageCosts
from layerpipe.simulate.engine import Op, Policy, Simulation, StaticPolicy, Timeline, pipeline_deps

ASYNC_SCHEDULES = ("layerpipe", "pipedream")
SYNC_SCHEDULES = ("gpipe", "1f1b", "zb-h1")
SCHEDULES = ASYNC_SCHEDULES + SYNC_SCHEDULES
WEIGHT_HISTORY = ("stash", "ema", "latest")


def history_copies(strategy: str, delay: int, accumulate: int = 1) -> int:
    """Copies of a stage's weights its weight history holds at a delay of `delay` ticks, with
    one update every `accumulate` ticks (versions count updates: ceil(delay / accumulate))."""
    if strategy == "stash":
        return delay_in_updates(delay, accumulate)
    if strategy == "ema":
        return 1 if delay > 0 else 0
    if strategy in ("latest", "sync"):
        return 0
    raise LayerpipeError(f"unknown weight strategy {strategy!r}; choose one of: {', '.join(WEIGHT_HISTORY)}")


# -- op orders ------------------------------------------------------------------------------------
def async_order(num_stages: int, n: int, delays: list[int], accumulate: int = 1) -> dict[int, list[Op]]:
    """Stage k, tick t: F(t-k), then B, W of microbatch t-k-d_k and, every `accumulate`
    microbatches, U (method.md sec 3)."""
    order: dict[int, list[Op]] = {}
    for k in range(num_stages):
        ops = []
        for t in range(n + k + delays[k]):
            if 0 <= t - k < n:
                ops.append(Op(k, "F", t - k))
            m = t - k - delays[k]
            if 0 <= m < n:
                ops += [Op(k, "B", m), Op(k, "W", m)]
                if (m + 1) % accumulate == 0:
                    ops.append(Op(k, "U", m))
        order[k] = ops
    return order


def gpipe_order(num_stages: int, m: int, steps: int) -> dict[int, list[Op]]:
    order: dict[int, list[Op]] = {k: [] for k in range(num_stages)}
    for k in range(num_stages):
        for s in range(steps):
            mbs = range(s * m, (s + 1) * m)
            order[k] += [Op(k, "F", i) for i in mbs]
            for i in mbs:
                order[k] += [Op(k, "B", i), Op(k, "W", i)]
            order[k].append(Op(k, "U", s))
    return order


def one_f_one_b_order(num_stages: int, m: int, steps: int) -> dict[int, list[Op]]:
    order: dict[int, list[Op]] = {k: [] for k in range(num_stages)}
    for k in range(num_stages):
        warm = min(num_stages - 1 - k, m)
        for s in range(steps):
            base = s * m
            ops = [Op(k, "F", base + i) for i in range(warm)]
            for i in range(m - warm):
                ops += [Op(k, "F", base + warm + i), Op(k, "B", base + i), Op(k, "W", base + i)]
            for i in range(m - warm, m):
                ops += [Op(k, "B", base + i), Op(k, "W", base + i)]
            order[k] += ops + [Op(k, "U", s)]
    return order


class ZeroBubblePolicy(Policy):
    """Greedy ZB-H1-like choice per stage, step by step: a ready B first (oldest), then the
    next F while at most K-k microbatches sit between F and B and at most K between F and W,
    then the oldest pending W; the update once the step's W are done."""

    def __init__(self, num_stages: int, m: int, steps: int) -> None:
        self.k_count, self.m, self.steps = num_stages, m, steps
        self.step = {k: 0 for k in range(num_stages)}
        self.next_f = {k: 0 for k in range(num_stages)}  # microbatches forwarded in this step
        self.fb: dict[int, list[int]] = {k: [] for k in range(num_stages)}  # F done, B not
        self.bw: dict[int, list[int]] = {k: [] for k in range(num_stages)}  # B done, W not
        self.w_done = {k: 0 for k in range(num_stages)}

    def done(self, k: int) -> bool:
        return self.step[k] >= self.steps

    def choose(self, k: int, now: float, sim: Simulation) -> tuple[Op, float] | None:
        base = self.step[k] * self.m
        if self.w_done[k] == self.m:
            return Op(k, "U", self.step[k]), now
        for i in self.fb[k]:  # oldest first
            op = Op(k, "B", base + i)
            if sim.ready_at(op, now):
                return op, now
        held = len(self.fb[k]) + len(self.bw[k])
        if self.next_f[k] < self.m and len(self.fb[k]) < self.k_count - k and held < self.k_count:
            op = Op(k, "F", base + self.next_f[k])
            if sim.ready_at(op, now):
                return op, now
        if self.bw[k]:
            return Op(k, "W", base + self.bw[k][0]), now
        return None

    def commit(self, op: Op) -> None:
        k, kind, idx = op
        i = idx - self.step[k] * self.m
        if kind == "F":
            self.fb[k].append(i)
            self.next_f[k] += 1
        elif kind == "B":
            self.fb[k].remove(i)
            self.bw[k].append(i)
        elif kind == "W":
            self.bw[k].remove(i)
            self.w_done[k] += 1
        else:
            self.step[k] += 1
            self.next_f[k] = self.w_done[k] = 0


# -- results --------------------------------------------------------------------------------------
@dataclass
class SimResult:
    """What one schedule achieves on one set of costs.

    `throughput` is in microbatches per second in steady state (asynchronous: the rate
    stage 0 admits microbatches, fill and drain excluded; synchronous: M / the period of a
    step, flush and update included). `epoch_throughput` counts one run of `microbatches`
    microbatches from an empty pipeline to the last update (asynchronous: fill and drain
    included, as a training epoch that drains does). `bubble` is the share of stage-time
    idle in steady state (imbalance between stages counts as idle)."""

    schedule: str
    num_stages: int
    microbatches: int
    throughput: float
    epoch_throughput: float
    bubble: float
    delays: list[int]
    in_flight: list[int]
    memory: dict[str, list[float]] = field(default_factory=dict)
    """per weight strategy ("sync" for the synchronous schedules): bytes per stage at peak"""
    accumulate: int = 1
    """asynchronous schedules: microbatches per update"""

    def peak_memory(self, strategy: str) -> float:
        return max(self.memory[strategy])

    def to_dict(self) -> dict:
        return {
            "schedule": self.schedule, "stages": self.num_stages, "microbatches": self.microbatches,
            "throughput_microbatches_per_s": self.throughput, "epoch_throughput_microbatches_per_s":
            self.epoch_throughput, "bubble": self.bubble, "delays": self.delays,
            "in_flight": self.in_flight, "memory_bytes": self.memory, "accumulate": self.accumulate,
        }


def peak_in_flight(tl: Timeline, k: int) -> int:
    """Most microbatches whose activations stage k holds at once: from the start of the
    forward to the end of the last backward op (W). A release at the same instant as an
    allocation goes first."""
    events = []
    for op in tl.order[k]:
        if op.kind == "F":
            events.append((tl.start[op], 1))
        elif op.kind == "W":
            events.append((tl.finish[op], -1))
    events.sort(key=lambda e: (e[0], e[1]))
    now = peak = 0
    for _, d in events:
        now += d
        peak = max(peak, now)
    return peak


def _memory(costs: StageCosts, in_flight: list[int], delays: list[int], strategies: tuple[str, ...],
            accumulate: int = 1) -> dict:
    out = {}
    for s in strategies:
        out[s] = [costs.weight_bytes[k] + costs.optimizer_bytes[k] + costs.activation_bytes[k] * in_flight[k]
                  + history_copies(s, delays[k], accumulate) * costs.weight_bytes[k] for k in range(costs.num_stages)]
    return out


def simulate(costs: StageCosts, schedule: str, microbatches: int, steps: int = 3,
             steady_microbatches: int | None = None, accumulate: int = 1) -> SimResult:
    """Simulate `schedule` on `costs` with M = `microbatches` (per step for the synchronous
    schedules; per epoch for the asynchronous ones, whose steady state is measured on a
    longer run of `steady_microbatches`, by default max(6K, 2M, 64)). `accumulate`:
    asynchronous schedules update every A microbatches (the gradients summed in between), as
    the synchronous ones do once per step of M."""
    if schedule not in SCHEDULES:
        raise LayerpipeError(f"unknown schedule {schedule!r}; choose one of: {', '.join(SCHEDULES)}")
    if microbatches < 1:
        raise LayerpipeError(f"need at least one microbatch, got {microbatches}")
    if steps < 1:
        raise LayerpipeError(f"need at least one step, got {steps}")
    if accumulate < 1:
        raise LayerpipeError(f"accumulate must be at least 1 microbatch per update, got {accumulate}")
    K, M = costs.num_stages, int(microbatches)
    deps = pipeline_deps(K, split=schedule == "zb-h1")
    if schedule in ASYNC_SCHEDULES:
        delays = stage_delays(K, schedule)
        A = int(accumulate)
        n = steady_microbatches or max(6 * K, 2 * M, 64, 8 * A)
        n -= n % A  # whole accumulations
        tl = Simulation(costs, StaticPolicy(async_order(K, n, delays, A)), deps).run()
        lo, hi = n // 2 - (n // 2) % A, n - A  # whole accumulations between the two
        period = (tl.start[Op(0, "F", hi)] - tl.start[Op(0, "F", lo)]) / (hi - lo)
        busy = sum(costs.stage_time(k) - costs.update_time(k) * (1 - 1 / A) for k in range(K))
        epoch = Simulation(costs, StaticPolicy(async_order(K, M, delays, A)), deps).run()
        in_flight = [peak_in_flight(tl, k) for k in range(K)]
        memory = _memory(costs, in_flight, delays, WEIGHT_HISTORY, A)
        return SimResult(schedule, K, M, _rate(1, period), _rate(M, epoch.makespan), _bubble(busy, K, period),
                         delays, in_flight, memory, A)
    if schedule == "gpipe":
        policy: Policy = StaticPolicy(gpipe_order(K, M, steps))
    elif schedule == "1f1b":
        policy = StaticPolicy(one_f_one_b_order(K, M, steps))
    else:
        policy = ZeroBubblePolicy(K, M, steps)
    tl = Simulation(costs, policy, deps).run()
    ends = [max(tl.finish[Op(k, "U", s)] for k in range(K)) for s in range(steps)]
    period = (ends[-1] - ends[0]) / (steps - 1) if steps > 1 else ends[0]
    busy = sum(M * (costs.forward[k] + costs.backward_input[k] + costs.backward_weight[k]) + costs.update_time(k)
               for k in range(K))
    in_flight = [peak_in_flight(tl, k) for k in range(K)]
    delays = [0] * K
    return SimResult(schedule, K, M, _rate(M, period), _rate(M, ends[0]), _bubble(busy, K, period), delays,
                     in_flight, _memory(costs, in_flight, delays, ("sync",)))


def _rate(count: float, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def _bubble(busy: float, k: int, period: float) -> float:
    if period <= 0:
        return 0.0
    b = 1.0 - busy / (k * period)
    return 0.0 if abs(b) < 1e-9 else b


def memory_strategy(result: SimResult, weights: str) -> str:
    """The memory key to show for `result`: the weight strategy for asynchronous schedules."""
    return weights if result.schedule in ASYNC_SCHEDULES else "sync"
