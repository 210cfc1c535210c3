//! smp_exit_mmap: a process whose thread ran on another CPU exits while that CPU, idle,
//! still has the process's root loaded (lazy TLB). PV: the teardown is one MMU hypercall
//! (UNPIN with DETACH moves the other vCPU to its kernel root), no per-entry calls and no
//! IPI. Native: the kernel's IPIs make the lazy CPU drop the root.
#![no_std]
#![no_main]
use utest::smp;
use utest::*;

fn toucher(x: u64) -> i32 {
    fill(x, 32, 0x77);
    0
}

/// The test: 0 on success, else the failing line (`check!`).
#[no_mangle]
pub fn test_main(a: Args) -> i32 {
    let n = smp::ncpus();
    if a.mode != 0 && n > 1 && stat(st::LAZY_TLB) == 0 {
        diag!("smp_exit_mmap: SKIP the VMM offers no SMP_TLB (UNPIN DETACH), so idle vCPUs never keep a user root");
        return EXIT_SKIP;
    }
    let ipi0 = stat(st::FLUSH_IPIS);
    let status = in_child(|| {
        let x = mmap(32 * 4096, RW, MAP_POPULATE);
        let t = smp::spawn(toucher, x, 1);
        if t.join() != 0 || verify(x, 32, 0x77).is_some() {
            return 1;
        }
        0
    });
    check!(exited(status) == Some(0), "child status {:#x}", status);
    let (hc, ptes, others) = (
        stat(st::TEARDOWN_HC),
        stat(st::TEARDOWN_PTES),
        stat(st::TEARDOWN_OTHERS),
    );
    let ipis = stat(st::FLUSH_IPIS) - ipi0;
    diag!(
        "smp_exit_mmap: teardown of {} PTEs on {} CPUs with the root loaded on {} other CPUs: {} MMU hypercalls, {} flush IPIs",
        ptes,
        n,
        others,
        hc,
        ipis
    );
    if n > 1 {
        check!(others >= 1, "no other CPU kept the root loaded (lazy TLB)");
    }
    if a.mode != 0 {
        check!(hc == 1, "PV teardown took {} MMU hypercalls", hc);
        check!(ipis == 0, "PV sent {} flush IPIs", ipis);
    } else if n > 1 {
        check!(
            ipis >= 1,
            "native: the lazy CPU was never told to drop the root"
        );
    }
    0
}
