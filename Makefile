# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Both create a virtualenv in .venv on first use and install what they need into it.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of torch: on CPU-only machines a plain `pip install torch` pulls several GB of CUDA
# libraries. On other machines point TORCH_INDEX at the CPU wheel index or install torch first.
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
# DALI build: cuda13 (CUDA 13 drivers, and CPU-only machines) or cuda12; see pyproject.toml's extras.
DALI_EXTRA  ?= cuda13
DEMO_OUT    ?= shards/sample
DATA        ?= .cache/data

.PHONY: install demo test bench clean-venv

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints-tested.txt
	@echo "== installing into $(VENV): torch (CPU wheel here), NVIDIA DALI, numba, OpenCV, ... (several minutes the first time)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --progress-bar off "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) | grep -v "^Requirement already"
	$(PY) -m pip install --progress-bar off -c constraints-tested.txt -e ".[$(DALI_EXTRA),test]" \
		| grep -v "^Requirement already"
	touch $@

DEMO_RUN    ?= runs/demo
DEMO_EPOCHS ?= 2

demo: install
	@echo "== 1/5 shards: the embedded corpus (ImageNet-like crops of the photos scikit-image/-learn ship) -> $(DEMO_OUT)"
	$(PY) -m sslkit.shard build sample --out $(DEMO_OUT) --shuffle --seed 0 --max-count 500
	$(PY) -m sslkit.shard verify $(DEMO_OUT)
	$(PY) -m sslkit.shard info $(DEMO_OUT)
	@echo "== 2/5 what the multi-crop pipeline makes of them -> $(DEMO_RUN)-views.png"
	$(PY) -m sslkit.viz --pipeline multicrop --preset tiny --data $(DEMO_OUT) --out $(DEMO_RUN)-views.png
	@echo "== 3/5 DeepClusterV2 (preset tiny) on 2 CPU ranks -> $(DEMO_RUN)"
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --nproc_per_node=2 train.py --method deepclusterv2 --preset tiny \
		--data $(DEMO_OUT) --out $(DEMO_RUN) --epochs $(DEMO_EPOCHS)
	@echo "== 4/5 kNN of its features (which photo is a crop from?) beside the untrained trunk"
	$(PY) -m sslkit.shard build sample:300 --out $(DEMO_OUT)-val --seed 1 --no-progress
	$(PY) -m sslkit.eval knn --ckpt $(DEMO_RUN) --train $(DEMO_OUT) --val $(DEMO_OUT)-val --size 64 --resize 73 \
		--out $(DEMO_RUN)/knn.json
	@echo "== 5/5 done. Outputs:"
	@printf '   %-34s %s\n' \
		"$(DEMO_OUT)/" "shards + manifest.json (python -m sslkit.shard info $(DEMO_OUT))" \
		"$(DEMO_RUN)-views.png" "the augmented views" \
		"$(DEMO_RUN)/log.jsonl" "per-step and per-epoch records (config.json: the resolved config)" \
		"$(DEMO_RUN)/checkpoints/" "resumable checkpoints (re-run the same command to continue)" \
		"$(DEMO_RUN)/knn.json" "the evaluation above"
	@echo "   Next (no need to activate the venv): $(PY) train.py --list-presets"
	@echo "     $(PY) -m sslkit.viz --pipeline jigsaw --data $(DEMO_OUT) --out jigsaw.png"
	@echo "     $(PY) bench/ssl_quality.py --device cpu --method deepclusterv2 --preset fmnist --json quality.json"

# Real labelled data for the tests: Fashion-MNIST from Debian's dataset-fashion-mnist package.
$(DATA)/root/.dataset-fashion-mnist:
	bench/fetch_debian_data.sh $(DATA) dataset-fashion-mnist

test: install $(DATA)/root/.dataset-fashion-mnist
	$(PY) -m pytest -q

clean-venv:
	rm -rf $(VENV)
