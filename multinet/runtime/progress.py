"""Progress bars for long work: rich when asked for, nothing otherwise."""
from __future__ import annotations


class Bar:
    def __init__(self, enabled: bool, total: float, description: str):
        self.bar = None
        if enabled:
            from rich.progress import Progress

            self.bar = Progress(transient=True)
            self.task = self.bar.add_task(description, total=total)
            self.bar.start()

    def advance(self, amount: float = 1) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, amount)

    def update(self, completed: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=completed)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
