#!/usr/bin/env bash
# Checks judge.awk on hand-made serial logs: a good suite passes, and every way a suite or
# the stock-Linux step can go wrong fails. Needs nothing but awk; runs in well under a second.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
fails=0

# judge <steps> <expected verdict of the first step> <description>, log on stdin
judge() {
    local got
    got=$(awk -v steps="$1" -v token=tok-1 -f "$HERE/judge.awk" | head -1 | cut -f4)
    if [ "$got" = "$2" ]; then echo "ok - $3"; else echo "not ok - $3 (verdict '$got', want '$2')"; fails=$((fails + 1)); fi
}

suite() { # $1: TAP body, $2: rc, $3: via, $4: remote flushes (default the dirty-log kernel flush)
    printf 'BED-BEGIN suite:pv:vmcall\r\r\nnoise\r\r\nTAP version 13\r\r\n%b' "$1"
    printf '\nBED-STATS-BEGIN\nend: guest-exit (exit code 0)   wall: 1 ms   hypercalls via: %s\n' "$3"
    printf 'pool resync: not needed (auto); remote flushes: %s\ntotal 10\nBED-STATS-END\n' "${4:-kernel (dirty_log)}"
    printf 'BED-END suite:pv:vmcall rc=%s secs=1.00\n' "$2"
}

good='1..2\nok 1 a\nok 2 b\n'
suite "$good" 0 'vmcall (forced)' | judge suite:pv:vmcall PASS "a complete suite over vmcall passes"
suite '1..2\nok 1 a\nnot ok 2 b\n' 1 'vmcall (forced)' | judge suite:pv:vmcall FAIL "a not ok fails"
suite '1..2\nok 1 a\nnot ok 2 b\n' 0 'vmcall (forced)' | judge suite:pv:vmcall FAIL "a not ok fails even with status 0"
suite 'ok 1 a\nok 2 b\n' 0 'vmcall (forced)' | judge suite:pv:vmcall FAIL "a missing plan fails"
suite '1..3\nok 1 a\nok 2 b\n' 0 'vmcall (forced)' | judge suite:pv:vmcall FAIL "a missing result fails"
suite '1..2\nok 1 a\nok 3 b\n' 0 'vmcall (forced)' | judge suite:pv:vmcall FAIL "out-of-order numbers fail"
suite "$good" 0 'vmcall (auto, probe 75.5 ms)' | judge suite:pv:vmcall PASS "the v2 stats header with the probe time is read"
suite "$good" 0 'pio (auto)' | judge suite:pv:vmcall FAIL "a pio stats header fails a vmcall step"
suite "$good" 104 'vmcall (forced)' | judge suite:pv:vmcall FAIL "a non-zero pvmm status fails"
suite "$good" 0 'vmcall (forced)' | head -6 | judge suite:pv:vmcall FAIL "a step cut off before BED-END fails"
printf '' | judge suite:pv:vmcall FAIL "a step that never ran fails"
smp() { sed 's/BED-BEGIN suite:pv:vmcall/BED-BEGIN smp:pv:vmcall/; s/BED-END suite:pv:vmcall/BED-END smp:pv:vmcall/'; }
smp_good='# mmu=pv cpus=2\n1..2\nok 1 a\nok 2 smp_unmap\n'
suite "$smp_good" 0 'vmcall (forced)' | smp | judge smp:pv:vmcall PASS "an SMP suite on 2 CPUs passes"
suite "$good" 0 'vmcall (forced)' | smp | judge smp:pv:vmcall FAIL "an SMP step without smp_* tests or a CPU count fails"
suite '# mmu=pv cpus=1\n1..2\nok 1 a\nok 2 smp_unmap\n' 0 'vmcall (forced)' | smp |
    judge smp:pv:vmcall FAIL "an SMP step whose guest saw 1 CPU fails"
suite '# mmu=pv cpus=2\n1..2\nok 1 a\nok 2 smp_unmap # SKIP x\n' 0 'vmcall (forced)' | smp |
    judge smp:pv:vmcall FAIL "an SMP step whose smp_* tests all skipped fails"
suite '# mmu=pv cpus=2\n1..2\nok 1 a\nnot ok 2 smp_unmap\n' 1 'vmcall (forced)' | smp |
    judge smp:pv:vmcall FAIL "a failing smp_* test fails the SMP step"
suite "$smp_good" 0 'vmcall (forced)' kick | smp |
    judge smp:pv:vmcall FAIL "a PV SMP step whose remote flushes fell back to kicks fails"
kick() { sed 's/BED-BEGIN suite:pv:vmcall/BED-BEGIN smpkick:pv:vmcall/; s/BED-END suite:pv:vmcall/BED-END smpkick:pv:vmcall/'; }
suite "$smp_good" 0 'vmcall (forced)' kick | kick |
    judge smpkick:pv:vmcall PASS "an SMP suite with kicks passes the kick step"
suite "$smp_good" 0 'vmcall (forced)' | kick |
    judge smpkick:pv:vmcall FAIL "a kick step whose flushes went through the kernel fails"
suite "$smp_good" 0 'vmcall (forced)' 'kernel (pkey)' | smp |
    judge smp:pv:vmcall FAIL "a PV SMP step whose kernel flush fell back to protection keys fails"
pkey() { sed 's/BED-BEGIN suite:pv:vmcall/BED-BEGIN smppkey:pv:vmcall/; s/BED-END suite:pv:vmcall/BED-END smppkey:pv:vmcall/'; }
suite "$smp_good" 0 'vmcall (forced)' 'kernel (pkey)' | pkey |
    judge smppkey:pv:vmcall PASS "an SMP suite on the protection-key trigger passes the pkey step"
suite "$smp_good" 0 'vmcall (forced)' | pkey |
    judge smppkey:pv:vmcall FAIL "a pkey step whose flushes took the dirty log fails"
smp4() { sed 's/BED-BEGIN suite:pv:vmcall/BED-BEGIN smp4:pv:vmcall/; s/BED-END suite:pv:vmcall/BED-END smp4:pv:vmcall/'; }
suite '# mmu=pv cpus=4\n1..2\nok 1 a\nok 2 smp_unmap\n' 0 'vmcall (forced)' | smp4 |
    judge smp4:pv:vmcall PASS "an SMP suite on 4 CPUs passes the 4-vCPU step"
suite "$smp_good" 0 'vmcall (forced)' | smp4 |
    judge smp4:pv:vmcall FAIL "a 4-vCPU step whose guest saw 2 CPUs fails"

kzap() { sed 's/BED-BEGIN suite:pv:vmcall/BED-BEGIN kzapbreak:pv-lazy:vmcall/; s/BED-END suite:pv:vmcall/BED-END kzapbreak:pv-lazy:vmcall/'; }
suite '# mmu=pv-lazy cpus=2\n1..2\nnot ok 1 smp_unmap # x\nok 2 smp_dirty\n' 1 'vmcall (forced)' | kzap |
    judge kzapbreak:pv-lazy:vmcall PASS "kzapbreak: a failing shootdown test passes the step"
suite '# mmu=pv-lazy cpus=2\n1..2\nok 1 smp_unmap\nok 2 smp_dirty\n' 0 'vmcall (forced)' | kzap |
    judge kzapbreak:pv-lazy:vmcall FAIL "kzapbreak: TLB tests that pass without the zap fail the step"
brk() { sed 's/BED-BEGIN suite:pv:vmcall/BED-BEGIN smpbreak:native:vmcall/; s/BED-END suite:pv:vmcall/BED-END smpbreak:native:vmcall/'; }
suite '# mmu=native cpus=2\n1..2\nok 1 smp_unmap\nnot ok 2 smp_dirty # x\n' 1 'vmcall (forced)' | brk |
    judge smpbreak:native:vmcall PASS "smpbreak: a failing dirty-race test passes the step"
suite '# mmu=native cpus=2\n1..2\nnot ok 1 smp_unmap # x\nok 2 smp_dirty\n' 1 'vmcall (forced)' | brk |
    judge smpbreak:native:vmcall PASS "smpbreak: a failing shootdown test passes the step"
suite '# mmu=native cpus=2\n1..2\nok 1 smp_unmap\nok 2 smp_dirty\n' 0 'vmcall (forced)' | brk |
    judge smpbreak:native:vmcall FAIL "smpbreak: TLB tests that pass without shootdowns fail the step"
suite '# mmu=native cpus=2\n1..2\nok 1 smp_unmap\nnot ok 2 smp_fork_cow # x\n' 1 'vmcall (forced)' | brk |
    judge smpbreak:native:vmcall FAIL "smpbreak: a failure outside the TLB tests does not pass the step"

linux() { # $1: timer after, $2: uptime after, $3: echoed token, $4: rc
    printf 'BED-BEGIN linux\nLINUX-MARKER userspace reached: 6.1\nLINUX-TIMER before=10 after=%s\n' "$1"
    printf 'LINUX-SLEEP uptime_before=5.00 uptime_after=%s\nLINUX-ECHO %s\n' "$2" "$3"
    printf 'BED-STATS-BEGIN\nBED-STATS-END\nBED-END linux rc=%s secs=100.00\n' "$4"
}
linux 20 6.05 tok-1 0 | judge linux PASS "a stock Linux that ticks, sleeps, echoes and reboots passes"
linux 10 6.05 tok-1 0 | judge linux FAIL "a timer that does not tick fails"
linux 20 5.50 tok-1 0 | judge linux FAIL "a sleep shorter than 1 s of uptime fails"
linux 20 6.05 other 0 | judge linux FAIL "a wrong echoed line fails"
linux 20 6.05 tok-1 104 | judge linux FAIL "a Linux that does not reboot (timeout) fails"
linux 20 6.05 tok-1 0 | sed 's/BED-BEGIN linux/&:2/; s/BED-END linux/&:2/; s/^LINUX-MARKER.*/&\nLINUX-CPUS 2/' |
    judge linux:2 PASS "a 2-vCPU Linux that sees 2 CPUs passes"
linux 20 6.05 tok-1 0 | sed 's/BED-BEGIN linux/&:2/; s/BED-END linux/&:2/; s/^LINUX-MARKER.*/&\nLINUX-CPUS 1/' |
    judge linux:2 FAIL "a 2-vCPU Linux that brought up only 1 CPU fails"

bench() { # $1: rc, $2: points, $3: errors, $4: transport used, $5: block lines declared, $6: lines sent
    printf 'BED-BEGIN bench:16x1:vmcall\r\nbench-matrix: host transport=%s resync_needed=false hw_virt=true kvm_paging=kvm_amd_npt=1\r\n' "$4"
    printf 'wrote /tmp/bench/results.json, report.md, exits_per_op.svg, us_per_op.svg (%s points, %s errors)\r\n' "$2" "$3"
    printf 'BED-FILE-BEGIN bench.tar.gz lines=%s md5=x\r\n' "$5"
    for _ in $(seq "$6"); do printf 'H4sIAAAAAAAAA+3R\r\n'; done
    printf 'BED-FILE-END bench.tar.gz\r\nBED-END bench:16x1:vmcall rc=%s secs=60.00\r\n' "$1"
}
bench 0 30 0 vmcall 3 3 | judge bench:16x1:vmcall PASS "bench: a whole matrix over vmcall with its output block passes"
bench 1 30 0 vmcall 3 3 | judge bench:16x1:vmcall FAIL "bench: a non-zero bench-matrix status fails"
bench 0 29 1 vmcall 3 3 | judge bench:16x1:vmcall FAIL "bench: a failed run fails"
bench 0 0 0 vmcall 3 3 | judge bench:16x1:vmcall FAIL "bench: no points fails"
bench 0 30 0 pio 3 3 | judge bench:16x1:vmcall FAIL "bench: runs over pio fail a vmcall step"
bench 0 30 0 vmcall 3 2 | judge bench:16x1:vmcall FAIL "bench: an output block cut short fails"
bench 0 30 0 vmcall 3 3 | grep -v '^BED-FILE-END' | judge bench:16x1:vmcall FAIL "bench: an output block without its end fails"
bench 0 30 0 vmcall 3 3 | grep -v '^wrote' | judge bench:16x1:vmcall FAIL "bench: a run without the summary line fails"
bench 0 30 0 vmcall 3 3 | grep -v '^BED-FILE' | grep -v '^H4s' | judge bench:16x1:vmcall FAIL "bench: no output block fails"
bench 0 30 0 vmcall 3 3 | sed 's/bench:16x1/benchcost:16x1/' | judge benchcost:16x1:vmcall PASS "benchcost: judged as a bench step"
bench 1 30 0 vmcall 3 3 | sed 's/bench:16x1/benchcost:16x1/' | judge benchcost:16x1:vmcall FAIL "benchcost: a non-zero bench-matrix status fails"

[ "$fails" = 0 ] && echo "judge-test: all passed" || { echo "judge-test: $fails failed"; exit 1; }
