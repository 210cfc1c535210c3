//! Helpers for the end-to-end tests: locating the `pvmm` binary and the bundled guest,
//! deciding whether KVM tests run, and a small TAP 13 consumer.

use std::path::PathBuf;
use std::process::{Command, Output};

/// Workspace root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The `pvmm` binary (`PVMM_BIN`, else target/release or target/debug).
pub fn pvmm_bin() -> PathBuf {
    if let Ok(p) = std::env::var("PVMM_BIN") {
        return p.into();
    }
    let r = root();
    for p in [r.join("target/release/pvmm"), r.join("target/debug/pvmm")] {
        if p.exists() {
            return p;
        }
    }
    panic!("pvmm binary not found: run `make build` (or set PVMM_BIN)");
}

/// The bundled guest kernel (`PVMM_GUEST`, else the release build in guest-images).
pub fn guest() -> PathBuf {
    let p: PathBuf = std::env::var("PVMM_GUEST")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            root().join("guest-images/target/x86_64-unknown-linux-gnu/release/pvmm-guest")
        });
    assert!(
        p.exists(),
        "guest kernel {} not found: run `make build`",
        p.display()
    );
    p
}

/// True if KVM tests should run. Without /dev/kvm they are skipped with a printed reason,
/// unless `REQUIRE_KVM=1`, where that is a failure.
pub fn kvm_available(test: &str) -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        if std::env::var("REQUIRE_KVM").as_deref() == Ok("1") {
            panic!("{test}: /dev/kvm is not usable and REQUIRE_KVM=1");
        }
        eprintln!("SKIP {test}: /dev/kvm is not available");
    }
    ok
}

/// Runs `pvmm run` with `args`.
pub fn run(args: &[&str]) -> Output {
    Command::new(pvmm_bin())
        .arg("run")
        .args(args)
        .output()
        .expect("spawning pvmm")
}

/// Runs the bundled guest with a command line and extra flags.
pub fn run_guest(cmdline: &str, extra: &[&str]) -> Output {
    let g = guest();
    let mut args = vec![
        "--kernel",
        g.to_str().unwrap_or_default(),
        "--cmdline",
        cmdline,
    ];
    args.extend_from_slice(extra);
    run(&args)
}

/// Runs the bundled guest over the pio transport with `extra` flags, its statistics going
/// to a temp file named after `name` (`--stats json`, `--timeout 120`): the output and the
/// statistics (`Null` when none were written).
pub fn run_guest_stats(name: &str, cmdline: &str, extra: &[&str]) -> (Output, serde_json::Value) {
    let f = temp(&format!("{name}.json"));
    let path = f.to_str().unwrap_or_default().to_string();
    let mut args = vec![
        "--hypercall",
        "pio",
        "--stats",
        "json",
        "--stats-file",
        &path,
        "--timeout",
        "120",
    ];
    args.extend_from_slice(extra);
    let out = run_guest(cmdline, &args);
    let stats = std::fs::read_to_string(&f)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or(serde_json::Value::Null);
    let _ = std::fs::remove_file(&f);
    (out, stats)
}

/// A temp file path unique to this process and `name`.
pub fn temp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("pvmm-e2e-{}-{name}", std::process::id()))
}

/// A minimal 64-bit ELF (the VMM's own helper, used by its exit benchmark).
pub use vmm::bench::tiny_elf;

/// One TAP test point.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TapPoint {
    /// `ok` or `not ok`.
    pub ok: bool,
    /// Test number.
    pub num: u32,
    /// Description.
    pub name: String,
    /// `# SKIP` reason, if skipped.
    pub skip: Option<String>,
    /// Diagnostic lines (`# ...`) printed since the previous point, without the `# `
    /// (kselftest style: a test's diagnostics come before its result line).
    pub diag: Vec<String>,
}

/// A parsed TAP 13 stream.
#[derive(Clone, Debug, Default)]
pub struct Tap {
    /// Planned count from `1..N`.
    pub plan: Option<u32>,
    /// Test points in order.
    pub points: Vec<TapPoint>,
    /// Diagnostics before the plan line.
    pub preamble: Vec<String>,
    /// Diagnostics after the last point.
    pub trailer: Vec<String>,
}

impl Tap {
    /// Parses TAP 13 from console output (other lines are ignored). Errors on a missing
    /// version line, a malformed plan or out-of-order numbers.
    pub fn parse(text: &str) -> Result<Tap, String> {
        let mut lines = text.lines().map(|l| l.trim_end_matches('\r'));
        lines
            .by_ref()
            .find(|l| *l == "TAP version 13")
            .ok_or("no 'TAP version 13' line")?;
        let mut tap = Tap::default();
        let mut pending: Vec<String> = Vec::new();
        for l in lines {
            if let Some(n) = l.strip_prefix("1..") {
                tap.plan = Some(n.trim().parse().map_err(|_| format!("bad plan '{l}'"))?);
            } else if let Some(rest) = l
                .strip_prefix("ok ")
                .map(|r| (true, r))
                .or_else(|| l.strip_prefix("not ok ").map(|r| (false, r)))
            {
                let (ok, rest) = rest;
                let (num, desc) = rest.split_once(' ').unwrap_or((rest, ""));
                let num: u32 = num
                    .parse()
                    .map_err(|_| format!("bad test number in '{l}'"))?;
                if num as usize != tap.points.len() + 1 {
                    return Err(format!("test {num} out of order"));
                }
                let (name, directive) = match desc.split_once(" # ") {
                    Some((n, d)) => (n.trim_start_matches("- ").to_string(), Some(d.to_string())),
                    None => (desc.trim_start_matches("- ").to_string(), None),
                };
                let skip =
                    directive.and_then(|d| d.strip_prefix("SKIP").map(|s| s.trim().to_string()));
                tap.points.push(TapPoint {
                    ok,
                    num,
                    name,
                    skip,
                    diag: std::mem::take(&mut pending),
                });
            } else if let Some(d) = l.strip_prefix("# ").or_else(|| l.strip_prefix("#")) {
                if tap.plan.is_none() {
                    tap.preamble.push(d.to_string());
                } else {
                    pending.push(d.to_string());
                }
            }
        }
        tap.trailer = pending;
        if tap.plan.is_none() {
            return Err("no plan line".into());
        }
        Ok(tap)
    }

    /// The point named `name`.
    pub fn get(&self, name: &str) -> Option<&TapPoint> {
        self.points.iter().find(|p| p.name == name)
    }

    /// The number just before `word` in the diagnostic line of `test` that starts with
    /// `prefix` (words split at spaces, commas, colons and parentheses). Panics with the
    /// line when the test, the line, the word or the number is missing.
    pub fn diag_count(&self, test: &str, prefix: &str, word: &str) -> u64 {
        let p = self.get(test).unwrap_or_else(|| panic!("no test {test}"));
        let line = p
            .diag
            .iter()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("{test}: no '{prefix}' line in {:?}", p.diag));
        let words: Vec<&str> = line
            .split([' ', ',', ':', '(', ')'])
            .filter(|w| !w.is_empty())
            .collect();
        let i = words
            .iter()
            .position(|w| *w == word)
            .unwrap_or_else(|| panic!("no '{word}' in '{line}'"));
        i.checked_sub(1)
            .and_then(|j| words[j].parse().ok())
            .unwrap_or_else(|| panic!("no count before '{word}' in '{line}'"))
    }

    /// Number of `not ok` points.
    pub fn failures(&self) -> usize {
        self.points.iter().filter(|p| !p.ok).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tap() {
        let t = Tap::parse("boot\nTAP version 13\n# pre\n1..3\n# populate: 5\nok 1 populate\n# updates 5\nnot ok 2 zap # bad\nok 3 hostile # SKIP native\n# 1 failed\n").unwrap();
        assert_eq!(t.plan, Some(3));
        assert_eq!(t.points.len(), 3);
        assert_eq!(t.preamble, vec!["pre"]);
        assert_eq!(t.get("populate").unwrap().diag, vec!["populate: 5"]);
        assert_eq!(t.get("zap").unwrap().diag, vec!["updates 5"]);
        assert_eq!(t.trailer, vec!["1 failed"]);
        assert!(!t.get("zap").unwrap().ok);
        assert_eq!(t.get("hostile").unwrap().skip.as_deref(), Some("native"));
        assert_eq!(t.failures(), 1);
        assert!(Tap::parse("ok 1 x").is_err());
        assert!(Tap::parse("TAP version 13\nok 2 x\n1..1").is_err());
    }

    #[test]
    fn diag_count_reads_the_number_before_a_word() {
        let t = Tap::parse("TAP version 13\n1..1\n# reclaim: 111 prefaulted pages (17 munmaps, 0 flushes)\nok 1 fault_around\n").unwrap();
        let r = "reclaim:";
        assert_eq!(t.diag_count("fault_around", r, "prefaulted"), 111);
        assert_eq!(t.diag_count("fault_around", r, "munmaps"), 17);
        assert_eq!(t.diag_count("fault_around", r, "flushes"), 0);
        let missing = std::panic::catch_unwind(|| t.diag_count("fault_around", r, "reclaim"));
        assert!(missing.is_err(), "no number before the first word");
    }
}
