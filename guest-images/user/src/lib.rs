//! Runtime of the ring-3 selftest programs: entry point, syscall wrappers, output, checks.
#![no_std]

pub mod smp;

use core::arch::{asm, global_asm};
use core::fmt::Write;

global_asm!(
    ".section .text.start, \"ax\"",
    ".global _start",
    "_start:",
    "    and rsp, -16",
    "    call {main}",
    "    ud2",
    main = sym rt_main,
);

/// Arguments the kernel passes.
#[derive(Clone, Copy)]
pub struct Args {
    /// `pages=`.
    pub pages: u64,
    /// Random seed.
    pub seed: u64,
    /// 0 native, 1 pv, 2 pv-lazy.
    pub mode: u64,
}

extern "Rust" {
    fn test_main(a: Args) -> i32;
}

extern "C" fn rt_main(pages: u64, seed: u64, mode: u64) -> ! {
    // SAFETY: every program defines test_main.
    let r = unsafe { test_main(Args { pages, seed, mode }) };
    exit(r)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    let _ = writeln!(Out::new(), "# user panic: {info}");
    exit(99)
}

/// Syscall numbers (see kernel/src/syscall.rs).
#[allow(missing_docs)] // the names are the calls
pub mod nr {
    pub const EXIT: u64 = 0;
    pub const WRITE: u64 = 1;
    pub const GETPID: u64 = 2;
    pub const MMAP: u64 = 3;
    pub const MUNMAP: u64 = 4;
    pub const MPROTECT: u64 = 5;
    pub const MREMAP: u64 = 6;
    pub const FORK: u64 = 7;
    pub const WAIT: u64 = 8;
    pub const YIELD: u64 = 9;
    pub const AD: u64 = 10;
    pub const RELOCATE: u64 = 11;
    pub const STAT: u64 = 12;
    pub const THREAD: u64 = 13;
    pub const JOIN: u64 = 14;
    pub const PIN: u64 = 15;
    pub const CPU: u64 = 16;
    pub const CATCH: u64 = 17;
}

/// `stat` selectors.
pub mod st {
    /// Free frames.
    pub const FREE: u64 = 0;
    /// Page faults of this process.
    pub const FAULTS: u64 = 1;
    /// MMU_BATCH hypercalls (since boot).
    pub const HYPERCALLS: u64 = 2;
    /// PTE writes.
    pub const PTE_UPDATES: u64 = 3;
    /// TLB flushes done or sent by the kernel.
    pub const FLUSHES: u64 = 4;
    /// MMU mode (0 native, 1 pv, 2 pv-lazy, 3 emulate, 4 wrpt).
    pub const MODE: u64 = 5;
    /// MMU hypercalls of the last exit's teardown.
    pub const TEARDOWN_HC: u64 = 6;
    /// Leaf PTEs of the last exit's teardown.
    pub const TEARDOWN_PTES: u64 = 7;
    /// Entries sent in MMU_BATCHes.
    pub const ENTRIES: u64 = 8;
    /// Frames zeroed by the VMM (ZERO_FRAME).
    pub const ZERO_VMM: u64 = 9;
    /// Frames zeroed by the CPU.
    pub const ZERO_CPU: u64 = 10;
    /// The TSC.
    pub const TSC: u64 = 11;
    /// 1 if new frames are zeroed by the VMM (a PV mode with zero=vmm), else 0.
    pub const ZERO_BY_VMM: u64 = 12;
    /// `fault_around=`: pages a demand fault maps (0 or 1: only the faulting one).
    pub const FAULT_AROUND: u64 = 13;
    /// Pages mapped by demand faults since boot (faulting pages and their neighbours).
    pub const FAULT_MAPPED: u64 = 14;
    /// CPUs online.
    pub const NCPUS: u64 = 15;
    /// Shootdown IPIs the kernel sent (native mode), all CPUs.
    pub const FLUSH_IPIS: u64 = 16;
    /// Wake-up IPIs sent.
    pub const WAKE_IPIS: u64 = 17;
    /// Native shootdowns with at least one remote target.
    pub const SHOOTDOWNS: u64 = 18;
    /// Remote CPUs that still had a dying root loaded at its teardown (since boot).
    pub const LAZY_DETACHED: u64 = 19;
    /// Of the last exit's teardown: other CPUs that still had the root loaded.
    pub const TEARDOWN_OTHERS: u64 = 20;
    /// 1 if the VMM offers SMP_TLB (PV).
    pub const SMP_TLB: u64 = 21;
    /// 1 if idle CPUs keep their last root loaded (lazy TLB).
    pub const LAZY_TLB: u64 = 22;
}

/// mmap/mprotect: readable.
pub const PROT_R: u64 = 1;
/// mmap/mprotect: writable.
pub const PROT_W: u64 = 2;
/// PROT_R | PROT_W.
pub const RW: u64 = 3;
/// mmap flag: map every page now.
pub const MAP_POPULATE: u64 = 1;
/// mmap flag: with MAP_POPULATE, zero with the CPU even where the VMM would.
pub const MAP_ZERO_CPU: u64 = 4;
/// mmap flag: map at the address given (a free, page-aligned range).
pub const MAP_FIXED: u64 = 8;
/// A/D query: accessed bits.
pub const AD_A: u64 = 1;
/// A/D query: dirty bits.
pub const AD_D: u64 = 2;
/// A/D query: clear the bits queried.
pub const AD_CLEAR: u64 = 4;
/// Signal number of a segmentation fault.
pub const SIGSEGV: u64 = 11;

/// Raw syscall.
#[inline(always)]
pub fn sys(n: u64, a0: u64, a1: u64, a2: u64, a3: u64) -> u64 {
    let r: u64;
    // SAFETY: the kernel's syscall: `ud2` + tag "PVSC" (this platform's `syscall` does not
    // switch CS and `int n` raises #UD). The kernel preserves the general registers but
    // rax; every caller-saved register is declared clobbered (`clobber_abi`), so no vector
    // or x87 state is live across a syscall (another process may run in between, and the
    // kernel does not switch that state).
    unsafe {
        asm!("ud2", ".ascii \"PVSC\"", inlateout("rax") n => r, in("rdi") a0, in("rsi") a1, in("rdx") a2,
             in("r10") a3, clobber_abi("C"), options(nostack))
    };
    r
}

/// Ends the process with `code`.
pub fn exit(code: i32) -> ! {
    sys(nr::EXIT, code as u64, 0, 0, 0);
    // The kernel never returns from EXIT; if it did, fault rather than spin.
    loop {
        // SAFETY: ud2 without the syscall tag: the kernel kills the process (SIGILL).
        unsafe { asm!("ud2", options(nomem, nostack)) };
    }
}
/// Writes to the console.
pub fn write(b: &[u8]) {
    sys(nr::WRITE, b.as_ptr() as u64, b.len() as u64, 0, 0);
}
/// This process's id.
pub fn getpid() -> u64 {
    sys(nr::GETPID, 0, 0, 0, 0)
}
/// Maps `len` bytes; returns the address (or a negative errno).
pub fn mmap(len: u64, prot: u64, flags: u64) -> u64 {
    sys(nr::MMAP, len, prot, flags, 0)
}
/// Unmaps; returns the number of PTEs dropped.
pub fn munmap(a: u64, len: u64) -> u64 {
    sys(nr::MUNMAP, a, len, 0, 0)
}
/// Maps `len` bytes at `addr` (MAP_FIXED); returns it (or a negative errno).
pub fn mmap_at(addr: u64, len: u64, prot: u64, flags: u64) -> u64 {
    sys(nr::MMAP, len, prot, flags | MAP_FIXED, addr)
}
/// Changes protection.
pub fn mprotect(a: u64, len: u64, prot: u64) -> u64 {
    sys(nr::MPROTECT, a, len, prot, 0)
}
/// Moves a mapping to a new address of `new` bytes; returns it.
pub fn mremap(a: u64, old: u64, new: u64) -> u64 {
    sys(nr::MREMAP, a, old, new, 0)
}
/// Forks: the child's pid in the parent, 0 in the child.
pub fn fork() -> u64 {
    sys(nr::FORK, 0, 0, 0, 0)
}
/// (pid, wait status).
pub fn wait() -> (u64, u64) {
    let r = sys(nr::WAIT, 0, 0, 0, 0);
    (r & 0xffff_ffff, r >> 32)
}
/// Lets another process run.
pub fn yield_now() {
    sys(nr::YIELD, 0, 0, 0, 0);
}
/// A/D query over `pages` pages into `bm`; returns the count.
pub fn ad(a: u64, pages: u64, bm: &mut [u64], flags: u64) -> u64 {
    sys(nr::AD, a, pages, bm.as_mut_ptr() as u64, flags)
}
/// Moves the page tables covering `a`; returns how many moved.
pub fn relocate(a: u64) -> u64 {
    sys(nr::RELOCATE, a, 0, 0, 0)
}
/// A kernel statistic (see [`st`]).
pub fn stat(w: u64) -> u64 {
    sys(nr::STAT, w, 0, 0, 0)
}
/// The TSC.
pub fn rdtsc() -> u64 {
    // SAFETY: no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Line-buffered output through `write`.
pub struct Out {
    buf: [u8; 200],
    n: usize,
}
impl Out {
    /// An empty buffer.
    pub fn new() -> Out {
        Out {
            buf: [0; 200],
            n: 0,
        }
    }
}
impl Default for Out {
    fn default() -> Self {
        Out::new()
    }
}
impl Write for Out {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for &b in s.as_bytes() {
            if self.n == self.buf.len() {
                write(&self.buf[..self.n]);
                self.n = 0;
            }
            self.buf[self.n] = b;
            self.n += 1;
            if b == b'\n' {
                write(&self.buf[..self.n]);
                self.n = 0;
            }
        }
        Ok(())
    }
}
impl Drop for Out {
    fn drop(&mut self) {
        if self.n > 0 {
            write(&self.buf[..self.n]);
        }
    }
}

/// Prints a diagnostic line (`# ...`).
#[macro_export]
macro_rules! diag {
    ($($t:tt)*) => {{
        use core::fmt::Write as _;
        let mut o = $crate::Out::new();
        let _ = o.write_str("# ");
        let _ = writeln!(o, $($t)*);
    }};
}

/// Exit code of a program that cannot exercise its mechanism here: the runner reports
/// `ok ... # SKIP`. Failure codes ([`fail_code`]) never take it.
pub const EXIT_SKIP: i32 = 254;

/// The exit code of a failed check at source line `line`: 1..=200 (the diagnostic line
/// names the real line), never 0 or [`EXIT_SKIP`].
pub const fn fail_code(line: u32) -> i32 {
    (line % 200) as i32 + 1
}

/// Fails the test (returns [`fail_code`] of the line) if `cond` is false.
#[macro_export]
macro_rules! check {
    ($cond:expr, $($t:tt)*) => {
        if !$cond {
            $crate::diag!("FAIL line {}: {}", line!(), format_args!($($t)*));
            return $crate::fail_code(line!());
        }
    };
}

/// Like [`check!`], in a function that returns `Result<_, i32>`: `Err` with the failing line.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $($t:tt)*) => {
        if !$cond {
            $crate::diag!("FAIL line {}: {}", line!(), format_args!($($t)*));
            return Err($crate::fail_code(line!()));
        }
    };
}

/// xorshift64.
pub struct Rng(pub u64);
impl Rng {
    /// The next value.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

/// Reads the u64 at `a`.
#[inline(always)]
pub fn rd(a: u64) -> u64 {
    // SAFETY: the test reads its own mappings (or expects to be killed).
    unsafe { core::ptr::read_volatile(a as *const u64) }
}
/// Writes the u64 at `a`.
#[inline(always)]
pub fn wr(a: u64, v: u64) {
    // SAFETY: as rd.
    unsafe { core::ptr::write_volatile(a as *mut u64, v) }
}

/// Writes `tag ^ i` into the first and last words of each page.
pub fn fill(a: u64, pages: u64, tag: u64) {
    for i in 0..pages {
        wr(a + i * 4096, tag ^ i);
        wr(a + i * 4096 + 4088, !(tag ^ i));
    }
}

/// First page whose pattern differs, if any.
pub fn verify(a: u64, pages: u64, tag: u64) -> Option<u64> {
    (0..pages).find(|&i| rd(a + i * 4096) != tag ^ i || rd(a + i * 4096 + 4088) != !(tag ^ i))
}

/// True if every word of every page is zero.
pub fn all_zero(a: u64, pages: u64) -> bool {
    (0..pages * 512).all(|k| rd(a + k * 8) == 0)
}

/// Runs `f` in a child and returns its wait status.
pub fn in_child(f: impl FnOnce() -> i32) -> u64 {
    let pid = fork();
    if pid == 0 {
        exit(f());
    }
    let (_, status) = wait();
    status
}

/// True if a wait status says "killed by SIGSEGV".
pub fn segv(status: u64) -> bool {
    status & 0x7f == SIGSEGV
}

/// Exit code of a wait status (None if killed).
pub fn exited(status: u64) -> Option<u64> {
    if status & 0x7f == 0 {
        Some((status >> 8) & 0xff)
    } else {
        None
    }
}

/// A random subset of `pages` pages as a bitmap (`1 in k` chance per page).
pub fn subset(rng: &mut Rng, pages: u64, k: u64, bm: &mut [u64]) {
    for w in bm.iter_mut() {
        *w = 0;
    }
    for i in 0..pages {
        if rng.next().is_multiple_of(k) {
            bm[(i / 64) as usize] |= 1 << (i % 64);
        }
    }
}

/// Bit `i` of a bitmap.
pub fn bit(bm: &[u64], i: u64) -> bool {
    bm[(i / 64) as usize] & (1 << (i % 64)) != 0
}

/// First index where two bitmaps of `pages` bits differ.
pub fn first_diff(a: &[u64], b: &[u64], pages: u64) -> Option<u64> {
    (0..pages).find(|&i| bit(a, i) != bit(b, i))
}

/// Set bits of a bitmap.
pub fn popcount(bm: &[u64]) -> u64 {
    bm.iter().map(|w| u64::from(w.count_ones())).sum()
}

/// The kernel's fault-around window (page indices `[lo, hi)` of a mapping of `pages`
/// pages starting 2 MiB-aligned) for a fault on page `i` with `n` pages around: the
/// `n`-page window aligned inside its 2 MiB page table, cut at the table and the mapping.
pub fn around_window(i: u64, n: u64, pages: u64) -> (u64, u64) {
    if n <= 1 {
        return (i, i + 1);
    }
    let table = i - i % 512;
    let lo = table + (i - table) / n * n;
    (lo, (lo + n).min(table + 512).min(pages))
}

/// Sets bits `[lo, hi)` of a bitmap.
pub fn set_range(bm: &mut [u64], lo: u64, hi: u64) {
    for i in lo..hi {
        bm[(i / 64) as usize] |= 1 << (i % 64);
    }
}

/// Most pages the A/D tests handle.
pub const MAXP: usize = 16384;
/// Bitmap words for MAXP pages.
pub const MAXW: usize = MAXP / 64;

// The compiler's memory intrinsics (no libc here).

/// `memcpy`.
///
/// # Safety
/// `d` and `s` are valid for `n` bytes and do not overlap.
#[no_mangle]
pub unsafe extern "C" fn memcpy(d: *mut u8, s: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller's contract.
    unsafe {
        asm!("rep movsb", inout("rdi") d => _, inout("rsi") s => _, inout("rcx") n => _, options(nostack));
    }
    d
}

/// `memmove`.
///
/// # Safety
/// `d` and `s` are valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memmove(d: *mut u8, s: *const u8, n: usize) -> *mut u8 {
    if (d as usize) <= (s as usize) || (d as usize) >= (s as usize) + n {
        // SAFETY: a forward copy is correct when the destination starts below the source
        // or past its end.
        unsafe { memcpy(d, s, n) }
    } else {
        // SAFETY: the caller's contract; a backward copy for an overlapping destination.
        unsafe {
            asm!("std", "rep movsb", "cld", inout("rdi") d.add(n - 1) => _, inout("rsi") s.add(n - 1) => _,
                 inout("rcx") n => _, options(nostack));
        }
        d
    }
}

/// `memset`.
///
/// # Safety
/// `d` is valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memset(d: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller's contract.
    unsafe {
        asm!("rep stosb", inout("rdi") d => _, inout("rcx") n => _, in("al") c as u8, options(nostack));
    }
    d
}

/// `memcmp`.
///
/// # Safety
/// `a` and `b` are valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: i < n, inside both buffers (the caller's contract).
        let (x, y) = unsafe {
            (
                core::ptr::read_volatile(a.add(i)),
                core::ptr::read_volatile(b.add(i)),
            )
        };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

/// `bcmp`.
///
/// # Safety
/// As [`memcmp`].
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: the same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}
