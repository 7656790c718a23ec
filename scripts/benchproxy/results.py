"""The bench's results: a row per measured number, its ratio against a baseline of the same run and
the target it is held to, printed as it is measured and as one table at the end."""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field

from benchproxy import MIB

FLAT = 10_000_000  # bytes: "flat" over 100k requests or messages
TRANSFER_GROWTH = 50 * MIB  # bytes: most a 1 GiB transfer may add
CHASE = "best proxy vs CHP (to chase)"


@dataclass
class Row:
    section: str
    row: str
    metric: str
    value: float | None = None
    unit: str = ""
    baseline_row: str = ""
    baseline: float | None = None
    ratio: float | None = None
    target: str = ""
    met: bool | None = None
    note: str = ""
    skipped: str = ""
    shown: dict = field(default_factory=dict)  # how the table prints value, baseline and ratio


class Results:
    def __init__(self) -> None:
        self.rows: list[Row] = []

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        print("  " + " | ".join(format_row(row)), flush=True)
        return row

    def skip(self, section: str, row: str, metric: str, reason: str) -> None:
        self.add(Row(section, row, metric, skipped=reason))

    def ratio(
        self,
        section: str,
        row: str,
        metric: str,
        value: float | None,
        unit: str,
        base_row: str,
        base: float | None,
        minimum: float | None = None,
        note: str = "",
    ) -> Row:
        ratio = value / base if value is not None and base else None
        met = None if minimum is None or ratio is None else ratio >= minimum
        target = f">= {minimum:g}x" if minimum is not None else ""
        return self.add(Row(section, row, metric, value, unit, base_row, base, ratio, target, met, note))

    def chase(
        self, section: str, metric: str, unit: str, best: str | None, values: dict[str, float], missing: str
    ) -> None:
        """The best proxy configuration against CHP, "for the team to chase" (>= 1.0x), or why not."""
        if best and "CHP" in values:
            self.ratio(section, CHASE, metric, values[best], unit, "CHP", values["CHP"], 1.0, f"best: {best}")
        else:
            self.skip(section, CHASE, metric, missing)

    def memory(self, section: str, row: str, metric: str, before: int, after: int, limit: int, label: str) -> Row:
        delta = after - before
        shown = {"ratio": f"Δ {delta / MIB:+.1f} MiB"}
        target = f"Δ <= {limit / 1e6:g} MB" if limit == FLAT else f"Δ < {limit / MIB:g} MiB"
        return self.add(
            Row(
                section,
                row,
                metric,
                after / MIB,
                "MiB",
                label,
                before / MIB,
                after / before if before else None,
                target,
                delta <= limit if limit == FLAT else delta < limit,
                "",
                shown=shown,
            )
        )


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "MiB":
        return f"{value:.1f} MiB"
    if abs(value) >= 100:
        return f"{value:,.0f} {unit}".strip()
    return f"{value:.3g} {unit}".strip()


def format_row(r: Row) -> list[str]:
    if r.skipped:
        return [r.row, r.metric, r.skipped, "", "", r.target, ""]
    base = fmt(r.baseline, r.unit) + (f" ({r.baseline_row})" if r.baseline_row else "") if r.baseline_row else ""
    ratio = r.shown.get("ratio") or (f"{r.ratio:.3g}x" if r.ratio is not None else "")
    met = "" if r.met is None else ("yes" if r.met else "NO")
    return [r.row, r.metric, fmt(r.value, r.unit), base, ratio, r.target, met]


def print_table(results: Results) -> None:
    head = ["row", "metric", "value", "baseline", "ratio", "target", "met?"]
    by_section: dict[str, list[list[str]]] = {}
    for r in results.rows:
        by_section.setdefault(r.section, []).append(format_row(r))
    cells = [head] + [c for rows in by_section.values() for c in rows]
    widths = [min(60, max(len(c[i]) for c in cells)) for i in range(len(head))]

    def line(c: list[str]) -> str:
        return "  ".join(s[:60].ljust(w) for s, w in zip(c, widths, strict=True)).rstrip()

    print()
    print(line(head))
    print(line(["-" * w for w in widths]))
    for section, rows in by_section.items():
        print(f"[{section}]")
        for c in rows:
            print(line(c))
    print("ratio = value / baseline (for latencies lower is better; for memory the growth is shown)")
    notes = [r for r in results.rows if r.note and not r.skipped]
    if notes:
        print("\nnotes:")
        for r in notes:
            print(f"  {r.row} / {r.metric}: {r.note}")
