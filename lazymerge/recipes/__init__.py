"""Recipes: turn input checkpoints and user parameters into a MergePlan (no tensor bytes)."""
