//! Links the kernel at its fixed address and builds the ring-3 selftest programs (the
//! `user` member of this workspace, with its own link flags and target directory) so that
//! selftest.rs can embed them with include_bytes!.
use std::path::PathBuf;
use std::process::Command;

/// The user programs, one ELF each.
const PROGRAMS: &[&str] = &[
    "populate",
    "zap",
    "mprotect",
    "mremap",
    "fork_cow",
    "exit_teardown",
    "ad_young",
    "ad_dirty",
    "relocate",
    "flush_avoid",
    "fault_around",
    "smp_unmap",
    "smp_mprotect",
    "smp_remap",
    "smp_dirty",
    "smp_exit_mmap",
    "smp_flush_avoid",
    "smp_fork_cow",
    "smp_hammer",
];

fn main() {
    let dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    println!("cargo:rustc-link-arg-bins=-T{}/linker.ld", dir.display());
    println!("cargo:rerun-if-changed=linker.ld");
    let user = dir.join("../user").canonicalize().unwrap();
    println!("cargo:rerun-if-changed={}", user.join("src").display());
    println!(
        "cargo:rerun-if-changed={}",
        user.join("Cargo.toml").display()
    );
    println!("cargo:rerun-if-changed={}", user.join("user.ld").display());
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let target_dir = out.join("user-target");
    let flags = [
        "-Crelocation-model=static".to_string(),
        "-Ctarget-feature=-sse,-sse2,-sse3,-ssse3,-sse4.1,-sse4.2,-avx,-avx2".to_string(),
        "-Clink-arg=-nostartfiles".to_string(),
        "-Clink-arg=-nostdlib".to_string(),
        "-Clink-arg=-static".to_string(),
        "-Clink-arg=-no-pie".to_string(),
        "-Clink-arg=-Wl,--build-id=none".to_string(),
        format!("-Clink-arg=-T{}", user.join("user.ld").display()),
    ]
    .join("\x1f");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&user)
        .args([
            "build",
            "--release",
            "--offline",
            "--bins",
            "--target",
            "x86_64-unknown-linux-gnu",
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("CARGO_ENCODED_RUSTFLAGS", flags);
    for v in [
        "RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTC_WORKSPACE_WRAPPER",
    ] {
        cmd.env_remove(v);
    }
    let st = cmd.status().expect("cargo build of the user programs");
    assert!(st.success(), "building the user programs failed");
    let bin = target_dir.join("x86_64-unknown-linux-gnu/release");
    let dest = out.join("user");
    std::fs::create_dir_all(&dest).unwrap();
    for p in PROGRAMS {
        std::fs::copy(bin.join(p), dest.join(p)).unwrap();
    }
}
