//! Error codes of the PV ABI: negative errno-style values in a signed 64-bit status.

/// A hypercall or MMU batch entry failure. The wire value is the negated code
/// (`status = -(code as i64)`), the Linux errno numbering.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(i64)]
pub enum HcError {
    /// The request is not allowed (mapping memory the guest does not own).
    Eperm = 1,
    /// The named frame or table is not known (not pinned / not typed).
    Enoent = 2,
    /// Argument list too long: a batch longer than [`crate::MAX_BATCH_ENTRIES`] or a range
    /// longer than [`crate::MAX_AD_RANGE_PAGES`].
    E2big = 7,
    /// The shadow pool is exhausted and nothing could be reclaimed.
    Enomem = 12,
    /// A guest-physical address points outside guest RAM (or straddles its end).
    Efault = 14,
    /// The object is in use: unpin of a loaded root or of a still-referenced table.
    Ebusy = 16,
    /// The frame already has a different type (or is already pinned).
    Eexist = 17,
    /// Malformed input: misaligned address, non-zero reserved field, bad flag, wrong level.
    Einval = 22,
    /// Unknown hypercall op or MMU entry kind, or an op this VMM does not implement.
    Enosys = 38,
    /// A hypercall other than `VERSION`/`EXIT` before the `VERSION` handshake, or a
    /// handshake for an unsupported ABI major version.
    Eproto = 71,
}

impl HcError {
    /// Every error code, in numeric order.
    pub const ALL: [HcError; 10] = [
        HcError::Eperm,
        HcError::Enoent,
        HcError::E2big,
        HcError::Enomem,
        HcError::Efault,
        HcError::Ebusy,
        HcError::Eexist,
        HcError::Einval,
        HcError::Enosys,
        HcError::Eproto,
    ];

    /// The negative status value written to the guest.
    pub const fn status(self) -> i64 {
        -(self as i64)
    }

    /// Maps a negative status back to an error; `None` for success or unknown values.
    pub fn from_status(status: i64) -> Option<HcError> {
        HcError::ALL.iter().copied().find(|e| e.status() == status)
    }

    /// The short name (`"EINVAL"`, ...) used in statistics and docs.
    pub const fn name(self) -> &'static str {
        match self {
            HcError::Eperm => "EPERM",
            HcError::Enoent => "ENOENT",
            HcError::E2big => "E2BIG",
            HcError::Enomem => "ENOMEM",
            HcError::Efault => "EFAULT",
            HcError::Ebusy => "EBUSY",
            HcError::Eexist => "EEXIST",
            HcError::Einval => "EINVAL",
            HcError::Enosys => "ENOSYS",
            HcError::Eproto => "EPROTO",
        }
    }
}

impl core::fmt::Display for HcError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_round_trips() {
        for e in HcError::ALL {
            assert!(e.status() < 0);
            assert_eq!(HcError::from_status(e.status()), Some(e));
        }
        assert_eq!(HcError::from_status(0), None);
        assert_eq!(HcError::from_status(-9999), None);
    }
}
