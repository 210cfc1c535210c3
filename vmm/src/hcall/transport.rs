//! Choosing the hypercall transport: `pio` always works; `vmcall` only where it reaches
//! userspace, which the probe finds out (its verdict cached per host). A forced `vmcall`
//! on a host where it cannot work fails at once with the reason, instead of hanging.

use super::{probe, probe_cache};
use crate::cli::HypercallMode;
use crate::error::SetupError;
use hypercall::Transport;
use kvm_ioctls::Kvm;

/// The transport a run uses, and how it was chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TransportChoice {
    /// The transport.
    pub transport: Transport,
    /// "forced" or "auto".
    pub how: &'static str,
    /// Time the probe took, ns (0 when forced, or when the verdict was cached).
    pub probe_ns: u64,
    /// The verdict came from the per-host cache.
    pub cached: bool,
}

/// Whether `vmcall` exits to userspace here: (verdict, probe ns, cached).
fn vmcall_verdict(kvm: &Kvm, device: &str) -> (bool, u64, bool) {
    let key = probe_cache::host_key(kvm.get_api_version(), device);
    if let Some(v) = probe_cache::load(&key) {
        log::info!("hypercall probe: cached verdict, vmcall exits = {v}");
        return (v, 0, true);
    }
    match probe::probe(kvm) {
        Ok(r) => {
            log::info!("hypercall probe: {r:?}");
            probe_cache::store(&key, r.vmcall_exits);
            (r.vmcall_exits, r.elapsed.as_nanos() as u64, false)
        }
        Err(e) => {
            log::warn!("{e}; assuming vmcall does not exit");
            (false, 0, false)
        }
    }
}

/// Chooses the hypercall transport for `mode`; `device` names the KVM device (cache key).
pub fn choose(kvm: &Kvm, mode: HypercallMode, device: &str) -> Result<TransportChoice, SetupError> {
    let choice = |transport, how, probe_ns, cached| TransportChoice {
        transport,
        how,
        probe_ns,
        cached,
    };
    match mode {
        HypercallMode::Pio => Ok(choice(Transport::Pio, "forced", 0, false)),
        HypercallMode::Vmcall => match vmcall_verdict(kvm, device) {
            (true, ns, cached) => Ok(choice(Transport::Vmcall, "forced", ns, cached)),
            (false, ..) => Err(SetupError::VmcallUnavailable),
        },
        HypercallMode::Auto => {
            let (exits, ns, cached) = vmcall_verdict(kvm, device);
            let t = if exits {
                Transport::Vmcall
            } else {
                Transport::Pio
            };
            log::info!("hypercall transport: {} (auto)", t.name());
            Ok(choice(t, "auto", ns, cached))
        }
    }
}
