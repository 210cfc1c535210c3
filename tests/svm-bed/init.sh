#!/bin/busybox sh
# /init of the SVM test bed (runs inside QEMU TCG with -cpu ...,+svm,+npt).
#
# Loads kvm_amd, then runs the steps named by `bed.steps=` on the kernel command line, in
# order, and powers off. Every step prints a machine-parsable block on the serial console
# (the host side, tests/svm-bed/run.sh, judges it):
#
#   BED-BEGIN <step>
#   ...pvmm's guest console (TAP for suites), streamed...
#   BED-STATS-BEGIN / ...pvmm's stats table... / BED-STATS-END
#   BED-END <step> rc=<pvmm exit status> secs=<wall seconds>
#
# Steps: suite:<mmu mode>:<transport>   the whole selftest suite, one pvmm run
#        smp:<mmu mode>:<transport>     the suite with --vcpus 2
#        smp4:<mmu mode>:<transport>    the suite with --vcpus 4 (on QEMU's 2 CPUs)
#        smpbreak:<mmu mode>:<transport> SMP tests with --vcpus 2 and remote flushes off
#                                       (native: the guest's break=no_shootdown; PV: pvmm's
#                                       --debug-drop-remote-flushes): they must fail
#        smpkick:<mmu mode>:<transport> the suite with --vcpus 2 and --remote-flush kick
#        smppkey:<mmu mode>:<transport> the suite with --vcpus 2 and the kernel flush's
#            protection-key trigger (--kernel-flush-trigger pkey)
#        kzapbreak:<mmu mode>:<transport> SMP tests with --vcpus 2, --remote-flush kernel and
#                                       --debug-kernel-flush-no-zap (targets counted flushed,
#                                       nothing zapped): they must fail
#        npt0                           reload kvm_amd with npt=0 (later steps run on it)
#        linux[:<vcpus>]                a stock Linux bzImage under pvmm (see linux-init.sh)
#        bench:<pages>x<repeat>:<transport> the bench matrix (/bed/bench-matrix: the five
#                                       strategies, UP, exit floor in the same run) at that
#                                       size; its output directory comes out on the console
#                                       as a BED-FILE block (a base64 tar.gz, see emit_dir)
#        benchcost:<pages>x<repeat>:<transport> the same with the remote-flush cost rows
#                                       (1, 2 and 4 vCPUs: boot it on QEMU's 2 CPUs)
#        benchcostonly:<pages>x<repeat>:<transport> only the cost rows (no UP matrix: far
#                                       fewer VMs made and destroyed under multi-threaded TCG)
# A step may end in @tag (suite:pv:vmcall@npt0) to tell repeated steps apart.
/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin /proc /sys /dev /tmp
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp

PVMM=/bed/pvmm
GUEST=/bed/pvmm-guest
MODDIR=/bed/modules
SUITE_CMDLINE="console=ttyS0 selftest=all pages=256"
BREAK_CMDLINE="console=ttyS0 selftest=smp_unmap,smp_mprotect,smp_remap,smp_dirty,smp_fork_cow break=no_shootdown"
STEP_TIMEOUT=900
# One smpbreak attempt takes 2-3 s; with the flushes gone the guest may corrupt itself and
# hang, which must cost one attempt, not the boot's whole QEMU timeout.
BREAK_TIMEOUT=${BREAK_TIMEOUT:-60}

say() { echo "$*"; }

now_cs() { # uptime in centiseconds
    read -r up _ </proc/uptime
    echo "${up%.*}${up#*.}" | sed 's/^0*//;s/^$/0/'
}

secs_since() { # start_cs -> "S.CC"
    d=$(($(now_cs) - $1))
    printf '%d.%02d' $((d / 100)) $((d % 100))
}

load_kvm() { # extra kvm_amd parameters
    for m in irqbypass ccp kvm; do
        grep -q "^$m " /proc/modules || insmod "$MODDIR/$m.ko" || return 1
    done
    insmod "$MODDIR/kvm-amd.ko" "$@" || return 1
    [ -c /dev/kvm ] || return 1
}

# Host facts, for the log.
say "BED-HOST cpus=$(nproc) kernel=$(uname -r) svm=$(grep -c -w svm /proc/cpuinfo)"
if load_kvm; then
    say "BED-KVM loaded npt=$(cat /sys/module/kvm_amd/parameters/npt)"
else
    say "BED-KVM failed"
    dmesg | tail -20
fi
dmesg | grep -i -E 'kvm|svm|nested paging' | sed 's/^/BED-DMESG /'

run_pvmm() { # step name, then pvmm arguments; stdin from the caller
    name=$1
    shift
    say "BED-BEGIN $name"
    t0=$(now_cs)
    limit=${RUN_TIMEOUT:-$STEP_TIMEOUT}
    # The outer kill is a backstop: pvmm must end by itself within STOP_GRACE of --timeout.
    timeout -s KILL $((limit + 30)) "$PVMM" run "$@" --stats table --stats-file /tmp/stats.txt \
        --timeout "$limit"
    rc=$?
    [ "$rc" = 137 ] && say "BED-NOTE $name: pvmm outlived its --timeout $limit by 30 s and was killed"
    secs=$(secs_since "$t0")
    say ""
    say "BED-STATS-BEGIN"
    cat /tmp/stats.txt 2>/dev/null
    say "BED-STATS-END"
    say "BED-END $name rc=$rc secs=$secs"
    rm -f /tmp/stats.txt
}

suite() { # name mode transport vcpus [pvmm flags]
    name=$1 mode=$2 transport=$3 vcpus=$4
    shift 4
    run_pvmm "$name" --kernel "$GUEST" --cmdline "$SUITE_CMDLINE mmu=$mode" \
        --hypercall "$transport" --vcpus "$vcpus" --mem 256M "$@" </dev/null
}

# A stale translation lives only until the target vCPU's next exit to the bed's KVM (QEMU
# drops its TLB on the way back in), and under TCG one often comes before the prober looks:
# a run can miss the missing flush. Up to BREAK_ATTEMPTS runs; the first in which a TLB test
# fails is the one judged (the last if none does). Where the mechanism were not needed, no
# attempt would fail and the judge fails the step.
BREAK_ATTEMPTS=${BREAK_ATTEMPTS:-4}
smpbreak() { # name mode transport [pvmm flags that break the PV flush]
    drop=""
    [ "$2" != native ] && drop=${4:---debug-drop-remote-flushes}
    n=1
    while :; do
        RUN_TIMEOUT=$BREAK_TIMEOUT
        run_pvmm "$1" --kernel "$GUEST" --cmdline "$BREAK_CMDLINE mmu=$2" \
            --hypercall "$3" --vcpus 2 --mem 256M $drop </dev/null >/tmp/break.log 2>&1
        RUN_TIMEOUT=
        grep -q "rc=205 " /tmp/break.log && say "BED-NOTE $1: attempt $n hit the ${BREAK_TIMEOUT}s timeout"
        if grep -qE '^not ok [0-9]+ smp_(unmap|mprotect|remap|dirty)( |$)' /tmp/break.log ||
            [ "$n" -ge "$BREAK_ATTEMPTS" ]; then
            break
        fi
        say "BED-NOTE $1: attempt $n saw no stale translation; again"
        n=$((n + 1))
    done
    cat /tmp/break.log
    say "BED-NOTE $1: judged attempt $n of at most $BREAK_ATTEMPTS"
    rm -f /tmp/break.log
}

npt0() {
    say "BED-BEGIN npt0"
    rmmod kvm_amd
    if load_kvm npt=0; then rc=0; else rc=1; fi
    say "npt=$(cat /sys/module/kvm_amd/parameters/npt 2>/dev/null)"
    dmesg | tail -3
    say "BED-END npt0 rc=$rc secs=0"
}

# The stock-Linux step: pvmm boots /bed/vmlinuz with /bed/linux-initrd.gz. Its console is
# piped through a reader that answers the guest's input prompt through a FIFO on pvmm's
# stdin, so the guest's serial tty is checked in both directions.
# Every 30 s while a stock Linux runs: L1's uptime and each pvmm thread's state and wait
# channel, so a hang shows whether L1, pvmm or the guest stopped.
heartbeat() {
    while sleep 30; do
        pid=$(pidof pvmm | cut -d' ' -f1)
        line="BED-HEARTBEAT up=$(cut -d' ' -f1 /proc/uptime) pvmm=[$(tr '\0' ' ' </proc/"$pid"/cmdline 2>/dev/null | sed 's/.*--cmdline //' | cut -c1-120)]"
        for t in /proc/$pid/task/*; do
            [ -r "$t/stat" ] || continue
            line="$line $(cat "$t/comm"):$(cut -d' ' -f3 "$t/stat"):$(cat "$t/wchan" 2>/dev/null)"
        done
        echo "$line"
    done
}

linux() { # step name, vCPUs
    mkfifo /tmp/linux-in
    exec 3<>/tmp/linux-in
    heartbeat &
    hb=$!
    run_pvmm "$1" --kernel /bed/vmlinuz --initrd /bed/linux-initrd.gz \
        --cmdline "console=ttyS0 panic=-1 reboot=k" --mem 512M --hypercall auto --vcpus "$2" \
        </tmp/linux-in | while IFS= read -r line; do
        printf '%s\n' "$line"
        case "$line" in
        *LINUX-READY-FOR-INPUT*) echo "$TOKEN" >&3 ;;
        esac
    done
    kill "$hb"
    exec 3>&-
    rm -f /tmp/linux-in
}

# Prints directory $1 (under /tmp) as a gzipped tar in base64 between
#   BED-FILE-BEGIN <name>.tar.gz lines=<base64 lines> md5=<md5 of those lines>
#   BED-FILE-END <name>.tar.gz
# (run.sh checks both and unpacks it).
emit_dir() {
    (cd /tmp && tar czf - "${1#/tmp/}") | base64 >/tmp/emit.b64
    say "BED-FILE-BEGIN ${1##*/}.tar.gz lines=$(wc -l </tmp/emit.b64) md5=$(md5sum </tmp/emit.b64 | cut -d' ' -f1)"
    cat /tmp/emit.b64
    say "BED-FILE-END ${1##*/}.tar.gz"
    rm -f /tmp/emit.b64
}

BENCH_NOTE="QEMU TCG + SVM/NPT bed (pvmm and its guest run under kvm_amd in a stock Debian kernel, itself emulated by QEMU TCG): absolute µs are emulation-inflated; compare ratios."

bench() { # step name, <pages>x<repeat>, transport, --smp= value
    say "BED-BEGIN $1"
    t0=$(now_cs)
    rm -rf /tmp/bench
    if [ -x /bed/bench-matrix ]; then
        # A run that hangs shows which one and each pvmm thread's state (the matrix's own
        # output comes only at its end).
        heartbeat &
        hb=$!
        # $4 may hold more than one value (benchcostonly): split on purpose.
        # shellcheck disable=SC2086
        PVMM_BIN=$PVMM PVMM_GUEST=$GUEST /bed/bench-matrix --modes=five $(printf -- '--smp=%s ' $4) \
            --pages="${2%x*}" --repeat="${2#*x}" --hypercall="$3" --floor-iterations=5000 \
            --out=/tmp/bench --host-note="$BENCH_NOTE" </dev/null 2>/tmp/bench-stderr
        rc=$?
        kill "$hb"
        # stderr is a file, so that no progress bar is drawn; its errors follow the summary.
        sed 's/^/bench-matrix stderr: /' /tmp/bench-stderr | tail -n 20
    else
        say "no /bed/bench-matrix in the initramfs"
        rc=127
    fi
    secs=$(secs_since "$t0")
    # Numbered: two bench steps in one boot must not emit blocks of the same name.
    BENCH_N=$((${BENCH_N:-0} + 1))
    if [ -d /tmp/bench ]; then
        rm -rf "/tmp/bench-$BENCH_N"
        mv /tmp/bench "/tmp/bench-$BENCH_N" && emit_dir "/tmp/bench-$BENCH_N"
    fi
    say "BED-END $1 rc=$rc secs=$secs"
}

TOKEN=$(tr ' ' '\n' </proc/cmdline | sed -n 's/^bed\.token=//p')
steps=$(tr ' ' '\n' </proc/cmdline | sed -n 's/^bed\.steps=//p')
for s in $(echo "$steps" | tr ',' ' '); do
    # kind:mode:transport, optionally @tag to tell repeated steps apart (ignored here).
    IFS=: read -r kind mode transport <<EOF
${s%%@*}
EOF
    case "$kind" in
    suite) suite "$s" "$mode" "$transport" 1 ;;
    smp) suite "$s" "$mode" "$transport" 2 ;;
    smp4) suite "$s" "$mode" "$transport" 4 ;;
    smpbreak) smpbreak "$s" "$mode" "$transport" ;;
    smpkick) suite "$s" "$mode" "$transport" 2 --remote-flush kick ;;
    smppkey) suite "$s" "$mode" "$transport" 2 --kernel-flush-trigger pkey ;;
    kzapbreak) smpbreak "$s" "$mode" "$transport" "--remote-flush kernel --debug-kernel-flush-no-zap" ;;
    npt0) npt0 ;;
    linux) linux "$s" "${mode:-1}" ;;
    bench) bench "$s" "$mode" "$transport" off ;;
    benchcost) bench "$s" "$mode" "$transport" cost ;;
    benchcostonly) bench "$s" "$mode" "$transport" "cost only" ;;
    *) say "BED-BEGIN $s" && say "unknown step" && say "BED-END $s rc=127 secs=0" ;;
    esac
done
say "BED-DONE"
sync
poweroff -f
