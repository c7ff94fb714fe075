# Set-up and checks; README.md names `make demo` and `make test`.
PYTHON ?= python3
DEMO := examples/demo

.PHONY: install demo test zoo benchmark

install:
	$(PYTHON) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PYTHON) -m pip install --quiet -e '.[test]'

demo: install
	@rm -rf runs/demo && mkdir -p runs/demo
	@echo "--- 1. the release gate fails on the backdoored demo model (exit 1 expected):"
	-scrub evaluate $(DEMO)/model.safetensors --test-dir $(DEMO)/test --trigger $(DEMO)/trigger.png --max-asr 0.05
	@echo "--- 2. edit: unlearn the trigger from 10 clean samples per class"
	scrub edit $(DEMO)/model.safetensors --clean-dir $(DEMO)/clean --trigger $(DEMO)/trigger.png -o runs/demo/model.scrubbed.safetensors
	@echo "--- 3. repair: restore the classes the edit hurt (target and trigger read from the edit's provenance)"
	scrub repair runs/demo/model.scrubbed.safetensors --clean-dir $(DEMO)/clean -o runs/demo/model.repaired.safetensors
	@echo "--- 4. the gate passes on the scrubbed model, side by side with the original"
	scrub evaluate runs/demo/model.scrubbed.safetensors runs/demo/model.repaired.safetensors \
		--baseline $(DEMO)/model.safetensors --test-dir $(DEMO)/test --trigger $(DEMO)/trigger.png --max-asr 0.05

test: install
	$(PYTHON) -m pytest -q

# The benchmark's model zoo (examples/zoo.py): tuning models, held-out report models and clean references.
# Training all of them takes about an hour on 2 CPU cores (one thread each, two at a time is fine).
ZOO_MODELS = $(shell $(PYTHON) examples/zoo.py list)

runs/%/model.safetensors:
	$(PYTHON) examples/zoo.py train $* --threads 1

zoo: install $(foreach m,$(ZOO_MODELS),runs/$(m)/model.safetensors)

# README's figures: edit + repair against fine-tuning on the held-out report models only.
benchmark: zoo
	$(PYTHON) -m pip install --quiet -e '.[examples]'
	$(PYTHON) examples/benchmark.py --split report --out-dir examples/results
	$(PYTHON) examples/benchmark_evaluate.py --model runs/r18_white3_tr/model.safetensors \
		--test-dir runs/r18_white3_tr/test --trigger runs/r18_white3_tr/trigger.png
