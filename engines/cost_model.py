"""The forward-cost model: seconds of one denoiser call of each expert as a
function of its batch rows, from measurements (no tensors here).

A backend times every expert at each batch bucket during warm-up, several
calls per bucket (`Backend.warmup` -> `Backend.cost_model()`); the engine
gives the model to the scheduler (which batches where a row is cheapest) and
to the row budget, and `ediffi bench engine` divides its throughput by the
compute limit of the same model (`CostModel.compute_limit`).

Per expert the model keeps:

- the measured points: the median of the timings at each bucket (a shared
  machine's outliers do not move a median), made non-decreasing in rows
  (a call of more rows never costs less; where noise says otherwise the
  pooled mean of the violators is used, isotonic regression), and
  interpolated linearly between buckets (the torch backend runs the exact
  row count; static-shape runtimes pad to a bucket, which this slightly
  underestimates);
- the least-squares line ``seconds = fixed + per_row * rows`` through the
  same points: what a call costs before its first row (kernel launches,
  Python, OpenMP barriers) and what each row adds. It extrapolates beyond
  the largest bucket and is what `--profile` prints.

The cheapest batch per row (`best_rows`) comes from the points, not the
line: on a CPU a 64 px network can get dearer per row past 8 rows (the
activations leave the cache), which no straight line shows.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

ExpertId = tuple[str, str]  # (stage, expert)


def _isotonic(values: Sequence[float]) -> list[float]:
    """Pool adjacent violators: the closest non-decreasing sequence (least squares)."""
    blocks: list[list[float]] = []  # [sum, count]
    for v in values:
        blocks.append([v, 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            s, c = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += c
    out: list[float] = []
    for s, c in blocks:
        out += [s / c] * int(c)
    return out


def _line(rows: Sequence[int], seconds: Sequence[float]) -> tuple[float, float]:
    """Least-squares fixed + per_row * rows (both clamped at >= 0)."""
    if len(rows) == 1:
        return 0.0, seconds[0] / rows[0]
    n = len(rows)
    mx, my = sum(rows) / n, sum(seconds) / n
    sxx = sum((x - mx) ** 2 for x in rows)
    slope = sum((x - mx) * (y - my) for x, y in zip(rows, seconds)) / sxx if sxx else 0.0
    slope = max(slope, 0.0)
    return max(my - slope * mx, 0.0), slope


@dataclass(frozen=True)
class ExpertCost:
    """Seconds of one call of one expert versus its batch rows."""

    rows: tuple[int, ...]  # measured batch sizes, increasing
    seconds: tuple[float, ...]  # smoothed (median, non-decreasing) seconds per call at `rows`
    fixed_s: float  # the fitted line's intercept: a call's cost before its first row
    per_row_s: float  # the fitted line's slope: what each row adds
    samples: int = 1  # timings behind each point

    @classmethod
    def from_timings(cls, timings: Mapping[int, Sequence[float] | float]) -> ExpertCost:
        """From {rows: [seconds of several calls]} (or one number per size)."""
        points = sorted(
            (int(r), statistics.median(t) if isinstance(t, (list, tuple)) else float(t))
            for r, t in timings.items()
            if (t if not isinstance(t, (list, tuple)) else len(t)) and int(r) >= 1
        )
        if not points:
            raise ValueError("no timings")
        rows = tuple(r for r, _ in points)
        seconds = tuple(max(s, 1e-9) for s in _isotonic([s for _, s in points]))
        fixed, per_row = _line(rows, seconds)
        counts = [len(t) for t in timings.values() if isinstance(t, (list, tuple))]
        return cls(rows, seconds, fixed, per_row, min(counts) if counts else 1)

    @classmethod
    def affine(cls, fixed_s: float, per_row_s: float, rows: Iterable[int] = (1, 2, 4, 8, 16)) -> ExpertCost:
        """A synthetic expert: exactly fixed + per_row * rows (tests, simulations)."""
        rows = tuple(sorted(rows))
        return cls(rows, tuple(fixed_s + per_row_s * r for r in rows), fixed_s, per_row_s)

    def __call__(self, rows: int) -> float:
        """Seconds of one call of `rows` rows."""
        xs, ys = self.rows, self.seconds
        if rows <= xs[0]:
            return max(ys[0] - self.per_row_s * (xs[0] - rows), min(self.fixed_s, ys[0]))
        for i in range(1, len(xs)):
            if rows <= xs[i]:
                t = (rows - xs[i - 1]) / (xs[i] - xs[i - 1])
                return ys[i - 1] + t * (ys[i] - ys[i - 1])
        return ys[-1] + self.per_row_s * (rows - xs[-1])

    def per_row(self, rows: int) -> float:
        return self(rows) / rows

    def best_rows(self, cap: int, tolerance: float = 0.0) -> int:
        """The batch where a row is cheapest, among the measured sizes up to
        `cap` and `cap` itself; with a `tolerance`, the largest one within it
        of the cheapest (timings on a shared machine are noisy, and a bigger
        batch is the safer bet)."""
        cap = max(1, int(cap))
        per_row = {r: self.per_row(r) for r in {*(r for r in self.rows if r <= cap), cap}}
        best = min(per_row.values())
        return max(r for r, c in per_row.items() if c <= best * (1 + tolerance))


@dataclass
class CostModel:
    """Per-expert call costs; unknown experts cost like the mean known one."""

    experts: dict[ExpertId, ExpertCost] = field(default_factory=dict)
    # Where the timings come from ("wall" or "cpu" seconds), for reports.
    clock: str = "wall"

    @classmethod
    def from_timings(cls, timings: Mapping[ExpertId, Mapping[int, Sequence[float] | float]], clock: str = "wall") -> CostModel:
        return cls({key: ExpertCost.from_timings(t) for key, t in timings.items() if t}, clock)

    def __bool__(self) -> bool:
        return bool(self.experts)

    def expert(self, stage: str, expert: str) -> ExpertCost:
        found = self.experts.get((stage, expert))
        if found is not None:
            return found
        if not self.experts:
            # No measurements (no warm-up): assume a call costs the same at
            # any batch, so the scheduler batches as much as it can.
            return ExpertCost.affine(1.0, 0.0)
        known = list(self.experts.values())
        return ExpertCost.affine(
            sum(e.fixed_s for e in known) / len(known), sum(e.per_row_s for e in known) / len(known)
        )

    def seconds(self, stage: str, expert: str, rows: int) -> float:
        return self.expert(stage, expert)(rows)

    def best_rows(self, stage: str, expert: str, cap: int, tolerance: float = 0.0) -> int:
        return self.expert(stage, expert).best_rows(cap, tolerance)

    def best_seconds_per_row(self, stage: str, expert: str, cap: int) -> float:
        cost = self.expert(stage, expert)
        return cost.per_row(cost.best_rows(cap))

    def compute_limit(self, rows_per_image: Mapping[ExpertId, float], cap: int | Mapping[ExpertId, int]) -> float:
        """Images/s if every row of an image ran at its expert's cheapest
        batch (<= cap), and nothing else ran: the bound a scheduler can
        approach but not beat."""
        seconds = 0.0
        for key, rows in rows_per_image.items():
            limit = cap[key] if isinstance(cap, Mapping) else cap
            seconds += rows * self.best_seconds_per_row(key[0], key[1], limit)
        return 1.0 / seconds if seconds > 0 else float("inf")

    def table(self) -> str:
        """One line per expert: the fitted line, then ms per call and per row
        at each measured size, and the cheapest batch per row."""
        lines = []
        for (stage, expert), cost in self.experts.items():
            cells = "  ".join(f"{r}:{1000 * s:.1f}/{1000 * s / r:.2f}" for r, s in zip(cost.rows, cost.seconds))
            best = cost.best_rows(cost.rows[-1])
            lines.append(
                f"{stage}/{expert}: {1000 * cost.fixed_s:.2f} ms + {1000 * cost.per_row_s:.2f} ms/row "
                f"({self.clock}, median of {cost.samples}); ms per call/per row at batch {cells}; "
                f"cheapest per row at {best} rows ({1000 * cost.per_row(best):.2f} ms/row)"
            )
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            f"{stage}/{expert}": {
                "fixed_s": round(c.fixed_s, 6), "per_row_s": round(c.per_row_s, 6),
                "seconds": {str(r): round(s, 6) for r, s in zip(c.rows, c.seconds)},
                "best_rows": c.best_rows(c.rows[-1]),
            }
            for (stage, expert), c in self.experts.items()
        }


__all__ = ["CostModel", "ExpertCost", "ExpertId"]
