#!/usr/bin/env bash
# Coverage-guided fuzzing of every decoder of untrusted bytes, on the stable toolchain.
#
# Each target in fuzz/fuzz_targets/ is linked with libFuzzer (the `libfuzzer-sys` crate,
# pinned in fuzz/Cargo.toml and fuzz/Cargo.lock, which compiles libFuzzer with the system
# C++ compiler) and instrumented with LLVM's SanitizerCoverage through stable `-C` flags
# (`-Cpasses=sancov-module` and `-Cllvm-args=-sanitizer-coverage-*`): no nightly, no
# cargo-fuzz, no RUSTC_BOOTSTRAP. Every target starts from its committed seed corpus in
# fuzz/corpus/<target>/ and runs for FUZZ_SECONDS; a crash, a panic, a leak-free OOM or a
# hang fails the script and leaves the input in $FUZZ_ARTIFACTS/<target>/.
#
# Environment:
#   FUZZ_SECONDS     seconds per target (default 20)
#   FUZZ_TARGETS     space-separated targets to run (default: all)
#   FUZZ_ARTIFACTS   where crashing inputs and the grown corpus go (default: a temp dir)
#   FUZZ_KEEP_CORPUS=1  copy inputs that found new coverage back into fuzz/corpus/
#   FUZZ_NO_BUILD=1  run the targets already built (e.g. restored from a CI cache)
#   CARGO_TARGET_DIR honoured as usual (default fuzz/target, fuzz/target-quick with --quick)
#
# --quick: the smoke run CI can afford on every change. The same targets, instrumentation
# and seed corpora, but everything compiled at opt-level 0 (a cold build of the targets
# and their ~170 dependency crates at opt-level 2 dominates the full run) and 10 s per
# target by default. Fewer executions per second, so it finds less than the full run;
# it still fails on any crash, panic, timeout or OOM reached from the seeds.
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0
for arg in "$@"; do
    case "$arg" in
        --quick) quick=1 ;;
        *) echo "fuzz.sh: unknown argument $arg (only --quick)" >&2; exit 2 ;;
    esac
done
build_flags=()
if [[ "$quick" == 1 ]]; then
    seconds="${FUZZ_SECONDS:-10}"
    build_flags=(--config 'profile.dev.opt-level=0' --config 'profile.dev.package."*".opt-level=0')
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/fuzz/target-quick}"
else
    seconds="${FUZZ_SECONDS:-20}"
fi
host="$(rustc -vV | sed -n 's/^host: //p')"
command -v c++ >/dev/null || { echo "fuzz.sh: a C++ compiler (c++) is needed to build libFuzzer" >&2; exit 1; }

# SanitizerCoverage as cargo-fuzz configures it, with stable flags only. `--target` keeps
# these flags off build scripts and proc macros.
export RUSTFLAGS="${RUSTFLAGS:-} -Cpasses=sancov-module \
 -Cllvm-args=-sanitizer-coverage-level=4 \
 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
 -Cllvm-args=-sanitizer-coverage-pc-table \
 -Cllvm-args=-sanitizer-coverage-trace-compares \
 --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/fuzz/target}"

all_targets=$(sed -n 's/^name = "\([a-z_]*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^shardseal-fuzz$' || true)
targets="${FUZZ_TARGETS:-$all_targets}"

if [[ "${FUZZ_NO_BUILD:-0}" != 1 ]]; then
    echo "==> building fuzz targets ($host, stable: $(rustc --version))"
    build_started=$(date +%s)
    cargo build --locked --manifest-path fuzz/Cargo.toml --target "$host" --bins ${build_flags[@]+"${build_flags[@]}"}
    echo "==> built in $(( $(date +%s) - build_started )) s"
fi

artifacts="${FUZZ_ARTIFACTS:-$(mktemp -d -t shardseal-fuzz-XXXXXX)}"
summary=()
for target in $targets; do
    bin="$CARGO_TARGET_DIR/$host/debug/$target"
    seeds="fuzz/corpus/$target"
    work="$artifacts/$target/corpus"
    mkdir -p "$work" "$artifacts/$target/crashes" "$seeds"
    log="$artifacts/$target/fuzz.log"
    echo "==> $target: ${seconds}s from $(find "$seeds" -type f | wc -l) seed(s)"
    # The grown corpus goes to $work; the committed seeds are read only.
    if ! "$bin" "$work" "$seeds" \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
        -print_final_stats=1 -artifact_prefix="$artifacts/$target/crashes/" \
        >"$log" 2>&1; then
        tail -n 60 "$log" >&2
        echo "fuzz.sh: $target FAILED; crashing input in $artifacts/$target/crashes/" >&2
        exit 1
    fi
    # libFuzzer's status lines: "#<execs>\t<EVENT> cov: <edges> ft: <features> corp: ...".
    events=$(grep -E '^#[0-9]+[[:space:]]+(INITED|NEW|REDUCE|DONE)' "$log" || true)
    printf '%s\n' "$events" | tail -n 2
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    first_cov=$(printf '%s\n' "$events" | grep -m1 INITED | grep -Eo 'cov: [0-9]+' | cut -d' ' -f2 || true)
    cov=$(printf '%s\n' "$events" | grep -Eo 'cov: [0-9]+' | tail -n 1 | cut -d' ' -f2 || true)
    new=$(printf '%s\n' "$events" | grep -Ec '[[:space:]]NEW[[:space:]]' || true)
    summary+=("$(printf '%-16s %11s execs in %4ss   edges %5s -> %-5s  %5s new inputs' \
        "$target" "${runs:-?}" "$seconds" "${first_cov:-?}" "${cov:-?}" "$new")")
    if [[ "${FUZZ_KEEP_CORPUS:-0}" == 1 ]]; then
        "$bin" -merge=1 "$seeds" "$work" >/dev/null 2>&1 || true
    fi
done

echo
echo "==> fuzzing summary (no crash in any target)"
printf '%s\n' "${summary[@]}"
