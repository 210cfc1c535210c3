#!/usr/bin/env bash
# The SVM test bed: a real KVM with AMD SVM and nested paging, under QEMU's TCG emulator.
#
# Installs what it needs from Debian's archive (qemu-system-x86, busybox-static, cpio, and
# a stock kernel package, downloaded and unpacked, not installed), builds an initramfs with
# pvmm, the bundled guest, busybox and the kvm modules, boots QEMU with
# `-cpu qemu64,+svm,+npt`, runs the test plan inside (init.sh), and judges the serial log
# (judge.awk): any `not ok`, missing plan or missing result fails the bed.
#
# Environment:
#   REQUIRE_SVM=1      a bed that cannot run (no QEMU and cannot install, no archive) fails
#                      instead of skipping
#   SVM_BED_DIR        cache and logs (default target/svm-bed)
#   SVM_BED_BOOTS      the plan: boots separated by ';', each `<qemu cpus>=<step>,<step>...`
#   SVM_BED_TIMEOUT    seconds per QEMU boot (default 1200; a full boot 1 takes 3-4 minutes)
#   SVM_BED_STALL      seconds without console output after which a boot counts as wedged
#                      (default 420): QEMU is killed and the boot's unfinished steps run once
#                      more in a fresh boot (SVM_BED_RETRIES, default 1)
#   SVM_BED_VERBOSE=1  stream the whole serial console (default: step progress only)
#   PVMM_BIN, PVMM_GUEST  the binaries under test (default: the release builds)
#   BENCH_MATRIX_BIN   the bench matrix for `bench:` steps (default target/release/bench-matrix)
#   SVM_BED_BENCH_OUT  a directory: the last `bench:` step's output (results.json, report.md,
#                      plots) is unpacked there (`make bench`), a `benchcostonly:` step's
#                      into its cost/; a bed that skips writes its reason to DIR/SKIPPED
#   SVM_BED_QEMU       the QEMU binary (default qemu-system-x86_64)
#   SVM_BED_CPU        the QEMU -cpu model (default qemu64,+svm,+npt,+xsave,+xsaveopt,+pku)
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
HERE="$ROOT/tests/svm-bed"
BED=${SVM_BED_DIR:-$ROOT/target/svm-bed}
PVMM=${PVMM_BIN:-$ROOT/target/release/pvmm}
GUEST=${PVMM_GUEST:-$ROOT/guest-images/target/x86_64-unknown-linux-gnu/release/pvmm-guest}
BENCH_MATRIX=${BENCH_MATRIX_BIN:-$ROOT/target/release/bench-matrix}
TIMEOUT=${SVM_BED_TIMEOUT:-1200}
STALL=${SVM_BED_STALL:-420}
RETRIES=${SVM_BED_RETRIES:-1}
SUITES="suite:native:vmcall,suite:pv:vmcall,suite:pv-lazy:vmcall,suite:native:auto,suite:pv:auto,suite:pv-lazy:auto"
DEFAULT_BOOTS="1=$SUITES,suite:emulate:auto,suite:wrpt:auto,bench:16x1:vmcall,linux,npt0,suite:pv:vmcall@npt0,suite:pv-lazy:auto@npt0;2=smp:pv-lazy:auto,smp:pv:auto,smp:native:auto,smp4:pv-lazy:auto,smp:wrpt:auto,smpbreak:native:auto,smpbreak:pv-lazy:auto,smpkick:pv-lazy:auto,smppkey:pv-lazy:auto,kzapbreak:pv-lazy:auto"
# Not in the default plan: linux:2 (a stock Linux with --vcpus 2 under -smp 2) passed 7 of 8
# runs; one produced no output for 20 minutes from the L2 kernel's boot on (pvmm's own
# --timeout never answered either) until QEMU was killed. Run it with SVM_BED_BOOTS="2=linux:2";
# BED-HEARTBEAT lines show pvmm's thread states if it hangs again.
# bench:16x1:vmcall (about 30 s) keeps `make bench`'s bed part from breaking silently: the
# matrix of the five strategies must run whole inside the bed and its output come out intact.
BOOTS=${SVM_BED_BOOTS:-$DEFAULT_BOOTS}
PACKAGES="qemu-system-x86 busybox-static cpio"
QEMU=${SVM_BED_QEMU:-qemu-system-x86_64}
# SVM with nested paging; XSAVE and protection keys, so that L1 offers pkey_mprotect (the
# kernel flush of remote TLBs, docs/pv-abi.md §6.5). XSAVEOPT too: without it the Debian
# kernel hangs in its FPU set-up under TCG.
BED_CPU=${SVM_BED_CPU:-qemu64,+svm,+npt,+xsave,+xsaveopt,+pku}

log() { echo "svm-bed: $*"; }

skip() {
    if [ -n "${SVM_BED_BENCH_OUT:-}" ]; then
        mkdir -p "$SVM_BED_BENCH_OUT"
        rm -f "$SVM_BED_BENCH_OUT"/{results.json,report.md,exits_per_op.svg,us_per_op.svg}
        echo "the SVM bed skipped: $*" >"$SVM_BED_BENCH_OUT/SKIPPED"
    fi
    if [ "${REQUIRE_SVM:-0}" = 1 ]; then
        echo "FAIL svm-bed: $* (and REQUIRE_SVM=1)"
        exit 1
    fi
    echo "SKIP svm-bed: $* (set REQUIRE_SVM=1 to make this a failure)"
    exit 0
}

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo -n "$@"; else return 1; fi
}

APT_UPDATED=0
apt_update() {
    [ "$APT_UPDATED" = 1 ] && return 0
    log "apt-get update"
    as_root apt-get update -q >"$BED/apt-update.log" 2>&1 || return 1
    APT_UPDATED=1
}

static_busybox() {
    [ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1
}

install_tools() {
    command -v "$QEMU" >/dev/null && command -v cpio >/dev/null && static_busybox && return 0
    command -v apt-get >/dev/null || skip "QEMU/busybox-static/cpio missing and no apt-get to install them"
    apt_update || skip "cannot reach Debian's archive (apt-get update failed, see $BED/apt-update.log)"
    log "installing $PACKAGES"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $PACKAGES \
        >"$BED/apt-install.log" 2>&1 || skip "cannot install $PACKAGES (see $BED/apt-install.log)"
    command -v "$QEMU" >/dev/null && static_busybox ||
        skip "installed $PACKAGES but $QEMU or a static /bin/busybox is still missing"
}

# Sets KVER and KDIR: the stock kernel linux-image-amd64 depends on, unpacked under $BED.
fetch_kernel() {
    local deps
    deps=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
    if [ -z "$deps" ]; then
        apt_update || true
        deps=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
    fi
    if [ -z "$deps" ]; then
        # No package lists: fall back to a kernel unpacked by an earlier run.
        KDIR=$(ls -d "$BED"/kernel-* 2>/dev/null | tail -1)
        [ -n "$KDIR" ] || skip "cannot find the linux-image-amd64 dependency (no package lists, no cache)"
        KVER=${KDIR##*/kernel-}
        return 0
    fi
    KVER=${deps#linux-image-}
    KDIR="$BED/kernel-$KVER"
    [ -f "$KDIR/boot/vmlinuz-$KVER" ] && return 0
    mkdir -p "$BED/dl"
    if ! ls "$BED"/dl/"$deps"_*.deb >/dev/null 2>&1; then
        log "downloading $deps"
        (cd "$BED/dl" && apt-get download "$deps" >"$BED/apt-download.log" 2>&1) ||
            { apt_update && (cd "$BED/dl" && apt-get download "$deps" >"$BED/apt-download.log" 2>&1); } ||
            skip "cannot download $deps (see $BED/apt-download.log)"
    fi
    rm -rf "$KDIR.tmp"
    dpkg-deb -x "$(ls "$BED"/dl/"$deps"_*.deb | tail -1)" "$KDIR.tmp" || { log "cannot unpack $deps"; exit 1; }
    mv "$KDIR.tmp" "$KDIR"
}

# Copies a dynamic executable and the libraries ldd names into the tree at $1.
copy_with_libs() {
    local root=$1 src=$2 dst=$3 lib
    install -D -m 755 "$src" "$root$dst"
    if command -v strip >/dev/null; then strip --strip-debug "$root$dst" 2>/dev/null || true; fi
    for lib in $(ldd "$src" 2>/dev/null | grep -o '/[^ ]*'); do
        install -D -m 755 "$lib" "$root$lib"
    done
}

cpio_gz() { # directory, output
    (cd "$1" && find . | cpio -o -H newc --quiet | gzip -1) >"$2"
}

build_initramfs() {
    local r="$BED/root" l="$BED/linux-root" m
    local mods="$KDIR/lib/modules/$KVER/kernel"
    rm -rf "$r" "$l"
    mkdir -p "$r/bin" "$r/bed/modules" "$l/bin"
    cp /bin/busybox "$r/bin/busybox"
    cp /bin/busybox "$l/bin/busybox"
    install -m 755 "$HERE/init.sh" "$r/init"
    install -m 755 "$HERE/linux-init.sh" "$l/init"
    copy_with_libs "$r" "$PVMM" /bed/pvmm
    install -m 644 "$GUEST" "$r/bed/pvmm-guest"
    case ";$BOOTS," in *[=,]bench:* | *[=,]benchcost:* | *[=,]benchcostonly:*)
        [ -x "$BENCH_MATRIX" ] || { log "$BENCH_MATRIX not found: cargo build --release -p pvmm-e2e"; exit 1; }
        copy_with_libs "$r" "$BENCH_MATRIX" /bed/bench-matrix
        ;;
    esac
    for m in virt/lib/irqbypass drivers/crypto/ccp/ccp arch/x86/kvm/kvm arch/x86/kvm/kvm-amd; do
        if [ -f "$mods/$m.ko" ]; then
            cp "$mods/$m.ko" "$r/bed/modules/"
        elif [ -f "$mods/$m.ko.xz" ]; then
            xz -dc "$mods/$m.ko.xz" >"$r/bed/modules/${m##*/}.ko"
        else
            log "kernel $KVER has no module $m"
            exit 1
        fi
        # Any dependency modinfo names beyond the four must be in the tree too.
        for dep in $(tr '\0' '\n' <"$r/bed/modules/${m##*/}.ko" | sed -n 's/^depends=//p' | tr ',' ' '); do
            case "$dep" in irqbypass | ccp | kvm) ;; *)
                log "module ${m##*/} needs $dep, which the bed does not load"
                exit 1
                ;;
            esac
        done
    done
    cp "$KDIR/boot/vmlinuz-$KVER" "$r/bed/vmlinuz"
    cpio_gz "$l" "$r/bed/linux-initrd.gz"
    cpio_gz "$r" "$BED/initrd.gz"
}

# Kills the QEMU of run `tag` once its log `out` has not grown for STALL seconds (an L1
# wedged under TCG: seen with 2 CPUs, where even init's heartbeat stops), leaving
# `out.wedged`; returns when that QEMU is gone.
watchdog() { # tag, log
    local size=-1 quiet=0 now
    rm -f "$2.wedged"
    while sleep 15; do
        pgrep -f "bed.run=$1 " >/dev/null || return 0
        # The wedged L1 kernel still prints its soft-lockup reports: they are no progress,
        # and one of a minute or more means it is stuck for good.
        if grep -qE "$LOCKUP" "$2" 2>/dev/null; then
            echo "L1 soft lockup: $(grep -E "$LOCKUP" "$2" | tail -1)" >"$2.wedged"
            pkill -f "bed.run=$1 "
            return 0
        fi
        # (grep -c prints 0 itself when nothing matches.)
        now=$(grep -cvE 'soft lockup|rcu: ' "$2" 2>/dev/null)
        if [ "$now" = "$size" ]; then quiet=$((quiet + 15)); else quiet=0; size=$now; fi
        if [ "$quiet" -ge "$STALL" ]; then
            echo "no console output for $quiet s" >"$2.wedged"
            pkill -f "bed.run=$1 "
            return 0
        fi
    done
}

# An L1 soft-lockup report of 60 s or more (the watchdog's sign of a wedged L1).
LOCKUP='soft lockup - CPU#[0-9]+ stuck for ([6-9][0-9]|[0-9]{3,})s'

# One QEMU boot: cpus, comma-separated steps, log file. Returns QEMU's (or timeout's) status.
boot() {
    local cpus=$1 steps=$2 out=$3 accel=tcg tag="$$-$RANDOM" wd
    [ "$cpus" -gt 1 ] && accel=tcg,thread=multi
    log "boot: QEMU TCG, $cpus CPU(s), steps $steps"
    : >"$out"
    watchdog "$tag" "$out" &
    wd=$!
    timeout -k 10 "$TIMEOUT" "$QEMU" -accel "$accel" -cpu "$BED_CPU" -m 2G \
        -smp "$cpus" -kernel "$KDIR/boot/vmlinuz-$KVER" -initrd "$BED/initrd.gz" \
        -append "console=ttyS0 panic=-1 quiet loglevel=3 bed.steps=$steps bed.run=$tag bed.token=$TOKEN" \
        -display none -serial stdio -monitor none -no-reboot </dev/null 2>"$out.qemu-stderr" |
        tee "$out" | if [ "${SVM_BED_VERBOSE:-0}" = 1 ]; then cat; else
            grep --line-buffered -E '^(BED-BEGIN|BED-END|BED-KVM|BED-DONE|Kernel panic)'; fi
    local rc=${PIPESTATUS[0]}
    kill "$wd" 2>/dev/null
    wait "$wd" 2>/dev/null
    return "$rc"
}

# The steps of `steps` (comma-separated) that log `out` has no BED-END for.
unfinished() { # steps, log
    local s left=""
    for s in $(echo "$1" | tr ',' ' '); do
        tr -d '\r' <"$2" | grep -q "^BED-END $s " || left="$left${left:+,}$s"
    done
    echo "$left"
}

# Unpacks every BED-FILE block of log $1 into $BED/files/<name without .tar.gz>/ after
# checking its line count and md5; returns 1 if a block is damaged.
extract_files() {
    local log=$1 name lines md5 got dir bad=0 boot
    # Every boot numbers its files from 1: the boot's name keeps them apart.
    boot=$(basename "$log" .log)
    while read -r name lines md5; do
        dir="$BED/files/$boot-${name%.tar.gz}"
        awk -v n="$name" '{ sub(/\r+$/, "") } $0 == "BED-FILE-END " n { on = 0 } on { print } $1 == "BED-FILE-BEGIN" && $2 == n { on = 1 }' \
            "$log" >"$BED/files/$name.b64"
        got=$(md5sum <"$BED/files/$name.b64" | cut -d' ' -f1)
        if [ "$(wc -l <"$BED/files/$name.b64")" != "$lines" ] || [ "$got" != "$md5" ]; then
            log "$name from $log is damaged (want $lines lines, md5 $md5; got $(wc -l <"$BED/files/$name.b64"), $got)"
            bad=1
            continue
        fi
        rm -rf "$dir" && mkdir -p "$dir"
        base64 -d <"$BED/files/$name.b64" | tar xzf - -C "$dir" --strip-components=1 || { log "cannot unpack $name"; bad=1; continue; }
        log "unpacked $name into $dir"
        # A cost-only matrix (benchcostonly:) has no UP points: it goes beside the other.
        if grep -Eq '"points": ?\[\]' "$dir/results.json" 2>/dev/null; then
            LAST_COST_DIR=$dir
        else
            LAST_BENCH_DIR=$dir
        fi
    done < <(tr -d '\r' <"$log" | awk '$1 == "BED-FILE-BEGIN" { sub(/^lines=/, "", $3); sub(/^md5=/, "", $4); print $2, $3, $4 }')
    return "$bad"
}

# What a boot that did not reach BED-DONE left: its status, the last console lines (the
# step it was in, the guest's last output) and QEMU's stderr.
cut_off_report() { # boot number, QEMU status, seconds, log
    local why="QEMU status $2 after $3 s"
    [ -f "$4.wedged" ] && why="$why, killed as wedged: $(cat "$4.wedged")"
    echo "svm-bed: boot $1 did not reach BED-DONE ($why); last console lines and QEMU's stderr:"
    grep -a '^BED-BEGIN' "$4" | tail -n 1 | sed 's/^/    last step: /'
    tail -n 15 "$4" | tr -d '\r' | sed 's/^/    /'
    sed 's/^/    qemu: /' "$4.qemu-stderr"
}

main() {
    mkdir -p "$BED"
    "$HERE/judge-test.sh" >"$BED/judge-test.log" || { cat "$BED/judge-test.log"; log "judge.awk self-test failed"; exit 1; }
    [ -x "$PVMM" ] || { log "$PVMM not found: run make build"; exit 1; }
    [ -f "$GUEST" ] || { log "$GUEST not found: run make build"; exit 1; }
    install_tools
    fetch_kernel
    log "kernel $KVER"
    build_initramfs
    TOKEN="bed-token-$(date +%s)"
    local started=$SECONDS all_steps="" i=0 spec cpus steps qrc logs=() cut_off=()
    IFS=';' read -ra specs <<<"$BOOTS"
    local retries=$RETRIES todo
    for spec in "${specs[@]}"; do
        cpus=${spec%%=*}
        steps=${spec#*=}
        all_steps="$all_steps${all_steps:+,}$steps"
        todo=$steps
        while [ -n "$todo" ]; do
            i=$((i + 1))
            local out="$BED/boot-$i.log"
            local t0=$SECONDS
            boot "$cpus" "$todo" "$out"
            qrc=$?
            log "boot $i ended (status $qrc) after $((SECONDS - t0)) s; log: $out"
            [ "$qrc" = 124 ] && log "boot $i hit the ${TIMEOUT}s timeout"
            logs+=("$out")
            grep -q '^BED-DONE' "$out" && break
            cut_off+=("$(cut_off_report "$i" "$qrc" "$((SECONDS - t0))" "$out")")
            printf '%s\n' "${cut_off[-1]}"
            [ -f "$out.wedged" ] && [ "$retries" -gt 0 ] || break
            retries=$((retries - 1))
            todo=$(unfinished "$todo" "$out")
            # Steps tagged @npt0 run after the kvm_amd reload: a fresh boot needs it again.
            case ",$todo," in *@npt0,*) case ",$todo," in *,npt0,*) ;; *) todo="npt0,$todo" ;; esac ;; esac
            cut_off+=("svm-bed: boot $i wedged ($(cat "$out.wedged")); its unfinished steps run again in a fresh boot: $todo")
            printf '%s\n' "${cut_off[-1]}"
        done
    done
    local table rc files_ok=1
    LAST_BENCH_DIR="" LAST_COST_DIR=""
    mkdir -p "$BED/files"
    for out in "${logs[@]}"; do extract_files "$out" || files_ok=0; done
    if [ -n "${SVM_BED_BENCH_OUT:-}" ]; then
        mkdir -p "$SVM_BED_BENCH_OUT"
        rm -f "$SVM_BED_BENCH_OUT"/{results.json,report.md,exits_per_op.svg,us_per_op.svg,SKIPPED}
        rm -rf "$SVM_BED_BENCH_OUT/cost"
        if [ -n "$LAST_COST_DIR" ]; then
            mkdir -p "$SVM_BED_BENCH_OUT/cost" && cp -r "$LAST_COST_DIR"/. "$SVM_BED_BENCH_OUT/cost"/
        fi
        if [ -n "$LAST_BENCH_DIR" ]; then
            cp -r "$LAST_BENCH_DIR"/. "$SVM_BED_BENCH_OUT"/
            log "the bed's bench output is in $SVM_BED_BENCH_OUT"
        else
            echo "the SVM bed ran but brought no bench output back" >"$SVM_BED_BENCH_OUT/SKIPPED"
        fi
    fi
    table=$(cat "${logs[@]}" | awk -v steps="$all_steps" -v token="$TOKEN" -f "$HERE/judge.awk")
    rc=$?
    [ "$files_ok" = 1 ] || rc=1
    echo
    echo "=== SVM bed summary (kernel $KVER, total wall $((SECONDS - started)) s) ==="
    {
        printf 'step\tmode\ttransport\tresult\tpassed\tfailed\twall(s)\tvia\texits\thypercalls\tresyncs\tnote\n'
        echo "$table"
    } | awk -F'\t' '{ for (i = 1; i <= NF; i++) { c[NR, i] = $i; if (length($i) > w[i]) w[i] = length($i) } n = NR; if (NF > nf) nf = NF }
        END { for (r = 1; r <= n; r++) { l = ""; for (i = 1; i <= nf; i++) l = l sprintf(i < nf ? "%-" w[i] "s  " : "%s", c[r, i]); print l } }'
    # Repeated last: CI shows the tail of the output.
    [ "${#cut_off[@]}" -gt 0 ] && printf '%s\n' "${cut_off[@]}"
    if [ "$rc" = 0 ]; then
        echo "svm-bed: PASS"
    else
        echo "svm-bed: FAIL (logs: ${logs[*]})"
    fi
    exit "$rc"
}

main "$@"
