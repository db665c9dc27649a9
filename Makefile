# `make ci` runs exactly what CI runs (.ci/run).
.PHONY: ci test fmt lint bench

ci:
	bash .ci/run

test:
	cargo test --workspace

fmt:
	cargo fmt --all

lint:
	cargo clippy --workspace --all-targets -- -D warnings

bench:
	cargo build --release -p lockstep-cli
	./target/release/lockstep bench publish
	./target/release/lockstep bench read
