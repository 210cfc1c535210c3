#!/usr/bin/env bash
# Cargo's rustc wrapper for the guest build (.cargo/config.toml: build.rustc-wrapper).
# Runs the compiler ("$@": rustc, or clippy-driver then rustc) unchanged and drops exactly
# one diagnostic from its stderr: rustc's future-compatibility WARNING that `sse2` is part
# of the x86_64-unknown-linux-gnu float ABI. The guest must be built without SSE (see
# .cargo/config.toml) and passes no floats, so the note can never apply; rustc offers no
# lint name to allow it. Every other warning, every lint and every error passes through,
# and if rustc ever turns this warning into an error, the error passes through too.
set -o pipefail
exec 3>&1
"$@" 2>&1 1>&3 3>&- |
    sed -e '/"level":"warning"/{/target feature `sse2` must be enabled to ensure that the ABI/d;}' \
        -e '/^warning: target feature `sse2` must be enabled to ensure that the ABI/,/^$/d' >&2
