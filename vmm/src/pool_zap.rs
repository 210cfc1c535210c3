//! The kernel flush's zap (docs/pv-abi.md §6.5): makes the host kernel drop its mappings of
//! shadow-pool frames without changing what this process or the guest may do with them.
//!
//! Changing a page's memory-protection key (`pkey_mprotect`) is a protection change: the
//! kernel invalidates the range through its MMU notifiers, KVM zaps every mapping it has of
//! those guest frames and, having zapped one that was present, flushes every vCPU's TLB
//! (a request each vCPU services before it enters the guest again, with an IPI to those in
//! guest mode that the kernel waits for). The key is allocated with full access rights,
//! so every thread (they are all created after it) may still read and write the pool. A
//! zap flips each frame between key 0 and that key: one call per run of frames, and one
//! flush (a second call to put key 0 back would zap, and flush, again whatever the vCPUs
//! walked in between).
//!
//! Why a zap of the stale frames is enough: a translation made through a pool entry needed
//! the hardware walk to read that entry's frame through KVM's mapping of it, which is then
//! present until a zap, and every zap flushes all vCPUs. So a vCPU that still holds a
//! translation through a changed entry has the frame mapped, and zapping it flushes.

use crate::cli::RemoteFlush;
use crate::error::SetupError;
use crate::hcall::PoolZap;
use crate::layout::{Layout, PAGE};
use std::io;
use std::sync::Mutex;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// The protection-key zap of the pool in `mem`, for `--remote-flush mode` (`kernel` or
/// `auto`, on a host that needs no pool resync: [`crate::vm::kernel_flush::choose`]
/// decides that): `None` for `auto` where the host has no protection keys, an error for
/// `kernel`.
pub fn choose(
    mode: RemoteFlush,
    mem: &GuestMemoryMmap,
    layout: &Layout,
) -> Result<Option<PkeyZap>, SetupError> {
    let base = mem
        .get_host_address(GuestAddress(layout.pool_base))
        .map_err(|e| SetupError::other("the shadow pool's host address", e))?;
    let frames = u32::try_from(layout.pool_size / PAGE).unwrap_or(u32::MAX);
    match PkeyZap::new(base, frames) {
        Ok(z) => Ok(Some(z)),
        Err(e) if mode == RemoteFlush::Auto => {
            log::info!("no kernel flush (protection keys: {e}); kicking");
            Ok(None)
        }
        Err(e) => Err(SetupError::other(
            "--remote-flush kernel needs protection keys",
            e,
        )),
    }
}

/// The page (and pool frame) size, for address arithmetic.
const FRAME: usize = PAGE as usize;

/// Zaps pool frames by flipping their protection key between key 0 and one of its own.
pub struct PkeyZap {
    /// The protection key allocated for the zap (full access in every thread).
    pkey: i32,
    /// Host address of pool frame 0.
    base: usize,
    /// Pool frames.
    frames: u32,
    /// Which frames carry the zap's key now (the others key 0).
    keyed: Mutex<Vec<bool>>,
}

impl PkeyZap {
    /// Allocates a protection key for the pool at host address `base` (`frames` frames).
    /// Call it before any vCPU thread starts: threads inherit the key's access rights.
    /// Fails where the CPU or kernel has no protection keys.
    pub fn new(base: *mut u8, frames: u32) -> io::Result<PkeyZap> {
        Ok(PkeyZap {
            pkey: alloc_pkey()?,
            base: base as usize,
            frames,
            keyed: Mutex::new(vec![false; frames as usize]),
        })
    }

    /// Flips the key of every frame of `frames` (ascending, inside the pool): one call per
    /// run of consecutive frames that carry the same key.
    fn flip(&self, keyed: &mut [bool], frames: &[u32]) -> io::Result<()> {
        for (first, count) in runs(keyed, frames) {
            let was = keyed.get(first as usize).copied().unwrap_or(false);
            self.set_key(first, count, if was { 0 } else { self.pkey })?;
            for k in keyed.iter_mut().skip(first as usize).take(count as usize) {
                *k = !was;
            }
        }
        Ok(())
    }

    /// Sets the key of frames `first .. first + count` to `pkey`, keeping read and write.
    fn set_key(&self, first: u32, count: u32, pkey: i32) -> io::Result<()> {
        // The range lies inside the pool's mapping (checked by the caller against `frames`).
        set_pkey(
            self.base + first as usize * FRAME,
            count as usize * FRAME,
            pkey,
        )
    }
}

/// A protection key with full access rights for the calling thread (and the threads it
/// creates afterwards). Fails where the CPU or kernel has no protection keys.
pub(crate) fn alloc_pkey() -> io::Result<i32> {
    // SAFETY: pkey_alloc takes two integers and touches no memory of ours; access rights
    // 0 leave reads and writes allowed.
    let pkey = unsafe { libc::syscall(libc::SYS_pkey_alloc, 0, 0) };
    if pkey < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(pkey as i32)
}

/// Sets the protection key of the `len` bytes of guest memory at host address `addr` to
/// `pkey`, keeping read and write. The caller passes a range inside a mapping of guest
/// memory (pool or RAM), which lives as long as the VM.
pub(crate) fn set_pkey(addr: usize, len: usize, pkey: i32) -> io::Result<()> {
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    // SAFETY: the range lies inside a mapping of guest memory (the caller's contract); the
    // protection stays read-write and the key grants every thread full access, so no access
    // of ours or the guest's changes, and no memory is unmapped.
    let r = unsafe { libc::syscall(libc::SYS_pkey_mprotect, addr, len, prot, pkey) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl PoolZap for PkeyZap {
    fn name(&self) -> &'static str {
        "pkey"
    }

    fn zap(&self, _vcpu: usize, frames: &[u32]) -> io::Result<()> {
        if frames.iter().any(|&f| f >= self.frames) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "frame outside the pool",
            ));
        }
        let mut keyed = self
            .keyed
            .lock()
            .map_err(|_| io::Error::other("zap state poisoned"))?;
        self.flip(&mut keyed, frames)
    }
}

impl Drop for PkeyZap {
    fn drop(&mut self) {
        let mut keyed = self.keyed.get_mut().map(std::mem::take).unwrap_or_default();
        let on: Vec<u32> = (0..self.frames)
            .filter(|&f| keyed.get(f as usize).copied().unwrap_or(false))
            .collect();
        if let Err(e) = self.flip(&mut keyed, &on) {
            log::debug!("pool pages keep the zap's protection key: {e}");
        }
        // SAFETY: frees the key this value allocated, after putting key 0 back on every
        // page that had it (a later pkey_alloc may hand the same key out again).
        unsafe { libc::syscall(libc::SYS_pkey_free, self.pkey) };
    }
}

/// Ascending `frames` as (first, count) runs of consecutive frames with the same `keyed`
/// state (duplicates dropped).
fn runs(keyed: &[bool], frames: &[u32]) -> Vec<(u32, u32)> {
    let key = |f: u32| keyed.get(f as usize).copied().unwrap_or(false);
    let mut out: Vec<(u32, u32)> = Vec::new();
    for &f in frames {
        match out.last_mut() {
            Some((first, count)) if *first + *count == f && key(*first) == key(f) => *count += 1,
            Some((first, count)) if f < *first + *count => {}
            _ => out.push((f, 1)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_become_runs_of_one_key() {
        let mut keyed = vec![false; 16];
        assert_eq!(runs(&keyed, &[]), vec![]);
        assert_eq!(
            runs(&keyed, &[3, 4, 5, 5, 9, 11, 12]),
            vec![(3, 3), (9, 1), (11, 2)]
        );
        keyed[4] = true;
        assert_eq!(runs(&keyed, &[3, 4, 5]), vec![(3, 1), (4, 1), (5, 1)]);
    }

    #[test]
    fn a_zap_keeps_the_pool_readable_and_writable() {
        let frames = 8u32;
        let len = frames as usize * FRAME;
        // SAFETY: a fresh private anonymous mapping, unmapped at the end of the test.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        let base = base.cast::<u8>();
        let zap = match PkeyZap::new(base, frames) {
            Ok(z) => z,
            Err(e) => {
                eprintln!("skipped: no protection keys here ({e})");
                // SAFETY: the mapping made above.
                unsafe { libc::munmap(base.cast(), len) };
                return;
            }
        };
        // SAFETY: inside the mapping.
        unsafe { base.add(2 * FRAME).write(7) };
        zap.zap(0, &[1, 2, 3, 6]).unwrap();
        zap.zap(0, &[2, 3, 4]).unwrap();
        assert_eq!(
            *zap.keyed.lock().unwrap(),
            [false, true, false, false, true, false, true, false],
            "each zap flips its frames' key"
        );
        // SAFETY: inside the mapping, which stays read-write with key 0.
        unsafe {
            assert_eq!(base.add(2 * FRAME).read(), 7);
            base.add(6 * FRAME).write(9);
            assert_eq!(base.add(6 * FRAME).read(), 9);
        }
        assert!(zap.zap(0, &[8]).is_err(), "outside the pool");
        drop(zap);
        // SAFETY: the mapping made above.
        unsafe { libc::munmap(base.cast(), len) };
    }
}
