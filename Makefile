# Set-up and checks; README.md names `make demo` and `make test`.
PYTHON ?= python3
DEMO := examples/demo

.PHONY: install demo test benchmark-evaluate

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

benchmark-evaluate: install
	$(PYTHON) examples/make_backdoored.py --arch resnet18 --epochs 2 --train-subset 40000 --target 3 --out runs/r18_badnets
	$(PYTHON) examples/benchmark_evaluate.py --model runs/r18_badnets/model.safetensors \
		--test-dir runs/r18_badnets/test --trigger runs/r18_badnets/trigger.png
