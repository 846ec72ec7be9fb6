# Recipes mirror the README's cargo commands; they never replace them.

# The one-command reproduction of the performance claims (report in reports/out/).
repro *ARGS:
    cargo repro {{ARGS}}

# The soak: sttproxy alone under finite sessions, misbehaving clients and backend kills.
soak duration="30m":
    cargo repro --scenario soak --duration {{duration}}

# The whole test suite (unit, proptest, integration over 127.0.0.1).
test:
    cargo test --workspace

# loom model checks of the pool (its own target dir: --cfg loom rebuilds everything).
loom:
    RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=2 CARGO_TARGET_DIR=target/loom cargo test -p sttproxy-pool --release --test loom_pool

# Pool benchmark: ours vs the naive mutex design vs deadpool.
bench:
    cargo bench -p sttproxy-pool --bench pool

# Instructions per relayed message vs the committed baseline (needs valgrind and
# gungraun-runner of the gungraun version in Cargo.lock; see .ci/run).
instructions:
    scripts/check-instructions

# Fault simulation: every scenario, many seeds, ours vs the naive pool.
sim-sweep seeds="30":
    cargo run --release -p sim -- sweep --scenario all --seeds {{seeds}} --duration 10m

lint:
    cargo clippy --workspace --all-targets -- -D warnings
    cargo fmt --all --check

# What CI runs.
ci:
    bash .ci/run
