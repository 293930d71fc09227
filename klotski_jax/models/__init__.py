"""The math: pure functions over explicit weight pytrees. Never imports checkpoints/pipeline."""
