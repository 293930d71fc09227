"""Planning: policies, placement, cost model, step simulator, planner, cost prior and the hot-expert
prediction tables. Plain Python and NumPy: nothing here imports JAX (tests/test_architecture.py
checks), so the runtime imports planning and never the other way round."""
