//! The leaf zap (docs/pv-abi.md §6.6): makes the host kernel drop its mappings of guest
//! RAM frames without changing what this process or the guest may do with them.
//!
//! On a host whose KVM shadows the pool in software, a translation KVM made from a shadow
//! leaf maps that leaf's target frame. Changing the protection key of the frame's host page
//! (`pkey_mprotect`, read-write kept) is a protection change: the kernel invalidates the
//! range through its MMU notifiers and KVM zaps every mapping it has of the frame, the
//! stale translation included, flushing every vCPU that could hold it; the next access
//! walks the pool again and sees the new entry. Each run of frames is flipped to the zap's
//! key and straight back to key 0, so the process's mappings are left as they were (no
//! split mapping stays behind to count against the host's limit). The key is allocated
//! with full access rights before any vCPU thread starts, and threads inherit them.

use crate::hcall::RamZap;
use crate::layout::PAGE;
use crate::pool_zap::{alloc_pkey, set_pkey};
use std::io;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// One RAM region: guest frames `first .. first + frames` at host address `host`.
#[derive(Clone, Copy, Debug)]
struct Region {
    first: u64,
    frames: u64,
    host: usize,
}

/// Zaps RAM frames by flipping their protection key to one of its own and back.
pub struct PkeyRamZap {
    /// The protection key allocated for the zap (full access in every thread).
    pkey: i32,
    /// Guest RAM, region by region.
    regions: Vec<Region>,
}

impl PkeyRamZap {
    /// Allocates a protection key for the zaps of `mem`'s regions. Call it before any vCPU
    /// thread starts: threads inherit the key's access rights. Fails where the CPU or
    /// kernel has no protection keys.
    pub fn new(mem: &GuestMemoryMmap) -> io::Result<PkeyRamZap> {
        let mut regions = Vec::new();
        for r in mem.iter() {
            let host = mem
                .get_host_address(r.start_addr())
                .map_err(|e| io::Error::other(format!("RAM host address: {e}")))?;
            regions.push(Region {
                first: r.start_addr().0 / PAGE,
                frames: r.len() / PAGE,
                host: host as usize,
            });
        }
        Ok(PkeyRamZap {
            pkey: alloc_pkey()?,
            regions,
        })
    }

    /// The region holding frame `pfn`.
    fn region(&self, pfn: u64) -> Option<usize> {
        self.regions
            .iter()
            .position(|r| pfn >= r.first && pfn - r.first < r.frames)
    }

    /// Host address of frame `pfn` and the frames after it in the same region.
    fn locate(&self, pfn: u64) -> Option<(usize, u64)> {
        let r = self.regions.get(self.region(pfn)?)?;
        let off = pfn - r.first;
        Some((r.host + (off * PAGE) as usize, r.frames - off))
    }
}

/// Frames between two listed ones that are zapped too, to make one call of two: zapping
/// a frame only makes KVM fault its translations in again. 16 made the fewest calls for
/// the least time over the selftest suite (gaps of 0, 16, 64, 512 frames: 113, 64, 79,
/// 99 µs per zap on the development machine).
const MERGE_GAP: u64 = 16;

/// Runs of `frames` (ascending), a gap of up to [`MERGE_GAP`] frames closed where
/// `same_region` says both ends lie in one region: (first, count).
fn runs(frames: &[u64], same_region: impl Fn(u64, u64) -> bool) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &f in frames {
        match out.last_mut() {
            Some((first, n))
                if f >= *first + *n && f - (*first + *n) <= MERGE_GAP && same_region(*first, f) =>
            {
                *n = f - *first + 1
            }
            _ => out.push((f, 1)),
        }
    }
    out
}

impl RamZap for PkeyRamZap {
    fn zap(&self, frames: &[u64]) -> io::Result<u32> {
        let mut calls = 0;
        let same = |a: u64, b: u64| self.region(a).is_some() && self.region(a) == self.region(b);
        for (first, count) in runs(frames, same) {
            let mut done = 0;
            while done < count {
                let Some((addr, room)) = self.locate(first + done) else {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "frame outside guest RAM",
                    ));
                };
                let n = room.min(count - done);
                let len = (n * PAGE) as usize;
                // Inside one RAM region's mapping (`locate`).
                set_pkey(addr, len, self.pkey)?;
                set_pkey(addr, len, 0)?;
                calls += 2;
                done += n;
            }
        }
        Ok(calls)
    }
}

impl Drop for PkeyRamZap {
    fn drop(&mut self) {
        // SAFETY: frees the key allocated in `new`; every zap put key 0 back.
        unsafe { libc::syscall(libc::SYS_pkey_free, self.pkey) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn runs_group_close_frames() {
        let one = |_: u64, _: u64| true;
        assert_eq!(runs(&[1, 2, 3, 7, 9, 10], one), [(1, 10)]);
        assert_eq!(runs(&[1, 2, 20, 100], one), [(1, 2), (20, 1), (100, 1)]);
        assert_eq!(runs(&[5, 5 + MERGE_GAP + 1], one), [(5, MERGE_GAP + 2)]);
        assert_eq!(runs(&[1, 3], |a, b| a / 2 == b / 2), [(1, 1), (3, 1)]);
        assert!(runs(&[], one).is_empty());
    }

    #[test]
    fn a_zap_keeps_ram_readable_and_writable() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x4000),
            (GuestAddress(0x6000), 0x4000),
            (GuestAddress(0x10_0000), 0x4000),
        ])
        .unwrap();
        let Ok(z) = PkeyRamZap::new(&mem) else {
            eprintln!("skipped: no protection keys on this host");
            return;
        };
        mem.write_obj(0x55u64, GuestAddress(0x1000)).unwrap();
        // Frames 1..4 of the first region and 0x100..0x102 of the third: two runs.
        assert_eq!(z.zap(&[1, 2, 3, 0x100, 0x101]).unwrap(), 4);
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x1000)).unwrap(), 0x55);
        mem.write_obj(0x66u64, GuestAddress(0x10_1000)).unwrap();
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x10_1000)).unwrap(), 0x66);
        // Frames 3 and 6 are close but in two regions: two runs, not one over the hole.
        assert_eq!(z.zap(&[3, 6]).unwrap(), 4);
        // A frame outside guest RAM is refused.
        assert!(z.zap(&[0x200]).is_err());
    }
}
