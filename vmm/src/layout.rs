//! Guest-physical memory layout: RAM regions, the e820 map, boot structures and the shadow pool.

use crate::error::SetupError;

/// Page size.
pub const PAGE: u64 = 4096;
/// Boot GDT.
pub const BOOT_GDT: u64 = 0x500;
/// Boot IDT (empty, limit 0).
pub const BOOT_IDT: u64 = 0x520;
/// Zero page (`boot_params`), passed in RSI.
pub const ZERO_PAGE: u64 = 0x7000;
/// Initial stack top (grows down below the zero page).
pub const BOOT_STACK: u64 = 0x6ff0;
/// Boot page tables: PML4, then PDPT low, PDPT high, then four PDs.
pub const BOOT_PML4: u64 = 0x9000;
/// Kernel command line.
pub const CMDLINE: u64 = 0x20000;
/// Largest command line accepted (bytes, including the NUL).
pub const CMDLINE_MAX: usize = 4096;
/// Start of the legacy hole (EBDA, VGA, ROMs), reserved in e820.
pub const LEGACY_HOLE_START: u64 = 0x9f000;
/// MP configuration table ("PCMP", see `mptable`), at the start of the legacy hole.
pub const MPTABLE_CONFIG: u64 = 0x9f000;
/// MP floating pointer ("_MP_"), in the last KiB below 640 KiB where Linux scans for it.
pub const MPTABLE_FLOATING: u64 = 0x9fc00;
/// End of the legacy hole: high memory starts here.
pub const HIGH_MEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole: RAM beyond this continues at 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole.
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// Smallest guest RAM accepted.
pub const MIN_MEM: u64 = 16 << 20;
/// Largest guest RAM accepted (1 TiB).
pub const MAX_MEM: u64 = 1 << 40;
/// Smallest shadow pool accepted: 512 frames, enough for the bundled guest's largest
/// working set; a guest that outgrows its pool gets ENOMEM from MMU_BATCH.
pub const MIN_POOL: u64 = 2 << 20;
/// Largest shadow pool accepted (64 GiB).
pub const MAX_POOL: u64 = 64 << 30;

/// e820 entry type: usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 entry type: reserved.
pub const E820_RESERVED: u32 = 2;

/// One e820 map entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// `E820_RAM` or `E820_RESERVED`.
    pub kind: u32,
}

/// Where everything lives in guest-physical space.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Guest RAM size requested.
    pub mem_size: u64,
    /// Backing regions of guest RAM (start, size); the reserved legacy hole is backed too.
    pub ram_regions: Vec<(u64, u64)>,
    /// The e820 map handed to the guest.
    pub e820: Vec<E820Entry>,
    /// Shadow pool: first guest-physical address (outside the e820 map).
    pub pool_base: u64,
    /// Shadow pool size in bytes.
    pub pool_size: u64,
}

impl Layout {
    /// Builds the layout for `mem_size` bytes of RAM and a shadow pool of `pool_size` bytes.
    pub fn new(mem_size: u64, pool_size: u64) -> Result<Layout, SetupError> {
        if mem_size < MIN_MEM {
            return Err(SetupError::MemTooSmall {
                mem: mem_size,
                need: MIN_MEM,
            });
        }
        if !mem_size.is_multiple_of(PAGE) || !pool_size.is_multiple_of(PAGE) || pool_size == 0 {
            return Err(SetupError::Unaligned {
                what: if !mem_size.is_multiple_of(PAGE) {
                    "--mem"
                } else {
                    "--shadow-pool"
                },
            });
        }
        let mut ram_regions = Vec::new();
        let low = mem_size.min(MMIO_HOLE_START);
        ram_regions.push((0, low));
        if mem_size > MMIO_HOLE_START {
            ram_regions.push((MMIO_HOLE_END, mem_size - MMIO_HOLE_START));
        }
        let e820 = build_e820(&ram_regions);
        let ram_top = ram_regions.last().map(|&(s, l)| s + l).unwrap_or(0);
        // The pool sits above RAM, 2 MiB aligned, never inside the 32-bit hole.
        let mut pool_base = ram_top.div_ceil(2 << 20) * (2 << 20);
        if pool_base + pool_size > MMIO_HOLE_START && pool_base < MMIO_HOLE_END {
            pool_base = MMIO_HOLE_END.max(ram_top);
        }
        Ok(Layout {
            mem_size,
            ram_regions,
            e820,
            pool_base,
            pool_size,
        })
    }

    /// Usable RAM ranges (e820 type 1).
    pub fn usable(&self) -> impl Iterator<Item = std::ops::Range<u64>> + '_ {
        self.e820
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.addr..e.addr + e.size)
    }

    /// Reserved ranges (e820 type 2).
    pub fn reserved(&self) -> impl Iterator<Item = std::ops::Range<u64>> + '_ {
        self.e820
            .iter()
            .filter(|e| e.kind == E820_RESERVED)
            .map(|e| e.addr..e.addr + e.size)
    }

    /// End of the low RAM region (below the legacy hole's end or 3 GiB).
    pub fn low_ram_end(&self) -> u64 {
        self.ram_regions.first().map(|&(s, l)| s + l).unwrap_or(0)
    }
}

/// Builds the e820 map for the backed RAM regions: the first region loses the legacy hole
/// (reported reserved), every other region is usable. Entries are sorted and disjoint and
/// cover the backed regions exactly.
pub fn build_e820(ram_regions: &[(u64, u64)]) -> Vec<E820Entry> {
    let mut out = Vec::new();
    for &(start, size) in ram_regions {
        let end = start + size;
        if start == 0 {
            out.push(E820Entry {
                addr: 0,
                size: end.min(LEGACY_HOLE_START),
                kind: E820_RAM,
            });
            if end > LEGACY_HOLE_START {
                let hole_end = end.min(HIGH_MEM_START);
                out.push(E820Entry {
                    addr: LEGACY_HOLE_START,
                    size: hole_end - LEGACY_HOLE_START,
                    kind: E820_RESERVED,
                });
            }
            if end > HIGH_MEM_START {
                out.push(E820Entry {
                    addr: HIGH_MEM_START,
                    size: end - HIGH_MEM_START,
                    kind: E820_RAM,
                });
            }
        } else {
            out.push(E820Entry {
                addr: start,
                size,
                kind: E820_RAM,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn total(e: &[E820Entry]) -> u64 {
        e.iter().map(|e| e.size).sum()
    }

    #[test]
    fn e820_small_guest() {
        let l = Layout::new(256 << 20, 32 << 20).unwrap();
        assert_eq!(
            l.e820,
            vec![
                E820Entry {
                    addr: 0,
                    size: 0x9f000,
                    kind: E820_RAM
                },
                E820Entry {
                    addr: 0x9f000,
                    size: 0x61000,
                    kind: E820_RESERVED
                },
                E820Entry {
                    addr: 0x100000,
                    size: (256 << 20) - 0x100000,
                    kind: E820_RAM
                },
            ]
        );
        assert_eq!(total(&l.e820), 256 << 20, "e820 covers RAM exactly");
        assert_eq!(l.pool_base, 256 << 20);
        assert!(l.usable().all(|r| r.end <= l.pool_base));
    }

    #[test]
    fn e820_large_guest_splits_around_hole() {
        let l = Layout::new(4 << 30, 32 << 20).unwrap();
        assert_eq!(
            l.ram_regions,
            vec![(0, 0xc000_0000), (0x1_0000_0000, 0x4000_0000)]
        );
        assert_eq!(
            l.e820.last(),
            Some(&E820Entry {
                addr: 0x1_0000_0000,
                size: 0x4000_0000,
                kind: E820_RAM
            })
        );
        assert_eq!(total(&l.e820), 4 << 30);
        assert_eq!(l.pool_base, 0x1_4000_0000);
        // Entries sorted and disjoint.
        for w in l.e820.windows(2) {
            assert!(w[0].addr + w[0].size <= w[1].addr);
        }
    }

    #[test]
    fn pool_never_in_mmio_hole() {
        let l = Layout::new(3 << 30, 64 << 20).unwrap();
        assert!(l.pool_base >= MMIO_HOLE_END);
    }

    #[test]
    fn too_small_or_unaligned() {
        assert!(matches!(
            Layout::new(1 << 20, 1 << 20),
            Err(SetupError::MemTooSmall { .. })
        ));
        assert!(matches!(
            Layout::new((16 << 20) + 1, 1 << 20),
            Err(SetupError::Unaligned { .. })
        ));
    }
}
