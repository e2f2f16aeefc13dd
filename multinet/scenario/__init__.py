"""Scenario YAML runs: schema, runner, reports."""
from .runner import run
from .schema import Scenario, ScenarioError, load_scenario

__all__ = ["Scenario", "ScenarioError", "load_scenario", "run"]
