# pvmm: build, run and test. `make run` boots the bundled PV guest; `make test` runs everything.
CARGO   ?= cargo
GUEST   := guest-images/target/x86_64-unknown-linux-gnu/release/pvmm-guest
PVMM    := target/release/pvmm
RUN_CMDLINE ?= console=ttyS0 selftest=all mmu=pv-lazy
RUN_ARGS    ?= --stats table --timeout 600
BENCH_PAGES ?= 256
BENCH_REPEAT ?= 3
# The SVM bed's column set of the bench report (BENCH_SVM=0 skips it).
BENCH_SVM ?= 1
BENCH_SVM_PAGES ?= $(BENCH_PAGES)
BENCH_SVM_REPEAT ?= $(BENCH_REPEAT)
# BENCH_SVM_COST=1: the bed's run adds the remote-flush cost rows (a second boot, QEMU
# with 2 CPUs, a `benchcostonly:` step; minutes under TCG, so not the default).
BENCH_SVM_COST ?= 0
BENCH_SVM_SIZE = $(BENCH_SVM_PAGES)x$(BENCH_SVM_REPEAT):vmcall
BENCH_SVM_PLAN = 1=bench:$(BENCH_SVM_SIZE)$(if $(filter 1,$(BENCH_SVM_COST)),;2=benchcostonly:$(BENCH_SVM_SIZE))
BENCH_BED := bench/svm-bed

export PVMM_BIN   := $(abspath $(PVMM))
export PVMM_GUEST := $(abspath $(GUEST))

.PHONY: all build deps vmm guest run test lint unit e2e bench clean test-svm mutants

all: build

# The toolchain ships with the machine; make sure the lint components are there too.
deps:
	@command -v $(CARGO) >/dev/null || { echo "cargo not found: install the Rust toolchain (rustup)"; exit 1; }
	@$(CARGO) clippy --version >/dev/null 2>&1 || rustup component add clippy
	@$(CARGO) fmt --version >/dev/null 2>&1 || rustup component add rustfmt

build: deps vmm guest

vmm:
	$(CARGO) build --release -p vmm

guest:
	cd guest-images && $(CARGO) build --release

run: build
	$(PVMM) run --kernel $(GUEST) --cmdline "$(RUN_CMDLINE)" $(RUN_ARGS)

lint: deps
	$(CARGO) fmt --all -- --check
	cd guest-images && $(CARGO) fmt -p pvmm-guest -p pvmm-user -- --check
	python3 scripts/check-module-cycles.py --self-test
	python3 scripts/check-module-cycles.py vmm/src shadow/src hypercall/src tests/src \
		guest-images/kernel/src guest-images/user/src
	$(CARGO) clippy --workspace --all-targets --release -- -D warnings
	cd guest-images && $(CARGO) clippy --workspace --all-targets --release -- -D warnings

# On a host without hardware virtualization (like CI's), `make test` also runs the SVM test
# bed, so the vmcall transport, nested paging and a stock Linux guest are tested too; it runs
# before the cargo tests so that their summary closes the output.
test: build lint
	@if grep -qwE 'vmx|svm' /proc/cpuinfo; then \
		echo "test-svm: this host has hardware virtualization: the tests below use it directly"; \
	else $(MAKE) --no-print-directory test-svm; fi
	$(CARGO) test --workspace --release

# The SVM test bed (tests/svm-bed/run.sh): a real KVM with AMD SVM and nested paging under
# QEMU TCG. Skips with a printed reason where it cannot run, unless REQUIRE_SVM=1.
REQUIRE_SVM ?= 0
test-svm: build
	$(CARGO) build --release -p pvmm-e2e --bin bench-matrix
	REQUIRE_SVM=$(REQUIRE_SVM) tests/svm-bed/run.sh

# The matrix runs twice: inside the SVM bed (the five strategies over vmcall, into
# $(BENCH_BED)/; skipped with a printed reason where the bed cannot run, or with BENCH_SVM=0),
# then on this host, whose report.md puts the bed's column set beside its own.
bench: build
	$(CARGO) bench -p shadow --bench engine -- --warm-up-time 1 --measurement-time 3
	$(CARGO) bench -p vmm --bench dispatch -- --warm-up-time 1 --measurement-time 3
	$(PVMM) bench-exits --iterations 20000 --repeat 5
	$(CARGO) build --release -p pvmm-e2e --bin bench-matrix
	@if [ "$(BENCH_SVM)" = 0 ]; then \
		mkdir -p $(BENCH_BED) && rm -f $(BENCH_BED)/results.json $(BENCH_BED)/report.md $(BENCH_BED)/*.svg; \
		echo "skipped with BENCH_SVM=0" >$(BENCH_BED)/SKIPPED; \
		echo "bench: the SVM bed's column set skipped (BENCH_SVM=0)"; \
	else \
		SVM_BED_BOOTS="$(BENCH_SVM_PLAN)" \
		SVM_BED_TIMEOUT=1200 \
		SVM_BED_BENCH_OUT=$(abspath $(BENCH_BED)) REQUIRE_SVM=$(REQUIRE_SVM) tests/svm-bed/run.sh; \
	fi
	target/release/bench-matrix --pages=$(BENCH_PAGES) --repeat=$(BENCH_REPEAT) --out=bench --bed=$(BENCH_BED)

clean:
	$(CARGO) clean
	cd guest-images && $(CARGO) clean

# Mutation testing of the shadow engine with cargo-mutants (crates.io); slow: hours on 2
# cores (MUTANTS_ARGS="-f shadow/src/ad.rs" narrows it). Survivors are listed in
# target/mutants.out/missed.txt; equivalent ones are explained in shadow/README.md.
mutants:
	@command -v cargo-mutants >/dev/null || $(CARGO) install cargo-mutants --locked
	$(CARGO) mutants -p shadow -e shadow/src/debug.rs --timeout-multiplier 3 -j 1 --cargo-test-arg=--tests -o target $(MUTANTS_ARGS)
