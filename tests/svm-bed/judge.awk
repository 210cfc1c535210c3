# Judges the serial log of one or more SVM-bed boots (see init.sh for the block format).
#
# Input: the concatenated logs. Variables: steps (comma-separated steps that were asked
# for, in order), token (the line the stock-Linux step must echo back).
# Output: one tab-separated line per step, in the order asked:
#   step  mode  transport  verdict  passed  failed  secs  via  exits  hypercalls  resyncs  why
# verdict is PASS or FAIL. An SMP step must also show the guest running on every vCPU
# (the guest's `# mmu=... cpus=N` line) and its smp_* tests run. An smpbreak step (the
# guest's shootdowns switched off) passes only if the dirty-race test failed. A bench step
# passes if bench-matrix ended with status 0 and measured points without errors, over the
# transport asked for, and its output block came out whole (its line count; run.sh also
# checks its md5); passed/failed are its points/errors, resyncs its resync verdict.
# Exit status: 0 if no step is FAIL.

function reset_step() {
    tap = 0; plan = -1; npts = 0; nok = 0; nnot = 0; order_ok = 1; skips = 0
    via = "-"; exits = "-"; hcalls = 0; resyncs = 0; in_stats = 0; in_hc = 0
    lx_marker = 0; lx_before = ""; lx_after = ""; lx_up0 = ""; lx_up1 = ""; lx_echo = ""; lx_cpus = ""
    kvm_line = ""; g_cpus = ""; smp_tests = 0; failed_names = " "; rflush = ""
    bm_points = ""; bm_errors = ""; bm_resync = ""; f_name = ""; f_want = -1; f_got = 0; f_done = 0; in_file = 0
}

# Verdict for a bench step (see the header).
function judge_bench(transport, cost_only,    why) {
    why = ""
    if (rc != 0) why = why "bench-matrix exit status " rc "; "
    if (bm_points == "") why = why "no 'wrote ... (N points, M errors)' line; "
    else {
        # The UP points; a cost-only step measures none (its status says whether the cost
        # rows ran).
        if (num(bm_points) == 0 && !cost_only) why = why "no points measured; "
        if (num(bm_errors) > 0) why = why bm_errors " runs failed; "
    }
    # (The cost rows run with the host's transport; the UP runs name the one asked for.)
    if (!cost_only && transport != "pio" && via != "vmcall") why = why "runs went via '" via "', want vmcall; "
    if (!cost_only && transport == "pio" && via != "pio") why = why "runs went via '" via "', want pio; "
    if (f_name == "") why = why "no output block; "
    else if (!f_done || f_got != f_want) why = why "output block cut off (" f_got " of " f_want " lines); "
    nok = num(bm_points); nnot = num(bm_errors)
    resyncs = bm_resync == "" ? 0 : "needed=" bm_resync
    return why
}

function num(s) { return s + 0 }

# Verdict for a suite step: everything planned ran, nothing failed, the transport is right.
function judge_suite(transport,    why) {
    why = ""
    if (rc != 0) why = why "pvmm exit status " rc "; "
    if (!tap) why = why "no TAP output; "
    else if (plan < 0) why = why "no TAP plan; "
    else if (npts != plan) why = why "planned " plan ", got " npts " results; "
    if (nnot > 0) why = why nnot " not ok; "
    if (!order_ok) why = why "TAP numbers out of order; "
    if ((transport == "vmcall" || transport == "auto") && via !~ /^vmcall/)
        why = why "stats header says hypercalls via '" via "', want vmcall; "
    return why
}

# Verdict for an smpbreak step: a complete TAP run on 2+ CPUs in which a TLB test failed
# (smp_unmap, smp_mprotect, smp_remap or smp_dirty: a missing shootdown leaves a stale
# translation, and a stale D=1 one loses dirty bits); the failures are reported.
function judge_break(    why) {
    why = ""
    if (!tap || plan < 0 || npts != plan) why = why "incomplete TAP output; "
    if (num(g_cpus) < 2) why = why "the guest ran on " g_cpus " CPUs; "
    if (failed_names !~ / smp_(unmap|mprotect|remap|dirty) /)
        why = why "every TLB test passed without shootdowns; "
    if (rc == 0) why = why "pvmm exit status 0 although tests must fail; "
    return why
}

# Five checks; nok/nnot count them for the summary's passed/failed columns.
function check(ok, what) {
    if (ok) { nok++; return "" }
    nnot++
    return what "; "
}

function judge_linux(want_cpus,    why, d) {
    nok = 0; nnot = 0
    d = num(lx_up1) - num(lx_up0)
    why = check(lx_marker, "no userspace marker") \
        check(lx_before != "" && num(lx_after) > num(lx_before), "timer did not tick (" lx_before " -> " lx_after ")") \
        check(lx_up0 != "" && lx_up1 != "" && d >= 1.0, "sleep 1 did not take 1 s of uptime (" lx_up0 " -> " lx_up1 ")") \
        check(lx_echo == token, "serial input not echoed (got '" lx_echo "')") \
        check(rc == 0, "pvmm exit status " rc " (reboot -f must end the VM with 0)")
    if (want_cpus > 1)
        why = why check(num(lx_cpus) == want_cpus, "guest saw " lx_cpus " CPUs, want " want_cpus)
    return why
}

function finish(name,    kind, parts, mode, transport, why, verdict, base, want, want_flush) {
    # A step name is kind:mode:transport, optionally @tag (e.g. @npt0 after the reload).
    base = name; sub(/@.*/, "", base)
    split(base, parts, ":"); kind = parts[1]; mode = parts[2]; transport = parts[3]
    if (mode == "") mode = "-"
    if (transport == "") transport = "-"
    if (name ~ /@/) mode = mode substr(name, index(name, "@"))
    if (kind == "suite" || kind == "smp" || kind == "smp4" || kind == "smpkick" || kind == "smppkey") why = judge_suite(transport)
    else if (kind == "smpbreak" || kind == "kzapbreak") why = judge_break()
    else if (kind == "linux") why = judge_linux(num(parts[2]))
    else if (kind == "bench" || kind == "benchcost" || kind == "benchcostonly") why = judge_bench(transport, kind == "benchcostonly")
    else if (kind == "npt0") why = (rc != 0 || kvm_line !~ /npt=(0|N)$/) ? "kvm_amd npt=0 reload failed (" kvm_line "); " : ""
    else why = "unknown step; "
    if (kind == "smp" || kind == "smp4" || kind == "smpkick" || kind == "smppkey") {
        # The bed has nested paging and protection keys: PV steps take the kernel flush
        # with the dirty-log trigger unless told to kick or to use protection keys (a
        # silent fallback must not pass unnoticed).
        want_flush = (kind == "smpkick") ? "kick" : (kind == "smppkey") ? "kernel (pkey)" : "kernel (dirty_log)"
        if (mode !~ /^native/ && rflush != want_flush)
            why = why "remote flushes went by '" rflush "', want " want_flush "; "
        want = (kind == "smp4") ? 4 : 2
        if (num(g_cpus) != want) why = why "the guest ran on " (g_cpus == "" ? "?" : g_cpus) " CPUs, want " want "; "
        if (smp_tests == 0) why = why "no smp_* test ran; "
    }
    verdict = (why == "") ? "PASS" : "FAIL"
    sub(/; $/, "", why)
    res[name] = name "\t" mode "\t" transport "\t" verdict "\t" nok "\t" nnot "\t" secs "\t" \
        via "\t" exits "\t" (hcalls ? hcalls : "-") "\t" (resyncs ? resyncs : "-") "\t" (why == "" ? "-" : why)
}

{ sub(/\r+$/, "") }

/^BED-BEGIN / { cur = $2; reset_step(); rc = ""; secs = "-"; next }
cur == "" { next }

/^BED-END / {
    if ($2 == cur) {
        for (i = 3; i <= NF; i++) {
            if ($i ~ /^rc=/) rc = num(substr($i, 4))
            if ($i ~ /^secs=/) secs = substr($i, 6)
        }
        finish(cur)
    }
    cur = ""
    next
}

# A bench step's output block: count its lines (run.sh checks the md5 and unpacks it).
/^BED-FILE-BEGIN / {
    f_name = $2; f_got = 0; f_done = 0
    for (i = 3; i <= NF; i++) if ($i ~ /^lines=/) f_want = num(substr($i, 7))
    in_file = 1; next
}
in_file && $0 == "BED-FILE-END " f_name { in_file = 0; f_done = 1; next }
in_file { f_got++; next }
/^bench-matrix: host / {
    for (i = 3; i <= NF; i++) {
        if ($i ~ /^transport=/) via = substr($i, 11)
        if ($i ~ /^resync_needed=/) bm_resync = substr($i, 15)
    }
}
/^wrote .* points, [0-9]+ errors\)$/ {
    for (i = 2; i <= NF; i++) {
        if ($(i + 1) == "points,") bm_points = $i
        if ($(i + 1) == "errors)") bm_errors = $i
    }
    sub(/^\(/, "", bm_points)
}

/^BED-STATS-BEGIN/ { in_stats = 1; next }
/^BED-STATS-END/ { in_stats = 0; next }

# The stats table: "hypercalls via: vmcall (auto...)", the first "total" row (userspace
# exits), the hypercall rows under "op calls ...", and the host_resync count.
in_stats {
    if (match($0, /hypercalls via: [a-z]+ \([^)]*\)/))
        { via = substr($0, RSTART + 16, RLENGTH - 16); sub(/,[^)]*/, "", via) }
    if (match($0, /remote flushes: [a-z]+( \([a-z_]+\))?/)) rflush = substr($0, RSTART + 16, RLENGTH - 16)
    if ($1 == "total" && exits == "-" && $2 ~ /^[0-9]+$/) exits = $2
    if ($1 == "op" && $2 == "calls") { in_hc = 1; next }
    if (in_hc && NF == 0) in_hc = 0
    if (in_hc && $1 ~ /^[A-Za-z_]+$/ && $2 ~ /^[0-9]+$/) hcalls += $2
    for (i = 1; i < NF && !resyncs; i++)
        if ($i == "host_resync" && $(i + 1) ~ /^[0-9]+$/) resyncs = $(i + 1)
    next
}

/^TAP version 13$/ { tap = 1; next }
tap && /^1\.\.[0-9]+$/ { plan = num(substr($0, 4)); next }
tap && /^(not )?ok [0-9]+/ {
    n = ($1 == "not") ? $3 : $2
    if ((($1 == "not") ? $4 : $3) ~ /^smp_/ && $0 !~ /# SKIP/) smp_tests++
    if (num(n) != npts + 1) order_ok = 0
    npts++
    if ($1 == "not") { nnot++; failed_names = failed_names $4 " " } else nok++
    next
}
/^npt=/ { kvm_line = $0 }
/^# mmu=/ { for (i = 2; i <= NF; i++) if ($i ~ /^cpus=/) g_cpus = substr($i, 6) }
/^LINUX-MARKER / { lx_marker = 1 }
/^LINUX-CPUS / { lx_cpus = $2 }
/^LINUX-TIMER / {
    for (i = 2; i <= NF; i++) {
        if ($i ~ /^before=/) lx_before = substr($i, 8)
        if ($i ~ /^after=/) lx_after = substr($i, 7)
    }
}
/^LINUX-SLEEP / {
    for (i = 2; i <= NF; i++) {
        if ($i ~ /^uptime_before=/) lx_up0 = substr($i, 15)
        if ($i ~ /^uptime_after=/) lx_up1 = substr($i, 14)
    }
}
/^LINUX-ECHO / { lx_echo = $2 }

END {
    n = split(steps, want, ",")
    bad = 0
    for (i = 1; i <= n; i++) {
        s = want[i]
        if (s in res) line = res[s]
        else {
            b = s; sub(/@.*/, "", b)
            split(b, p, ":")
            line = s "\t" (p[2] == "" ? "-" : p[2]) "\t" (p[3] == "" ? "-" : p[3]) \
                "\tFAIL\t0\t0\t-\t-\t-\t-\t-\tno result (step missing or cut off)"
        }
        split(line, f, "\t")
        if (f[4] == "FAIL") bad++
        print line
    }
    exit bad ? 1 : 0
}
