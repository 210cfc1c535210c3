//! The validation rules. Each refusal is one named function with the error it answers, and
//! one [`Rule`] variant whose counter records how often the rule fired.

use hypercall::HcError;

use crate::layout::{FrameClass, Layout};
use crate::pte::{self, Kind};

macro_rules! rules {
    ($($(#[$m:meta])* $v:ident = $name:literal => $err:ident,)*) => {
        /// Every reason the engine refuses an MMU entry.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Rule { $($(#[$m])* $v,)* }
        impl Rule {
            /// Every rule, in counter order.
            pub const ALL: &'static [Rule] = &[$(Rule::$v,)*];
            /// Number of rules.
            pub const COUNT: usize = Rule::ALL.len();
            /// The rule's name for statistics.
            pub const fn name(self) -> &'static str { match self { $(Rule::$v => $name,)* } }
            /// The error the guest sees.
            pub const fn error(self) -> HcError { match self { $(Rule::$v => HcError::$err,)* } }
        }
    };
}

rules! {
    /// A leaf maps a frame of the shadow pool.
    LeafMapsPool = "leaf_maps_pool" => Eperm,
    /// A leaf maps a reserved range.
    LeafMapsReserved = "leaf_maps_reserved" => Eperm,
    /// A leaf maps something that is not guest RAM (hole, MMIO, past the end).
    LeafOutsideRam = "leaf_outside_ram" => Eperm,
    /// A flag outside the level's whitelist is set.
    ReservedBits = "reserved_bits" => Einval,
    /// Address bits above MAXPHYADDR are set.
    AddrAboveMaxPhys = "addr_above_maxphyaddr" => Einval,
    /// A 2 MiB leaf is not 2 MiB aligned.
    Misaligned2m = "misaligned_2m" => Einval,
    /// 1 GiB leaves (PS in L3) are not supported.
    Leaf1g = "leaf_1g" => Einval,
    /// A non-leaf entry references a table typed at another level.
    WrongLevel = "wrong_level" => Einval,
    /// A non-leaf entry references its own table.
    SelfMap = "self_map" => Einval,
    /// A table (non-leaf target, pin, relocation target) is not guest RAM.
    TableNotRam = "table_not_ram" => Eperm,
    /// `PT_UPDATE` of an address not inside a typed page table.
    PtrNotTable = "ptr_not_table" => Einval,
    /// `PIN` of a frame already pinned.
    AlreadyPinned = "already_pinned" => Eexist,
    /// `PIN` of a frame typed at another level.
    TypeConflict = "type_conflict" => Eexist,
    /// `UNPIN` of a frame that is not pinned.
    NotPinned = "not_pinned" => Enoent,
    /// `UNPIN` of a root loaded in some vCPU.
    RootLoaded = "root_loaded" => Ebusy,
    /// `UNPIN` of a table still referenced by a validated entry.
    StillReferenced = "still_referenced" => Ebusy,
    /// `NEW_BASEPTR` of a frame that is not a pinned L4.
    NotPinnedL4 = "not_pinned_l4" => Enoent,
    /// `ZERO_FRAME` of a frame that is not usable RAM.
    ZeroNotRam = "zero_not_ram" => Eperm,
    /// `ZERO_FRAME` of a typed page table.
    ZeroTyped = "zero_typed" => Ebusy,
    /// `COPY_FRAME` from or to a frame that is not usable RAM (the pool included).
    CopyNotRam = "copy_not_ram" => Eperm,
    /// `COPY_FRAME` into a typed page table.
    CopyTyped = "copy_typed" => Ebusy,
    /// `SYNC_AD` / `QUERY_AD` on a vCPU without a loaded root.
    NoRoot = "no_root" => Enoent,
    /// `QUERY_AD` bitmaps not entirely inside one RAM range.
    BitmapNotRam = "bitmap_not_ram" => Efault,
    /// `QUERY_AD` bitmaps overlapping a typed page table.
    BitmapInTable = "bitmap_in_table" => Eperm,
    /// `RELOCATE_TABLE` of a frame that is not a typed table.
    RelocateUntyped = "relocate_untyped" => Enoent,
    /// `RELOCATE_TABLE` to a frame that already has a type.
    RelocateTargetTyped = "relocate_target_typed" => Eexist,
    /// A vCPU index out of range.
    BadVcpu = "bad_vcpu" => Einval,
    /// A `FLUSH_TLB` / `INVLPG` mask names a vCPU the VM does not have.
    BadFlushMask = "bad_flush_mask" => Einval,
    /// `UNPIN` of an L4 registered as some vCPU's kernel root.
    KernelRootRegistered = "kernel_root_registered" => Ebusy,
    /// `UNPIN` with `DETACH` of a root loaded on a vCPU without a (different) kernel root.
    NoKernelRoot = "no_kernel_root" => Ebusy,
    /// The shadow pool is exhausted and nothing could be reclaimed.
    PoolExhausted = "pool_exhausted" => Enomem,
    /// Guest memory the layout calls RAM (or the pool) is not backed by the memory object.
    Unbacked = "unbacked_memory" => Efault,
}

/// A leaf may map only usable guest RAM: the pool → `EPERM` ([`Rule::LeafMapsPool`]), a
/// reserved range → `EPERM` ([`Rule::LeafMapsReserved`]), anything else outside RAM →
/// `EPERM` ([`Rule::LeafOutsideRam`]). `frames` is 1 for 4 KiB leaves, 512 for 2 MiB.
#[inline]
pub fn leaf_maps_guest_ram(layout: &Layout, pfn: u64, frames: u64) -> Result<(), Rule> {
    match layout.classify_range(pfn << 12, frames << 12) {
        FrameClass::Ram => Ok(()),
        FrameClass::Pool => Err(Rule::LeafMapsPool),
        FrameClass::Reserved => Err(Rule::LeafMapsReserved),
        FrameClass::Outside => Err(Rule::LeafOutsideRam),
    }
}

/// A page table (pinned frame, non-leaf target, relocation target) must be usable RAM:
/// `EPERM` ([`Rule::TableNotRam`]) otherwise.
#[inline]
pub fn table_is_guest_ram(layout: &Layout, pfn: u64) -> Result<(), Rule> {
    match layout.classify(pfn) {
        FrameClass::Ram => Ok(()),
        _ => Err(Rule::TableNotRam),
    }
}

/// The flag whitelist of a present entry at `level` (1..=4), returning what it is.
///
/// * address bits between MAXPHYADDR (46) and 51 → `EINVAL` ([`Rule::AddrAboveMaxPhys`]);
/// * `PS` in L3 (1 GiB leaf) → `EINVAL` ([`Rule::Leaf1g`]);
/// * a 2 MiB leaf with bits 13-20 set → `EINVAL` ([`Rule::Misaligned2m`]);
/// * any other bit outside the level's whitelist (`PS`/`G` in non-leaf entries, protection
///   key bits 59-62, ...) → `EINVAL` ([`Rule::ReservedBits`]).
///
/// Not-present entries are not checked (the guest may keep swap entries in them).
#[inline]
pub fn entry_flags_allowed(level: u8, e: u64) -> Result<Kind, Rule> {
    if !pte::present(e) {
        return Ok(Kind::NotPresent);
    }
    if e & pte::ADDR_ABOVE_MAX != 0 {
        return Err(Rule::AddrAboveMaxPhys);
    }
    let (allowed, kind) = match level {
        1 => (
            pte::L1_ALLOWED,
            Kind::Leaf4k {
                pfn: pte::pfn_of(e),
            },
        ),
        2 if e & pte::PS != 0 => {
            if e & pte::MISALIGNED_2M != 0 {
                return Err(Rule::Misaligned2m);
            }
            (
                pte::L2_LEAF_ALLOWED,
                Kind::Leaf2m {
                    pfn: (e & pte::ADDR_2M) >> 12,
                },
            )
        }
        3 if e & pte::PS != 0 => return Err(Rule::Leaf1g),
        2..=4 => (
            pte::NONLEAF_ALLOWED,
            Kind::Table {
                pfn: pte::pfn_of(e),
            },
        ),
        _ => return Err(Rule::ReservedBits),
    };
    if e & !allowed != 0 {
        return Err(Rule::ReservedBits);
    }
    Ok(kind)
}

/// A non-leaf entry must not reference its own table (recursive self-map): `EINVAL`
/// ([`Rule::SelfMap`]). References to any other table of the same or a higher level are
/// refused by [`table_level_matches`].
#[inline]
pub fn not_self_map(table_pfn: u64, target_pfn: u64) -> Result<(), Rule> {
    if table_pfn == target_pfn {
        Err(Rule::SelfMap)
    } else {
        Ok(())
    }
}

/// A non-leaf entry of a level-`level` table must reference a table of exactly
/// `level - 1`; a target already typed at another level (including tables being validated
/// higher up, which is how linear/recursive mappings are caught) → `EINVAL`
/// ([`Rule::WrongLevel`]).
#[inline]
pub fn table_level_matches(level: u8, target_type: Option<u8>) -> Result<(), Rule> {
    match target_type {
        Some(t) if t + 1 != level => Err(Rule::WrongLevel),
        _ => Ok(()),
    }
}

/// `PT_UPDATE` may only write into a frame typed as a page table: `EINVAL`
/// ([`Rule::PtrNotTable`]) otherwise (including pool and non-RAM addresses).
#[inline]
pub fn ptr_in_table(ty: Option<u8>) -> Result<u8, Rule> {
    ty.ok_or(Rule::PtrNotTable)
}

/// `PIN` at `level` of a frame already typed `ty` and pinned `pinned`: already pinned →
/// `EEXIST` ([`Rule::AlreadyPinned`]); typed at another level → `EEXIST`
/// ([`Rule::TypeConflict`]).
pub fn pin_allowed(level: u8, ty: Option<u8>, pinned: bool) -> Result<(), Rule> {
    if pinned {
        return Err(Rule::AlreadyPinned);
    }
    match ty {
        Some(t) if t != level => Err(Rule::TypeConflict),
        _ => Ok(()),
    }
}

/// `UNPIN`: not pinned → `ENOENT` ([`Rule::NotPinned`]); loaded as some vCPU's root →
/// `EBUSY` ([`Rule::RootLoaded`]); still referenced by a validated entry → `EBUSY`
/// ([`Rule::StillReferenced`]).
pub fn unpin_allowed(pinned: bool, loaded: bool, refs: usize) -> Result<(), Rule> {
    if !pinned {
        Err(Rule::NotPinned)
    } else if loaded {
        Err(Rule::RootLoaded)
    } else if refs > 0 {
        Err(Rule::StillReferenced)
    } else {
        Ok(())
    }
}

/// A flush mask may name only the VM's vCPUs (`all`): `EINVAL` ([`Rule::BadFlushMask`]).
pub fn flush_mask_valid(mask: u64, all: u64) -> Result<(), Rule> {
    if mask & !all == 0 {
        Ok(())
    } else {
        Err(Rule::BadFlushMask)
    }
}

/// `UNPIN` of a registered kernel root: `EBUSY` ([`Rule::KernelRootRegistered`]).
pub fn not_a_kernel_root(registered: bool) -> Result<(), Rule> {
    if registered {
        Err(Rule::KernelRootRegistered)
    } else {
        Ok(())
    }
}

/// `DETACH` of `dying` needs a kernel root other than `dying` on every vCPU that has it
/// loaded: `EBUSY` ([`Rule::NoKernelRoot`]) otherwise.
pub fn kernel_root_usable(kernel: Option<u64>, dying: u64) -> Result<u64, Rule> {
    match kernel {
        Some(k) if k != dying => Ok(k),
        _ => Err(Rule::NoKernelRoot),
    }
}

/// `NEW_BASEPTR` needs a pinned L4: `ENOENT` ([`Rule::NotPinnedL4`]) otherwise.
pub fn baseptr_allowed(ty: Option<u8>, pinned: bool) -> Result<(), Rule> {
    if ty == Some(4) && pinned {
        Ok(())
    } else {
        Err(Rule::NotPinnedL4)
    }
}

/// `ZERO_FRAME`: the frame must be usable RAM (`EPERM`, [`Rule::ZeroNotRam`]) and untyped
/// (`EBUSY`, [`Rule::ZeroTyped`]).
pub fn zero_allowed(layout: &Layout, pfn: u64, ty: Option<u8>) -> Result<(), Rule> {
    if layout.classify(pfn) != FrameClass::Ram {
        Err(Rule::ZeroNotRam)
    } else if ty.is_some() {
        Err(Rule::ZeroTyped)
    } else {
        Ok(())
    }
}

/// `COPY_FRAME`: both frames must be usable RAM (`EPERM`, [`Rule::CopyNotRam`]: never the
/// pool, whose shadows the guest must not read) and the destination untyped (`EBUSY`,
/// [`Rule::CopyTyped`]: a page table changes only through validated entries). The source
/// may be a page table: the guest reads its own tables anyway.
pub fn copy_allowed(layout: &Layout, dst: u64, src: u64, dst_ty: Option<u8>) -> Result<(), Rule> {
    if layout.classify(dst) != FrameClass::Ram || layout.classify(src) != FrameClass::Ram {
        Err(Rule::CopyNotRam)
    } else if dst_ty.is_some() {
        Err(Rule::CopyTyped)
    } else {
        Ok(())
    }
}

/// `QUERY_AD` bitmaps (`len` bytes at `gpa`) must lie inside one RAM range, outside the pool
/// and reserved ranges (`EFAULT`, [`Rule::BitmapNotRam`]); overlapping a typed frame is
/// checked by [`bitmap_not_in_table`].
pub fn bitmap_in_ram(layout: &Layout, gpa: u64, len: u64) -> Result<(), Rule> {
    match layout.classify_range(gpa, len) {
        FrameClass::Ram => Ok(()),
        _ => Err(Rule::BitmapNotRam),
    }
}

/// `QUERY_AD` bitmaps must not overlap a typed page table: `EPERM` ([`Rule::BitmapInTable`]).
pub fn bitmap_not_in_table(any_typed: bool) -> Result<(), Rule> {
    if any_typed {
        Err(Rule::BitmapInTable)
    } else {
        Ok(())
    }
}

/// `RELOCATE_TABLE`: `old` must be typed (`ENOENT`, [`Rule::RelocateUntyped`]); `new` must be
/// usable RAM (`EPERM`, [`Rule::TableNotRam`]) and untyped (`EEXIST`,
/// [`Rule::RelocateTargetTyped`]).
pub fn relocate_allowed(
    layout: &Layout,
    old_ty: Option<u8>,
    new_pfn: u64,
    new_ty: Option<u8>,
) -> Result<u8, Rule> {
    let level = old_ty.ok_or(Rule::RelocateUntyped)?;
    table_is_guest_ram(layout, new_pfn)?;
    if new_ty.is_some() {
        return Err(Rule::RelocateTargetTyped);
    }
    Ok(level)
}

/// A vCPU index must be below the number of vCPUs: `EINVAL` ([`Rule::BadVcpu`]).
#[inline]
pub fn vcpu_valid(vcpu: usize, vcpus: usize) -> Result<(), Rule> {
    if vcpu < vcpus {
        Ok(())
    } else {
        Err(Rule::BadVcpu)
    }
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;
    use crate::pte::*;

    fn lay() -> Layout {
        Layout {
            ram: vec![0..0x40_0000],
            reserved: vec![0x9_f000..0xa_0000],
            pool_base: 0x100_0000,
            pool_frames: 8,
        }
        .validated()
        .unwrap()
    }

    #[test]
    fn names_are_unique_and_errors_documented() {
        let mut names: Vec<_> = Rule::ALL.iter().map(|r| r.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), Rule::COUNT);
    }

    #[test]
    fn leaf_targets() {
        let l = lay();
        assert_eq!(leaf_maps_guest_ram(&l, 5, 1), Ok(()));
        assert_eq!(leaf_maps_guest_ram(&l, 0x1000, 1), Err(Rule::LeafMapsPool));
        assert_eq!(
            leaf_maps_guest_ram(&l, 0x9f, 1),
            Err(Rule::LeafMapsReserved)
        );
        assert_eq!(leaf_maps_guest_ram(&l, 0x400, 1), Err(Rule::LeafOutsideRam));
        assert_eq!(leaf_maps_guest_ram(&l, 0x200, 512), Ok(()));
        assert_eq!(
            leaf_maps_guest_ram(&l, 0x0, 512),
            Err(Rule::LeafMapsReserved)
        );
        assert_eq!(
            leaf_maps_guest_ram(&l, 0x400, 512),
            Err(Rule::LeafOutsideRam)
        );
        assert_eq!(
            leaf_maps_guest_ram(&l, u64::MAX >> 12, 512),
            Err(Rule::LeafOutsideRam)
        );
        assert_eq!(Rule::LeafMapsPool.error(), HcError::Eperm);
    }

    #[test]
    fn flag_whitelist() {
        assert_eq!(entry_flags_allowed(1, 0x1000 | 0x7fe), Ok(Kind::NotPresent));
        assert_eq!(
            entry_flags_allowed(1, 0x1000 | P | RW | PAT_4K | G | NX | AVAIL | AD),
            Ok(Kind::Leaf4k { pfn: 1 })
        );
        assert_eq!(
            entry_flags_allowed(1, 1 << 46 | P),
            Err(Rule::AddrAboveMaxPhys)
        );
        assert_eq!(entry_flags_allowed(1, 1 << 59 | P), Err(Rule::ReservedBits));
        assert_eq!(
            entry_flags_allowed(2, 0x20_0000 | P | PS | PAT_2M | G),
            Ok(Kind::Leaf2m { pfn: 0x200 })
        );
        assert_eq!(
            entry_flags_allowed(2, 0x20_2000 | P | PS),
            Err(Rule::Misaligned2m)
        );
        assert_eq!(
            entry_flags_allowed(2, 0x2000 | P | G),
            Err(Rule::ReservedBits)
        );
        assert_eq!(
            entry_flags_allowed(2, 0x2000 | P | D | A),
            Ok(Kind::Table { pfn: 2 })
        );
        assert_eq!(
            entry_flags_allowed(3, 0x4000_0000 | P | PS),
            Err(Rule::Leaf1g)
        );
        assert_eq!(
            entry_flags_allowed(4, 0x2000 | P | PS),
            Err(Rule::ReservedBits)
        );
        assert_eq!(entry_flags_allowed(5, P), Err(Rule::ReservedBits));
        assert_eq!(Rule::ReservedBits.error(), HcError::Einval);
    }

    #[test]
    fn table_rules() {
        assert_eq!(not_self_map(3, 3), Err(Rule::SelfMap));
        assert_eq!(not_self_map(3, 4), Ok(()));
        assert_eq!(table_level_matches(2, Some(1)), Ok(()));
        assert_eq!(table_level_matches(2, None), Ok(()));
        assert_eq!(table_level_matches(2, Some(2)), Err(Rule::WrongLevel));
        assert_eq!(table_level_matches(4, Some(4)), Err(Rule::WrongLevel));
        assert_eq!(table_is_guest_ram(&lay(), 0x1000), Err(Rule::TableNotRam));
        assert_eq!(ptr_in_table(None), Err(Rule::PtrNotTable));
        assert_eq!(Rule::PtrNotTable.error(), HcError::Einval);
    }

    #[test]
    fn op_rules() {
        assert_eq!(pin_allowed(1, None, false), Ok(()));
        assert_eq!(pin_allowed(1, Some(1), true), Err(Rule::AlreadyPinned));
        assert_eq!(pin_allowed(1, Some(2), false), Err(Rule::TypeConflict));
        assert_eq!(Rule::TypeConflict.error(), HcError::Eexist);
        assert_eq!(unpin_allowed(false, false, 0), Err(Rule::NotPinned));
        assert_eq!(unpin_allowed(true, true, 0), Err(Rule::RootLoaded));
        assert_eq!(unpin_allowed(true, false, 1), Err(Rule::StillReferenced));
        assert_eq!(Rule::StillReferenced.error(), HcError::Ebusy);
        assert_eq!(baseptr_allowed(Some(3), true), Err(Rule::NotPinnedL4));
        assert_eq!(flush_mask_valid(0b11, 0b11), Ok(()));
        assert_eq!(flush_mask_valid(0b100, 0b11), Err(Rule::BadFlushMask));
        assert_eq!(not_a_kernel_root(true), Err(Rule::KernelRootRegistered));
        assert_eq!(not_a_kernel_root(false), Ok(()));
        assert_eq!(kernel_root_usable(Some(5), 4), Ok(5));
        assert_eq!(kernel_root_usable(Some(4), 4), Err(Rule::NoKernelRoot));
        assert_eq!(kernel_root_usable(None, 4), Err(Rule::NoKernelRoot));
        assert_eq!(baseptr_allowed(Some(4), false), Err(Rule::NotPinnedL4));
        let l = lay();
        assert_eq!(zero_allowed(&l, 0x1000, None), Err(Rule::ZeroNotRam));
        assert_eq!(zero_allowed(&l, 1, Some(1)), Err(Rule::ZeroTyped));
        assert_eq!(copy_allowed(&l, 0x1000, 1, None), Err(Rule::CopyNotRam));
        assert_eq!(copy_allowed(&l, 1, 0x1000, None), Err(Rule::CopyNotRam));
        assert_eq!(copy_allowed(&l, 1, 2, Some(1)), Err(Rule::CopyTyped));
        assert_eq!(copy_allowed(&l, 1, 2, None), Ok(()));
        assert_eq!(bitmap_in_ram(&l, 0x3f_fff8, 16), Err(Rule::BitmapNotRam));
        assert_eq!(bitmap_not_in_table(true), Err(Rule::BitmapInTable));
        assert_eq!(
            relocate_allowed(&l, None, 1, None),
            Err(Rule::RelocateUntyped)
        );
        assert_eq!(
            relocate_allowed(&l, Some(1), 0x1000, None),
            Err(Rule::TableNotRam)
        );
        assert_eq!(
            relocate_allowed(&l, Some(1), 1, Some(2)),
            Err(Rule::RelocateTargetTyped)
        );
        assert_eq!(vcpu_valid(2, 2), Err(Rule::BadVcpu));
    }
}
