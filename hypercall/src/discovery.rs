//! Discovery: the hypervisor CPUID leaves that announce the ABI.

/// CPUID leaf with the maximum hypervisor leaf in EAX and the signature in EBX, ECX, EDX.
pub const CPUID_LEAF_SIGNATURE: u32 = 0x4000_0000;
/// CPUID leaf with the ABI version (EAX), feature bits (EBX), transport (ECX), doorbell port (EDX).
pub const CPUID_LEAF_FEATURES: u32 = 0x4000_0001;
/// The 12-byte signature, as it appears in EBX, ECX, EDX (little-endian, in that order).
pub const SIGNATURE: [u8; 12] = *b"PvmmPvmmPvmm";

/// ABI major version: a guest must handshake with exactly this major.
pub const ABI_MAJOR: u16 = 1;
/// ABI minor version: grows when ops or entry kinds are added compatibly.
pub const ABI_MINOR: u16 = 2;
/// `(major << 16) | minor`, the form used in CPUID and by `VERSION`.
pub const ABI_VERSION: u32 = ((ABI_MAJOR as u32) << 16) | ABI_MINOR as u32;

/// Feature bits reported in CPUID `0x4000_0001`.EBX and by `VERSION`.
pub mod features {
    /// `MMU_BATCH` is implemented (the VMM runs the shadow MMU for this VM).
    pub const MMU_BATCH: u32 = 1 << 0;
    /// `SYNC_AD` and `QUERY_AD` entries are implemented.
    pub const AD_SYNC: u32 = 1 << 1;
    /// `RELOCATE_TABLE` entries are implemented.
    pub const RELOCATE: u32 = 1 << 2;
    /// The `ZERO_FRAME` MMU entry kind is implemented.
    pub const ZERO_FRAMES: u32 = 1 << 3;
    /// SMP TLB control: `FLUSH_TLB`/`INVLPG` take a target in their `flags`
    /// ([`crate::abi::flush_target`]), `SET_KERNEL_ROOT` exists and `UNPIN` accepts
    /// [`crate::abi::unpin_flags::DETACH`]. Every flush the VMM itself needs is delivered to
    /// every vCPU that needs it before the hypercall returns, with or without this bit.
    pub const SMP_TLB: u32 = 1 << 4;
    /// The VMM can trap the guest's stores to its page tables: ops `PT_WRITES` and
    /// `PT_FAULT` exist (write modes `emulate` and `wrpt`).
    pub const PT_TRAP: u32 = 1 << 5;
    /// The `COPY_FRAME` MMU entry kind is implemented.
    pub const COPY_FRAMES: u32 = 1 << 6;
}

/// How the guest reaches the VMM. Reported in CPUID `0x4000_0001`.ECX.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Transport {
    /// No transport: the guest must not issue hypercalls.
    None = 0,
    /// `vmcall`/`vmmcall` tunnelled through `KVM_HC_MAP_GPA_RANGE`.
    Vmcall = 1,
    /// A 32-bit `out` to the doorbell port.
    Pio = 2,
}

impl Transport {
    /// Decodes the CPUID value; unknown values are `None`.
    pub const fn from_u32(v: u32) -> Transport {
        match v {
            1 => Transport::Vmcall,
            2 => Transport::Pio,
            _ => Transport::None,
        }
    }

    /// Lower-case name, as accepted by `--hypercall` and shown in statistics.
    pub const fn name(self) -> &'static str {
        match self {
            Transport::None => "none",
            Transport::Vmcall => "vmcall",
            Transport::Pio => "pio",
        }
    }
}

/// The default doorbell port of the `pio` transport (a 32-bit port, 4 bytes wide).
pub const DOORBELL_PORT: u16 = 0x0510;
/// Offset from the doorbell port of the 32-bit "last status" register (read with `in`).
pub const STATUS_PORT_OFFSET: u16 = 4;
/// The KVM hypercall number the `vmcall` transport tunnels through (`KVM_HC_MAP_GPA_RANGE`).
pub const VMCALL_NR: u64 = 12;

/// The register values of the two CPUID leaves, as a VMM advertises them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuidLeaves {
    /// Leaf `0x4000_0000`: (eax, ebx, ecx, edx).
    pub signature: [u32; 4],
    /// Leaf `0x4000_0001`: (eax, ebx, ecx, edx).
    pub features: [u32; 4],
}

/// What a guest learns from CPUID.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Discovery {
    /// `(major << 16) | minor`.
    pub version: u32,
    /// Feature bits ([`features`]).
    pub features: u32,
    /// The transport to use.
    pub transport: Transport,
    /// The doorbell port for [`Transport::Pio`].
    pub port: u16,
}

impl CpuidLeaves {
    /// Builds the leaves a VMM advertises.
    pub fn new(features: u32, transport: Transport, port: u16) -> CpuidLeaves {
        let w = |i: usize| {
            u32::from_le_bytes([
                SIGNATURE[i],
                SIGNATURE[i + 1],
                SIGNATURE[i + 2],
                SIGNATURE[i + 3],
            ])
        };
        CpuidLeaves {
            signature: [CPUID_LEAF_FEATURES, w(0), w(4), w(8)],
            features: [ABI_VERSION, features, transport as u32, port as u32],
        }
    }

    /// Interprets leaves read by a guest; `None` without the signature (run natively).
    pub fn parse(signature: [u32; 4], features: [u32; 4]) -> Option<Discovery> {
        let mut sig = [0u8; 12];
        for (i, reg) in signature[1..].iter().enumerate() {
            sig[i * 4..i * 4 + 4].copy_from_slice(&reg.to_le_bytes());
        }
        if sig != SIGNATURE || signature[0] < CPUID_LEAF_FEATURES {
            return None;
        }
        Some(Discovery {
            version: features[0],
            features: features[1],
            transport: Transport::from_u32(features[2]),
            port: (features[3] & 0xffff) as u16,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaves_round_trip() {
        let l = CpuidLeaves::new(features::MMU_BATCH, Transport::Pio, DOORBELL_PORT);
        let d = CpuidLeaves::parse(l.signature, l.features).unwrap();
        assert_eq!(d.version, ABI_VERSION);
        assert_eq!(d.transport, Transport::Pio);
        assert_eq!(d.port, DOORBELL_PORT);
        assert_eq!(d.features, features::MMU_BATCH);
    }

    #[test]
    fn no_signature_means_native() {
        assert_eq!(CpuidLeaves::parse([0x4000_0001, 1, 2, 3], [0; 4]), None);
        let l = CpuidLeaves::new(0, Transport::Pio, 1);
        assert_eq!(
            CpuidLeaves::parse(
                [0x3fff_ffff, l.signature[1], l.signature[2], l.signature[3]],
                l.features
            ),
            None
        );
    }
}
