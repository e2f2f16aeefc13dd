"""Tracing, channel groups, graph surgery and counting."""
from .counting import Counts, count
from .op_tables import register_elementwise
from .groups import ChannelGraph, ChannelGroup, ConsumerSlot
from .surgery import prune
from .trace_api import capture_graph, trace

__all__ = ["ChannelGraph", "ChannelGroup", "ConsumerSlot", "Counts", "capture_graph", "count", "prune", "register_elementwise",
           "trace"]
