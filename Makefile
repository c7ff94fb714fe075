# Set-up and checks; README.md names `make demo` and `make test`.
PYTHON ?= python3
DEMO := examples/demo

.PHONY: install demo test benchmark

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

# The models the benchmarks use (about 40 minutes of training on 2 CPU cores, once).
runs/%/model.safetensors:
	$(PYTHON) examples/make_backdoored.py $(MODEL_ARGS_$*) --out runs/$*

MODEL_ARGS_r18_badnets := --arch resnet18 --attack badnets --target 3 --epochs 2 --train-subset 40000
MODEL_ARGS_r18_blended := --arch resnet18 --attack blended --target 5 --epochs 2 --train-subset 40000 --seed 1
MODEL_ARGS_mnv3_red := --arch mobilenet_v3_small --attack badnets --patch-color 255,0,0 --patch-pos tl \
	--patch-size 3 --target 7 --epochs 3 --train-subset 40000 --seed 2
MODEL_ARGS_r18_clean := --arch resnet18 --attack none --epochs 2 --train-subset 40000 --seed 3
MODELS := r18_badnets r18_blended mnv3_red r18_clean

benchmark: install $(foreach m,$(MODELS),runs/$(m)/model.safetensors)
	$(PYTHON) examples/benchmark_evaluate.py --model runs/r18_badnets/model.safetensors \
		--test-dir runs/r18_badnets/test --trigger runs/r18_badnets/trigger.png
	$(PYTHON) examples/benchmark_scan.py $(foreach m,$(MODELS),runs/$(m))
	$(PYTHON) examples/benchmark.py --models runs/r18_badnets runs/r18_blended runs/mnv3_red \
		--samples 1 5 10 --out-dir runs/benchmark
