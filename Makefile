# make demo : train a DDM on the embedded biased digits, then sample it unguided and guided,
#             side by side with their FD (creates .venv)
# make test : the whole test suite (what .ci/run runs)
# make test-fast: the tests not marked slow (no subprocesses, PyTorch or Stable Diffusion)
# make bench: JAX vs the PyTorch reference, one JSON line per preset (BENCHMARKS.md;
#             BENCH_ARGS='small --rounds 5' picks presets/options)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo
PIP := $(PY) -m pip install -q --disable-pip-version-check
# glibc maps XLA:CPU's large step buffers with transparent huge pages: without it every
# step of the `small` benchmark page-faults ~160 MB back in (40k faults, ~100 ms of kernel
# time), with it ~200 faults and an ~18 % faster JAX step (BENCHMARKS.md). Ignored where
# glibc or the kernel lack it; a GLIBC_TUNABLES of your own wins. Not set for `make bench`:
# it slowed the PyTorch train step there, and the table gives both settings.
THP := GLIBC_TUNABLES=$${GLIBC_TUNABLES:-glibc.malloc.hugetlb=1}

.PHONY: demo test test-fast bench clean

# Installs hold to constraints.txt, the tested lock (setup.cfg's ranges are wider).
$(VENV)/.core: setup.cfg pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -c constraints.txt -e .
	touch $@

# TORCH_INDEX='--extra-index-url https://download.pytorch.org/whl/cpu' takes torch's CPU build
# where PyPI's would be the CUDA one (README, "Dependencies"); empty here, where a local CPU
# wheel satisfies the pin.
TORCH_INDEX ?=
$(VENV)/.test: $(VENV)/.core
	$(PIP) -c constraints.txt $(TORCH_INDEX) -e '.[test,torch]'
	touch $@

demo: $(VENV)/.core
	@start=$$(date +%s); \
	$(THP) $(PY) train.py --config=configs/digits.py --workdir=$(WORKDIR) && \
	$(THP) $(PY) -m ddm_jax.cli.compare --workdir=$(WORKDIR) --num_samples=160 && \
	echo "demo finished in $$(( $$(date +%s) - start )) s: metrics $(WORKDIR)/metrics.jsonl, \
	checkpoints $(WORKDIR)/checkpoints, evaluations $(WORKDIR)/eval/before_after, \
	the picture $(WORKDIR)/before_after.png"

test: $(VENV)/.test
	$(PY) -m pytest -q -n 2 --dist loadfile tests

test-fast: $(VENV)/.test
	$(PY) -m pytest -q -n 2 --dist loadfile -m 'not slow' tests

bench: $(VENV)/.test
	$(PY) benchmarks/run.py $(BENCH_ARGS)

# Only what make made: the environment, the demo's run, pip's build leftovers. Other runs
# under runs/ are the user's and stay.
clean:
	rm -rf $(VENV) $(WORKDIR) build ddm_jax.egg-info
