# The two commands of the README, and the benchmarks. Each brings up what it needs.
.PHONY: demo test bench crash-matrix stack-up stack-down

demo:
	scripts/demo

test:
	scripts/test

bench:
	scripts/bench

# The crash-safety matrix, several runs per crash point; writes results/crash-matrix.md.
crash-matrix:
	scripts/crash-matrix

stack-up:
	scripts/stack up

stack-down:
	scripts/stack down
