"""Tiers, budgets, expert pool, transfers, prefetcher, planner and scheduler (pipeline issue)."""
