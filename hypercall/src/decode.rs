//! A panic-free decoder from untrusted guest bytes to typed requests.
//!
//! Only structural rules live here (known op/kind, reserved fields zero, alignment, limits,
//! canonical addresses). Whether a frame may be mapped is the shadow engine's business.

use crate::abi::{
    self, flush_target, kind, op, sync_flags, unpin_flags, ENTRY_LEN, PAGE_SIZE, REQUEST_IN_LEN,
};
use crate::HcError;

/// A decoded hypercall request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// `VERSION(major)`.
    Version {
        /// The ABI major the guest was built for.
        major: u16,
    },
    /// `EXIT(code)`.
    Exit {
        /// The VM's exit status.
        code: u8,
    },
    /// `NULL`.
    Null,
    /// `MMU_BATCH(entries_gpa, count)`.
    MmuBatch {
        /// Guest-physical address of the first entry.
        entries_gpa: u64,
        /// Number of entries, 1..=[`abi::MAX_BATCH_ENTRIES`].
        count: u32,
    },
    /// `PT_WRITES(mode)`.
    PtWrites {
        /// An [`abi::pt_writes`] value (0..=2).
        mode: u64,
    },
    /// `PT_FAULT(va)`.
    PtFault {
        /// The faulting VA (canonical).
        va: u64,
    },
}

/// Paging level of a table, 1 (page table) to 4 (root).
pub type Level = u8;

/// Which vCPUs a guest-requested `FLUSH_TLB` / `INVLPG` is for ([`flush_target`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlushTarget {
    /// The calling vCPU.
    Local,
    /// Every vCPU that may hold translations through the caller's loaded root.
    Root,
    /// The vCPUs whose bits are set (bit n = vCPU n; bits past the VM's vCPUs are the
    /// engine's `EINVAL`).
    Mask(u64),
    /// Every vCPU.
    All,
}

impl FlushTarget {
    /// Decodes the target bits of `flags` and the mask argument `a1` (which must be 0
    /// unless the target is `MASK`).
    fn decode(flags: u16, a1: u64) -> Result<FlushTarget, HcError> {
        let t = match flags & flush_target::BITS {
            flush_target::LOCAL => FlushTarget::Local,
            flush_target::ROOT => FlushTarget::Root,
            flush_target::MASK => return Ok(FlushTarget::Mask(a1)),
            _ => FlushTarget::All,
        };
        zero(a1)?;
        Ok(t)
    }
}

/// A decoded MMU batch entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmuOp {
    /// Write `val` to the guest PTE at guest-physical `ptr`.
    PtUpdate {
        /// Guest-physical address of the PTE (8-byte aligned).
        ptr: u64,
        /// New entry value.
        val: u64,
        /// Keep A/D bits already recorded for this entry.
        preserve_ad: bool,
    },
    /// Pin `frame` as a table of `level`.
    Pin {
        /// 1..=4.
        level: Level,
        /// Page-aligned guest-physical address.
        frame: u64,
    },
    /// Drop the pin of `frame`.
    Unpin {
        /// Page-aligned guest-physical address.
        frame: u64,
        /// [`unpin_flags::DETACH`]: switch vCPUs that still have the root loaded to their
        /// kernel root first.
        detach: bool,
    },
    /// Load the pinned L4 `frame`.
    NewBaseptr {
        /// Page-aligned guest-physical address.
        frame: u64,
    },
    /// Invalidate one translation.
    Invlpg {
        /// Canonical virtual address.
        va: u64,
        /// On which vCPUs.
        target: FlushTarget,
    },
    /// Invalidate all non-global (with `global`, all) translations.
    FlushTlb {
        /// On which vCPUs.
        target: FlushTarget,
        /// [`flush_target::GLOBAL`]: global translations too.
        global: bool,
    },
    /// Register this vCPU's kernel-only root (`DETACH` switches to it).
    SetKernelRoot {
        /// Page-aligned guest-physical address of a pinned L4, or `None` to clear.
        frame: Option<u64>,
    },
    /// Propagate (and optionally clear) A/D bits of a range.
    SyncAd {
        /// Page-aligned canonical start.
        va: u64,
        /// Number of pages, 1..=[`abi::MAX_AD_RANGE_PAGES`].
        pages: u64,
        /// Test-and-clear accessed bits.
        clear_a: bool,
        /// Test-and-clear dirty bits.
        clear_d: bool,
    },
    /// Write accessed and dirty bitmaps of a range to guest memory.
    QueryAd {
        /// Page-aligned canonical start.
        va: u64,
        /// Number of pages, 1..=[`abi::MAX_AD_RANGE_PAGES`].
        pages: u64,
        /// 8-byte aligned guest-physical address of the accessed bitmap.
        bitmap_gpa: u64,
    },
    /// The guest copied table `old` to `new`.
    RelocateTable {
        /// Page-aligned guest-physical address of the old table.
        old: u64,
        /// Page-aligned guest-physical address of the new table.
        new: u64,
    },
    /// Zero the untyped RAM frame.
    ZeroFrame {
        /// Page-aligned guest-physical address.
        frame: u64,
    },
    /// Copy RAM frame `src` into the untyped RAM frame `dst`.
    CopyFrame {
        /// Page-aligned guest-physical address written.
        dst: u64,
        /// Page-aligned guest-physical address read (not `dst`).
        src: u64,
    },
}

fn u16_at(b: &[u8], off: usize) -> Result<u16, HcError> {
    let s = b.get(off..off + 2).ok_or(HcError::Einval)?;
    Ok(u16::from_le_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], off: usize) -> Result<u32, HcError> {
    let s = b.get(off..off + 4).ok_or(HcError::Einval)?;
    let mut a = [0u8; 4];
    a.copy_from_slice(s);
    Ok(u32::from_le_bytes(a))
}

fn u64_at(b: &[u8], off: usize) -> Result<u64, HcError> {
    let s = b.get(off..off + 8).ok_or(HcError::Einval)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Ok(u64::from_le_bytes(a))
}

fn zero(v: u64) -> Result<(), HcError> {
    if v == 0 {
        Ok(())
    } else {
        Err(HcError::Einval)
    }
}

/// True if `va` is canonical for 48-bit virtual addresses.
pub const fn is_canonical(va: u64) -> bool {
    let top = va >> 47;
    top == 0 || top == 0x1_ffff
}

fn page_aligned(a: u64) -> Result<u64, HcError> {
    if a.is_multiple_of(PAGE_SIZE) {
        Ok(a)
    } else {
        Err(HcError::Einval)
    }
}

fn ad_range(va: u64, pages: u64) -> Result<(), HcError> {
    if !va.is_multiple_of(PAGE_SIZE) || !is_canonical(va) || pages == 0 {
        return Err(HcError::Einval);
    }
    if pages > abi::MAX_AD_RANGE_PAGES {
        return Err(HcError::E2big);
    }
    let end = va
        .checked_add(pages * PAGE_SIZE - 1)
        .ok_or(HcError::Einval)?;
    // The range may not cross the canonical hole.
    if !is_canonical(end) || (va >> 47) != (end >> 47) {
        return Err(HcError::Einval);
    }
    Ok(())
}

/// Decodes the guest-written part of a request block (at least [`REQUEST_IN_LEN`] bytes).
pub fn decode_request(b: &[u8]) -> Result<Request, HcError> {
    if b.len() < REQUEST_IN_LEN {
        return Err(HcError::Einval);
    }
    let op = u32_at(b, 0)?;
    // docs/pv-abi.md 4.3: flags first (also for unknown ops), then the op's arguments,
    // then the op number.
    if u32_at(b, 4)? != 0 {
        return Err(HcError::Einval);
    }
    let a = [
        u64_at(b, 8)?,
        u64_at(b, 16)?,
        u64_at(b, 24)?,
        u64_at(b, 32)?,
    ];
    match op {
        op::VERSION => {
            zero(a[1] | a[2] | a[3])?;
            let major = u16::try_from(a[0]).map_err(|_| HcError::Einval)?;
            Ok(Request::Version { major })
        }
        op::EXIT => {
            zero(a[1] | a[2] | a[3])?;
            let code = u8::try_from(a[0]).map_err(|_| HcError::Einval)?;
            Ok(Request::Exit { code })
        }
        op::NULL => {
            zero(a[0] | a[1] | a[2] | a[3])?;
            Ok(Request::Null)
        }
        op::MMU_BATCH => {
            zero(a[2] | a[3])?;
            if a[0] % abi::ENTRY_ALIGN != 0 {
                return Err(HcError::Einval);
            }
            if a[1] == 0 {
                return Err(HcError::Einval);
            }
            if a[1] > abi::MAX_BATCH_ENTRIES as u64 {
                return Err(HcError::E2big);
            }
            Ok(Request::MmuBatch {
                entries_gpa: a[0],
                count: a[1] as u32,
            })
        }
        op::PT_WRITES => {
            zero(a[1] | a[2] | a[3])?;
            if a[0] > abi::pt_writes::WRPT {
                return Err(HcError::Einval);
            }
            Ok(Request::PtWrites { mode: a[0] })
        }
        op::PT_FAULT => {
            zero(a[1] | a[2] | a[3])?;
            if !is_canonical(a[0]) {
                return Err(HcError::Einval);
            }
            Ok(Request::PtFault { va: a[0] })
        }
        _ => Err(HcError::Enosys),
    }
}

/// Decodes one MMU entry from exactly [`ENTRY_LEN`] bytes.
pub fn decode_entry(b: &[u8]) -> Result<MmuOp, HcError> {
    if b.len() != ENTRY_LEN {
        return Err(HcError::Einval);
    }
    let k = u16_at(b, 0)?;
    let flags = u16_at(b, 2)?;
    let reserved = u32_at(b, 4)?;
    let (a0, a1, a2) = (u64_at(b, 8)?, u64_at(b, 16)?, u64_at(b, 24)?);
    // docs/pv-abi.md 6.1: reserved, then flags (also for unknown kinds), then the kind's
    // arguments, then the kind number.
    if reserved != 0 {
        return Err(HcError::Einval);
    }
    if flags & !allowed_flags(k) != 0 {
        return Err(HcError::Einval);
    }
    match k {
        kind::INVLPG | kind::FLUSH_TLB | kind::SYNC_AD | kind::QUERY_AD => {
            decode_tlb_ad(k, flags, a0, a1, a2)
        }
        _ => decode_table_op(k, flags, a0, a1, a2),
    }
}

/// The `flags` bits kind `k` may carry (0 for unknown kinds).
const fn allowed_flags(k: u16) -> u16 {
    match k {
        kind::SYNC_AD => sync_flags::ALL,
        kind::INVLPG => flush_target::BITS,
        kind::FLUSH_TLB => flush_target::BITS | flush_target::GLOBAL,
        kind::UNPIN => unpin_flags::DETACH,
        _ => 0,
    }
}

/// Entries that change tables or frames: updates, pins, root loads, relocation, zeroing.
fn decode_table_op(k: u16, flags: u16, a0: u64, a1: u64, a2: u64) -> Result<MmuOp, HcError> {
    match k {
        kind::PT_UPDATE | kind::PT_UPDATE_PRESERVE_AD => {
            zero(a2)?;
            if !a0.is_multiple_of(8) {
                return Err(HcError::Einval);
            }
            Ok(MmuOp::PtUpdate {
                ptr: a0,
                val: a1,
                preserve_ad: k == kind::PT_UPDATE_PRESERVE_AD,
            })
        }
        kind::PIN_L1..=kind::PIN_L4 => {
            zero(a1 | a2)?;
            Ok(MmuOp::Pin {
                level: (k - kind::PIN_L1 + 1) as u8,
                frame: page_aligned(a0)?,
            })
        }
        kind::UNPIN => {
            zero(a1 | a2)?;
            Ok(MmuOp::Unpin {
                frame: page_aligned(a0)?,
                detach: flags & unpin_flags::DETACH != 0,
            })
        }
        kind::SET_KERNEL_ROOT => {
            zero(a1 | a2)?;
            let f = page_aligned(a0)?;
            Ok(MmuOp::SetKernelRoot {
                frame: (f != 0).then_some(f),
            })
        }
        kind::NEW_BASEPTR => {
            zero(a1 | a2)?;
            Ok(MmuOp::NewBaseptr {
                frame: page_aligned(a0)?,
            })
        }
        kind::RELOCATE_TABLE => {
            zero(a2)?;
            let (old, new) = (page_aligned(a0)?, page_aligned(a1)?);
            if old == new {
                return Err(HcError::Einval);
            }
            Ok(MmuOp::RelocateTable { old, new })
        }
        kind::ZERO_FRAME => {
            zero(a1 | a2)?;
            Ok(MmuOp::ZeroFrame {
                frame: page_aligned(a0)?,
            })
        }
        kind::COPY_FRAME => {
            zero(a2)?;
            let (dst, src) = (page_aligned(a0)?, page_aligned(a1)?);
            if dst == src {
                return Err(HcError::Einval);
            }
            Ok(MmuOp::CopyFrame { dst, src })
        }
        _ => Err(HcError::Enosys),
    }
}

/// Entries about translations: INVLPG, FLUSH_TLB, SYNC_AD, QUERY_AD.
fn decode_tlb_ad(k: u16, flags: u16, a0: u64, a1: u64, a2: u64) -> Result<MmuOp, HcError> {
    match k {
        kind::INVLPG => {
            zero(a2)?;
            let target = FlushTarget::decode(flags, a1)?;
            if !is_canonical(a0) {
                return Err(HcError::Einval);
            }
            Ok(MmuOp::Invlpg { va: a0, target })
        }
        kind::FLUSH_TLB => {
            zero(a0 | a2)?;
            Ok(MmuOp::FlushTlb {
                target: FlushTarget::decode(flags, a1)?,
                global: flags & flush_target::GLOBAL != 0,
            })
        }
        kind::SYNC_AD => {
            zero(a2)?;
            if flags & !sync_flags::ALL != 0 {
                return Err(HcError::Einval);
            }
            ad_range(a0, a1)?;
            Ok(MmuOp::SyncAd {
                va: a0,
                pages: a1,
                clear_a: flags & sync_flags::CLEAR_A != 0,
                clear_d: flags & sync_flags::CLEAR_D != 0,
            })
        }
        kind::QUERY_AD => {
            ad_range(a0, a1)?;
            if !a2.is_multiple_of(abi::ENTRY_ALIGN) {
                return Err(HcError::Einval);
            }
            Ok(MmuOp::QueryAd {
                va: a0,
                pages: a1,
                bitmap_gpa: a2,
            })
        }
        _ => Err(HcError::Enosys),
    }
}

/// Byte length of `count` entries; `E2BIG` past the limit, `EINVAL` for zero.
pub fn batch_bytes(count: u32) -> Result<usize, HcError> {
    if count == 0 {
        return Err(HcError::Einval);
    }
    if count > abi::MAX_BATCH_ENTRIES {
        return Err(HcError::E2big);
    }
    Ok(count as usize * ENTRY_LEN)
}

/// Iterates the entries of a batch already copied out of guest memory. A buffer shorter
/// than `count` entries (truncated) yields `EINVAL` at the first missing entry.
pub fn batch_entries(
    bytes: &[u8],
    count: u32,
) -> impl Iterator<Item = Result<MmuOp, HcError>> + '_ {
    (0..count as usize).map(
        move |i| match bytes.get(i * ENTRY_LEN..(i + 1) * ENTRY_LEN) {
            Some(e) => decode_entry(e),
            None => Err(HcError::Einval),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::{MmuEntry, RequestHeader};

    fn req(op: u32, args: [u64; 4]) -> [u8; 64] {
        RequestHeader::new(op, args).to_bytes()
    }

    #[test]
    fn decodes_each_op() {
        assert_eq!(
            decode_request(&req(op::VERSION, [1, 0, 0, 0])),
            Ok(Request::Version { major: 1 })
        );
        assert_eq!(
            decode_request(&req(op::EXIT, [3, 0, 0, 0])),
            Ok(Request::Exit { code: 3 })
        );
        assert_eq!(decode_request(&req(op::NULL, [0; 4])), Ok(Request::Null));
        assert_eq!(
            decode_request(&req(op::MMU_BATCH, [0x1000, 5, 0, 0])),
            Ok(Request::MmuBatch {
                entries_gpa: 0x1000,
                count: 5
            })
        );
    }

    /// docs/pv-abi.md 4.3, one case per step: each input passes every earlier step and
    /// fails exactly at its own.
    #[test]
    fn request_decoding_follows_the_documented_order() {
        let mut flags = req(99, [7; 4]);
        flags[4] = 1;
        assert_eq!(decode_request(&flags), Err(HcError::Einval), "1: flags");
        assert_eq!(
            decode_request(&req(op::MMU_BATCH, [0x1000, 0, 0, 0])),
            Err(HcError::Einval),
            "2: arguments (count 0)"
        );
        assert_eq!(
            decode_request(&req(op::MMU_BATCH, [0x1000, 5000, 0, 0])),
            Err(HcError::E2big),
            "2: arguments (count > 1024)"
        );
        assert_eq!(
            decode_request(&req(99, [7; 4])),
            Err(HcError::Enosys),
            "3: op"
        );
    }

    /// docs/pv-abi.md 6.1, one case per step.
    #[test]
    fn entry_decoding_follows_the_documented_order() {
        let e = |kind, flags, reserved, a0| MmuEntry {
            kind,
            flags,
            reserved,
            a0,
            ..Default::default()
        };
        let d = |m: MmuEntry| decode_entry(&m.to_bytes());
        assert_eq!(d(e(99, 1, 1, 3)), Err(HcError::Einval), "1: reserved");
        assert_eq!(
            d(e(99, 1, 0, 3)),
            Err(HcError::Einval),
            "2: flags, unknown kind"
        );
        assert_eq!(d(e(kind::UNPIN, 2, 0, 0)), Err(HcError::Einval), "2: flags");
        assert_eq!(
            d(e(kind::PIN_L1, 1, 0, 0)),
            Err(HcError::Einval),
            "2: flags of a kind without flags"
        );
        assert_eq!(
            d(e(kind::UNPIN, 1, 0, 3)),
            Err(HcError::Einval),
            "3: arguments (with an allowed flag)"
        );
        // A flush target's mask argument is checked with the other arguments, before
        // the canonical VA.
        let bad_mask = MmuEntry::invlpg_on(0x0000_8000_0000_0000, flush_target::ROOT, 1);
        assert_eq!(d(bad_mask), Err(HcError::Einval), "3: arguments (mask)");
        assert_eq!(d(e(99, 0, 0, 3)), Err(HcError::Enosys), "4: kind");
        assert_eq!(d(e(0, 0, 0, 0)), Err(HcError::Enosys), "4: kind 0");
    }

    #[test]
    fn refuses_bad_requests() {
        assert_eq!(decode_request(&req(0, [0; 4])), Err(HcError::Enosys));
        assert_eq!(decode_request(&req(99, [0; 4])), Err(HcError::Enosys));
        let mut unknown_flagged = req(99, [1; 4]);
        unknown_flagged[4] = 1;
        assert_eq!(
            decode_request(&unknown_flagged),
            Err(HcError::Einval),
            "flags are checked before the op number (pv-abi 4.3 step 1)"
        );
        assert_eq!(
            decode_request(&req(op::NULL, [1, 0, 0, 0])),
            Err(HcError::Einval)
        );
        assert_eq!(
            decode_request(&req(op::EXIT, [256, 0, 0, 0])),
            Err(HcError::Einval)
        );
        assert_eq!(
            decode_request(&req(op::MMU_BATCH, [0x1000, 0, 0, 0])),
            Err(HcError::Einval)
        );
        assert_eq!(
            decode_request(&req(op::MMU_BATCH, [0x1000, 1025, 0, 0])),
            Err(HcError::E2big)
        );
        assert_eq!(
            decode_request(&req(op::MMU_BATCH, [0x1004, 1, 0, 0])),
            Err(HcError::Einval)
        );
        let mut r = req(op::NULL, [0; 4]);
        r[4] = 1; // reserved flags
        assert_eq!(decode_request(&r), Err(HcError::Einval));
        assert_eq!(decode_request(&r[..39]), Err(HcError::Einval));
    }

    #[test]
    fn decodes_each_entry_kind() {
        let cases = [
            (
                MmuEntry::pt_update(0x2008, 0x3003),
                MmuOp::PtUpdate {
                    ptr: 0x2008,
                    val: 0x3003,
                    preserve_ad: false,
                },
            ),
            (
                MmuEntry::pt_update_preserve_ad(0x2008, 7),
                MmuOp::PtUpdate {
                    ptr: 0x2008,
                    val: 7,
                    preserve_ad: true,
                },
            ),
            (
                MmuEntry::pin(1, 0x5000),
                MmuOp::Pin {
                    level: 1,
                    frame: 0x5000,
                },
            ),
            (
                MmuEntry::pin(4, 0x5000),
                MmuOp::Pin {
                    level: 4,
                    frame: 0x5000,
                },
            ),
            (
                MmuEntry::new_baseptr(0x5000),
                MmuOp::NewBaseptr { frame: 0x5000 },
            ),
            (
                MmuEntry::invlpg(0xffff_8000_0000_1234),
                MmuOp::Invlpg {
                    va: 0xffff_8000_0000_1234,
                    target: FlushTarget::Local,
                },
            ),
            (
                MmuEntry::sync_ad(0x40_0000, 16, sync_flags::CLEAR_D),
                MmuOp::SyncAd {
                    va: 0x40_0000,
                    pages: 16,
                    clear_a: false,
                    clear_d: true,
                },
            ),
            (
                MmuEntry::query_ad(0x40_0000, 16, 0x9000),
                MmuOp::QueryAd {
                    va: 0x40_0000,
                    pages: 16,
                    bitmap_gpa: 0x9000,
                },
            ),
            (
                MmuEntry::relocate_table(0x5000, 0x6000),
                MmuOp::RelocateTable {
                    old: 0x5000,
                    new: 0x6000,
                },
            ),
            (
                MmuEntry::zero_frame(0x7000),
                MmuOp::ZeroFrame { frame: 0x7000 },
            ),
        ];
        for (e, want) in cases {
            assert_eq!(decode_entry(&e.to_bytes()), Ok(want), "{e:?}");
        }
    }

    #[test]
    fn decodes_copy_frames_and_refuses_bad_ones() {
        assert_eq!(
            decode_entry(&MmuEntry::copy_frame(0x7000, 0x8000).to_bytes()),
            Ok(MmuOp::CopyFrame {
                dst: 0x7000,
                src: 0x8000
            })
        );
        for e in [
            MmuEntry::copy_frame(0x7000, 0x7000),
            MmuEntry::copy_frame(0x7001, 0x8000),
            MmuEntry::copy_frame(0x7000, 0x8008),
            MmuEntry {
                a2: 1,
                ..MmuEntry::copy_frame(0x7000, 0x8000)
            },
            MmuEntry {
                flags: 1,
                ..MmuEntry::copy_frame(0x7000, 0x8000)
            },
        ] {
            assert_eq!(decode_entry(&e.to_bytes()), Err(HcError::Einval), "{e:?}");
        }
    }

    #[test]
    fn refuses_bad_entries() {
        let bad = [
            (
                MmuEntry {
                    kind: 0,
                    ..Default::default()
                },
                HcError::Enosys,
            ),
            (
                MmuEntry {
                    kind: 200,
                    ..Default::default()
                },
                HcError::Enosys,
            ),
            (
                MmuEntry {
                    kind: 15,
                    flags: 1,
                    reserved: 1,
                    ..Default::default()
                },
                HcError::Einval,
            ),
            (
                MmuEntry {
                    reserved: 1,
                    ..MmuEntry::flush_tlb()
                },
                HcError::Einval,
            ),
            (
                MmuEntry {
                    flags: 1 << 3,
                    ..MmuEntry::flush_tlb()
                },
                HcError::Einval,
            ),
            (MmuEntry::pt_update(0x2004, 0), HcError::Einval),
            (
                MmuEntry {
                    a2: 1,
                    ..MmuEntry::pt_update(0x2000, 0)
                },
                HcError::Einval,
            ),
            (MmuEntry::pin(1, 0x5001), HcError::Einval),
            (MmuEntry::invlpg(0x0000_8000_0000_0000), HcError::Einval),
            (MmuEntry::sync_ad(0x1000, 0, 0), HcError::Einval),
            (MmuEntry::sync_ad(0x1001, 1, 0), HcError::Einval),
            (MmuEntry::sync_ad(0x1000, 1, 4), HcError::Einval),
            (
                MmuEntry::sync_ad(0x1000, abi::MAX_AD_RANGE_PAGES + 1, 0),
                HcError::E2big,
            ),
            (MmuEntry::sync_ad(0x7fff_ffff_f000, 2, 0), HcError::Einval),
            (MmuEntry::query_ad(0x1000, 1, 0x9001), HcError::Einval),
            (MmuEntry::relocate_table(0x5000, 0x5000), HcError::Einval),
        ];
        for (e, want) in bad {
            assert_eq!(decode_entry(&e.to_bytes()), Err(want), "{e:?}");
        }
    }

    #[test]
    fn decodes_smp_tlb_entries() {
        let cases = [
            (
                MmuEntry::unpin(0x5000),
                MmuOp::Unpin {
                    frame: 0x5000,
                    detach: false,
                },
            ),
            (
                MmuEntry::flush_tlb(),
                MmuOp::FlushTlb {
                    target: FlushTarget::Local,
                    global: false,
                },
            ),
            (
                MmuEntry::unpin_with(0x5000, unpin_flags::DETACH),
                MmuOp::Unpin {
                    frame: 0x5000,
                    detach: true,
                },
            ),
            (
                MmuEntry::set_kernel_root(0x6000),
                MmuOp::SetKernelRoot {
                    frame: Some(0x6000),
                },
            ),
            (
                MmuEntry::set_kernel_root(0),
                MmuOp::SetKernelRoot { frame: None },
            ),
            (
                MmuEntry::flush_tlb_on(flush_target::MASK | flush_target::GLOBAL, 0b101),
                MmuOp::FlushTlb {
                    target: FlushTarget::Mask(0b101),
                    global: true,
                },
            ),
            (
                MmuEntry::flush_tlb_on(flush_target::ROOT, 0),
                MmuOp::FlushTlb {
                    target: FlushTarget::Root,
                    global: false,
                },
            ),
            (
                MmuEntry::invlpg_on(0x1000, flush_target::ALL, 0),
                MmuOp::Invlpg {
                    va: 0x1000,
                    target: FlushTarget::All,
                },
            ),
            (
                MmuEntry::invlpg_on(0x1000, flush_target::MASK, 2),
                MmuOp::Invlpg {
                    va: 0x1000,
                    target: FlushTarget::Mask(2),
                },
            ),
        ];
        for (e, want) in cases {
            assert_eq!(decode_entry(&e.to_bytes()), Ok(want), "{e:?}");
        }
    }

    #[test]
    fn refuses_bad_smp_tlb_entries() {
        let bad = [
            (
                MmuEntry::flush_tlb_on(flush_target::ROOT, 1),
                HcError::Einval,
            ),
            (
                MmuEntry::flush_tlb_on(flush_target::ALL, 1),
                HcError::Einval,
            ),
            (
                MmuEntry::invlpg_on(0x1000, flush_target::GLOBAL, 0),
                HcError::Einval,
            ),
            (
                MmuEntry::invlpg_on(0x1000, flush_target::LOCAL, 1),
                HcError::Einval,
            ),
            (MmuEntry::unpin_with(0x5000, 2), HcError::Einval),
            (MmuEntry::set_kernel_root(0x6001), HcError::Einval),
            (
                MmuEntry {
                    flags: 1,
                    ..MmuEntry::set_kernel_root(0x6000)
                },
                HcError::Einval,
            ),
            (
                MmuEntry {
                    a1: 1,
                    ..MmuEntry::set_kernel_root(0x6000)
                },
                HcError::Einval,
            ),
        ];
        for (e, want) in bad {
            assert_eq!(decode_entry(&e.to_bytes()), Err(want), "{e:?}");
        }
    }

    #[test]
    fn truncated_batch_is_einval() {
        let mut buf = [0u8; 64];
        buf[..32].copy_from_slice(&MmuEntry::flush_tlb().to_bytes());
        buf[32..].copy_from_slice(&MmuEntry::flush_tlb().to_bytes());
        let got: [_; 3] = {
            let mut it = batch_entries(&buf[..48], 3);
            [it.next(), it.next(), it.next()]
        };
        assert_eq!(
            got[0],
            Some(Ok(MmuOp::FlushTlb {
                target: FlushTarget::Local,
                global: false
            }))
        );
        assert_eq!(got[1], Some(Err(HcError::Einval)));
        assert_eq!(got[2], Some(Err(HcError::Einval)));
        assert_eq!(batch_bytes(0), Err(HcError::Einval));
        assert_eq!(batch_bytes(abi::MAX_BATCH_ENTRIES + 1), Err(HcError::E2big));
        assert_eq!(batch_bytes(2), Ok(64));
    }
}

#[cfg(test)]
mod pt_trap_tests {
    use super::*;
    use crate::RequestHeader;

    fn req(op: u32, args: [u64; 4]) -> Result<Request, HcError> {
        decode_request(&RequestHeader::new(op, args).to_bytes())
    }

    #[test]
    fn pt_writes_and_pt_fault_decode_with_their_rules() {
        assert_eq!(
            req(op::PT_WRITES, [2, 0, 0, 0]),
            Ok(Request::PtWrites { mode: 2 })
        );
        assert_eq!(req(op::PT_WRITES, [3, 0, 0, 0]), Err(HcError::Einval));
        assert_eq!(req(op::PT_WRITES, [1, 1, 0, 0]), Err(HcError::Einval));
        assert_eq!(
            req(op::PT_FAULT, [0x40_1234, 0, 0, 0]),
            Ok(Request::PtFault { va: 0x40_1234 })
        );
        assert_eq!(req(op::PT_FAULT, [1 << 47, 0, 0, 0]), Err(HcError::Einval));
        assert_eq!(op::name(op::PT_FAULT), "PT_FAULT");
    }
}
