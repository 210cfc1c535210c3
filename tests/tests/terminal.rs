//! The console on a terminal (a pty): the escape sequence, signals, and the terminal state
//! afterwards. Each run boots a guest that never ends on its own (a POST-port loop).

use pvmm_e2e::*;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A pvmm child whose stdin, stdout and stderr are the slave side of a fresh pty.
struct OnPty {
    child: Child,
    master: std::fs::File,
    slave: OwnedFd,
    kernel: std::path::PathBuf,
}

fn spawn_on_pty(name: &str, extra: &[&str]) -> OnPty {
    let kernel = temp(&format!("{name}-loop.elf"));
    // `out 0x80, al; jmp .-2`: runs until the VMM stops it.
    std::fs::write(&kernel, tiny_elf(0x10_0000, &[0xe6, 0x80, 0xeb, 0xfc])).unwrap();
    let (mut m, mut s) = (0, 0);
    // SAFETY: openpty writes two descriptors into the out parameters; no name/termios/size.
    let rc = unsafe {
        libc::openpty(
            &mut m,
            &mut s,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty");
    // SAFETY: both descriptors were just returned by openpty and are owned here.
    let (master, slave) = unsafe { (std::fs::File::from_raw_fd(m), OwnedFd::from_raw_fd(s)) };
    let io = || Stdio::from(slave.try_clone().unwrap());
    let mut args = vec![
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--hypercall",
        "pio",
    ];
    args.extend_from_slice(extra);
    let child = Command::new(pvmm_bin())
        .args(&args)
        .stdin(io())
        .stdout(io())
        .stderr(io())
        .spawn()
        .unwrap();
    OnPty {
        child,
        master,
        slave,
        kernel,
    }
}

impl OnPty {
    fn lflag(&self) -> libc::tcflag_t {
        // SAFETY: termios is plain data; tcgetattr fills it for a valid descriptor.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: as above, on the slave descriptor we own.
        let r = unsafe { libc::tcgetattr(self.slave.as_raw_fd(), &mut t) };
        assert_eq!(r, 0);
        t.c_lflag
    }

    /// Waits (up to 60 s) until the terminal is in raw mode, i.e. pvmm owns the console.
    fn wait_raw(&self) {
        let t = Instant::now();
        while self.lflag() & libc::ICANON != 0 {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "never entered raw mode"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the exit; returns (code, everything printed).
    fn finish(mut self) -> (Option<i32>, String) {
        let t = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if t.elapsed() > Duration::from_secs(60) {
                let _ = self.child.kill();
                panic!("pvmm did not end");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let restored = self.lflag() & (libc::ICANON | libc::ECHO) == (libc::ICANON | libc::ECHO);
        let fd = self.master.as_raw_fd();
        // SAFETY: O_NONBLOCK on our own master descriptor, to drain what is buffered.
        unsafe { libc::fcntl(fd, libc::F_SETFL, libc::O_NONBLOCK) };
        let mut out = Vec::new();
        let mut buf = [0u8; 65536];
        while let Ok(n) = self.master.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        let _ = std::fs::remove_file(&self.kernel);
        let text = String::from_utf8_lossy(&out).into_owned();
        assert!(restored, "terminal left in raw mode; output: {text}");
        (status.code(), text)
    }
}

#[test]
fn ctrl_a_x_ends_the_vm_with_the_report_and_restores_the_terminal() {
    if !kvm_available("ctrl_a_x_ends_the_vm_with_the_report_and_restores_the_terminal") {
        return;
    }
    let mut p = spawn_on_pty("escape", &[]);
    p.wait_raw();
    use std::io::Write;
    // Ctrl-C, Ctrl-\ and Ctrl-D are the guest's; Ctrl-a x is pvmm's.
    p.master.write_all(b"\x03\x1c\x04").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        p.child.try_wait().unwrap().is_none(),
        "guest keys do not end pvmm"
    );
    p.master.write_all(b"\x01x").unwrap();
    let (code, out) = p.finish();
    assert_eq!(code, Some(130), "{out}");
    assert!(out.contains("ended from the console (Ctrl-a x)"), "{out}");
    assert!(
        out.contains("pvmm exit statistics"),
        "report printed: {out}"
    );
}

#[test]
fn stop_signals_end_the_vm_cleanly_on_a_terminal() {
    if !kvm_available("stop_signals_end_the_vm_cleanly_on_a_terminal") {
        return;
    }
    for (sig, name) in [
        (libc::SIGTERM, "SIGTERM"),
        (libc::SIGHUP, "SIGHUP"),
        (libc::SIGINT, "SIGINT"),
    ] {
        let p = spawn_on_pty(name, &[]);
        p.wait_raw();
        // SAFETY: sending a signal to our own child.
        assert_eq!(unsafe { libc::kill(p.child.id() as i32, sig) }, 0);
        let (code, out) = p.finish();
        assert_eq!(code, Some(128 + sig), "{name}: {out}");
        assert!(out.contains(&format!("ended by {name}")), "{name}: {out}");
        assert!(
            out.contains("pvmm exit statistics"),
            "{name}: report: {out}"
        );
    }
}

#[test]
fn a_signal_without_a_terminal_still_prints_json_stats() {
    if !kvm_available("a_signal_without_a_terminal_still_prints_json_stats") {
        return;
    }
    let kernel = temp("sig-json-loop.elf");
    std::fs::write(&kernel, tiny_elf(0x10_0000, &[0xe6, 0x80, 0xeb, 0xfc])).unwrap();
    let child = Command::new(pvmm_bin())
        .args([
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--serial",
            "none",
        ])
        .args(["--stats", "json", "--hypercall", "pio"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    // SAFETY: sending a signal to our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let out = child.wait_with_output().unwrap();
    let _ = std::fs::remove_file(&kernel);
    assert_eq!(out.status.code(), Some(143));
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("stdout is exactly the JSON report");
    assert_eq!(v["vm"]["end_reason"], "signal");
    assert_eq!(v["vm"]["exit_code"], 143);
}
