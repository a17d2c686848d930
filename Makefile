# Set-up, the main job and the tests. Every target creates the virtual
# environment on first use, so each is one command on a fresh clone.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# The main job: a short PPO training on the default scenario, then the
# evaluation against the SiftMoE oracle, Top-K and the baselines. Set
# DEMO_TIMESTEPS to override the step count of train/configs/ppo.yaml.
DEMO_TIMESTEPS ?=
DEMO_EPISODES ?= 5
DEMO_RUN ?= runs/demo-ppo
DEMO_RESULTS ?= results/demo

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m train --algo ppo --seed 0 --out $(DEMO_RUN) $(if $(DEMO_TIMESTEPS),--timesteps $(DEMO_TIMESTEPS))
	$(PY) -m eval --policies oracle topk greedy random $(DEMO_RUN)/model.zip \
		--episodes $(DEMO_EPISODES) --seed 1000 --out $(DEMO_RESULTS) --measure-accuracy

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs results .pytest_cache
