"""Training: optimizer.py, state.py (train state), step.py (the jitted step), loss.py, checkpoint.py (Orbax),
metrics.py and loop.py. Import the submodules themselves: the step needs no data pipeline (a benchmark or an
accelerator check runs it without grain installed)."""
