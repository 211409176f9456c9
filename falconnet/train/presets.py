"""Named ablation presets: every row of the paper's Table 2 and Table 3 as (model, kwargs).

``table2-<row>``: LightNet whose blocks are the Meta Basic Block of Table 2 row A..T.
``table3-<row>``: LightNet with the RepSO block whose spatial operator has Table 3 row A..T's
branches (row T is the default RepSO).
The rows themselves are defined once, in falconnet.layers (TABLE2_CONFIGS, TABLE3_CONFIGS).
"""
from __future__ import annotations


class PresetError(ValueError):
    """An unknown preset name (the message lists the valid ones)."""


def _tables() -> tuple[dict, dict]:
    from falconnet.layers.meta_block import TABLE2_CONFIGS
    from falconnet.layers.repso import TABLE3_CONFIGS

    return TABLE2_CONFIGS, TABLE3_CONFIGS


def list_presets() -> list[str]:
    table2, table3 = _tables()
    return [f"table2-{row}" for row in sorted(table2)] + [f"table3-{row}" for row in sorted(table3)]


def resolve_preset(name: str) -> tuple[str, dict]:
    """(registry model name, model kwargs) of a preset."""
    table2, table3 = _tables()
    table, _, row = name.partition("-")
    if table == "table2" and row in table2:
        return "lightnet", {"block": "meta_basic", "block_kwargs": dict(table2[row])}
    if table == "table3" and row in table3:
        return "lightnet", {"block": "repso", "block_kwargs": {"repso": dict(table3[row])}}
    raise PresetError(f"unknown preset {name!r}; expected one of: {', '.join(list_presets())}")
