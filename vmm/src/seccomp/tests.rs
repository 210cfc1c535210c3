//! The allow-lists checked as tables and as installed filters (in forked children, so the
//! test process itself stays unfiltered).

use super::rules::{allowed, Allowed, Context};
use super::*;

fn ctx() -> Context {
    Context {
        pid: std::process::id(),
        kick_signal: crate::kick::kick_signal(),
    }
}

/// Syscalls no thread may make: file opening, programs, processes, network, debugging.
const FORBIDDEN: [i64; 14] = [
    libc::SYS_execve,
    libc::SYS_execveat,
    libc::SYS_open,
    libc::SYS_openat,
    libc::SYS_openat2,
    libc::SYS_creat,
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_ptrace,
    libc::SYS_fork,
    libc::SYS_vfork,
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_process_vm_writev,
];

#[test]
fn no_list_allows_opening_executing_forking_networking_or_tracing() {
    for kind in ThreadKind::ALL {
        let list = allowed(kind, &ctx());
        let map = rule_map(&list).unwrap();
        for nr in FORBIDDEN {
            assert!(
                !map.contains_key(&nr),
                "{kind:?} allows {}",
                names::name(nr).unwrap_or("?")
            );
        }
    }
}

#[test]
fn entries_are_named_explained_and_unambiguous() {
    for kind in ThreadKind::ALL {
        let list = allowed(kind, &ctx());
        for a in &list {
            assert!(names::name(a.nr).is_some(), "{kind:?}: unnamed {}", a.nr);
            assert!(a.why.len() > 10, "{kind:?}: {} has no reason", a.nr);
            // An unconditional entry next to conditional ones would silently become
            // conditional (seccompiler ORs the rules of one syscall).
            let same: Vec<&Allowed> = list.iter().filter(|b| b.nr == a.nr).collect();
            assert!(
                same.len() == 1 || same.iter().all(|b| !b.args.is_empty()),
                "{kind:?}: {} mixes unconditional and conditional entries",
                a.nr
            );
        }
        let mut v: Vec<_> = list.iter().map(|a| (a.nr, a.args.clone())).collect();
        v.sort_by_key(|(n, _)| *n);
        let before = v.len();
        v.dedup();
        assert_eq!(v.len(), before, "{kind:?}: duplicate entry");
    }
}

#[test]
fn vcpu_ioctls_are_filtered_by_request_and_memory_is_never_executable() {
    let list = allowed(ThreadKind::Vcpu, &ctx());
    let ioctl: Vec<u64> = list
        .iter()
        .filter(|a| a.nr == libc::SYS_ioctl)
        .filter_map(|a| {
            a.args.iter().find_map(|c| match c {
                Arg::Is(1, v) => Some(*v),
                _ => None,
            })
        })
        .collect();
    for want in [
        ioctls::KVM_RUN(),
        ioctls::KVM_GET_SREGS(),
        ioctls::KVM_SET_SREGS(),
        ioctls::KVM_GET_REGS(),
        ioctls::KVM_SET_USER_MEMORY_REGION(),
        ioctls::KVM_SET_MSRS(),
        ioctls::KVM_GET_DIRTY_LOG(),
    ] {
        assert!(ioctl.contains(&want), "{want:#x} missing");
    }
    assert!(list
        .iter()
        .filter(|a| a.nr == libc::SYS_ioctl)
        .all(|a| !a.args.is_empty()));
    for nr in [libc::SYS_mmap, libc::SYS_mprotect] {
        let a = list.iter().find(|a| a.nr == nr).unwrap();
        assert_eq!(a.args, vec![Arg::Without(2, libc::PROT_EXEC as u64)]);
    }
    // The supervisor and the vCPUs (remote flushes, world stops) signal, and only our own
    // process with the kick signal; the stdin thread never.
    assert!(!allowed(ThreadKind::Stdin, &ctx())
        .iter()
        .any(|a| a.nr == libc::SYS_tgkill || a.nr == libc::SYS_kill));
    for kind in [ThreadKind::Vcpu, ThreadKind::Supervisor] {
        let l = allowed(kind, &ctx());
        assert!(!l.iter().any(|a| a.nr == libc::SYS_kill));
        let t = l.iter().find(|a| a.nr == libc::SYS_tgkill).unwrap();
        assert_eq!(
            t.args,
            vec![
                Arg::Is(0, u64::from(std::process::id())),
                Arg::Is(2, crate::kick::kick_signal() as u64)
            ]
        );
    }
}

/// Runs `body` in a forked child under `kind`'s filter in `mode`; returns its exit status
/// and what it wrote to stderr. The child only makes async-signal-safe calls.
fn in_child(mode: SeccompMode, kind: ThreadKind, body: fn() -> i32) -> (i32, String) {
    let prog = program(&allowed(kind, &ctx())).unwrap();
    let mut fds = [0; 2];
    // SAFETY: a pipe into a valid array.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: the child runs only async-signal-safe code and ends with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: plumbing in the child, then the code under test.
        unsafe {
            libc::dup2(fds[1], 2);
            if sigsys::install(mode).is_err() || seccompiler::apply_filter(&prog).is_err() {
                libc::_exit(90);
            }
            libc::_exit(body());
        }
    }
    // SAFETY: closing our copy of the write end.
    unsafe { libc::close(fds[1]) };
    let mut err = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        // SAFETY: reading into a valid buffer.
        let n = unsafe { libc::read(fds[0], buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            break;
        }
        err.extend_from_slice(&buf[..n as usize]);
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe {
        libc::close(fds[0]);
        libc::waitpid(pid, &mut status, 0);
    }
    assert!(libc::WIFEXITED(status), "child died by signal: {status:#x}");
    (
        libc::WEXITSTATUS(status),
        String::from_utf8_lossy(&err).into(),
    )
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// In log mode every forbidden call fails with EPERM and never runs.
fn forbidden_calls_fail() -> i32 {
    let path = c"/bin/true".as_ptr();
    let argv = [path, std::ptr::null()];
    // SAFETY: raw syscalls with valid pointers; each one is expected to be refused, and a
    // fork that was not refused ends its child at once.
    unsafe {
        let calls: [(i64, [usize; 3]); 6] = [
            (
                libc::SYS_socket,
                [libc::AF_INET as usize, libc::SOCK_STREAM as usize, 0],
            ),
            (
                libc::SYS_openat,
                [libc::AT_FDCWD as usize, path as usize, 0],
            ),
            (libc::SYS_execve, [path as usize, argv.as_ptr() as usize, 0]),
            (libc::SYS_ptrace, [libc::PTRACE_TRACEME as usize, 0, 0]),
            (libc::SYS_fork, [0, 0, 0]),
            (libc::SYS_clone, [libc::SIGCHLD as usize, 0, 0]),
        ];
        for (i, (nr, a)) in calls.iter().enumerate() {
            let r = libc::syscall(*nr, a[0], a[1], a[2]);
            if r == 0 && (*nr == libc::SYS_fork || *nr == libc::SYS_clone) {
                libc::_exit(80);
            }
            if r != -1 || errno() != libc::EPERM {
                return 10 + i as i32;
            }
        }
        // glibc's overcommit probe is refused quietly with EACCES.
        let probe = c"/proc/sys/vm/overcommit_memory".as_ptr();
        if libc::syscall(libc::SYS_openat, libc::AT_FDCWD, probe, libc::O_RDONLY) != -1
            || errno() != libc::EACCES
        {
            return 20;
        }
        // An allowed call still works.
        if libc::syscall(libc::SYS_write, 2, c"ok\n".as_ptr(), 3) != 3 {
            return 21;
        }
    }
    0
}

#[test]
fn installed_filters_refuse_forbidden_calls_in_log_mode() {
    for kind in ThreadKind::ALL {
        let (code, err) = in_child(SeccompMode::Log, kind, forbidden_calls_fail);
        assert_eq!(code, 0, "{kind:?}: stderr {err}");
        let lines: Vec<&str> = err.lines().collect();
        // Only the first violation is reported, by name, then the allowed write.
        assert_eq!(lines.len(), 2, "{err}");
        assert!(
            lines[0].contains("made syscall socket (41) outside its allow-list")
                && lines[0].contains("--seccomp log"),
            "{err}"
        );
        assert_eq!(lines[1], "ok");
    }
}

fn socket_then_survive() -> i32 {
    sigsys::provoke_violation();
    // Reached only if the violation did not end the process.
    0
}

#[test]
fn installed_filters_kill_with_the_documented_code_and_line() {
    for kind in ThreadKind::ALL {
        let (code, err) = in_child(SeccompMode::Kill, kind, socket_then_survive);
        assert_eq!(code, crate::error::exit_code::SECCOMP, "{kind:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.contains("made syscall socket (41) outside its allow-list; VM killed"),
            "{err}"
        );
    }
}

#[test]
fn reports_name_the_thread_and_fall_back_to_numbers() {
    let mut s = String::new();
    let v = sigsys::Violation {
        nr: 99_999,
        thread: sigsys::ThreadLabel::new(ThreadKind::Vcpu, 3),
        count: 2,
    };
    sigsys::describe(&v, true, &mut s).unwrap();
    assert!(
        s.starts_with("pvmm: seccomp: thread vcpu3 made syscall #99999 "),
        "{s}"
    );
    assert!(s.ends_with("exit code 208)"), "{s}");
}
