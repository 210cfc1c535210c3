//! KVM's binary statistics interface (`KVM_GET_STATS_FD`): kvm-ioctls has no wrapper, so this
//! module issues the ioctl through vmm-sys-util and parses the descriptor table.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use vmm_sys_util::ioctl::ioctl;

const KVMIO: u32 = 0xAE;
mod nr {
    #![allow(missing_docs)]
    use super::KVMIO;
    use vmm_sys_util::ioctl_io_nr;
    ioctl_io_nr!(KVM_GET_STATS_FD, KVMIO, 0xce);
}
use nr::KVM_GET_STATS_FD;

/// Size of `struct kvm_stats_header`.
const HEADER_LEN: usize = 24;
/// Size of `struct kvm_stats_desc` without its name.
const DESC_LEN: usize = 16;
/// Stat type mask in `kvm_stats_desc.flags`.
const TYPE_MASK: u32 = 0xf;

/// Kind of a KVM statistic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatKind {
    /// A counter that only grows.
    Cumulative,
    /// A current value.
    Instant,
    /// A high-water mark.
    Peak,
    /// A histogram (not read as a scalar).
    Histogram,
}

/// One scalar statistic descriptor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatDesc {
    /// Name, e.g. `"exits"`.
    pub name: String,
    /// Kind.
    pub kind: StatKind,
    /// Byte offset of its value from the data block.
    pub offset: u64,
    /// Number of u64 values.
    pub size: u16,
}

/// Errors from the stats interface.
#[derive(Debug, thiserror::Error)]
pub enum KvmStatsError {
    /// The ioctl failed (old kernel).
    #[error("KVM_GET_STATS_FD failed: {0}")]
    Ioctl(std::io::Error),
    /// Reading the fd failed.
    #[error("reading KVM stats: {0}")]
    Read(std::io::Error),
    /// The header or descriptors are malformed.
    #[error("malformed KVM stats data")]
    Malformed,
}

fn u32_at(b: &[u8], off: usize) -> Result<u32, KvmStatsError> {
    let s = b.get(off..off + 4).ok_or(KvmStatsError::Malformed)?;
    Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn u16_at(b: &[u8], off: usize) -> Result<u16, KvmStatsError> {
    let s = b.get(off..off + 2).ok_or(KvmStatsError::Malformed)?;
    Ok(u16::from_le_bytes([s[0], s[1]]))
}

/// Parsed header: (name_size, num_desc, desc_offset, data_offset).
pub fn parse_header(b: &[u8]) -> Result<(usize, usize, u64, u64), KvmStatsError> {
    if b.len() < HEADER_LEN {
        return Err(KvmStatsError::Malformed);
    }
    Ok((
        u32_at(b, 4)? as usize,
        u32_at(b, 8)? as usize,
        u64::from(u32_at(b, 16)?),
        u64::from(u32_at(b, 20)?),
    ))
}

/// Parses `num` descriptors of `name_size`-byte names from `b`.
pub fn parse_descs(b: &[u8], num: usize, name_size: usize) -> Result<Vec<StatDesc>, KvmStatsError> {
    let stride = DESC_LEN + name_size;
    (0..num)
        .map(|i| {
            let d = b
                .get(i * stride..(i + 1) * stride)
                .ok_or(KvmStatsError::Malformed)?;
            let flags = u32_at(d, 0)?;
            let size = u16_at(d, 6)?;
            let offset = u64::from(u32_at(d, 8)?);
            let name_bytes = &d[DESC_LEN..];
            let end = name_bytes
                .iter()
                .position(|&c| c == 0)
                .unwrap_or(name_bytes.len());
            let name = String::from_utf8_lossy(&name_bytes[..end]).into_owned();
            let kind = match flags & TYPE_MASK {
                0 => StatKind::Cumulative,
                1 => StatKind::Instant,
                2 => StatKind::Peak,
                _ => StatKind::Histogram,
            };
            Ok(StatDesc {
                name,
                kind,
                offset,
                size,
            })
        })
        .collect()
}

/// A reader over one vCPU's (or the VM's) stats fd.
pub struct KvmStats {
    file: File,
    descs: Vec<StatDesc>,
    data_offset: u64,
}

impl KvmStats {
    /// Opens the stats fd of a vCPU or VM file descriptor.
    pub fn open(fd: &impl AsRawFd) -> Result<KvmStats, KvmStatsError> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new fd or -1.
        let raw = unsafe { ioctl(fd, KVM_GET_STATS_FD()) };
        if raw < 0 {
            return Err(KvmStatsError::Ioctl(std::io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a fresh fd we own.
        let file = unsafe { File::from_raw_fd(raw) };
        let mut hdr = [0u8; HEADER_LEN];
        file.read_exact_at(&mut hdr, 0)
            .map_err(KvmStatsError::Read)?;
        let (name_size, num, desc_off, data_offset) = parse_header(&hdr)?;
        if num > 4096 || name_size > 1024 {
            return Err(KvmStatsError::Malformed);
        }
        let mut db = vec![0u8; num * (DESC_LEN + name_size)];
        file.read_exact_at(&mut db, desc_off)
            .map_err(KvmStatsError::Read)?;
        let descs = parse_descs(&db, num, name_size)?;
        Ok(KvmStats {
            file,
            descs,
            data_offset,
        })
    }

    /// Reads every scalar statistic (histograms are skipped).
    pub fn read(&self) -> Result<Vec<(String, StatKind, u64)>, KvmStatsError> {
        let mut out = Vec::with_capacity(self.descs.len());
        for d in self
            .descs
            .iter()
            .filter(|d| d.size == 1 && d.kind != StatKind::Histogram)
        {
            let mut v = [0u8; 8];
            self.file
                .read_exact_at(&mut v, self.data_offset + d.offset)
                .map_err(KvmStatsError::Read)?;
            out.push((d.name.clone(), d.kind, u64::from_le_bytes(v)));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(flags: u32, size: u16, offset: u32, name: &str, name_size: usize) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&flags.to_le_bytes());
        v.extend_from_slice(&0i16.to_le_bytes());
        v.extend_from_slice(&size.to_le_bytes());
        v.extend_from_slice(&offset.to_le_bytes());
        v.extend_from_slice(&0u32.to_le_bytes());
        let mut n = name.as_bytes().to_vec();
        n.resize(name_size, 0);
        v.extend_from_slice(&n);
        v
    }

    #[test]
    fn parses_synthetic_descriptors() {
        let mut hdr = vec![0u8; 24];
        hdr[4..8].copy_from_slice(&48u32.to_le_bytes());
        hdr[8..12].copy_from_slice(&3u32.to_le_bytes());
        hdr[16..20].copy_from_slice(&100u32.to_le_bytes());
        hdr[20..24].copy_from_slice(&500u32.to_le_bytes());
        assert_eq!(parse_header(&hdr).unwrap(), (48, 3, 100, 500));
        let mut d = desc(0, 1, 0, "exits", 48);
        d.extend(desc(2, 1, 8, "max_mmu_page_hash_collisions", 48));
        d.extend(desc(4, 32, 16, "halt_poll_hist", 48));
        let got = parse_descs(&d, 3, 48).unwrap();
        assert_eq!(
            got[0],
            StatDesc {
                name: "exits".into(),
                kind: StatKind::Cumulative,
                offset: 0,
                size: 1
            }
        );
        assert_eq!(got[1].kind, StatKind::Peak);
        assert_eq!(got[2].kind, StatKind::Histogram);
        assert!(parse_descs(&d[..70], 3, 48).is_err());
        assert!(parse_header(&hdr[..10]).is_err());
    }

    #[test]
    fn reads_real_vcpu_stats_when_kvm_present() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            eprintln!("skipping: /dev/kvm not available");
            return;
        };
        let vm = kvm.create_vm().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let s = KvmStats::open(&vcpu).unwrap();
        let v = s.read().unwrap();
        assert!(v.iter().any(|(n, _, _)| n == "exits"), "{v:?}");
    }
}
