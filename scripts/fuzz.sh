#!/usr/bin/env bash
# Runs the cargo-fuzz targets of fuzz/ (sans-IO parts of `common`) for a bounded time each.
#
#   scripts/fuzz.sh [seconds-per-target] [target...]      (default: 300 s, all targets)
#
# Each target starts from a scratch copy of its committed corpus (fuzz/corpus/<target>), so
# the committed corpus is not changed by a run (unless FUZZ_MERGE=1); inputs the run finds
# interesting stay in fuzz/target/fuzz-scratch/<target>. Targets run two at a time
# (FUZZ_JOBS). A crash fails the script (exit 1) and names the crashing input, saved under
# fuzz/artifacts/<target>/; reproduce it with
#   (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run --debug-assertions <target> <input>)
# and add it to common/tests/fuzz_regressions.rs (which also replays the committed corpora
# under plain `cargo test`).
#
# Environment: FUZZ_JOBS (parallel targets, default 2), FUZZ_SANITIZER (address | none, default
# address), FUZZ_MERGE=1 (after a clean run, replace the committed corpus by the hand-written
# `seed-*` files plus a minimal set of inputs from the committed corpus and the run's finds
# that covers every edge: libFuzzer's -set_cover_merge, what `cargo fuzz cmin` does, without
# losing the seeds' names). Needs only the Rust toolchain (stable is fine: cargo-fuzz's
# nightly flags are enabled with RUSTC_BOOTSTRAP=1), a C/C++ compiler (libFuzzer) and the
# crates registry.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
fuzz="$root/fuzz"
secs=${1:-300}
if ! [[ $secs =~ ^[0-9]+$ ]] || ((secs == 0)); then
    echo "usage: $0 [seconds-per-target] [target...]" >&2
    exit 2
fi
shift $(($# > 0 ? 1 : 0))

all=()
for f in "$fuzz"/fuzz_targets/*.rs; do
    all+=("$(basename "$f" .rs)")
done
targets=("$@")
((${#targets[@]})) || targets=("${all[@]}")
for t in "${targets[@]}"; do
    if [[ ! -f $fuzz/fuzz_targets/$t.rs ]]; then
        echo "unknown target $t (known: ${all[*]})" >&2
        exit 2
    fi
done

export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
# cargo-fuzz passes nightly-only flags (-Zsanitizer, -Cpasses=sancov-module); let stable take them.
export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

jobs=${FUZZ_JOBS:-2}
sanitizer=${FUZZ_SANITIZER:-address}
build_start=$SECONDS
(cd "$fuzz" && cargo fuzz build --sanitizer "$sanitizer" --debug-assertions)
echo "build: $((SECONDS - build_start)) s"

triple=$(rustc -vV | sed -n 's/^host: //p')
bin="$fuzz/target/$triple/release"
scratch_root="$fuzz/target/fuzz-scratch"
results=$(mktemp -d)
trap 'rm -rf "$results"' EXIT

max_len() {
    case $1 in
    # Long enough to cross the 8192-byte head limit.
    connect_request | connect_response | forward) echo 9000 ;;
    hub | keys | limits) echo 1024 ;;
    *) echo 4096 ;;
    esac
}

count() { find "$1" -maxdepth 1 -type f 2>/dev/null | wc -l; }

# Fuzzes one target; writes "ok"/"crash" and a summary line into $results/<target>.
run_one() {
    local t=$1
    local scratch="$scratch_root/$t" artifacts="$fuzz/artifacts/$t" log="$results/$t.log"
    rm -rf "$scratch"
    mkdir -p "$scratch" "$artifacts"
    if [[ -d $fuzz/corpus/$t ]]; then
        cp -R "$fuzz/corpus/$t/." "$scratch/"
    fi
    local committed start rc=0
    committed=$(count "$scratch")
    start=$SECONDS
    "$bin/$t" -max_total_time="$secs" -max_len="$(max_len "$t")" -timeout=10 \
        -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix="$artifacts/" \
        "$scratch" >"$log" 2>&1 || rc=$?
    local took=$((SECONDS - start))
    local runs corpus status crash
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n1)
    corpus=$(count "$scratch")
    crash=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n1)
    if ((rc == 0)); then
        status=ok
    else
        status=FAILED
    fi
    local extra=""
    if [[ $status != ok ]]; then
        extra=" exit=$rc input=${crash:-none} log=$scratch_root/$t.log"
        cp "$log" "$scratch_root/$t.log"
    elif [[ ${FUZZ_MERGE:-0} == 1 ]]; then
        local merged="$scratch_root/$t.merged"
        rm -rf "$merged"
        mkdir -p "$merged" "$fuzz/corpus/$t"
        find "$fuzz/corpus/$t" -maxdepth 1 -type f -name 'seed-*' -exec cp {} "$merged/" \;
        if "$bin/$t" -set_cover_merge=1 -use_counters=0 -max_len="$(max_len "$t")" \
            "$merged" "$fuzz/corpus/$t" "$scratch" >"$scratch_root/$t.merge.log" 2>&1; then
            rm -rf "$fuzz/corpus/$t"
            mv "$merged" "$fuzz/corpus/$t"
            extra=" merged=$(count "$fuzz/corpus/$t")"
        else
            status=FAILED
            extra=" merge failed (log $scratch_root/$t.merge.log)"
        fi
    fi
    local line
    line=$(printf '%-17s %-6s runs=%-10s time=%ss corpus=%s (committed %s)%s' \
        "$t" "$status" "${runs:-?}" "$took" "$corpus" "$committed" "$extra")
    echo "$status" >"$results/$t.status"
    echo "$line" | tee "$results/$t"
}

start=$SECONDS
for t in "${targets[@]}"; do
    while (($(jobs -rp | wc -l) >= jobs)); do
        wait -n || true
    done
    run_one "$t" &
done
wait

failed=0
echo "---- summary (${secs}s per target, $((SECONDS - start))s wall)"
for t in "${targets[@]}"; do
    cat "$results/$t" 2>/dev/null || echo "$t: no result"
    [[ $(cat "$results/$t.status" 2>/dev/null) == ok ]] || failed=1
done
if ((failed)); then
    echo "fuzzing found failures (inputs above, under fuzz/artifacts/)" >&2
    exit 1
fi
