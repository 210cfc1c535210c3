//! `--uid`/`--gid`: pvmm, started as root, becomes that user before it opens anything (the
//! KVM device, the kernel, initrd, serial and stats files), so it never reads or writes a
//! file, nor runs a guest, with more rights than that user has.

use std::ffi::CString;

/// Dropping privileges failed; one line for the user.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    /// A set*id call failed.
    #[error("cannot drop privileges to uid {uid} gid {gid} (--uid/--gid need pvmm to start as root): {call}")]
    Switch {
        /// Target user.
        uid: u32,
        /// Target group.
        gid: u32,
        /// The failing call.
        call: &'static str,
        /// Its error.
        #[source]
        source: std::io::Error,
    },
    /// The switch did not take (or root could be regained).
    #[error("dropping privileges to uid {uid} gid {gid} did not take effect")]
    NotDropped {
        /// Target user.
        uid: u32,
        /// Target group.
        gid: u32,
    },
    /// The new user cannot open the KVM device.
    #[error("cannot open {path} as uid {uid} gid {gid} (that user needs read-write access to it)")]
    NoKvm {
        /// The device.
        path: String,
        /// Target user.
        uid: u32,
        /// Target group.
        gid: u32,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn check(rc: libc::c_int, uid: u32, gid: u32, call: &'static str) -> Result<(), PrivilegeError> {
    if rc == 0 {
        return Ok(());
    }
    Err(PrivilegeError::Switch {
        uid,
        gid,
        call,
        source: std::io::Error::last_os_error(),
    })
}

/// Becomes `uid`/`gid` for good: supplementary groups cleared, then the group, then the user
/// (the user last: once it is not root it could no longer change its groups). Checks that
/// root cannot be regained and that the new user can open `kvm_device`.
pub fn drop_to(uid: u32, gid: u32, kvm_device: &str) -> Result<(), PrivilegeError> {
    // SAFETY: plain credential syscalls; no pointers but the null group list (count 0).
    unsafe {
        check(libc::setgroups(0, std::ptr::null()), uid, gid, "setgroups")?;
        check(libc::setresgid(gid, gid, gid), uid, gid, "setresgid")?;
        check(libc::setresuid(uid, uid, uid), uid, gid, "setresuid")?;
    }
    // SAFETY: credential queries and, for a non-root target, a setuid(0) that must fail.
    let dropped = unsafe {
        libc::getuid() == uid
            && libc::geteuid() == uid
            && libc::getgid() == gid
            && libc::getegid() == gid
            && (uid == 0 || libc::setuid(0) != 0)
    };
    if !dropped {
        return Err(PrivilegeError::NotDropped { uid, gid });
    }
    let no_kvm = |source| PrivilegeError::NoKvm {
        path: kvm_device.to_string(),
        uid,
        gid,
        source,
    };
    let c = CString::new(kvm_device).map_err(|e| no_kvm(std::io::Error::other(e)))?;
    // SAFETY: opening and closing a device node by a valid C string.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(no_kvm(std::io::Error::last_os_error()));
    }
    // SAFETY: closing the fd just opened.
    unsafe { libc::close(fd) };
    Ok(())
}
