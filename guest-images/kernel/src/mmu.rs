//! The MMU backends behind one interface: `native` (the kernel writes the tables the CPU
//! walks), `pv` (one MMU_BATCH hypercall per change), `pv-lazy` (changes queue in a
//! per-CPU buffer inside lazy sections and go out as one batch), `emulate` and `wrpt`
//! (plain stores to the shadowed tables, trapped by the VMM; pins, switches, A/D and
//! zeroing stay hypercalls).
//!
//! Per-CPU state: [`MMU`], each CPU's [`Mmu`] (its lazy queue, counters, PV handle, the
//! backend settings and a pending native shootdown), borrowed through [`this_cpu`]. Callers
//! borrow it once at an entry point (syscall, fault, selftest step) and pass `&mut Mmu`
//! down. The loaded root is kept in `tlb` (other CPUs read it to pick shootdown targets).
//! Shared state: [`SETTINGS`], the backend settings every CPU copies at bring-up.
//!
//! TLB coherence on SMP: natively, a changed leaf of a root that other CPUs have loaded is
//! shot down with IPIs (`tlb::shootdown`) when the outermost lazy section ends, before the
//! process-table lock is released and before any freed frame can be reused. In the PV modes
//! the kernel sends no IPIs: the VMM delivers every flush its shadow changes need to every
//! vCPU before the hypercall returns. Lazy TLB (an idle CPU keeps its last root) is used
//! natively and in PV when the VMM offers `SMP_TLB` (a dying root is detached from every
//! vCPU by one `UNPIN` with `DETACH`); without it an idle CPU switches to the kernel root.

use crate::arch::{self, cpu_id, KERNEL_VMA, MAX_CPUS};
use crate::mem;
use crate::pv::Pv;
use crate::sync::{CpuLocal, CpuRefMut, Once};
use crate::tlb;
use hypercall::MmuEntry;

/// Backend selection.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The kernel writes the tables the CPU walks.
    Native,
    /// One MMU_BATCH hypercall per change.
    Pv,
    /// Changes queue inside lazy sections and go out as one batch.
    PvLazy,
    /// Plain stores to the page tables; the VMM traps and emulates each one.
    Emulate,
    /// Plain stores; the VMM unhooks a written L1 and re-validates it later (writable
    /// page tables); spurious faults are reported and retried.
    Wrpt,
}

impl Mode {
    /// The `mmu=` value.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Native => "native",
            Mode::Pv => "pv",
            Mode::PvLazy => "pv-lazy",
            Mode::Emulate => "emulate",
            Mode::Wrpt => "wrpt",
        }
    }

    /// True in the modes where the kernel writes its (shadowed) tables with plain stores.
    pub fn plain_stores(self) -> bool {
        matches!(self, Mode::Emulate | Mode::Wrpt)
    }

    /// The `PT_WRITES` value of the mode.
    pub fn pt_writes(self) -> u64 {
        match self {
            Mode::Emulate => hypercall::pt_writes::EMULATE,
            Mode::Wrpt => hypercall::pt_writes::WRPT,
            _ => hypercall::pt_writes::HYPERCALL,
        }
    }
}

/// Guest-side counters.
#[derive(Clone, Copy, Default)]
pub struct Counters {
    /// PTE writes issued (any level).
    pub pte_updates: u64,
    /// MMU_BATCH hypercalls.
    pub hypercalls: u64,
    /// Entries sent in MMU_BATCHes.
    pub entries: u64,
    /// TLB flushes the kernel performed itself (native INVLPG / CR3 reloads) or sent
    /// (INVLPG / FLUSH_TLB entries in PV).
    pub flushes: u64,
    /// Frames zeroed by the CPU at CPL0.
    pub zero_cpu: u64,
    /// Frames zeroed by the VMM (ZERO_FRAME entries).
    pub zero_vmm: u64,
    /// Frames copied by the CPU at CPL0.
    pub copy_cpu: u64,
    /// Frames copied by the VMM (COPY_FRAME entries).
    pub copy_vmm: u64,
    /// Address-space switches.
    pub switches: u64,
    /// Page faults handled.
    pub faults: u64,
    /// Pages mapped by demand faults (the faulting page and its fault-around neighbours).
    pub fault_mapped: u64,
    /// Page faults on a VA the kernel's own tables allow (wrpt: reported with PT_FAULT).
    pub spurious: u64,
    /// PTE writes counted per flush window (see [`Window`]) and the distinct page-table
    /// pages they went to, summed over windows: `pt_ptes / pt_pages` is the number of PTEs
    /// written per page-table page between two flushes.
    pub pt_ptes: u64,
    /// See `pt_ptes`.
    pub pt_pages: u64,
}

/// Distinct page-table pages written in the current flush window: the outermost lazy
/// section (where pv-lazy sends its batch and a wrpt guest's next hypercall re-validates
/// what it unhooked), or one write outside any.
#[derive(Clone, Copy)]
struct Window {
    pages: [u64; 16],
    n: usize,
    ptes: u64,
}

/// `debug_faults`: log every user page fault.
pub static DEBUG_FAULTS: core::sync::atomic::AtomicBool =
    core::sync::atomic::AtomicBool::new(false);
/// Entries of the lazy queue (the ABI's largest batch).
pub const QMAX: usize = 1024;

const NO_ENTRY: MmuEntry = MmuEntry {
    kind: 0,
    flags: 0,
    reserved: 0,
    a0: 0,
    a1: 0,
    a2: 0,
};

/// The PTE's accessed and dirty bits.
const AD_BITS: u64 = 0x60;

/// Pre-zeroed frames kept for new page tables (PV modes).
const RESERVE: usize = 16;
/// Table links queued in the current batch that the kernel's walks must already see.
const LINKS: usize = 16;

/// The lazy queue: the VMM reads it in place during MMU_BATCH (entries need 8-byte
/// alignment only).
#[repr(C, align(8))]
struct Queue([MmuEntry; QMAX]);

/// The MMU state of one CPU.
pub struct Mmu {
    /// The lazy queue.
    queue: Queue,
    /// The backend.
    pub mode: Mode,
    /// The PV interface (None natively without one, and after `finish` took it).
    pub pv: Option<Pv>,
    /// Lazy section nesting depth.
    lazy: u32,
    qlen: usize,
    /// Flush threshold (`lazy_batch=`).
    pub batch: usize,
    /// Counters since boot.
    pub c: Counters,
    /// Zero new frames through ZERO_FRAME entries (PV modes).
    pub zero_vmm: bool,
    /// Copy frames through COPY_FRAME entries (PV modes, where the VMM offers them).
    pub copy_vmm: bool,
    /// `break=drop_update`: PT_UPDATEs to let through before dropping one (0 = off).
    pub drop_after: u64,
    /// PV: the VMM offers `SMP_TLB` (flush targets, SET_KERNEL_ROOT, UNPIN DETACH).
    pub smp_tlb: bool,
    /// Native: a root whose leaves changed while other CPUs had it loaded (0: none); shot
    /// down when the outermost lazy section ends.
    shoot: u64,
    /// `fault_around=`: pages a demand fault maps (0 or 1: only the faulting page).
    pub fault_around: u64,
    /// PV: frames for new page tables, zeroed in an earlier batch (or by the CPU), so that
    /// a table taken from here needs no batch of its own before the kernel walks it.
    reserve: [(u64, u64); RESERVE],
    nreserve: usize,
    /// Non-leaf entries queued in the current batch: (entry address, value).
    links: [(u64, u64); LINKS],
    nlinks: usize,
    /// The current flush window.
    win: Window,
}

/// Each CPU's MMU state.
static MMU: CpuLocal<Mmu> = CpuLocal::new([const { Mmu::new() }; MAX_CPUS]);

/// The backend settings (from the command line), the same on every CPU.
#[derive(Clone, Copy)]
pub struct Settings {
    /// `mmu=`.
    pub mode: Mode,
    /// `lazy_batch=`.
    pub batch: usize,
    /// `zero=vmm`.
    pub zero_vmm: bool,
    /// `copy=vmm`.
    pub copy_vmm: bool,
    /// `fault_around=`.
    pub fault_around: u64,
}

/// The settings, set once by the boot CPU before the others start.
pub static SETTINGS: Once<Settings> = Once::new();

/// Applies [`SETTINGS`] and the CPU's PV handle to its MMU state.
pub fn configure(m: &mut Mmu, pv: Option<Pv>) {
    let s = SETTINGS.get();
    m.mode = s.mode;
    m.batch = s.batch;
    m.zero_vmm = s.zero_vmm;
    m.copy_vmm = s.copy_vmm
        && pv
            .as_ref()
            .is_some_and(|p| p.features() & hypercall::features::COPY_FRAMES != 0);
    m.fault_around = s.fault_around;
    m.smp_tlb = pv
        .as_ref()
        .is_some_and(|p| p.features() & hypercall::features::SMP_TLB != 0);
    m.pv = pv;
}

impl Mmu {
    const fn new() -> Mmu {
        Mmu {
            queue: Queue([NO_ENTRY; QMAX]),
            mode: Mode::Native,
            pv: None,
            lazy: 0,
            qlen: 0,
            batch: QMAX,
            c: Counters {
                pte_updates: 0,
                hypercalls: 0,
                entries: 0,
                flushes: 0,
                zero_cpu: 0,
                zero_vmm: 0,
                copy_cpu: 0,
                copy_vmm: 0,
                switches: 0,
                faults: 0,
                fault_mapped: 0,
                spurious: 0,
                pt_ptes: 0,
                pt_pages: 0,
            },
            win: Window {
                pages: [0; 16],
                n: 0,
                ptes: 0,
            },
            zero_vmm: true,
            copy_vmm: false,
            drop_after: 0,
            smp_tlb: false,
            shoot: 0,
            fault_around: 0,
            reserve: [(0, 0); RESERVE],
            nreserve: 0,
            links: [(0, 0); LINKS],
            nlinks: 0,
        }
    }
}

/// Borrows this CPU's MMU state (panics if it is borrowed already).
pub fn this_cpu() -> CpuRefMut<'static, Mmu> {
    MMU.borrow_mut()
}

/// Borrows this CPU's MMU state unless it is borrowed already (the panic path).
pub fn try_this_cpu() -> Option<CpuRefMut<'static, Mmu>> {
    MMU.try_borrow_mut()
}

fn gpa<T>(p: *const T) -> u64 {
    p as u64 - KERNEL_VMA
}

impl Mmu {
    /// True in the PV modes.
    #[inline(always)]
    pub fn is_pv(&self) -> bool {
        self.mode != Mode::Native
    }

    /// Sends `entries` as one MMU_BATCH; returns (status, done, fail_index).
    pub fn batch_raw(&mut self, gpa: u64, count: u64) -> (i64, u32, u32) {
        let pv = self.pv.as_mut().expect("no PV interface");
        self.c.hypercalls += 1;
        self.c.entries += count;
        pv.mmu_batch(gpa, count)
    }

    /// Sends the queue (and, natively, a pending shootdown); panics on any refusal (a
    /// kernel bug).
    pub fn flush(&mut self) {
        self.sync_tlb();
        if self.qlen == 0 {
            return;
        }
        let n = self.qlen;
        self.qlen = 0;
        self.nlinks = 0;
        let g = gpa(self.queue.0.as_ptr());
        let (s, done, fail) = self.batch_raw(g, n as u64);
        if s != 0 {
            let e = self.queue.0[fail.min(n as u32 - 1) as usize];
            panic!(
                "MMU_BATCH of {n} failed: status {s} done {done} fail_index {fail}: kind {} a0 {:#x} a1 {:#x}",
                e.kind, e.a0, e.a1
            );
        }
    }

    /// Queues (or, outside lazy sections / in `pv` mode, sends) one entry.
    pub fn push(&mut self, e: MmuEntry) {
        self.queue.0[self.qlen] = e;
        self.qlen += 1;
        if self.lazy == 0 || self.mode == Mode::Pv || self.qlen >= self.batch {
            self.flush();
        }
    }

    /// Enters a lazy section (pv-lazy only queues).
    pub fn enter_lazy(&mut self) {
        self.lazy += 1;
    }

    /// Leaves a lazy section, flushing at the outermost level.
    pub fn leave_lazy(&mut self) {
        self.lazy -= 1;
        if self.lazy == 0 {
            self.flush();
            self.close_window();
        }
    }

    /// Counts one PTE write at `ptr` in the flush window.
    fn count_window(&mut self, ptr: u64) {
        let page = ptr >> 12;
        let w = &mut self.win;
        w.ptes += 1;
        if !w.pages[..w.n].contains(&page) {
            if w.n == w.pages.len() {
                // More distinct pages than tracked: count it as a new one.
                self.c.pt_pages += 1;
            } else {
                w.pages[w.n] = page;
                w.n += 1;
            }
        }
        if self.lazy == 0 {
            self.close_window();
        }
    }

    /// Ends the flush window.
    fn close_window(&mut self) {
        self.c.pt_ptes += self.win.ptes;
        self.c.pt_pages += self.win.n as u64;
        self.win.n = 0;
        self.win.ptes = 0;
    }

    /// True if an idle CPU may keep its last user root loaded (lazy TLB): natively (the
    /// teardown IPIs the CPUs that keep it) and in PV with `SMP_TLB` (UNPIN DETACH).
    pub fn lazy_tlb(&self) -> bool {
        !self.is_pv() || self.smp_tlb
    }

    /// The root this CPU has loaded.
    pub fn loaded(&self) -> u64 {
        tlb::loaded(cpu_id())
    }

    /// Native: shoots down the pending root on the other CPUs that have it loaded.
    fn sync_tlb(&mut self) {
        if self.shoot != 0 {
            let l4 = core::mem::take(&mut self.shoot);
            self.c.flushes += tlb::shootdown(l4, false);
        }
    }

    /// Native: the TLBs of other CPUs running `l4` must drop a changed translation.
    fn remote(&mut self, l4: u64) {
        if tlb::others_with(l4) == 0 {
            return;
        }
        if self.shoot != 0 && self.shoot != l4 {
            self.sync_tlb();
        }
        self.shoot = l4;
        if self.lazy == 0 {
            self.sync_tlb();
        }
    }

    /// Writes a leaf PTE at guest-physical `ptr`.
    pub fn set_pte(&mut self, ptr: u64, val: u64) {
        self.c.pte_updates += 1;
        self.count_window(ptr);
        if self.store_plain(ptr, val, false) {
            return;
        }
        if !self.is_pv() {
            mem::wr(ptr, val);
            return;
        }
        if self.drop_after > 0 && self.mode == Mode::PvLazy && self.lazy > 0 {
            self.drop_after -= 1;
            if self.drop_after == 0 {
                return; // break=drop_update: lose this one.
            }
        }
        self.push(MmuEntry::pt_update(ptr, val));
    }

    /// Writes a leaf PTE keeping the A/D bits the VMM recorded (PV) / the CPUs set
    /// (native: atomically, OR-ed into `val`, so a bit another CPU sets meanwhile stays).
    /// Returns the entry replaced (natively, with the A/D bits it had at that moment).
    pub fn set_pte_keep_ad(&mut self, ptr: u64, val: u64) -> u64 {
        self.c.pte_updates += 1;
        self.count_window(ptr);
        let old = mem::rd(ptr);
        if self.store_plain(ptr, val | (old & AD_BITS), false) {
            return old;
        }
        if !self.is_pv() {
            return mem::store_keep(ptr, val, AD_BITS);
        }
        let old = mem::rd(ptr);
        self.push(MmuEntry::pt_update_preserve_ad(ptr, val));
        old
    }

    /// Clears a leaf PTE; returns the entry removed (natively an atomic exchange, so its A
    /// bit says whether any CPU may have cached it).
    pub fn clear_pte(&mut self, ptr: u64) -> u64 {
        if !self.is_pv() {
            self.c.pte_updates += 1;
            return mem::store_keep(ptr, 0, 0);
        }
        let old = mem::rd(ptr);
        self.set_pte(ptr, 0);
        old
    }

    /// Writes a non-leaf entry; it is visible to the kernel's own walks on return.
    pub fn set_table(&mut self, ptr: u64, val: u64) {
        self.c.pte_updates += 1;
        self.count_window(ptr);
        if self.store_plain(ptr, val, true) {
            return;
        }
        if !self.is_pv() {
            mem::wr(ptr, val);
            return;
        }
        self.push(MmuEntry::pt_update(ptr, val));
        self.flush();
    }

    /// A fresh zeroed frame for a new page table and whether it is zero already (a PV
    /// reserve frame whose ZERO_FRAME batch has gone out, or any frame natively). A frame
    /// that is not may be linked only after its queued zeroing ([`Mmu::set_table`]).
    pub fn new_table(&mut self) -> (u64, bool) {
        let hc = self.c.hypercalls;
        if let Some(k) = (0..self.nreserve).find(|&k| self.reserve[k].1 <= hc) {
            let (f, _) = self.reserve[k];
            self.nreserve -= 1;
            self.reserve[k] = self.reserve[self.nreserve];
            self.refill_reserve();
            return (f, true);
        }
        let f = mem::alloc();
        self.zero_frame(f, false);
        (f, !self.is_pv())
    }

    /// PV: fills the table reserve (at boot, and after each table taken from it).
    pub fn refill_reserve(&mut self) {
        while self.is_pv() && self.nreserve < RESERVE {
            let f = mem::alloc();
            let queued = self.zero_vmm;
            self.zero_frame(f, false);
            // Zero once the batch holding its ZERO_FRAME has been sent.
            let ready = if queued { self.c.hypercalls + 1 } else { 0 };
            self.reserve[self.nreserve] = (f, ready);
            self.nreserve += 1;
        }
    }

    /// Links a new page table (`val`) at the non-leaf entry `ptr`. A table that is zero
    /// already joins the current batch (the kernel's walks see the link through
    /// [`Mmu::table_entry`] until the batch goes); otherwise the batch goes now.
    pub fn link_table(&mut self, ptr: u64, val: u64, zeroed: bool) {
        if !self.is_pv()
            || self.mode.plain_stores()
            || !zeroed
            || self.lazy == 0
            || self.nlinks == LINKS
        {
            self.set_table(ptr, val);
            return;
        }
        self.c.pte_updates += 1;
        self.count_window(ptr);
        self.links[self.nlinks] = (ptr, val);
        self.nlinks += 1;
        self.push(MmuEntry::pt_update(ptr, val));
    }

    /// A non-leaf entry as the kernel must see it: queued links first, else the table.
    pub fn table_entry(&self, ptr: u64) -> u64 {
        match self.links[..self.nlinks].iter().rev().find(|l| l.0 == ptr) {
            Some(&(_, v)) => v,
            None => mem::rd(ptr),
        }
    }

    /// emulate/wrpt: stores `val` at `ptr` with a plain store (the VMM traps it, or it lands
    /// in an unhooked L1). A non-leaf entry (`link`) first sends the queue: the table it
    /// links may be zeroed by a queued ZERO_FRAME, and the VMM validates it at the link. A
    /// leaf does not: the frame it maps is not reached before the lazy section ends, and the
    /// queue then goes as one batch (in wrpt also the re-validation point). False in the
    /// other modes.
    fn store_plain(&mut self, ptr: u64, val: u64, link: bool) -> bool {
        if !self.mode.plain_stores() {
            return false;
        }
        if link {
            self.flush();
        }
        mem::wr(ptr, val);
        true
    }

    /// A page fault at `va` that the kernel's own tables allow. wrpt: the VMM may have
    /// unhooked the L1 that maps it; PT_FAULT makes it re-validate and re-hook, then the
    /// access is retried. Native: INVLPG of the stale entry.
    pub fn spurious_fault(&mut self, l4: u64, va: u64) {
        self.c.spurious += 1;
        if self.mode == Mode::Wrpt {
            let pv = self.pv.as_mut().expect("no PV interface");
            self.c.hypercalls += 1;
            let (s, _) = pv.call(hypercall::op::PT_FAULT, [va, 0, 0, 0]);
            assert!(s == 0, "PT_FAULT({va:#x}) failed: status {s}");
        } else {
            self.invlpg_local(l4, va);
        }
    }

    /// A leaf of address space `l4` at `va` changed and CPUs may cache it. Native: INVLPG
    /// here if `l4` is loaded, and a shootdown of the other CPUs that have it loaded (at
    /// the end of the lazy section). PV: nothing (coherence of shadowed changes, on every
    /// vCPU, is the VMM's job).
    pub fn invlpg(&mut self, l4: u64, va: u64) {
        if !self.is_pv() {
            if self.loaded() == l4 {
                self.c.flushes += 1;
                arch::invlpg(va);
            }
            self.remote(l4);
        }
    }

    /// Native: INVLPG of `va` here if `l4` is loaded; no other CPU needs it (a rights
    /// upgrade, or this CPU's own stale entry).
    pub fn invlpg_local(&mut self, l4: u64, va: u64) {
        if !self.is_pv() && self.loaded() == l4 {
            self.c.flushes += 1;
            arch::invlpg(va);
        }
    }

    /// Native: flushes the whole (non-global) TLB of every CPU that has `l4` loaded.
    pub fn flush_all(&mut self, l4: u64) {
        if !self.is_pv() {
            if self.loaded() == l4 {
                self.c.flushes += 1;
                arch::write_cr3(l4);
            }
            self.remote(l4);
        }
    }

    /// Zeroes a fresh (untyped) frame: plain stores, or a queued ZERO_FRAME in PV modes.
    pub fn zero_frame(&mut self, pa: u64, force_cpu: bool) {
        if self.is_pv() && self.zero_vmm && !force_cpu {
            self.c.zero_vmm += 1;
            self.push(MmuEntry::zero_frame(pa));
        } else {
            self.c.zero_cpu += 1;
            arch::zero_page(mem::va(pa));
        }
    }

    /// Copies frame `src` into the fresh (untyped) frame `dst`: plain loads and stores, or a
    /// queued COPY_FRAME in PV modes (applied before any entry queued after it; the kernel
    /// reads `dst` only after the batch is sent).
    pub fn copy_frame(&mut self, dst: u64, src: u64) {
        if self.is_pv() && self.copy_vmm {
            self.c.copy_vmm += 1;
            self.push(MmuEntry::copy_frame(dst, src));
        } else {
            self.c.copy_cpu += 1;
            arch::copy_page(mem::va(dst), mem::va(src));
        }
    }

    /// Pins a fully built L4 (PV) — no-op natively. Inside a lazy section the pin joins
    /// the batch (entries queued after it see the pinned table, in order).
    pub fn pin_l4(&mut self, pa: u64) {
        if self.is_pv() {
            self.push(MmuEntry::pin(4, pa));
            if self.lazy == 0 {
                self.flush();
            }
        }
    }

    /// PV with `SMP_TLB`: registers `l4` as this vCPU's kernel-only root (where UNPIN with
    /// DETACH moves it).
    pub fn set_kernel_root(&mut self, l4: u64) {
        if self.is_pv() && self.smp_tlb {
            self.push(MmuEntry::set_kernel_root(l4));
            self.flush();
        }
    }

    /// Loads an address space (the caller holds the process-table lock, or is a CPU that
    /// is not online yet).
    pub fn switch(&mut self, l4: u64) {
        if self.loaded() == l4 {
            return;
        }
        tlb::set_loaded(l4);
        self.c.switches += 1;
        if self.is_pv() {
            self.push(MmuEntry::new_baseptr(l4));
            self.flush();
        } else {
            arch::write_cr3(l4);
        }
    }

    /// Detaches `dead` from every CPU and unpins it (PV): one batch. Natively, this CPU
    /// switches to `kernel_l4` and the CPUs that keep `dead` loaded lazily are told to drop
    /// it (IPIs). PV: this CPU's `NEW_BASEPTR` and `UNPIN` (with `DETACH` when the VMM
    /// offers `SMP_TLB`: the VMM moves the other vCPUs that keep it to their kernel root,
    /// without IPIs). The caller holds the process-table lock. Returns the other CPUs that
    /// had `dead` loaded.
    pub fn retire_l4(&mut self, dead: u64, kernel_l4: u64) -> u64 {
        if !self.is_pv() {
            if self.loaded() == dead {
                tlb::set_loaded(kernel_l4);
                self.c.switches += 1;
                arch::write_cr3(kernel_l4);
            }
            return tlb::shootdown(dead, true);
        }
        self.flush();
        self.lazy += 1;
        if self.loaded() == dead {
            tlb::set_loaded(kernel_l4);
            self.c.switches += 1;
            // DETACH moves this vCPU to its kernel root too (one hypercall even in `pv`).
            if !self.smp_tlb {
                self.push(MmuEntry::new_baseptr(kernel_l4));
            }
        }
        let flags = if self.smp_tlb {
            hypercall::unpin_flags::DETACH
        } else {
            0
        };
        self.push(MmuEntry::unpin_with(dead, flags));
        self.lazy -= 1;
        self.flush();
        tlb::detached(dead)
    }
}
