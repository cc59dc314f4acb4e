# cnnbench: every target runs inside .venv, which the first target that needs it creates.
# Data: torchvision downloads MNIST to ./data; set CNNBENCH_DATA=DIR to use a copy (e.g. ../shared/data).
# Tracking: MLflow's default ./mlflow.db unless MLFLOW_TRACKING_URI is set.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
ARGS   ?=
SPEC   ?= studies/sweep-lenet.yaml
PORT   ?= 5000
STUDY  ?= lr
MLFLOW_TRACKING_URI ?= sqlite:///mlflow.db
export MLFLOW_TRACKING_URI

.DEFAULT_GOAL := help
.PHONY: help install test test-fast chaos bench calibrate gpu-check study-lr study-batch study-activation study-epochs study-models study-alexnet study-resnet-bn \
        studies ui clean-state report ui-screenshot notebooks-clean

help:  ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	# the notebooks' kernel: this venv's Python under the name they ask for
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (cnnbench)" >/dev/null
	@touch $@

install: $(BIN)/.installed  ## create .venv and install cnnbench with its pinned stack

test: $(BIN)/.installed  ## the whole test suite (what CI runs; the chaos test included), its 25 slowest tests listed
	$(BIN)/python -m pytest -q --durations=25

test-fast: $(BIN)/.installed  ## while editing: the tests that need no long training, no server, no chaos (under 3 minutes)
	$(BIN)/python -m pytest -q -n 2 -m "not slow and not server and not chaos"

chaos: $(BIN)/.installed  ## the chaos test alone: random SIGKILLs, nothing lost; prints its seed (ARGS="--seed S" replays)
	$(BIN)/python -m cnnbench.tools.chaos $(ARGS)

# the CPU layout the studies use here: measured on first use (about a minute), then read
# from the state folder's cache (per CPU model, flags, torch version and core count)
calibrate: $(BIN)/.installed  ## the CPU layout fastest on this machine (workers, engine, K, channels-last, conv path; bf16), cached
	$(BIN)/cnnbench bench --calibrate

study-lr: $(BIN)/.installed calibrate  ## document 003: learning rate 0.001..0.1 (LeNet-5, 10 epochs)
	$(BIN)/cnnbench study studies/lr.yaml $(ARGS)

study-batch: $(BIN)/.installed calibrate  ## document 003: training batch size 32..512 (LeNet-5, 10 epochs)
	$(BIN)/cnnbench study studies/batch.yaml $(ARGS)

study-activation: $(BIN)/.installed calibrate  ## document 003: sigmoid/tanh vs ReLU in LeNet-5
	$(BIN)/cnnbench study studies/activation.yaml $(ARGS)

study-epochs: $(BIN)/.installed calibrate  ## documents 000 and 002: accuracy against training length, best epoch
	$(BIN)/cnnbench study studies/epochs-lenet.yaml $(ARGS)
	$(BIN)/cnnbench study studies/epochs.yaml $(ARGS)

study-models: $(BIN)/.installed calibrate  ## LeNet-5, AlexNet, Inception, ResNet under one budget
	$(BIN)/cnnbench study studies/models.yaml $(ARGS)

study-alexnet: $(BIN)/.installed calibrate  ## document 000: AlexNet, augmentation x batch size, 20 epochs
	$(BIN)/cnnbench study studies/alexnet.yaml $(ARGS)

study-resnet-bn: $(BIN)/.installed calibrate  ## document 002's ResNet with batch norm: lr 0.001..0.1, trained fused (wide)
	$(BIN)/cnnbench study studies/resnet-bn.yaml $(ARGS)

study-models-gpu: $(BIN)/.installed  ## torchvision AlexNet, GoogLeNet, ResNet-18, VGG16 at 224x224 (needs a GPU)
	$(BIN)/cnnbench study studies/models-imagenet.yaml $(ARGS)

DOCUMENT_STUDIES := studies/lr.yaml studies/batch.yaml studies/activation.yaml studies/epochs-lenet.yaml \
                    studies/epochs.yaml studies/models.yaml studies/alexnet.yaml

studies: $(BIN)/.installed  ## every document study (CPU-sized), one after another in one process (one start-up)
	$(BIN)/cnnbench study $(DOCUMENT_STUDIES) $(ARGS)

bench: $(BIN)/.installed  ## naive loop vs cnnbench vs fused K trials; writes results/bench/
	$(BIN)/cnnbench bench $(ARGS)

gpu-check: $(BIN)/.installed  ## on a CUDA machine: CUDA tests, conv2 and engine benches, sweep, studies timed and compared (9 min); ARGS=--dry-run tries it on the CPU
	$(BIN)/cnnbench gpu-check --out $(if $(OUT),$(OUT),results/gpu) $(ARGS)

ui: $(BIN)/.installed  ## MLflow UI on the tracking store (http://127.0.0.1:$(PORT))
	$(BIN)/mlflow ui --backend-store-uri $(MLFLOW_TRACKING_URI) --host 127.0.0.1 --port $(PORT)

report: $(BIN)/.installed  ## run the notebooks for every study and sweep in results/: results/*/report.html, results/index.html
	$(BIN)/cnnbench report $(ARGS)

ui-screenshot: $(BIN)/.installed  ## the MLflow UI on STUDY (default lr): results/mlflow-compare.png, results/mlflow-charts.png (needs /usr/bin/chromium)
	$(BIN)/cnnbench ui-screenshot --study $(STUDY) --out results/mlflow-compare.png --charts results/mlflow-charts.png

notebooks-clean: $(BIN)/.installed  ## strip outputs from notebooks/*.ipynb before committing (a test checks it)
	$(BIN)/jupyter nbconvert --clear-output --inplace notebooks/*.ipynb

clean-state:  ## delete run state (.cnnbench/: checkpoints, locks); MLflow runs are kept
	rm -rf .cnnbench

.PHONY: compare
compare: $(BIN)/.installed  ## does execution B of a study reproduce A? make compare A=results/lr B=other/results/lr ARGS="--labels fp32,bf16"
	@test -n "$(A)" -a -n "$(B)" || { echo "usage: make compare A=<results folder or study run id> B=<...> [ARGS=...]" >&2; exit 2; }
	$(BIN)/cnnbench compare $(A) $(B) $(ARGS)

.PHONY: summary
summary: $(BIN)/.installed  ## per-layer shapes, params, MACs, memory of every model + the documents' arithmetic checked (results/summary/)
	$(BIN)/cnnbench summary --all --documents --results-dir results

# -- Optuna sweeps (cnnbench/sweep.py) --------------------------------------------------
STORAGE ?=
DASHBOARD_PORT ?= 8080
.PHONY: sweep dashboard

sweep: $(BIN)/.installed  ## Optuna sweep of SPEC (studies/sweep-lenet.yaml); ARGS="--n-trials 50 --workers 4 --storage URL"
	$(BIN)/cnnbench sweep $(SPEC) $(ARGS)

dashboard: $(BIN)/.installed  ## optuna-dashboard on SPEC's sweep storage, or STORAGE=URL (http://127.0.0.1:$(DASHBOARD_PORT))
	storage="$(if $(STORAGE),$(STORAGE),$$($(BIN)/cnnbench sweep $(SPEC) --print-storage))" && \
	    $(BIN)/optuna-dashboard --host 127.0.0.1 --port $(DASHBOARD_PORT) "$$storage"
