//! Probe verdicts, cached per host: the `auto` transport probe costs about 200 ms on a host
//! where `vmcall` never exits (the pool-resync probe a few ms), so each answer is kept in a
//! small file keyed by everything that could change it (kernel build, KVM API version, CPU
//! model, the KVM modules' paging parameters, the KVM device) and the verdict's name, and
//! reused.

use std::path::PathBuf;

/// Bumped when the probe itself changes meaning.
const FORMAT: &str = "pvmm-probe-v1";

/// The cache directory: `$PVMM_CACHE_DIR` (`off` disables caching), else
/// `$XDG_CACHE_HOME/pvmm`, else `$HOME/.cache/pvmm`.
pub fn dir() -> Option<PathBuf> {
    match std::env::var_os("PVMM_CACHE_DIR") {
        Some(d) if d == "off" => None,
        Some(d) => Some(PathBuf::from(d)),
        None => std::env::var_os("XDG_CACHE_HOME")
            .map(|x| PathBuf::from(x).join("pvmm"))
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/pvmm"))),
    }
}

/// KVM module parameters that change how guest page tables are handled (nested paging on or
/// off, the TDP MMU): reloading `kvm_amd npt=0` turns a host that needs no pool resync into
/// one that does, with the same kernel and CPU.
const PAGING_PARAMS: [&str; 3] = [
    "/sys/module/kvm_amd/parameters/npt",
    "/sys/module/kvm_intel/parameters/ept",
    "/sys/module/kvm/parameters/tdp_mmu",
];

/// The values of the parameter files `paths` (`-` where a module or parameter is absent).
fn paging_params(paths: &[&str]) -> String {
    paths
        .iter()
        .map(|p| {
            std::fs::read_to_string(p).map_or_else(|_| "-".to_string(), |v| v.trim().to_string())
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// What identifies this host's answer: kernel release and build, KVM API version, CPU
/// signature, the KVM modules' paging parameters, and the KVM device node.
pub fn host_key(kvm_api_version: i32, device: &str) -> String {
    // SAFETY: utsname is plain data; uname fills it.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: a valid out pointer.
    let (release, version) = if unsafe { libc::uname(&mut u) } == 0 {
        (field(&u.release), field(&u.version))
    } else {
        (String::new(), String::new())
    };
    let id = std::arch::x86_64::__cpuid(1).eax;
    let vendor = std::arch::x86_64::__cpuid(0);
    format!(
        "{FORMAT}|{release}|{version}|api{kvm_api_version}|{:08x}{:08x}{:08x}|{id:08x}|{}|{device}",
        vendor.ebx,
        vendor.edx,
        vendor.ecx,
        paging_params(&PAGING_PARAMS)
    )
}

fn field(f: &[libc::c_char]) -> String {
    let bytes: Vec<u8> = f
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// File name for `key` (an FNV-1a hash: the key itself is stored inside and compared).
fn file_for(dir: &std::path::Path, key: &str) -> PathBuf {
    let h = key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    dir.join(format!("probe-{h:016x}"))
}

/// The cached verdict for `key` ("does vmcall exit?"), if any.
pub fn load(key: &str) -> Option<bool> {
    load_flag(key, "vmcall_exits")
}

/// Stores `vmcall_exits` for `key`; failures only cost the next run a probe.
pub fn store(key: &str, vmcall_exits: bool) {
    store_flag(key, "vmcall_exits", vmcall_exits);
}

/// The cached boolean verdict `name` of a probe for `key`, if any.
pub fn load_flag(key: &str, name: &str) -> Option<bool> {
    let key = format!("{key}|{name}");
    let text = std::fs::read_to_string(file_for(&dir()?, &key)).ok()?;
    let (stored, verdict) = text.trim_end().rsplit_once('\n')?;
    if stored != key {
        return None;
    }
    match verdict.strip_prefix(name)?.strip_prefix('=')? {
        "true" => Some(true),
        "false" => Some(false),
        _ => None,
    }
}

/// Stores verdict `name` = `value` for `key`; failures only cost the next run a probe.
pub fn store_flag(key: &str, name: &str, value: bool) {
    let Some(d) = dir() else { return };
    let key = format!("{key}|{name}");
    let write = std::fs::create_dir_all(&d)
        .and_then(|()| std::fs::write(file_for(&d, &key), format!("{key}\n{name}={value}\n")));
    if let Err(e) = write {
        log::info!("cannot cache the {name} probe in {}: {e}", d.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paging_parameters_are_part_of_the_key() {
        let f = std::env::temp_dir().join(format!("pvmm-npt-{}", std::process::id()));
        std::fs::write(&f, "Y\n").unwrap();
        let present = f.to_str().unwrap();
        assert_eq!(paging_params(&[present, "/nonexistent/npt"]), "Y,-");
        std::fs::write(&f, "0\n").unwrap();
        assert_eq!(
            paging_params(&[present]),
            "0",
            "a reloaded module changes the key"
        );
        let _ = std::fs::remove_file(&f);
        assert!(host_key(12, "/dev/kvm").contains(&paging_params(&PAGING_PARAMS)));
    }

    #[test]
    fn a_verdict_round_trips_and_other_hosts_miss() {
        let d = std::env::temp_dir().join(format!("pvmm-probe-cache-{}", std::process::id()));
        std::env::set_var("PVMM_CACHE_DIR", &d);
        let key = host_key(12, "/dev/kvm");
        assert!(key.contains("api12") && key.contains("/dev/kvm"));
        assert_eq!(load(&key), None);
        store(&key, false);
        assert_eq!(load(&key), Some(false));
        store(&key, true);
        assert_eq!(load(&key), Some(true));
        assert_eq!(load(&host_key(13, "/dev/kvm")), None);
        assert_eq!(
            load_flag(&key, "pool_resync_needed"),
            None,
            "verdicts are separate"
        );
        store_flag(&key, "pool_resync_needed", true);
        assert_eq!(load_flag(&key, "pool_resync_needed"), Some(true));
        assert_eq!(load(&key), Some(true));
        std::env::set_var("PVMM_CACHE_DIR", "off");
        assert_eq!(load(&key), None, "off disables the cache");
        std::env::remove_var("PVMM_CACHE_DIR");
        let _ = std::fs::remove_dir_all(&d);
    }
}
