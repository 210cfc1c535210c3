//! `pvmm bench-exits`: the raw exit floor (bare 32-bit port writes to an unassigned port)
//! against NULL hypercalls on the pio doorbell, measured in one run by a tiny hand-assembled
//! guest whose two loops execute the same number of instructions.

use crate::cli::{HypercallMode, RunArgs, SeccompMode, SerialMode, StatsMode};
use crate::devices::BusDevice;
use crate::error::SetupError;
use hypercall::{op, RequestHeader, DOORBELL_PORT};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Port whose writes mark phase boundaries.
pub const MARKER_PORT: u64 = 0x85;
/// Unassigned port the floor loop writes to.
pub const FLOOR_PORT: u16 = 0x84;
const LOAD: u64 = 0x10_0000;
const BLOCKS: u64 = LOAD + 0x1000;

/// Records the time of each marker write.
#[derive(Default)]
pub struct Marker(pub Vec<Instant>);

impl BusDevice for Marker {
    fn name(&self) -> &'static str {
        "bench-marker"
    }
    fn read(&mut self, _: usize, _: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _: usize, _: u64, _: &[u8]) {
        self.0.push(Instant::now());
    }
}

/// A minimal 64-bit ELF with one RWX segment holding `image` at physical = virtual `load`,
/// entered at its first byte.
pub fn tiny_elf(load: u64, image: &[u8]) -> Vec<u8> {
    let mut e = vec![0u8; 0x1000];
    e[0..4].copy_from_slice(b"\x7fELF");
    e[4] = 2; // 64-bit
    e[5] = 1; // little endian
    e[6] = 1;
    e[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
    e[20..24].copy_from_slice(&1u32.to_le_bytes());
    e[24..32].copy_from_slice(&load.to_le_bytes()); // entry
    e[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
    e[52..54].copy_from_slice(&64u16.to_le_bytes()); // ehsize
    e[54..56].copy_from_slice(&56u16.to_le_bytes()); // phentsize
    e[56..58].copy_from_slice(&1u16.to_le_bytes()); // phnum
    let ph = 64;
    let len = image.len() as u64;
    e[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    e[ph + 4..ph + 8].copy_from_slice(&7u32.to_le_bytes()); // RWX
    e[ph + 8..ph + 16].copy_from_slice(&0x1000u64.to_le_bytes()); // file offset
    e[ph + 16..ph + 24].copy_from_slice(&load.to_le_bytes()); // vaddr
    e[ph + 24..ph + 32].copy_from_slice(&load.to_le_bytes()); // paddr
    e[ph + 32..ph + 40].copy_from_slice(&len.to_le_bytes()); // filesz
    e[ph + 40..ph + 48].copy_from_slice(&len.to_le_bytes()); // memsz
    e.extend_from_slice(image);
    e
}

fn mov_dx(c: &mut Vec<u8>, port: u16) {
    c.extend_from_slice(&[0x66, 0xba]);
    c.extend_from_slice(&port.to_le_bytes());
}

fn mov_eax(c: &mut Vec<u8>, v: u32) {
    c.push(0xb8);
    c.extend_from_slice(&v.to_le_bytes());
}

/// `loop: mov eax, block; mov dx, port; out dx, eax; dec ecx; jnz loop` (5 instructions).
fn out_loop(c: &mut Vec<u8>, n: u32, port: u16, block: u32) {
    c.push(0xb9);
    c.extend_from_slice(&n.to_le_bytes()); // mov ecx, n
    let top = c.len();
    mov_eax(c, block);
    mov_dx(c, port);
    c.extend_from_slice(&[0xef, 0xff, 0xc9]); // out dx, eax; dec ecx
    let rel = top as i64 - (c.len() as i64 + 2);
    c.extend_from_slice(&[0x75, rel as i8 as u8]); // jnz top
}

fn marker(c: &mut Vec<u8>) {
    mov_dx(c, MARKER_PORT as u16);
    c.push(0xee); // out dx, al
}

/// The benchmark guest image: handshake, marker, floor loop, marker, NULL loop, marker, EXIT.
pub fn guest_image(n: u32) -> Vec<u8> {
    let (version, null, exit) = (BLOCKS as u32, BLOCKS as u32 + 64, BLOCKS as u32 + 128);
    let mut c = Vec::new();
    mov_dx(&mut c, DOORBELL_PORT);
    mov_eax(&mut c, version);
    c.push(0xef);
    marker(&mut c);
    out_loop(&mut c, n, FLOOR_PORT, null);
    marker(&mut c);
    out_loop(&mut c, n, DOORBELL_PORT, null);
    marker(&mut c);
    mov_dx(&mut c, DOORBELL_PORT);
    mov_eax(&mut c, exit);
    c.extend_from_slice(&[0xef, 0xf4]); // out dx, eax; hlt
    c.resize(0x1000, 0x90);
    c.extend_from_slice(
        &RequestHeader::new(op::VERSION, [u64::from(hypercall::ABI_MAJOR), 0, 0, 0]).to_bytes(),
    );
    c.extend_from_slice(&RequestHeader::new(op::NULL, [0; 4]).to_bytes());
    c.extend_from_slice(&RequestHeader::new(op::EXIT, [0; 4]).to_bytes());
    c
}

/// One measurement.
#[derive(Clone, Copy, Debug)]
pub struct ExitBench {
    /// ns per bare port-write round trip.
    pub floor_ns: f64,
    /// ns per NULL hypercall round trip.
    pub null_ns: f64,
}

/// Runs the benchmark guest once, its vCPU thread under `seccomp`.
pub fn run_once(n: u32, seccomp: SeccompMode) -> Result<ExitBench, SetupError> {
    let path = std::env::temp_dir().join(format!("pvmm-bench-exits-{}.elf", std::process::id()));
    std::fs::write(&path, tiny_elf(LOAD, &guest_image(n))).map_err(|source| {
        SetupError::OutputFile {
            path: path.clone(),
            source,
        }
    })?;
    let args = RunArgs {
        kernel: path.clone(),
        initrd: None,
        cmdline: String::new(),
        mem: 64 << 20,
        vcpus: 1,
        serial: SerialMode::None,
        stats: StatsMode::None,
        stats_file: None,
        timeout: Some(600.0),
        stats_interval: None,
        hypercall: HypercallMode::Pio,
        shadow_pool: 1 << 20,
        verbose: 0,
        seccomp,
        uid: None,
        gid: None,
        debug_seccomp_violation: false,
        pt_trap: crate::ptwrite::PtTrapMode::Off,
        debug_pt_trap_no_validate: false,
        debug_pt_trap_keep_parents: false,
        debug_pt_trap_no_harvest: false,
        check_shadow: false,
        debug_unguarded_response: false,
        debug_drop_remote_flushes: false,
        pool_resync: crate::cli::PoolResync::Auto,
        remote_flush: crate::cli::RemoteFlush::Auto,
        kernel_flush_trigger: crate::cli::KernelFlushTrigger::Auto,
        debug_kernel_flush_no_zap: false,
        leaf_zap: crate::cli::LeafZap::Auto,
        debug_leaf_zap_skip: false,
        // This thread runs one VM after another: only the VM's own threads are filtered.
        seccomp_supervisor: false,
    };
    let marks = Arc::new(Mutex::new(Marker::default()));
    let out = crate::vm::run_with_devices(
        &args,
        &crate::hcall::mmu_batch::factory,
        vec![(MARKER_PORT, 1, marks.clone())],
    );
    let _ = std::fs::remove_file(&path);
    let out = out?;
    if out.exit_code != 0 {
        return Err(SetupError::other(
            "bench guest",
            format!("ended with code {} ({:?})", out.exit_code, out.message),
        ));
    }
    let m = marks
        .lock()
        .map_err(|_| SetupError::other("bench marker", "lock poisoned"))?;
    match m.0.as_slice() {
        [a, b, c] => Ok(ExitBench {
            floor_ns: (*b - *a).as_nanos() as f64 / f64::from(n),
            null_ns: (*c - *b).as_nanos() as f64 / f64::from(n),
        }),
        other => Err(SetupError::other(
            "bench guest",
            format!("wrote {} markers, expected 3", other.len()),
        )),
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// The measurements of one configuration.
#[derive(Clone, Debug, Default)]
struct Series {
    floor: Vec<f64>,
    null: Vec<f64>,
    ratio: Vec<f64>,
}

/// Runs `repeat` rounds; each round measures every mode once, in turn (so slow drift in the
/// host affects all modes alike).
fn collect(n: u32, repeat: u32, modes: &[SeccompMode]) -> Result<Vec<Series>, SetupError> {
    let mut out = vec![Series::default(); modes.len()];
    for _ in 0..repeat {
        for (s, &mode) in out.iter_mut().zip(modes) {
            let r = run_once(n, mode)?;
            s.floor.push(r.floor_ns);
            s.null.push(r.null_ns);
            s.ratio.push(r.null_ns / r.floor_ns);
        }
    }
    Ok(out)
}

fn spread(v: &[f64]) -> (f64, f64) {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(0.0, f64::max);
    (lo, hi)
}

fn mode_name(m: SeccompMode) -> &'static str {
    match m {
        SeccompMode::Kill => "kill",
        SeccompMode::Log => "log",
        SeccompMode::Off => "off",
    }
}

fn to_json(n: u32, repeat: u32, mode: SeccompMode, s: &Series) -> serde_json::Value {
    let (mut floor, mut null, mut ratio) = (s.floor.clone(), s.null.clone(), s.ratio.clone());
    let ((fl, fh), (nl, nh), (rl, rh)) = (spread(&floor), spread(&null), spread(&ratio));
    serde_json::json!({
        "iterations": n, "repeat": repeat, "seccomp": mode_name(mode),
        "floor_ns": median(&mut floor), "floor_min_ns": fl, "floor_max_ns": fh,
        "null_ns": median(&mut null), "null_min_ns": nl, "null_max_ns": nh,
        "ratio": median(&mut ratio), "ratio_min": rl, "ratio_max": rh,
    })
}

fn to_text(n: u32, repeat: u32, mode: SeccompMode, s: &Series) -> String {
    let (mut floor, mut null, mut ratio) = (s.floor.clone(), s.null.clone(), s.ratio.clone());
    let ((fl, fh), (nl, nh), (rl, rh)) = (spread(&floor), spread(&null), spread(&ratio));
    let r = median(&mut ratio);
    format!(
        "exit floor vs NULL hypercall ({n} iterations x {repeat} runs, pio transport, same 5-instruction CPL0 loop, seccomp {})\n\
         raw port write (unassigned port {FLOOR_PORT:#x}): median {:.0} ns/exit   [min {:.0}, max {:.0}]\n\
         NULL hypercall (doorbell {DOORBELL_PORT:#x}):      median {:.0} ns/call   [min {:.0}, max {:.0}]\n\
         ratio NULL/floor: median {r:.3} ({:+.1}% overhead)  [min {rl:.3}, max {rh:.3}]   target <= 1.10\n",
        mode_name(mode),
        median(&mut floor),
        fl,
        fh,
        median(&mut null),
        nl,
        nh,
        (r - 1.0) * 100.0,
    )
}

/// Runs `repeat` measurements with the vCPU threads under `seccomp`; returns a report of
/// floor, NULL cost, their ratio, median and spread (text, or one JSON object with `json`).
pub fn run(n: u32, repeat: u32, json: bool, seccomp: SeccompMode) -> Result<String, SetupError> {
    let s = collect(n, repeat, &[seccomp])?;
    let s = s.first().cloned().unwrap_or_default();
    Ok(if json {
        to_json(n, repeat, seccomp, &s).to_string() + "\n"
    } else {
        to_text(n, repeat, seccomp, &s)
    })
}

/// The same measurement without and with seccomp filters (`kill`), interleaved in one run:
/// both reports and the ratio of their NULL/floor medians (JSON: `{"off": .., "kill": ..,
/// "ratio_kill_over_off": ..}`).
pub fn compare_seccomp(n: u32, repeat: u32, json: bool) -> Result<String, SetupError> {
    let modes = [SeccompMode::Off, SeccompMode::Kill];
    let s = collect(n, repeat, &modes)?;
    let (off, kill) = match s.as_slice() {
        [a, b] => (a, b),
        _ => return Err(SetupError::other("bench", "missing series")),
    };
    let rel = median(&mut kill.ratio.clone()) / median(&mut off.ratio.clone());
    if json {
        let v = serde_json::json!({
            "off": to_json(n, repeat, SeccompMode::Off, off),
            "kill": to_json(n, repeat, SeccompMode::Kill, kill),
            "ratio_kill_over_off": rel,
        });
        return Ok(v.to_string() + "\n");
    }
    Ok(format!(
        "{}{}NULL/floor ratio with filters / without: {rel:.3} ({:+.1}%)\n",
        to_text(n, repeat, SeccompMode::Off, off),
        to_text(n, repeat, SeccompMode::Kill, kill),
        (rel - 1.0) * 100.0
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_layout() {
        let img = guest_image(10);
        assert_eq!(img.len(), 0x1000 + 3 * 64);
        assert_eq!(&img[0x1000..0x1004], &op::VERSION.to_le_bytes());
        assert_eq!(&img[0x1080..0x1084], &op::EXIT.to_le_bytes());
        let elf = tiny_elf(LOAD, &img);
        assert_eq!(&elf[0..4], b"\x7fELF");
    }
}
