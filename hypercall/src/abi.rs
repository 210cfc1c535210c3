//! Op numbers, the request block and MMU batch entries, with their exact byte layouts.
//!
//! All multi-byte fields are little-endian. The `repr(C)` structs below are the wire
//! layout on x86-64; the VMM never reinterprets guest memory as these structs but decodes
//! bytes with [`crate::decode`].

/// Hypercall op numbers (the `op` field of [`RequestHeader`]). Op 0 is never valid.
pub mod op {
    /// Handshake: `args[0]` = the guest's ABI major. Returns version and features.
    pub const VERSION: u32 = 1;
    /// Clean shutdown: `args[0]` = exit status (0..=255). Does not return.
    pub const EXIT: u32 = 2;
    /// Does nothing; measures the transport.
    pub const NULL: u32 = 3;
    /// A multicall of MMU entries: `args[0]` = entries GPA, `args[1]` = entry count.
    pub const MMU_BATCH: u32 = 4;
    /// Selects how the guest writes its page tables (`args[0]`: a [`super::pt_writes`]
    /// value); only before the first page table is typed. Feature `PT_TRAP`.
    pub const PT_WRITES: u32 = 5;
    /// Reports a spurious page fault at VA `args[0]` (a fault its own tables allow): the VMM
    /// re-hooks every unhooked L1 (`wrpt`). Feature `PT_TRAP`.
    pub const PT_FAULT: u32 = 6;

    /// Name of an op for statistics; `"unknown"` for anything else.
    pub const fn name(op: u32) -> &'static str {
        match op {
            VERSION => "VERSION",
            EXIT => "EXIT",
            NULL => "NULL",
            MMU_BATCH => "MMU_BATCH",
            PT_WRITES => "PT_WRITES",
            PT_FAULT => "PT_FAULT",
            _ => "unknown",
        }
    }
}

/// Page-table write modes (`PT_WRITES` `args[0]`).
pub mod pt_writes {
    /// Page tables change only through `MMU_BATCH` (the default).
    pub const HYPERCALL: u64 = 0;
    /// Plain stores; each one traps and is validated like a `PT_UPDATE`.
    pub const EMULATE: u64 = 1;
    /// Plain stores; an L1 is unhooked at its first store and re-validated later.
    pub const WRPT: u64 = 2;
}

/// MMU batch entry kinds (the `kind` field of [`MmuEntry`]).
pub mod kind {
    /// Write `a1` to the guest PTE at guest-physical `a0` and update its shadows.
    pub const PT_UPDATE: u16 = 1;
    /// As `PT_UPDATE`, but A/D bits already recorded for the entry are kept in the new value.
    pub const PT_UPDATE_PRESERVE_AD: u16 = 2;
    /// Pin the frame at `a0` as a level-1 table (page table).
    pub const PIN_L1: u16 = 3;
    /// Pin the frame at `a0` as a level-2 table (page directory).
    pub const PIN_L2: u16 = 4;
    /// Pin the frame at `a0` as a level-3 table (PDPT).
    pub const PIN_L3: u16 = 5;
    /// Pin the frame at `a0` as a level-4 table (an address-space root).
    pub const PIN_L4: u16 = 6;
    /// Drop the pin of the frame at `a0`.
    pub const UNPIN: u16 = 7;
    /// Load the pinned L4 at `a0` as this vCPU's address space.
    pub const NEW_BASEPTR: u16 = 8;
    /// Invalidate the translation of virtual address `a0`.
    pub const INVLPG: u16 = 9;
    /// Invalidate all non-global translations.
    pub const FLUSH_TLB: u16 = 10;
    /// Propagate shadow A/D bits of `a1` pages from VA `a0` into the guest PTEs.
    pub const SYNC_AD: u16 = 11;
    /// Write accessed and dirty bitmaps of `a1` pages from VA `a0` to guest-physical `a2`.
    pub const QUERY_AD: u16 = 12;
    /// Move the page table at frame `a0` to the untyped frame `a1`: the VMM copies it (with
    /// its A/D bits), moves its shadow, type, pins and references, and repoints parents.
    pub const RELOCATE_TABLE: u16 = 13;
    /// Zero the untyped RAM frame at `a0`.
    pub const ZERO_FRAME: u16 = 14;
    /// Register the pinned L4 at `a0` as this vCPU's kernel-only root (0: none). `UNPIN`
    /// with [`super::unpin_flags::DETACH`] switches a vCPU that still has the dying root
    /// loaded to this root.
    pub const SET_KERNEL_ROOT: u16 = 15;
    /// Copy the RAM frame at `a1` into the untyped RAM frame at `a0`.
    pub const COPY_FRAME: u16 = 16;

    /// Name of an entry kind for statistics; `"unknown"` for anything else.
    pub const fn name(kind: u16) -> &'static str {
        match kind {
            PT_UPDATE => "PT_UPDATE",
            PT_UPDATE_PRESERVE_AD => "PT_UPDATE_PRESERVE_AD",
            PIN_L1 => "PIN_L1",
            PIN_L2 => "PIN_L2",
            PIN_L3 => "PIN_L3",
            PIN_L4 => "PIN_L4",
            UNPIN => "UNPIN",
            NEW_BASEPTR => "NEW_BASEPTR",
            INVLPG => "INVLPG",
            FLUSH_TLB => "FLUSH_TLB",
            SYNC_AD => "SYNC_AD",
            QUERY_AD => "QUERY_AD",
            RELOCATE_TABLE => "RELOCATE_TABLE",
            ZERO_FRAME => "ZERO_FRAME",
            SET_KERNEL_ROOT => "SET_KERNEL_ROOT",
            COPY_FRAME => "COPY_FRAME",
            _ => "unknown",
        }
    }
}

/// Flags of a `SYNC_AD` entry.
pub mod sync_flags {
    /// Test-and-clear the accessed bit in shadow and guest PTE.
    pub const CLEAR_A: u16 = 1 << 0;
    /// Test-and-clear the dirty bit in shadow and guest PTE.
    pub const CLEAR_D: u16 = 1 << 1;
    /// All defined flags.
    pub const ALL: u16 = CLEAR_A | CLEAR_D;
}

/// Targets of `FLUSH_TLB` and `INVLPG`: bits 0..=1 of the entry's `flags`.
///
/// Whatever the target, every flush the VMM itself decides on (a changed or removed
/// translation that may be cached) is delivered to every vCPU that may hold it before the
/// hypercall returns; the target only adds flushes the guest asks for.
pub mod flush_target {
    /// The calling vCPU only (the ABI 1.0 behaviour).
    pub const LOCAL: u16 = 0;
    /// Every vCPU whose TLB may hold translations through the caller's loaded root: the
    /// root is loaded there, or was loaded there since that vCPU's last full flush.
    pub const ROOT: u16 = 1;
    /// The vCPUs in the bitmask `a1` (bit n = vCPU n); the caller only if its bit is set.
    /// A bit for a vCPU the VM does not have is `EINVAL`.
    pub const MASK: u16 = 2;
    /// Every vCPU of the VM.
    pub const ALL: u16 = 3;
    /// The bits of `flags` that hold the target.
    pub const BITS: u16 = 0b11;
    /// `FLUSH_TLB` only: global (G=1) translations too.
    pub const GLOBAL: u16 = 1 << 2;
}

/// Flags of an `UNPIN` entry.
pub mod unpin_flags {
    /// The frame is an L4 that may still be loaded on vCPUs (lazily, as Linux's
    /// `exit_mmap` leaves it): every vCPU, the caller included, that has it loaded is
    /// switched to its registered kernel root (`SET_KERNEL_ROOT`) and flushed before the
    /// pin is dropped; `EBUSY` if such a vCPU has no kernel root. Without this flag, `UNPIN`
    /// of a loaded root is `EBUSY`.
    pub const DETACH: u16 = 1 << 0;
}

/// Size of a 4 KiB page / frame.
pub const PAGE_SIZE: u64 = 4096;
/// The most entries one `MMU_BATCH` may carry; more is `E2BIG`.
pub const MAX_BATCH_ENTRIES: u32 = 1024;
/// The most pages one `SYNC_AD` / `QUERY_AD` range may cover; more is `E2BIG`.
pub const MAX_AD_RANGE_PAGES: u64 = 1 << 18;
/// Required alignment of the request block (page alignment is also required for `vmcall`).
pub const REQUEST_ALIGN: u64 = 64;
/// Required alignment of an MMU entry array and of a `QUERY_AD` bitmap.
pub const ENTRY_ALIGN: u64 = 8;
/// The `status` value a guest stores before a call; a call that could not write its
/// response leaves it, and the guest then reads the status port.
pub const STATUS_PENDING: i64 = i64::MIN;

/// The 64-byte request block, one per vCPU in guest memory.
///
/// The guest fills the first [`REQUEST_IN_LEN`] bytes; the VMM copies them once, acts, and
/// writes the response fields (the last [`RESPONSE_LEN`] bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestHeader {
    /// Op number ([`op`]).
    pub op: u32,
    /// Reserved, must be zero.
    pub flags: u32,
    /// Op arguments; unused ones must be zero.
    pub args: [u64; 4],
    /// Out: 0 on success, or a negative error ([`crate::HcError`]).
    pub status: i64,
    /// Out: the op's result value.
    pub value: u64,
    /// Out (`MMU_BATCH`): entries completed.
    pub done: u32,
    /// Out (`MMU_BATCH`): index of the failing entry, or `u32::MAX`.
    pub fail_index: u32,
}

/// Bytes of the request block the VMM reads.
pub const REQUEST_IN_LEN: usize = 40;
/// Offset of the response fields in the request block.
pub const RESPONSE_OFFSET: usize = 40;
/// Bytes of the response the VMM writes.
pub const RESPONSE_LEN: usize = 24;
/// Size of the whole request block.
pub const REQUEST_LEN: usize = 64;

const _: () = assert!(core::mem::size_of::<RequestHeader>() == REQUEST_LEN);
const _: () = assert!(core::mem::offset_of!(RequestHeader, status) == RESPONSE_OFFSET);
const _: () = assert!(REQUEST_IN_LEN + RESPONSE_LEN == REQUEST_LEN);

/// The response the VMM writes back into the request block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Response {
    /// 0 or a negative error.
    pub status: i64,
    /// Op result.
    pub value: u64,
    /// Entries completed (`MMU_BATCH`).
    pub done: u32,
    /// Failing entry index or `u32::MAX`.
    pub fail_index: u32,
}

impl Response {
    /// A successful response carrying `value`.
    pub const fn ok(value: u64) -> Response {
        Response {
            status: 0,
            value,
            done: 0,
            fail_index: u32::MAX,
        }
    }

    /// A failed response.
    pub const fn err(e: crate::HcError) -> Response {
        Response {
            status: e.status(),
            value: 0,
            done: 0,
            fail_index: u32::MAX,
        }
    }

    /// The little-endian bytes written at [`RESPONSE_OFFSET`].
    pub fn to_bytes(&self) -> [u8; RESPONSE_LEN] {
        let mut b = [0u8; RESPONSE_LEN];
        b[0..8].copy_from_slice(&self.status.to_le_bytes());
        b[8..16].copy_from_slice(&self.value.to_le_bytes());
        b[16..20].copy_from_slice(&self.done.to_le_bytes());
        b[20..24].copy_from_slice(&self.fail_index.to_le_bytes());
        b
    }
}

/// One 32-byte MMU batch entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MmuEntry {
    /// Entry kind ([`kind`]).
    pub kind: u16,
    /// Kind-specific flags ([`sync_flags`] for `SYNC_AD`), otherwise zero.
    pub flags: u16,
    /// Reserved, must be zero.
    pub reserved: u32,
    /// First argument.
    pub a0: u64,
    /// Second argument.
    pub a1: u64,
    /// Third argument.
    pub a2: u64,
}

/// Size of an [`MmuEntry`].
pub const ENTRY_LEN: usize = 32;
const _: () = assert!(core::mem::size_of::<MmuEntry>() == ENTRY_LEN);

impl MmuEntry {
    const fn new(kind: u16, flags: u16, a0: u64, a1: u64, a2: u64) -> MmuEntry {
        MmuEntry {
            kind,
            flags,
            reserved: 0,
            a0,
            a1,
            a2,
        }
    }
    /// `PT_UPDATE(ptr, val)`.
    pub const fn pt_update(ptr: u64, val: u64) -> MmuEntry {
        Self::new(kind::PT_UPDATE, 0, ptr, val, 0)
    }
    /// `PT_UPDATE_PRESERVE_AD(ptr, val)`.
    pub const fn pt_update_preserve_ad(ptr: u64, val: u64) -> MmuEntry {
        Self::new(kind::PT_UPDATE_PRESERVE_AD, 0, ptr, val, 0)
    }
    /// `PIN_L<level>(frame)`, level 1..=4.
    pub const fn pin(level: u8, frame: u64) -> MmuEntry {
        Self::new(kind::PIN_L1 + level as u16 - 1, 0, frame, 0, 0)
    }
    /// `UNPIN(frame)`.
    pub const fn unpin(frame: u64) -> MmuEntry {
        Self::new(kind::UNPIN, 0, frame, 0, 0)
    }
    /// `NEW_BASEPTR(frame)`.
    pub const fn new_baseptr(frame: u64) -> MmuEntry {
        Self::new(kind::NEW_BASEPTR, 0, frame, 0, 0)
    }
    /// `INVLPG(va)`.
    pub const fn invlpg(va: u64) -> MmuEntry {
        Self::new(kind::INVLPG, 0, va, 0, 0)
    }
    /// `FLUSH_TLB` of the calling vCPU.
    pub const fn flush_tlb() -> MmuEntry {
        Self::new(kind::FLUSH_TLB, 0, 0, 0, 0)
    }
    /// `FLUSH_TLB` with a target ([`flush_target`], optionally `| GLOBAL`) and, for
    /// `MASK`, the vCPU mask.
    pub const fn flush_tlb_on(flags: u16, mask: u64) -> MmuEntry {
        Self::new(kind::FLUSH_TLB, flags, 0, mask, 0)
    }
    /// `INVLPG(va)` with a target ([`flush_target`]) and, for `MASK`, the vCPU mask.
    pub const fn invlpg_on(va: u64, target: u16, mask: u64) -> MmuEntry {
        Self::new(kind::INVLPG, target, va, mask, 0)
    }
    /// `UNPIN(frame)` with [`unpin_flags`].
    pub const fn unpin_with(frame: u64, flags: u16) -> MmuEntry {
        Self::new(kind::UNPIN, flags, frame, 0, 0)
    }
    /// `SET_KERNEL_ROOT(frame)`; 0 clears the registration.
    pub const fn set_kernel_root(frame: u64) -> MmuEntry {
        Self::new(kind::SET_KERNEL_ROOT, 0, frame, 0, 0)
    }
    /// `SYNC_AD(va, pages, flags)`.
    pub const fn sync_ad(va: u64, pages: u64, flags: u16) -> MmuEntry {
        Self::new(kind::SYNC_AD, flags, va, pages, 0)
    }
    /// `QUERY_AD(va, pages, bitmap_gpa)`.
    pub const fn query_ad(va: u64, pages: u64, bitmap_gpa: u64) -> MmuEntry {
        Self::new(kind::QUERY_AD, 0, va, pages, bitmap_gpa)
    }
    /// `RELOCATE_TABLE(old_frame, new_frame)`.
    pub const fn relocate_table(old: u64, new: u64) -> MmuEntry {
        Self::new(kind::RELOCATE_TABLE, 0, old, new, 0)
    }
    /// `ZERO_FRAME(frame)`.
    pub const fn zero_frame(frame: u64) -> MmuEntry {
        Self::new(kind::ZERO_FRAME, 0, frame, 0, 0)
    }
    /// `COPY_FRAME(dst, src)`.
    pub const fn copy_frame(dst: u64, src: u64) -> MmuEntry {
        Self::new(kind::COPY_FRAME, 0, dst, src, 0)
    }

    /// The little-endian wire bytes.
    pub fn to_bytes(&self) -> [u8; ENTRY_LEN] {
        let mut b = [0u8; ENTRY_LEN];
        b[0..2].copy_from_slice(&self.kind.to_le_bytes());
        b[2..4].copy_from_slice(&self.flags.to_le_bytes());
        b[4..8].copy_from_slice(&self.reserved.to_le_bytes());
        b[8..16].copy_from_slice(&self.a0.to_le_bytes());
        b[16..24].copy_from_slice(&self.a1.to_le_bytes());
        b[24..32].copy_from_slice(&self.a2.to_le_bytes());
        b
    }
}

impl RequestHeader {
    /// A request for `op` with `args`, response fields set to "pending".
    pub const fn new(op: u32, args: [u64; 4]) -> RequestHeader {
        RequestHeader {
            op,
            flags: 0,
            args,
            status: STATUS_PENDING,
            value: 0,
            done: 0,
            fail_index: u32::MAX,
        }
    }

    /// The little-endian bytes of the whole block.
    pub fn to_bytes(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&self.op.to_le_bytes());
        b[4..8].copy_from_slice(&self.flags.to_le_bytes());
        for (i, a) in self.args.iter().enumerate() {
            b[8 + i * 8..16 + i * 8].copy_from_slice(&a.to_le_bytes());
        }
        let r = Response {
            status: self.status,
            value: self.value,
            done: self.done,
            fail_index: self.fail_index,
        };
        b[RESPONSE_OFFSET..].copy_from_slice(&r.to_bytes());
        b
    }
}

/// Bytes of one bitmap written by `QUERY_AD` for `pages` pages (rounded up to 8 bytes).
/// The dirty bitmap follows the accessed bitmap at this offset.
pub const fn ad_bitmap_bytes(pages: u64) -> u64 {
    pages.div_ceil(64) * 8
}
