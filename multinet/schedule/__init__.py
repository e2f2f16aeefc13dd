"""Scheduling: which groups to compress, how much and in which order, under a global budget."""
from .budget import Budget, BudgetError
from .plan import GroupPlan, Plan
from .scheduler import SCHEDULES, Scheduling, make_plan, prepare

__all__ = ["Budget", "BudgetError", "GroupPlan", "Plan", "SCHEDULES", "Scheduling", "make_plan", "prepare"]
