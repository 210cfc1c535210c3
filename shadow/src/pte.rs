//! x86-64 page-table entry bits, the per-level flag whitelist and entry classification.
//!
//! Bit 7 is `PS` in L2/L3 entries and `PAT` in L1 entries; a 2 MiB leaf carries its `PAT`
//! bit at bit 12. Bits 9-11 and 52-58 are software-available and allowed everywhere. Bits
//! 59-62 (protection keys) are refused. Physical addresses are limited to [`MAXPHYADDR`] bits.

/// The first L4 index of the kernel half (the upper half of the canonical address space,
/// shared by every address space).
pub const KERNEL_HALF: usize = 256;

/// Present.
pub const P: u64 = 1 << 0;
/// Writable.
pub const RW: u64 = 1 << 1;
/// User-accessible.
pub const US: u64 = 1 << 2;
/// Write-through.
pub const PWT: u64 = 1 << 3;
/// Cache disable.
pub const PCD: u64 = 1 << 4;
/// Accessed (set by the CPU).
pub const A: u64 = 1 << 5;
/// Dirty (set by the CPU on leaves).
pub const D: u64 = 1 << 6;
/// Page size (L2/L3): the entry is a leaf.
pub const PS: u64 = 1 << 7;
/// PAT index bit of a 4 KiB leaf (L1).
pub const PAT_4K: u64 = 1 << 7;
/// Global (leaves only).
pub const G: u64 = 1 << 8;
/// PAT index bit of a 2 MiB leaf (L2 with PS).
pub const PAT_2M: u64 = 1 << 12;
/// No-execute.
pub const NX: u64 = 1 << 63;
/// Accessed and dirty.
pub const AD: u64 = A | D;
/// Software-available bits 9-11 and 52-58.
pub const AVAIL: u64 = (0x7 << 9) | (0x7f << 52);
/// Physical address width the engine accepts.
pub const MAXPHYADDR: u32 = 46;
/// Physical-address field of a 4 KiB-aligned entry (bits 12..MAXPHYADDR).
pub const ADDR: u64 = ((1u64 << MAXPHYADDR) - 1) & !0xfff;
/// Physical-address field of a 2 MiB leaf (bits 21..MAXPHYADDR).
pub const ADDR_2M: u64 = ((1u64 << MAXPHYADDR) - 1) & !0x1f_ffff;
/// Address bits between MAXPHYADDR and 51 (reserved).
pub const ADDR_ABOVE_MAX: u64 = ((1u64 << 52) - 1) & !((1u64 << MAXPHYADDR) - 1);
/// Bits 13-20 of a 2 MiB leaf (reserved: the frame must be 2 MiB aligned).
pub const MISALIGNED_2M: u64 = 0x1f_e000;

const COMMON: u64 = P | RW | US | PWT | PCD | A | D | AVAIL | NX;
/// Bits a present L1 entry (4 KiB leaf) may carry.
pub const L1_ALLOWED: u64 = COMMON | PAT_4K | G | ADDR;
/// Bits a present 2 MiB leaf (L2 with PS) may carry.
pub const L2_LEAF_ALLOWED: u64 = COMMON | PS | G | PAT_2M | ADDR_2M;
/// Bits a present non-leaf entry (L2, L3, L4) may carry. `D` is ignored by the CPU in
/// non-leaf entries but Linux sets it (`_PAGE_TABLE`), so it is allowed.
pub const NONLEAF_ALLOWED: u64 = COMMON | ADDR;
/// Guest bits copied into a 4 KiB shadow leaf (A/D start clear; software bits dropped).
pub const SHADOW_LEAF_KEEP: u64 = P | RW | US | PWT | PCD | PAT_4K | G | NX | ADDR;
/// Guest bits copied into a shadow non-leaf entry (the address is replaced).
pub const SHADOW_NONLEAF_KEEP: u64 = P | RW | US | PWT | PCD | NX;
/// Rights/attribute bits of a 2 MiB leaf that its split 4 KiB shadow leaves inherit.
pub const SPLIT_KEEP: u64 = P | RW | US | PWT | PCD | G | NX;

/// Entries per table.
pub const ENTRIES: usize = 512;
/// Frames covered by a 2 MiB leaf.
pub const FRAMES_2M: u64 = 512;

/// What a present entry is, by level and bits (after the whitelist passed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Not present: anything goes, never shadowed.
    NotPresent,
    /// A 4 KiB leaf mapping frame number `pfn`.
    Leaf4k {
        /// Target frame number.
        pfn: u64,
    },
    /// A 2 MiB leaf mapping frames `pfn .. pfn + 512`.
    Leaf2m {
        /// First target frame number.
        pfn: u64,
    },
    /// A reference to a table of the next level down.
    Table {
        /// Frame number of the referenced table.
        pfn: u64,
    },
}

/// Whether `e` is present.
#[inline]
pub const fn present(e: u64) -> bool {
    e & P != 0
}

/// Frame number of a 4 KiB-aligned entry.
#[inline]
pub const fn pfn_of(e: u64) -> u64 {
    (e & ADDR) >> 12
}

/// Whether an entry at `level` with bits `e` is a 2 MiB leaf.
#[inline]
pub const fn is_2m_leaf(level: u8, e: u64) -> bool {
    level == 2 && e & PS != 0
}

/// The 4 KiB shadow leaf equivalent to sub-page `j` of the 2 MiB guest leaf `e`.
pub const fn split_leaf(e: u64, j: u64) -> u64 {
    let pat = if e & PAT_2M != 0 { PAT_4K } else { 0 };
    (e & SPLIT_KEEP) | pat | ((e & ADDR_2M) + (j << 12))
}

/// True when `new` grants at least what `old` granted on the same frame with the same
/// attributes: replacing `old` by `new` needs no TLB flush.
#[inline]
pub const fn is_upgrade(old: u64, new: u64) -> bool {
    let same = P | PWT | PCD | PAT_4K | G | ADDR;
    (old & same) == (new & same)
        && (old & RW == 0 || new & RW != 0)
        && (old & US == 0 || new & US != 0)
        && (new & NX == 0 || old & NX != 0)
}

/// The guest entry a `PT_UPDATE` of `val` over `old` leaves, and the A/D bits it adds to
/// `val` (propagated): `preserve_ad` keeps `old`'s A/D; the `harvested` shadow A/D go in
/// too when the frame stays (`same_frame`) or with `preserve_ad` (a remap takes none).
#[inline(always)]
pub const fn updated_guest_entry(
    val: u64,
    old: u64,
    preserve_ad: bool,
    same_frame: bool,
    harvested: u64,
) -> (u64, u64) {
    let base = if preserve_ad { val | (old & AD) } else { val };
    let v = if preserve_ad || same_frame {
        base | harvested
    } else {
        base
    };
    (v, v & !base & AD)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_leaf_moves_pat_and_offsets_frames() {
        let e = 0x4020_0000 | P | RW | PS | PAT_2M | NX | A | D;
        let l = split_leaf(e, 4);
        assert_eq!(l & ADDR, 0x4020_4000);
        assert_eq!(l & (PAT_4K | RW | P | NX), PAT_4K | RW | P | NX);
        assert_eq!(l & (A | D | PAT_2M), 0);
    }

    #[test]
    fn upgrade_detection() {
        let o = 0x5000 | P | NX;
        assert!(is_upgrade(o, o | RW));
        assert!(is_upgrade(o, (o | US) & !NX));
        assert!(!is_upgrade(o | RW, o));
        assert!(!is_upgrade(o, o ^ 0x1000));
        assert!(!is_upgrade(o, o | G));
    }
}
