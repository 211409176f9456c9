"""Named ablation presets: every row of the paper's Table 2 and Table 3 as (registry model, kwargs).

``table3-<row>``: lightnet_repso (LightNet + RepSO block) whose RepSO has Table 3 row A..T's
branches; row T is the default RepSO, so table3-T is lightnet_repso itself.
``table2-<row>``: LightNet whose blocks are the Meta Basic Block of Table 2 row A..T. It needs
the block registered in falconnet.layers.BLOCKS under META_BASIC_BLOCK; it is built on the
lightnet_irb entry (Table 2 row E is that block) with the block replaced.
The rows themselves are defined once, in falconnet.layers (TABLE2_CONFIGS, TABLE3_CONFIGS).
"""
from __future__ import annotations

META_BASIC_BLOCK = "meta_basic"


class PresetError(ValueError):
    """An unknown preset name (the message lists the valid ones)."""


def _tables() -> tuple[dict, dict]:
    from falconnet.layers import TABLE2_CONFIGS, TABLE3_CONFIGS

    return TABLE2_CONFIGS, TABLE3_CONFIGS


def list_presets() -> list[str]:
    table2, table3 = _tables()
    return [f"table2-{row}" for row in sorted(table2)] + [f"table3-{row}" for row in sorted(table3)]


def resolve_preset(name: str) -> tuple[str, dict]:
    """(registry model name, model kwargs) of a preset."""
    table2, table3 = _tables()
    table, _, row = name.partition("-")
    if table == "table3" and row in table3:
        return "lightnet_repso", {"block_kwargs": {"repso": dict(table3[row])}}
    if table == "table2" and row in table2:
        from falconnet.layers import BLOCKS

        if META_BASIC_BLOCK not in BLOCKS:
            raise PresetError(
                f"preset {name!r} needs the Meta Basic Block registered as {META_BASIC_BLOCK!r} in "
                f"falconnet.layers.BLOCKS, which this build lacks (it has {', '.join(sorted(BLOCKS))})"
            )
        return "lightnet_irb", {"block": META_BASIC_BLOCK, "block_kwargs": dict(table2[row])}
    raise PresetError(f"unknown preset {name!r}; expected one of: {', '.join(list_presets())}")
