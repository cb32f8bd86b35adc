# The two commands a newcomer needs:  make demo  (install + the demo job end to end)  and  make test  (the fast
# tests, minutes). make test-all runs every test, the slow ones (processes, real training, Inception) too; CI runs it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torchvision (for torch-fidelity's FID) must match torch exactly; this pair also runs on CPUs.
TORCH ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test test-all lint

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev,eval,lsun,mpi,tensorboard]'
	touch $@

install: $(VENV)/.installed

data/synthetic: | $(VENV)/.installed
	$(BIN)/idiff data synthetic --out data/synthetic --n 512 --image-size 32 --classes 4

demo: install data/synthetic
	$(BIN)/idiff train jobs/demo.yaml
	$(BIN)/idiff sample jobs/demo_sample.yaml
	$(BIN)/idiff evaluate jobs/demo_evaluate.yaml
	$(BIN)/idiff status runs/demo

test: install
	$(BIN)/idiff validate jobs/*.yaml
	$(BIN)/python -m pytest -m "not slow" --durations=15

test-all: install
	$(BIN)/idiff validate jobs/*.yaml
	$(BIN)/python -m pytest --durations=25

lint: install
	$(BIN)/ruff check .
	$(BIN)/hadolint docker/Dockerfile
