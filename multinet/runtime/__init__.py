"""Where and how work runs: executors (in-process, Ray), batch inference, resumable runs, progress."""
from .executors import Executor, ExecutorError, LocalExecutor, RayExecutor, resolve_executor
from .infer import infer

__all__ = ["Executor", "ExecutorError", "LocalExecutor", "RayExecutor", "infer", "resolve_executor"]
