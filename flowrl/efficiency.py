"""The learning-efficiency table of the benchmark examples (``examples/compare_algorithms.py``,
``examples/compare_flow.py``): each method's evaluation curve at equal reward queries and at equal
seconds, and the time to first reach a baseline method's final value, as a ratio to its time.

A curve is a dict of equal-length lists: ``queries`` (reward queries so far), ``seconds``
(sampling + update time so far) and the evaluation values under one key (``key``: the examples'
``alignment`` or ``eval``); index 0 is the evaluation before training.
"""

from __future__ import annotations


def at(curve: dict, key: str, axis: str, x: float) -> float:
    """The value under ``key`` of the last evaluation at or before ``x`` on ``axis``."""
    value = curve[key][0]
    for xi, vi in zip(curve[axis], curve[key]):
        if xi <= x + 1e-9:
            value = vi
    return value


def first_reach(curve: dict, key: str, target: float, axis: str = "seconds") -> float | None:
    """Seconds (or queries, ``axis``) until the value under ``key`` first reaches ``target`` after
    training starts (None: never)."""
    for x, v in zip(curve[axis][1:], curve[key][1:]):
        if v >= target:
            return x
    return None


def table(
    curves: dict[str, dict],
    key: str,
    baseline: str,
    label: str,
    before: str,
    note: str,
    digits: int = 3,
    offline: tuple[str, ...] = (),
    per_epoch: bool = False,
) -> str:
    """The markdown table of ``curves`` (method -> curve), the target being ``baseline``'s final value.

    Args:
        key: the curves' evaluation values.
        baseline: the method whose final value is the target; ``label``: its name in the headers.
        before: the header of the first value's column.
        note: the line under the table, ``{}`` the target (formatted with ``digits`` decimals).
        digits: decimals of the values.
        offline: methods left out of the common queries and seconds (they train on a fixed file).
        per_epoch: add a seconds-per-epoch column.
    """
    base = curves.get(baseline)
    target = base[key][-1] if base else None
    t_base = first_reach(base, key, target) if base else None
    online = [c for n, c in curves.items() if n not in offline] or list(curves.values())
    common_t = min(c["seconds"][-1] for c in online)  # every online method has run this long
    common_q = min((c["queries"][-1] for n, c in curves.items() if n not in offline), default=0)
    headers = [
        "method",
        before,
        f"at {common_q} queries",
        f"at {common_t:.0f} s",
        "final",
        "queries",
        "seconds",
        *(["s/epoch"] if per_epoch else []),
        f"queries to {label}'s final",
        f"s to {label}'s final",
        f"time / {label}'s",
    ]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for name, c in curves.items():
        reach = first_reach(c, key, target) if target is not None else None
        q_reach = first_reach(c, key, target, "queries") if target is not None else None
        cells = [
            name,
            f"{c[key][0]:.{digits}f}",
            f"{at(c, key, 'queries', common_q):.{digits}f}",
            f"{at(c, key, 'seconds', common_t):.{digits}f}",
            f"{c[key][-1]:.{digits}f}",
            f"{c['queries'][-1]}",
            f"{c['seconds'][-1]:.0f}",
            *([f"{c['seconds'][-1] / max(1, len(c['seconds']) - 1):.1f}"] if per_epoch else []),
            "" if q_reach is None else f"{q_reach}",
            "" if reach is None else f"{reach:.0f}",
            f"{reach / t_base:.2f}" if reach is not None and t_base else "not reached",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if target is not None:
        lines.append("\n" + note.format(f"{target:.{digits}f}"))
    return "\n".join(lines)
