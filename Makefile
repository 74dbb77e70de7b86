# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Both create a virtualenv in .venv on first use and install what they need into it.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of torch: on CPU-only machines a plain `pip install torch` pulls several GB of CUDA
# libraries. On other machines point TORCH_INDEX at the CPU wheel index or install torch first.
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
DEMO_OUT    ?= shards/sample
DATA        ?= .cache/data

.PHONY: install demo test bench clean-venv

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[test]"
	touch $@

DEMO_RUN    ?= runs/demo
DEMO_EPOCHS ?= 2

demo: install
	$(PY) -m sslkit.shard build sample --out $(DEMO_OUT) --shuffle --seed 0 --max-count 500
	$(PY) -m sslkit.shard verify $(DEMO_OUT)
	$(PY) -m sslkit.shard info $(DEMO_OUT)
	$(PY) -m sslkit.viz --pipeline multicrop --preset tiny --data $(DEMO_OUT) --out $(DEMO_RUN)-views.png
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --nproc_per_node=2 train.py --method deepclusterv2 --preset tiny \
		--data $(DEMO_OUT) --out $(DEMO_RUN) --epochs $(DEMO_EPOCHS)

# Real labelled data for the tests (Fashion-MNIST from Debian; ../shared/reference/DATA.md).
$(DATA)/root/.dataset-fashion-mnist:
	bench/fetch_debian_data.sh $(DATA) dataset-fashion-mnist

test: install $(DATA)/root/.dataset-fashion-mnist
	$(PY) -m pytest -q

clean-venv:
	rm -rf $(VENV)
