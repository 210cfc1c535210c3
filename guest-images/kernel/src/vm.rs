//! Address spaces: 4-level tables with a shared kernel half, VMAs, demand-zero and
//! copy-on-write faults, zap/mprotect/mremap/fork copy/teardown, A/D queries, relocation.
//!
//! Every operation takes the caller's `&mut Mmu` (this CPU's MMU state) and a `&mut Space`
//! (which the caller holds through the process-table lock).
//!
//! Shared state: [`KERNEL`], the kernel half every space shares (set once at boot);
//! per-CPU [`AD_BITMAPS`], the buffer the VMM fills on QUERY_AD.

use crate::arch::{self, KERNEL_VMA, MAX_CPUS};
use crate::mem::{self, rd};
use crate::mmu::Mmu;
use crate::sync::{CpuLocal, Once};
use hypercall::MmuEntry;

/// PTE: present.
pub const P: u64 = 1;
/// PTE: writable.
pub const RW: u64 = 2;
/// PTE: user.
pub const US: u64 = 4;
/// PTE: accessed.
pub const A: u64 = 0x20;
/// PTE: dirty.
pub const D: u64 = 0x40;
/// PTE: large page (in an L2/L3 entry).
pub const PS: u64 = 0x80;
/// Software bit: copy-on-write page.
pub const COW: u64 = 1 << 9;
/// PTE: the frame address bits.
pub const ADDR: u64 = 0x000f_ffff_ffff_f000;

/// Prot bit (mmap/mprotect): readable.
pub const PROT_R: u8 = 1;
/// Prot bit (mmap/mprotect): writable.
pub const PROT_W: u8 = 2;

/// First mmap address.
pub const MMAP_BASE: u64 = 0x10_0000_0000;
/// Top of the user stack.
pub const STACK_TOP: u64 = 0x7fff_f000_0000;
/// Size of the user stack VMA.
pub const STACK_SIZE: u64 = 256 * 1024;

/// The kernel's address space as every process space shares it.
pub struct KernelHalf {
    /// The kernel's own L4 (guest-physical).
    pub l4: u64,
    /// Non-zero kernel-half L4 entries (index, value), copied into every address space.
    entries: [(usize, u64); 4],
    n: usize,
}

/// The kernel half, set once by [`set_kernel_half`] at boot.
static KERNEL: Once<KernelHalf> = Once::new();

/// Records the kernel's L4 (built at boot) and its kernel-half entries.
pub fn set_kernel_half(l4: u64) {
    let mut k = KernelHalf {
        l4,
        entries: [(0, 0); 4],
        n: 0,
    };
    for i in 256..512 {
        let v = rd(l4 + 8 * i as u64);
        if v != 0 {
            k.entries[k.n] = (i, v);
            k.n += 1;
        }
    }
    KERNEL.set(k);
}

/// The kernel's own L4 (guest-physical).
pub fn kernel_l4() -> u64 {
    KERNEL.get().l4
}

/// One mapping range.
#[derive(Clone, Copy)]
pub struct Vma {
    /// First byte.
    pub start: u64,
    /// End (exclusive).
    pub end: u64,
    /// PROT_R / PROT_W bits.
    pub prot: u8,
}

const MAXVMA: usize = 48;
const MAXTAB: usize = 256;

/// One process's address space.
pub struct Space {
    /// The L4 (guest-physical).
    pub l4: u64,
    /// The VMAs (the first `nvma` are in use).
    pub vmas: [Vma; MAXVMA],
    /// VMAs in use.
    pub nvma: usize,
    /// Next mmap address.
    pub mmap_next: u64,
    tables: [u32; MAXTAB],
    ntables: usize,
}

fn flags_of(prot: u8) -> u64 {
    P | US | if prot & PROT_W != 0 { RW } else { 0 }
}

impl Space {
    /// An unused space.
    pub const fn empty() -> Space {
        Space {
            l4: 0,
            vmas: [Vma {
                start: 0,
                end: 0,
                prot: 0,
            }; MAXVMA],
            nvma: 0,
            mmap_next: MMAP_BASE,
            tables: [0; MAXTAB],
            ntables: 0,
        }
    }

    /// A fresh address space: a zeroed L4 with the kernel half, pinned in PV modes.
    pub fn create(&mut self, m: &mut Mmu) {
        let l4 = mem::alloc();
        arch::zero_page(mem::va(l4));
        m.c.zero_cpu += 1;
        let k = KERNEL.get();
        for &(i, v) in &k.entries[..k.n] {
            mem::wr(l4 + 8 * i as u64, v);
        }
        m.pin_l4(l4);
        self.l4 = l4;
        self.nvma = 0;
        self.ntables = 0;
        self.mmap_next = MMAP_BASE;
    }

    // ----- VMAs -----

    /// The VMA containing `va`.
    pub fn find(&self, va: u64) -> Option<usize> {
        (0..self.nvma).find(|&i| self.vmas[i].start <= va && va < self.vmas[i].end)
    }

    /// Adds a VMA; false when the table is full.
    pub fn add_vma(&mut self, start: u64, end: u64, prot: u8) -> bool {
        if self.nvma == MAXVMA {
            return false;
        }
        self.vmas[self.nvma] = Vma { start, end, prot };
        self.nvma += 1;
        true
    }

    /// True if [start, end) is fully covered by VMAs.
    pub fn covered(&self, start: u64, end: u64) -> bool {
        let mut a = start;
        while a < end {
            match self.find(a) {
                Some(i) => a = self.vmas[i].end,
                None => return false,
            }
        }
        true
    }

    /// Removes [start, end) from the VMAs (splitting).
    pub fn remove_vma(&mut self, start: u64, end: u64) {
        let mut i = 0;
        while i < self.nvma {
            let v = self.vmas[i];
            if v.end <= start || v.start >= end {
                i += 1;
                continue;
            }
            // Remove v, re-add the parts outside the range.
            self.vmas[i] = self.vmas[self.nvma - 1];
            self.nvma -= 1;
            if v.start < start {
                self.add_vma(v.start, start, v.prot);
            }
            if v.end > end {
                self.add_vma(end, v.end, v.prot);
            }
        }
    }

    /// Sets the protection of [start, end) (splitting).
    pub fn protect_vma(&mut self, start: u64, end: u64, prot: u8) {
        self.remove_vma(start, end);
        self.add_vma(start, end, prot);
    }

    /// Picks the address of a new mmap of `len` bytes.
    pub fn alloc_va(&mut self, len: u64) -> u64 {
        let r = self.mmap_next;
        // Keep ranges 2 MiB apart (own page tables; unmapped guard between).
        self.mmap_next = (r + len + (2 << 20)).next_multiple_of(2 << 20);
        r
    }

    fn track(&mut self, t: u64) {
        assert!(self.ntables < MAXTAB, "too many page tables");
        self.tables[self.ntables] = (t >> 12) as u32;
        self.ntables += 1;
    }

    fn retrack(&mut self, old: u64, new: u64) {
        for t in self.tables[..self.ntables].iter_mut() {
            if u64::from(*t) << 12 == old {
                *t = (new >> 12) as u32;
            }
        }
    }

    // ----- walking -----

    /// The L1 table covering `va`, creating missing tables if `create`.
    pub fn l1_of(&mut self, m: &mut Mmu, va: u64, create: bool) -> Option<u64> {
        let mut t = self.l4;
        for shift in [39u32, 30, 21] {
            let ptr = t + ((va >> shift) & 511) * 8;
            let e = m.table_entry(ptr);
            if e & P == 0 {
                if !create {
                    return None;
                }
                let (n, zeroed) = m.new_table();
                m.link_table(ptr, n | P | RW | US, zeroed);
                self.track(n);
                t = n;
            } else {
                t = e & ADDR;
            }
        }
        Some(t)
    }

    /// Guest-physical address of the L1 entry for `va`.
    pub fn pte_ptr(&mut self, m: &mut Mmu, va: u64, create: bool) -> Option<u64> {
        self.l1_of(m, va, create)
            .map(|t| t + ((va >> 12) & 511) * 8)
    }

    /// Calls `f(space, mmu, va, pte_ptr)` for every page of [start, end) that has an L1 table
    /// (creating tables if `create`).
    pub fn each_pte(
        &mut self,
        m: &mut Mmu,
        start: u64,
        end: u64,
        create: bool,
        mut f: impl FnMut(&mut Space, &mut Mmu, u64, u64),
    ) {
        let mut va = start;
        while va < end {
            let next2m = (va | 0x1f_ffff) + 1;
            let stop = next2m.min(end);
            match self.l1_of(m, va, create) {
                Some(t) => {
                    while va < stop {
                        f(self, m, va, t + ((va >> 12) & 511) * 8);
                        va += 4096;
                    }
                }
                None => va = stop,
            }
        }
    }

    // ----- mapping -----

    /// Maps a fresh zeroed frame at `va` (the entry must be empty).
    pub fn map_zero(&mut self, m: &mut Mmu, ptr: u64, prot: u8, force_cpu: bool) -> u64 {
        let f = mem::alloc();
        m.zero_frame(f, force_cpu);
        m.set_pte(ptr, f | flags_of(prot));
        mem::get(f);
        f
    }

    /// MAP_POPULATE: maps every page of [start, end).
    pub fn populate(&mut self, m: &mut Mmu, start: u64, end: u64, prot: u8, force_cpu: bool) {
        m.enter_lazy();
        self.each_pte(m, start, end, true, |s, m, _va, ptr| {
            if rd(ptr) & P == 0 {
                s.map_zero(m, ptr, prot, force_cpu);
            }
        });
        m.leave_lazy();
    }

    /// Handles a fault at `va`; false if the access is not allowed (kill).
    pub fn fault(&mut self, m: &mut Mmu, va: u64, write: bool) -> bool {
        let Some(i) = self.find(va) else {
            return false;
        };
        let prot = self.vmas[i].prot;
        if (write && prot & PROT_W == 0) || prot == 0 {
            return false;
        }
        m.c.faults += 1;
        m.enter_lazy();
        let Some(ptr) = self.pte_ptr(m, va, true) else {
            m.leave_lazy();
            return false;
        };
        let e = rd(ptr);
        let ok = if e & P == 0 {
            let vma = self.vmas[i];
            m.c.fault_mapped += self.map_around(m, ptr, va, vma);
            true
        } else if write && e & RW == 0 {
            if e & COW == 0 {
                false
            } else {
                let old = e & ADDR;
                if mem::refs(old) <= 1 {
                    // An upgrade: stale read-only entries elsewhere only fault spuriously.
                    m.set_pte_keep_ad(ptr, (e | RW) & !COW);
                    m.invlpg_local(self.l4, va & !0xfff);
                } else {
                    let n = mem::alloc();
                    m.copy_frame(n, old);
                    m.set_pte(ptr, n | flags_of(prot));
                    mem::get(n);
                    mem::put(old);
                    m.invlpg(self.l4, va & !0xfff);
                }
                true
            }
        } else {
            // Spurious: a stale TLB entry of this CPU, or (wrpt) an L1 the VMM unhooked.
            m.spurious_fault(self.l4, va & !0xfff);
            true
        };
        m.leave_lazy();
        ok
    }

    /// A demand fault at `va` (its empty PTE at `ptr`): maps it and, with fault-around, every
    /// empty page of its window ([`around_window`]) with fresh zeroed frames, in the caller's
    /// lazy section (one batch in pv-lazy). Every PTE is installed old (A=0): the CPU (native)
    /// or the VMM's shadow (PV) records which ones the program really touches. Returns the
    /// pages mapped.
    fn map_around(&mut self, m: &mut Mmu, ptr: u64, va: u64, vma: Vma) -> u64 {
        let (lo, hi) = around_window(va, m.fault_around, vma.start, vma.end);
        // The L1 table exists (the caller found `ptr`); the window stays inside it.
        let l1 = ptr - ((va >> 12) & 511) * 8;
        let mut n = 0;
        let mut a = lo;
        while a < hi {
            let p = l1 + ((a >> 12) & 511) * 8;
            if rd(p) & P == 0 {
                self.map_zero(m, p, vma.prot, false);
                n += 1;
            }
            a += 4096;
        }
        n
    }

    /// Unmaps every page of [start, end) (VMAs untouched).
    pub fn zap(&mut self, m: &mut Mmu, start: u64, end: u64) -> u64 {
        let mut n = 0;
        m.enter_lazy();
        self.each_pte(m, start, end, false, |s, m, va, ptr| {
            if rd(ptr) & P != 0 {
                let e = m.clear_pte(ptr);
                if e & A != 0 {
                    m.invlpg(s.l4, va);
                }
                mem::put(e & ADDR);
                n += 1;
            }
        });
        m.leave_lazy();
        n
    }

    /// mprotect's PTE pass.
    pub fn protect(&mut self, m: &mut Mmu, start: u64, end: u64, prot: u8) {
        m.enter_lazy();
        self.each_pte(m, start, end, false, |s, m, va, ptr| {
            let e = rd(ptr);
            if e & P == 0 {
                return;
            }
            let w = prot & PROT_W != 0 && e & COW == 0;
            let n = (e & !RW) | if w { RW } else { 0 };
            if n != e {
                let e = m.set_pte_keep_ad(ptr, n);
                if e & RW != 0 && e & A != 0 {
                    m.invlpg(s.l4, va);
                }
            }
        });
        m.leave_lazy();
    }

    /// mremap: moves the PTEs of [old, old+len) to [new, new+len).
    pub fn move_ptes(&mut self, m: &mut Mmu, old: u64, new: u64, len: u64) {
        if m.is_pv() && len > 0 {
            // Harvest the A/D the VMM recorded into the guest PTEs before moving them.
            m.flush();
            m.push(MmuEntry::sync_ad(old, len >> 12, 0));
        }
        m.enter_lazy();
        let mut off = 0;
        while off < len {
            if let Some(src) = self.pte_ptr(m, old + off, false) {
                let e = rd(src);
                if e & P != 0 {
                    let Some(dst) = self.pte_ptr(m, new + off, true) else {
                        panic!("mremap: no page table for {:#x}", new + off);
                    };
                    m.set_pte(dst, e);
                    m.set_pte(src, 0);
                    if e & A != 0 {
                        m.invlpg(self.l4, old + off);
                    }
                }
                off += 4096;
            } else {
                off = ((old + off) | 0x1f_ffff) + 1 - old;
            }
        }
        m.leave_lazy();
    }

    /// fork: shares every mapped page with `child` (writable ones copy-on-write).
    pub fn fork_into(&mut self, m: &mut Mmu, child: &mut Space) {
        child.vmas = self.vmas;
        child.nvma = self.nvma;
        child.mmap_next = self.mmap_next;
        m.enter_lazy();
        for i in 0..self.nvma {
            let v = self.vmas[i];
            self.each_pte(m, v.start, v.end, false, |_s, m, va, ptr| {
                let e = rd(ptr);
                if e & P == 0 {
                    return;
                }
                let mut ce = e;
                if e & (RW | COW) != 0 {
                    ce = (e & !RW) | COW;
                    if e & RW != 0 {
                        m.set_pte_keep_ad(ptr, ce);
                    }
                }
                let Some(cp) = child.pte_ptr(m, va, true) else {
                    panic!("fork: no page table for {va:#x}");
                };
                m.set_pte(cp, ce & !(A | D));
                mem::get(e & ADDR);
            });
        }
        m.leave_lazy();
        m.flush_all(self.l4);
    }

    /// Tears the address space down. PV: switch away and unpin first (O(1) hypercalls,
    /// whatever other CPUs keep it loaded), then clear and free the now untyped tables with
    /// plain writes. Returns (MMU hypercalls issued, leaf PTEs dropped, other CPUs that
    /// still had the root loaded).
    pub fn teardown(&mut self, m: &mut Mmu) -> (u64, u64, u64) {
        m.flush();
        let hc0 = m.c.hypercalls;
        let others = m.retire_l4(self.l4, kernel_l4());
        let hcs = m.c.hypercalls - hc0;
        let pv = m.is_pv();
        let mut n = 0;
        for i in 0..self.nvma {
            let v = self.vmas[i];
            self.each_pte(m, v.start, v.end, false, |_s, _m, _va, ptr| {
                let e = rd(ptr);
                if e & P != 0 {
                    mem::put(e & ADDR);
                    if pv {
                        mem::wr(ptr, 0);
                    }
                    n += 1;
                }
            });
        }
        for &t in &self.tables[..self.ntables] {
            mem::free(u64::from(t) << 12);
        }
        mem::free(self.l4);
        self.ntables = 0;
        self.nvma = 0;
        self.l4 = 0;
        (hcs, n, others)
    }

    /// A/D query over `pages` pages at `va` into `out` (one bit per page): `bit` is A or
    /// D; `clear` test-and-clears. Returns the number of set bits.
    pub fn ad_query(
        &mut self,
        m: &mut Mmu,
        va: u64,
        pages: u64,
        bit: u64,
        clear: bool,
        out: &mut [u64],
    ) -> u64 {
        for w in out.iter_mut() {
            *w = 0;
        }
        if m.is_pv() {
            return ad_query_pv(m, va, pages, bit, clear, out);
        }
        let mut count = 0;
        // One lazy section: the shootdown of every cleared page goes once, at its end.
        m.enter_lazy();
        self.each_pte(m, va, va + pages * 4096, false, |s, m, a, ptr| {
            let e = rd(ptr);
            if e & P != 0 && e & bit != 0 {
                let k = ((a - va) >> 12) as usize;
                out[k / 64] |= 1 << (k % 64);
                count += 1;
                if clear {
                    // Atomic: another CPU's page walk may set A/D at the same time.
                    m.c.pte_updates += 1;
                    mem::fetch_and(ptr, !bit);
                    m.invlpg(s.l4, a);
                }
            }
        });
        m.leave_lazy();
        count
    }

    /// Moves the L1, L2 and L3 tables covering `va` to fresh frames.
    pub fn relocate(&mut self, m: &mut Mmu, va: u64) -> u64 {
        m.flush();
        let mut moved = 0;
        // Walk down collecting (parent entry ptr, table) pairs.
        let mut chain = [(0u64, 0u64); 3];
        let mut t = self.l4;
        for (k, shift) in [39u32, 30, 21].into_iter().enumerate() {
            let ptr = t + ((va >> shift) & 511) * 8;
            let e = rd(ptr);
            if e & P == 0 {
                return moved;
            }
            t = e & ADDR;
            chain[k] = (ptr, t);
        }
        // Bottom-up: L1, then L2, then L3 (parent entry pointers are re-read each time).
        for k in (0..3).rev() {
            let (_, old) = chain[k];
            // The parent pointer may itself have moved: recompute from the current tree.
            let mut pt = self.l4;
            let mut pptr = 0;
            for shift in [39u32, 30, 21].into_iter().take(k + 1) {
                pptr = pt + ((va >> shift) & 511) * 8;
                pt = rd(pptr) & ADDR;
            }
            debug_assert_eq!(pt, old);
            let new = mem::alloc();
            arch::copy_page(mem::va(new), mem::va(old));
            if m.is_pv() {
                m.push(MmuEntry::relocate_table(old, new));
                m.flush();
            } else {
                let e = rd(pptr);
                m.set_table(pptr, (e & !ADDR) | new);
            }
            self.retrack(old, new);
            mem::free(old);
            moved += 1;
        }
        if !m.is_pv() {
            m.flush_all(self.l4);
        }
        moved
    }
}

/// Largest `fault_around=` (one L1 table).
pub const FAULT_AROUND_MAX: u64 = 512;

/// The fault-around window of a fault at `va` with `n` pages around, inside the VMA
/// [`start`, `end`): the `n`-page window aligned to `n` pages from the start of `va`'s 2 MiB
/// page table, cut at that table's end and at the VMA's bounds. `n` of 0 or 1: `va`'s page.
pub fn around_window(va: u64, n: u64, start: u64, end: u64) -> (u64, u64) {
    let page = va & !0xfff;
    if n <= 1 {
        return (page, page + 4096);
    }
    let table = va & !0x1f_ffff;
    let idx = (page - table) >> 12;
    let lo = table + (idx - idx % n) * 4096;
    let hi = (lo + n * 4096).min(table + (2 << 20));
    (lo.max(start), hi.min(end))
}

/// The A and D bitmaps of one QUERY_AD (the VMM writes them in place; 8-byte aligned).
#[repr(C, align(8))]
struct AdBitmaps([u64; 1024]);

/// Each CPU's QUERY_AD buffer.
static AD_BITMAPS: CpuLocal<AdBitmaps> = CpuLocal::new([const { AdBitmaps([0; 1024]) }; MAX_CPUS]);

/// Most pages one A/D query may cover.
pub const AD_MAX_PAGES: u64 = 16384;

/// PV: QUERY_AD (then SYNC_AD with a clear) in one batch; the VMM reports into this CPU's
/// bitmap buffer.
fn ad_query_pv(m: &mut Mmu, va: u64, pages: u64, bit: u64, clear: bool, out: &mut [u64]) -> u64 {
    let buf = AD_BITMAPS.borrow_mut();
    let base: *const u64 = buf.0.as_ptr();
    let g = base as u64 - KERNEL_VMA;
    m.flush();
    m.enter_lazy();
    m.push(MmuEntry::query_ad(va, pages, g));
    if clear {
        let f = if bit == A {
            hypercall::sync_flags::CLEAR_A
        } else {
            hypercall::sync_flags::CLEAR_D
        };
        m.push(MmuEntry::sync_ad(va, pages, f));
    }
    m.leave_lazy();
    let off = if bit == A {
        0
    } else {
        hypercall::ad_bitmap_bytes(pages) as usize / 8
    };
    let mut count = 0;
    for (k, w) in out.iter_mut().enumerate().take(pages.div_ceil(64) as usize) {
        // SAFETY: inside this CPU's (borrowed) buffer: the A and D maps of AD_MAX_PAGES
        // pages fit its 1024 words; the VMM wrote it during the batch, so read volatile.
        *w = unsafe { core::ptr::read_volatile(base.add(off + k)) };
        count += u64::from(w.count_ones());
    }
    count
}

/// Maps [pa_start, pa_end) at `va_base + pa` in the table tree rooted at `l4` with plain
/// writes (boot only: 2 MiB pages where aligned, 4 KiB elsewhere).
pub fn boot_map(
    l4: u64,
    va_base: u64,
    pa_start: u64,
    pa_end: u64,
    tables: &mut impl FnMut() -> u64,
) {
    let mut pa = pa_start;
    while pa < pa_end {
        let va = va_base + pa;
        let big = pa.is_multiple_of(2 << 20) && pa + (2 << 20) <= pa_end;
        let mut t = l4;
        let levels: &[u32] = if big { &[39, 30] } else { &[39, 30, 21] };
        for &shift in levels {
            let ptr = t + ((va >> shift) & 511) * 8;
            let e = rd(ptr);
            if e & P == 0 {
                let n = tables();
                mem::wr(ptr, n | P | RW);
                t = n;
            } else {
                t = e & ADDR;
            }
        }
        if big {
            mem::wr(t + ((va >> 21) & 511) * 8, pa | P | RW | PS);
            pa += 2 << 20;
        } else {
            mem::wr(t + ((va >> 12) & 511) * 8, pa | P | RW);
            pa += 4096;
        }
    }
}

/// Copies `src` to user `va` through the direct map (faulting pages in). False on EFAULT.
pub fn copy_to_user(s: &mut Space, m: &mut Mmu, va: u64, src: &[u8]) -> bool {
    let mut done = 0usize;
    while done < src.len() {
        let a = va + done as u64;
        let Some(pa) = user_pa(s, m, a, true) else {
            return false;
        };
        let n = (4096 - (a & 0xfff) as usize).min(src.len() - done);
        // SAFETY: pa is a mapped user frame; direct map.
        unsafe {
            core::ptr::copy_nonoverlapping(src.as_ptr().add(done), mem::va(pa) as *mut u8, n)
        };
        done += n;
    }
    true
}

/// Physical address backing user `va` for an access, faulting it in if needed.
pub fn user_pa(s: &mut Space, m: &mut Mmu, va: u64, write: bool) -> Option<u64> {
    for _ in 0..2 {
        if let Some(ptr) = s.pte_ptr(m, va, false) {
            let e = rd(ptr);
            if e & P != 0 && (!write || e & RW != 0) {
                m.flush();
                return Some((e & ADDR) + (va & 0xfff));
            }
        }
        if !s.fault(m, va, write) {
            return None;
        }
    }
    None
}
