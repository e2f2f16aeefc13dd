"""Where independent jobs run. The in-process executor is the default and needs nothing else; a
Ray executor with the same ``map`` contract spreads jobs over a cluster (see the Ray issue).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Executor(Protocol):
    name: str

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """Results of ``fn`` on every item, in order."""
        ...


class LocalExecutor:
    """Runs jobs here, one after another: deterministic, and no process start-up to pay."""

    name = "local"

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        return [fn(item) for item in items]


def resolve_executor(executor: Executor | None) -> Executor:
    return LocalExecutor() if executor is None else executor
