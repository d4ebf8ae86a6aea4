"""Outputs, cost accounting, registry, configs and save/load."""
