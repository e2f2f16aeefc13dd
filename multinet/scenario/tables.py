"""Tables for the terminal (rich prints plain text when output is not a terminal)."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

from ..graph import ChannelGraph, Counts


def _short(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" +{len(names) - limit}" if len(names) > limit else "")


def groups_table(graph: ChannelGraph, title: str = "") -> Table:
    table = Table(title=title)
    for col in ("group", "channels", "producers", "consumers", "prunable"):
        table.add_column(col, overflow="fold")
    for g in graph.groups:
        status = "yes" if g.prunable else f"no: {g.reasons[0]}"
        if g.prunable and not g.exact:
            status = "yes (approx: normalisation)"
        table.add_row(str(g.id), str(g.size), _short(g.producers) or "-", _short(g.consumer_names) or "-", status)
    return table


def layers_table(counts: Counts) -> Table:
    table = Table(title="per layer")
    for col in ("layer", "kind", "FLOPs (MACs)", "params"):
        table.add_column(col, justify="right" if col != "layer" else "left")
    for lc in counts.layers:
        table.add_row(lc.name, lc.kind, f"{lc.flops:,}", f"{lc.params:,}")
    return table


def compress_table(result, title: str = "") -> Table:
    table = Table(title=title)
    for col in ("group", "producers", "channels", "removed", "error", "seconds"):
        table.add_column(col, justify="left" if col in ("producers", "removed") else "right")
    for g in result.groups:
        table.add_row(str(g.group), _short(g.producers), f"{g.channels_before} -> {g.channels_after}",
                      _short([str(i) for i in g.removed], 6) or "-", f"{g.error:.4f}", f"{g.seconds:.2f}")
    return table


def print_table(table: Table) -> None:
    Console(width=140).print(table)
