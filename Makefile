# `make demo` and `make test` set up what they need (idempotent) on a Debian machine as root.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEB_PACKAGES := qemu-system-x86 linux-image-amd64 fio python3-venv python3-dev gcc libc6-dev \
                linux-libc-dev e2fsprogs util-linux kmod pciutils busybox-static file \
                valgrind qemu-utils nbdkit nbdkit-plugin-python nbd-client libnbd-bin python3-libnbd nvme-cli acl
NATIVE_SOURCES := $(wildcard native/*.c native/*.h native/*.py) setup.py pyproject.toml

.PHONY: all setup deps venv demo test test-host test-vm lint wheelhouse wheel-venv bench bench-embedding clean

all: test

setup: deps venv

# Debian packages: installed only when one is missing.
deps:
	@missing=""; for p in $(DEB_PACKAGES); do \
	    dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi

venv: $(VENV)/.installed

# The virtualenv and the native build; redone when the native sources change.
$(VENV)/.installed: $(NATIVE_SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -c "import iommu_dma; print('native engine:', iommu_dma.native_version())"
	touch $@

demo: setup
	$(PY) -m iommu_dma.demo

# Every test: lint (ruff, mypy), the engine under ASan+UBSan, host and VM tests.
test: lint test-asan wheel-venv bench-kernel
	$(VENV)/bin/pytest -ra --durations=40

test-host: setup
	$(VENV)/bin/pytest -ra -m "not iommu_dma_vm"

test-vm: setup
	$(VENV)/bin/pytest -ra -m iommu_dma_vm

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# The package as users get it: our wheel and its dependencies' wheels (the wheel VM test
# installs from here into a fresh virtualenv outside the checkout).
wheelhouse: build/wheelhouse/.built

build/wheelhouse/.built: $(VENV)/.installed $(NATIVE_SOURCES) $(wildcard iommu_dma/*.py iommu_dma/*/*.py iommu_dma/data/*)
	rm -rf build/wheelhouse
	$(PY) -m pip wheel -q . -w build/wheelhouse
	touch $@

# The wheel installed offline into a fresh virtualenv of its own, as a user installs it; the
# wheel VM test runs its iommu-dma command in the guest (pip itself under TCG took ~5 minutes).
wheel-venv: build/wheel-venv/.built

build/wheel-venv/.built: build/wheelhouse/.built
	rm -rf build/wheel-venv
	$(PYTHON) -m venv --without-pip build/wheel-venv
	$(PY) -m pip --python build/wheel-venv/bin/python install -q --no-index \
	    --no-cache-dir --disable-pip-version-check --find-links build/wheelhouse iommu-dma
	touch $@

bench: setup
	$(PY) -m benchmarks.randread

bench-embedding: setup
	$(PY) -m benchmarks.embedding

clean:
	rm -rf $(VENV) build *.egg-info iommu_dma/_native*.so iommu_dma/_native.c

# The host tests against the engine built with AddressSanitizer + UBSan (iommu_dma._native_asan).
# PYTHONMALLOC=malloc: Python's own buffers (cffi arrays handed to the engine) get redzones too;
# --capture=sys: a sanitizer report (written to fd 2, then abort) reaches the terminal.
.PHONY: test-asan
test-asan: setup
	$(PY) native/build.py --asan
	LD_PRELOAD=$$(gcc -print-file-name=libasan.so) PYTHONMALLOC=malloc \
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
	UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	IOMMU_DMA_NATIVE=asan $(VENV)/bin/pytest -q -p no:cacheprovider --capture=sys tests/host \
	    -m "not iommu_dma_vm"

# Instructions per 4 KiB read of the engine against a simulated controller, counted by
# valgrind's callgrind (host only, deterministic): C worker QD1/QD32 and Python batch QD32.
.PHONY: bench-engine-cost
bench-engine-cost: setup
	$(PY) -m benchmarks.engine_cost

# Where QD1 time goes: the C worker at QD1 with one knob changed at a time, in one perf-bench boot.
.PHONY: bench-qd1
bench-qd1: setup
	$(PY) -m benchmarks.qd1

# The namespace over NBD with fio's nbd ioengine: `iommu-dma serve` (each --wait mode) against
# nbdkit's file plugin on the kernel nvme driver, 4 KiB randread QD16 and 1 MiB seq write QD4.
.PHONY: bench-nbd
bench-nbd: setup
	$(PY) -m benchmarks.nbd

# The bench kernel (Debian's linux-source-6.12 with iommufd, VFIO cdev and virtio-iommu), built
# once into a cache outside the checkout and reused while its configuration is unchanged.
.PHONY: bench-kernel
bench-kernel: setup
	bash scripts/build_bench_kernel.sh
