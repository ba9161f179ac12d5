# The two commands of README, each setting up .venv first when it is missing (launch/setup_env.sh).
PY := .venv/bin/python

.PHONY: setup demo test test-fast
setup:
	bash launch/setup_env.sh

demo: setup
	$(PY) launch/demo.py

test:  # what CI runs: setup, then the whole suite
	bash .ci/run

test-fast: setup  # the inner loop: unit tests only (no multi-process, Slurm, Ray or subprocess tests)
	$(PY) -m pytest -q -m "not integration" tests
