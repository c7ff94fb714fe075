# Set-up and checks; README.md names `make demo` and `make test`.
# Without an active virtual environment, everything goes into a project-local one (.venv), so that
# the set-up also works where the system Python refuses installs (PEP 668). It sees the system's
# site-packages: a torch already installed there is used, not downloaded again.
DEMO := examples/demo
ifdef VIRTUAL_ENV
PYTHON ?= python3
ENVIRONMENT :=
else
PYTHON := .venv/bin/python
ENVIRONMENT := $(PYTHON)
$(PYTHON):
	python3 -m venv --system-site-packages .venv
endif
BIN := $(dir $(shell command -v $(PYTHON) 2>/dev/null || echo $(PYTHON)))

.PHONY: install demo test test-variants zoo benchmark

install: $(ENVIRONMENT)
	$(PYTHON) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PYTHON) -m pip install --quiet -e '.[test]'

demo: install
	@rm -rf runs/demo && mkdir -p runs/demo
	@echo "--- 1. the release gate fails on the backdoored demo model (exit 1 expected):"
	-$(BIN)scrub evaluate $(DEMO)/model.safetensors --test-dir $(DEMO)/test --trigger $(DEMO)/trigger.png --max-asr 0.05
	@echo "--- 2. edit: unlearn the trigger from 10 clean samples per class"
	$(BIN)scrub edit $(DEMO)/model.safetensors --clean-dir $(DEMO)/clean --trigger $(DEMO)/trigger.png -o runs/demo/model.scrubbed.safetensors
	@echo "--- 3. repair: restore the classes the edit hurt (target and trigger read from the edit's provenance)"
	$(BIN)scrub repair runs/demo/model.scrubbed.safetensors --clean-dir $(DEMO)/clean -o runs/demo/model.repaired.safetensors
	@echo "--- 4. the gate passes on the scrubbed model, side by side with the original"
	$(BIN)scrub evaluate runs/demo/model.scrubbed.safetensors runs/demo/model.repaired.safetensors \
		--baseline $(DEMO)/model.safetensors --test-dir $(DEMO)/test --trigger $(DEMO)/trigger.png --max-asr 0.05

test: install
	$(PYTHON) -m pytest -q

# The other 58 torchvision models of the zoo test (not in `make test`: about 45 minutes on 2 cores, and
# ViT-H/14 and ViT-L/16, marked zoo_huge, left out: ViT-H/14 alone took 20 minutes on one thread).
test-variants: install
	$(PYTHON) -m pytest -q -m "zoo_variants and not zoo_huge"

# The benchmark's model zoo (examples/zoo.py): tuning models, held-out report models and clean references.
# Training all of them takes about an hour on 2 CPU cores (one thread each, two at a time is fine).
ZOO_MODELS = $(shell $(PYTHON) examples/zoo.py list 2>/dev/null)

runs/%/model.safetensors:
	$(PYTHON) examples/zoo.py train $* --threads 1

zoo: install $(foreach m,$(ZOO_MODELS),runs/$(m)/model.safetensors)

# README's figures: edit + repair against fine-tuning on the held-out report models only.
benchmark: zoo
	$(PYTHON) -m pip install --quiet -e '.[examples]'
	$(PYTHON) examples/benchmark.py --split report --out-dir examples/results
	$(PYTHON) examples/benchmark_evaluate.py --model runs/r18_white3_tr/model.safetensors \
		--test-dir runs/r18_white3_tr/test --trigger runs/r18_white3_tr/trigger.png
