"""The t schedule in mergekit's terms: filters -> ConditionalParameter list, and the t each layer gets."""
from __future__ import annotations

from definemed.merge.config import DEFAULT_KEY, Gradient


def conditional(schedule: dict[str, Gradient], transform=None) -> list[dict]:
    """Our {filter: value, default: value} -> mergekit's [{filter, value}, ..., {value}] (first match wins).
    `transform` maps each t (e.g. 1 - t for model_a's linear weight)."""
    def tx(v):
        if transform is None:
            return v
        return [transform(x) for x in v] if isinstance(v, list) else transform(v)

    out = [{"filter": k, "value": tx(v)} for k, v in schedule.items() if k != DEFAULT_KEY]
    out.append({"value": tx(schedule[DEFAULT_KEY])})
    return out


def t_at(value: Gradient, position: float) -> float:
    """Value of a gradient at `position` in [0, 1], via mergekit's own evaluator (so cards match merges)."""
    from mergekit.config import evaluate_setting

    return float(evaluate_setting("", value, t=position, validate=float))


def per_layer(schedule: dict[str, Gradient], num_layers: int) -> list[dict[str, float]]:
    """t of each filter for each layer: layer i of L sits at position i / (L - 1) (mergekit's plan_slice)."""
    rows = []
    for i in range(num_layers):
        pos = i / (num_layers - 1) if num_layers > 1 else 1.0
        rows.append({"layer": i, **{k: round(t_at(v, pos), 6) for k, v in schedule.items()}})
    return rows
