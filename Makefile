# gradlm: `make demo` trains on Shakespeare for ~2 minutes and writes a sample; `make test` runs the tests.
VENV   ?= .venv
PY     := $(VENV)/bin/python
GRADLM := $(VENV)/bin/gradlm
# torch is pinned for the install here (a CPU build lies on this machine's disk); pyproject allows a range.
TORCH  ?= torch==2.13.0

# Corpora are looked up in a mirror folder before any download (never committed to the repo).
ifneq ($(wildcard ../shared/data),)
export GRADLM_DATA_MIRROR ?= $(abspath ../shared/data)
endif

DEMO_RUN   ?= runs/demo
DEMO_TIME  ?= 2m
DEMO_FLAGS ?=   # none: --size auto chooses the model, batch and learning rate for the 2 minutes on this machine

.PHONY: demo test lint format docs docs-serve docs-figures test-cpus venv clean

# llama-cpp-python (a dev extra: the GGUF tests run llama.cpp) builds from source: only the library, for this CPU.
LLAMA_CMAKE ?= -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAVA_BUILD=OFF -DLLAMA_CURL=OFF

# demo needs the package (and the server); the tests add the dev extras on top, llama.cpp among them.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet "$(TORCH)" -e ".[serve,gguf]"
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	CMAKE_ARGS="$(LLAMA_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(VENV)/bin/pip install --quiet "$(TORCH)" -e ".[dev,serve,gguf,data]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	rm -rf $(DEMO_RUN)
	$(GRADLM) train --data shakespeare --out $(DEMO_RUN) --max-time $(DEMO_TIME) $(DEMO_FLAGS)
	@echo "--- sample (gradlm generate $(DEMO_RUN) 'ROMEO:') ---"
	$(GRADLM) generate $(DEMO_RUN) "ROMEO:" --max-new-tokens 200 --seed 1 --temperature 0.8 --top-p 0.95
	@echo "--- validation ---"
	@$(PY) -c "import json; s=json.load(open('$(DEMO_RUN)/summary.json')); print(f\"val loss {s['val_loss']:.4f} | val bits per byte {s['val_bpb']:.4f} | {s['steps']} steps, {s['tokens_per_s']:,.0f} tok/s\")"

test: $(VENV)/.installed-dev lint docs
	$(PY) -m pytest

# The site (mkdocs-material): every page of docs/, one page per command from the parser, the API from the
# docstrings. --strict: a broken link or a missing page fails the build (and so `make test`).
docs: $(VENV)/.installed-dev
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

# The course's pictures, redrawn by running its chapters at full size (a few minutes on 2 cores).
docs-figures: $(VENV)/.installed-dev
	for f in docs/course/[0-9]*.py; do $(PY) $$f || exit 1; done

docs-serve: $(VENV)/.installed-dev
	$(VENV)/bin/mkdocs serve

# ruff (pyflakes, pycodestyle, 120 columns; the formatter's layout) and the import contracts of pyproject.toml
# (the layers of the code): seconds. `make format` applies the formatter.
lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check gradlm tests tools benchmarks docs
	$(VENV)/bin/ruff format --check gradlm tests tools benchmarks docs
	$(VENV)/bin/lint-imports

format: $(VENV)/.installed-dev
	$(VENV)/bin/ruff format gradlm tests tools benchmarks docs

# The tests that touch numerics once per CPU kernel choice this machine can play (tools/test_cpus.py):
# make test-cpus                         every setting, once
# make test-cpus REPEAT=3 CPUS="avx2"    one setting, three times in a row
# make test-cpus PARALLEL=1              the settings side by side, the cores shared out (CI)
CPUS     ?= default avx2 avx512 native
REPEAT   ?= 1
PARALLEL ?=
test-cpus: $(VENV)/.installed-dev
	$(PY) tools/test_cpus.py --repeat $(REPEAT) $(foreach c,$(CPUS),--only $(c)) $(if $(PARALLEL),--parallel)

clean:
	rm -rf $(VENV) runs .cache site
