#!/usr/bin/env bash
# The stream pump (gateway/dataplane/_pump.c) under AddressSanitizer and UndefinedBehaviorSanitizer: a copy of
# the tree in its own build directory, the pump built there with -fsanitize=address,undefined, then the pump's
# tests and its fuzz harness run against that build, in-process (tests/test_pump_unit.py, test_pump_fuzz.py,
# test_pump_events.py, test_pump_resumed.py; the exchange's hand-overs to it, tests/test_exchange_pump.py) and
# through real gateways (tests/test_pump.py: the gateways they start import the same copy).
#
#   bash scripts/pump_asan.sh                          the fixed budget .ci/run uses (~1-2 min)
#   GATEWAY_FUZZ_EXAMPLES=20000 bash scripts/pump_asan.sh tests/test_pump_fuzz.py    a longer fuzz run
#
# Python itself is not instrumented: libasan is preloaded (it must come first), PYTHONMALLOC=malloc sends every
# object allocation through it (so a freed Stream is caught), leak detection is off (the interpreter keeps memory
# at exit by design), and any UBSan report aborts.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
OUT=${PUMP_ASAN_DIR:-$ROOT/build/pump-asan}
CC=${CC:-cc}

rm -rf "$OUT" && mkdir -p "$OUT"
git ls-files -z --cached --others --exclude-standard -- gateway replicas router_client tests scripts setup.py pyproject.toml \
    | tar --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -xf - -C "$OUT"
rm -f "$OUT"/gateway/dataplane/_pump*.so
(cd "$OUT" && CC=$CC CFLAGS="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g -O1" \
    LDFLAGS="-fsanitize=address,undefined" "$PYTHON" setup.py -q build_ext --inplace >/dev/null 2>&1) \
    || { echo "the sanitized pump did not build" >&2; exit 1; }

LIBASAN=$("$CC" -print-file-name=libasan.so)
[ -e "$LIBASAN" ] || { echo "libasan not found ($CC -print-file-name=libasan.so)" >&2; exit 1; }
tests=("$@")
[ ${#tests[@]} -eq 0 ] && tests=(tests/test_pump_unit.py tests/test_pump_fuzz.py tests/test_pump_events.py tests/test_pump_resumed.py tests/test_exchange_pump.py tests/test_pump.py)
cd "$OUT"
LD_PRELOAD=$LIBASAN PYTHONMALLOC=malloc PYTHONPATH=$OUT \
    ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:print_summary=1 \
    UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    "$PYTHON" -c "import gateway.dataplane._pump as p, sys; sys.exit(0 if p.__file__.startswith('$OUT') else 1)" \
    || { echo "the sanitized pump is not the one imported" >&2; exit 1; }
exec env LD_PRELOAD="$LIBASAN" PYTHONMALLOC=malloc PYTHONPATH="$OUT" \
    ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:print_summary=1 \
    UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    "$PYTHON" -m pytest -q -p no:cacheprovider "${tests[@]}"
