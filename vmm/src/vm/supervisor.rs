//! The supervisor: starts the console and one thread per vCPU, waits for the first vCPU to
//! end or the timeout, writes interval statistics, then stops and joins everything.

use super::build::{BuiltVm, SnapshotReplies};
use crate::cli::{RunArgs, SerialMode};
use crate::console::{self, RawModeGuard};
use crate::error::SetupError;
use crate::hcall::Dispatcher;
use crate::seccomp::ThreadKind;
use crate::stats::interval::IntervalWriter;
use crate::stats::report::VmInfo;
use crate::stats::VcpuStats;
use crate::vcpu::{VcpuEnd, VcpuResult};
use crate::{kick, signals};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How the vCPUs ended.
pub struct Ended {
    /// The first end reason other than "stopped" (what ends the VM).
    pub first_end: Option<VcpuEnd>,
    /// The timeout expired first.
    pub timed_out: bool,
    /// A stop signal (or the console escape) ended the VM: its number.
    pub signal: Option<i32>,
    /// Every vCPU's result, in index order (missing if its thread died).
    pub results: Vec<Option<VcpuResult>>,
}

/// Periodic statistics: when, where to, and the snapshot channel.
struct Interval {
    every: Duration,
    next: Instant,
    out: IntervalWriter<Box<dyn std::io::Write + Send>>,
    epoch: Arc<AtomicU64>,
    replies: mpsc::Receiver<(usize, VcpuStats)>,
    last: Vec<VcpuStats>,
}

/// Runs `vm` to its end.
pub fn supervise(
    vm: BuiltVm,
    args: &RunArgs,
    started: Instant,
    running: VmInfo,
) -> Result<Ended, SetupError> {
    let count = vm.vcpus.len();
    signals::install().map_err(|e| SetupError::other("installing signal handlers", e))?;
    let mut interval = interval(args, vm.snapshots, count, running)?;
    // Stdin reaches the guest only when it is a terminal (in raw mode) or a FIFO.
    let interactive = args.serial == SerialMode::Stdio && console::stdin_is_interactive();
    let raw = interactive.then(RawModeGuard::enter).flatten();
    let stdin_thread = interactive
        .then(|| console::spawn_stdin(vm.serial.clone(), vm.stop.clone(), vm.filters.clone()).ok())
        .flatten();
    let (tx, rx) = mpsc::channel::<(usize, VcpuResult)>();
    let mut threads = Vec::with_capacity(count);
    for v in vm.vcpus {
        let tx = tx.clone();
        let idx = v.index;
        let t = std::thread::Builder::new()
            .name(format!("pvmm-vcpu{idx}"))
            .spawn(move || {
                let _ = tx.send((idx, v.run()));
            })
            .map_err(|e| SetupError::other("spawning vCPU thread", e))?;
        threads.push(t);
    }
    drop(tx);
    if args.seccomp_supervisor {
        if let Err(e) = vm.filters.install(ThreadKind::Supervisor, 0) {
            // Nothing guest-fed has been handled yet: stop the vCPUs and give up.
            vm.stop.store(true, Ordering::Release);
            threads.iter().for_each(kick::kick);
            threads.into_iter().for_each(|t| drop(t.join()));
            return Err(SetupError::other("seccomp", e));
        }
    }
    let deadline = args
        .timeout
        .map(|s| Instant::now() + Duration::from_secs_f64(s));
    let ended = wait(
        &rx,
        &threads,
        &vm.stop,
        deadline,
        interval.as_mut(),
        &vm.dispatcher,
        started,
    );
    vm.stop.store(true, Ordering::Release);
    // A thread that never answered is left running; exiting the process ends it.
    for (i, t) in threads.into_iter().enumerate() {
        let answered = ended.results.get(i).is_some_and(Option::is_some);
        if answered || t.is_finished() {
            let _ = t.join();
        }
    }
    if let Some(t) = stdin_thread {
        let _ = t.join();
    }
    drop(raw);
    Ok(ended)
}

fn interval(
    args: &RunArgs,
    snapshots: Option<SnapshotReplies>,
    count: usize,
    running: VmInfo,
) -> Result<Option<Interval>, SetupError> {
    let (Some(secs), Some((epoch, replies))) = (args.stats_interval, snapshots) else {
        return Ok(None);
    };
    let every = Duration::from_secs_f64(secs);
    Ok(Some(Interval {
        every,
        next: Instant::now() + every,
        out: IntervalWriter::new(interval_sink(args)?, running),
        epoch,
        replies,
        last: vec![VcpuStats::default(); count],
    }))
}

/// Waits for every vCPU result; on the first end (or the timeout) stops the others.
fn wait(
    rx: &mpsc::Receiver<(usize, VcpuResult)>,
    threads: &[JoinHandle<()>],
    stop: &AtomicBool,
    deadline: Option<Instant>,
    mut interval: Option<&mut Interval>,
    dispatcher: &Dispatcher,
    started: Instant,
) -> Ended {
    let count = threads.len();
    let mut ended = Ended {
        first_end: None,
        timed_out: false,
        signal: None,
        results: (0..count).map(|_| None).collect(),
    };
    let mut received = 0;
    let mut ending_since = None;
    while received < count {
        let ending = ended.first_end.is_some() || ended.timed_out || ended.signal.is_some();
        let now = Instant::now();
        if ending && *ending_since.get_or_insert(now) + STOP_GRACE < now {
            log::warn!(
                "{} vCPU thread(s) did not stop within {STOP_GRACE:?}; not waiting for them",
                count - received
            );
            break;
        }
        let wake = if ending {
            now + Duration::from_millis(10)
        } else {
            // Wake at least every SIGNAL_POLL to notice a stop signal.
            [deadline, interval.as_ref().map(|i| i.next)]
                .into_iter()
                .flatten()
                .fold(now + SIGNAL_POLL, Instant::min)
        };
        let msg = match receive(rx, Some(wake)) {
            Ok(m) => m,
            Err(()) => break,
        };
        match msg {
            None if ending => {}
            None if signals::pending().is_some() => ended.signal = signals::pending(),
            None if deadline.is_some_and(|d| Instant::now() >= d) => ended.timed_out = true,
            None => {
                if let Some(i) = interval.as_deref_mut() {
                    i.tick(threads, count - received, dispatcher, started);
                }
            }
            Some((idx, r)) => {
                let outside = ended.timed_out || ended.signal.is_some();
                if ended.first_end.is_none() && r.end != VcpuEnd::Stopped && !outside {
                    ended.first_end = Some(r.end.clone());
                }
                if let Some(slot) = ended.results.get_mut(idx) {
                    *slot = Some(r);
                }
                received += 1;
            }
        }
        if ended.first_end.is_some() || ended.timed_out || ended.signal.is_some() {
            stop.store(true, Ordering::Release);
            threads.iter().for_each(kick::kick);
        }
    }
    ended
}

/// How long vCPU threads get to leave `KVM_RUN` once the VM ends (a vCPU stuck in the
/// kernel must not hang pvmm: the process exit ends it).
const STOP_GRACE: Duration = Duration::from_secs(5);

/// How often the supervisor looks for a stop signal.
const SIGNAL_POLL: Duration = Duration::from_millis(50);

/// The next result, `None` at `wake`; `Err` when every sender is gone.
fn receive<T>(rx: &mpsc::Receiver<T>, wake: Option<Instant>) -> Result<Option<T>, ()> {
    match wake {
        Some(w) => match rx.recv_timeout(w.saturating_duration_since(Instant::now())) {
            Ok(m) => Ok(Some(m)),
            Err(mpsc::RecvTimeoutError::Timeout) => Ok(None),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(()),
        },
        None => rx.recv().map(Some).map_err(|_| ()),
    }
}

impl Interval {
    /// When due: asks every running vCPU for a snapshot (kicking it out of `KVM_RUN`),
    /// collects the replies and writes one interval line.
    fn tick(
        &mut self,
        threads: &[JoinHandle<()>],
        running: usize,
        dispatcher: &Dispatcher,
        started: Instant,
    ) {
        if Instant::now() < self.next {
            return;
        }
        self.epoch.fetch_add(1, Ordering::AcqRel);
        threads.iter().for_each(kick::kick);
        for _ in 0..running {
            match self.replies.recv_timeout(Duration::from_millis(200)) {
                Ok((idx, s)) => {
                    if let Some(slot) = self.last.get_mut(idx) {
                        *slot = s;
                    }
                }
                Err(_) => break,
            }
        }
        let now = started.elapsed().as_nanos() as u64;
        if let Err(e) = self.out.write(now, &self.last, dispatcher.mmu_report()) {
            log::warn!("writing interval statistics: {e}");
        }
        self.next += self.every;
    }
}

/// Where interval lines go: the stats file (which `pvmm` created before the VM started;
/// appended to) or stdout (never shared with the console: see `RunArgs::validate`).
fn interval_sink(args: &RunArgs) -> Result<Box<dyn std::io::Write + Send>, SetupError> {
    Ok(match &args.stats_file {
        Some(p) => Box::new(crate::error::open_output(p)?),
        None => Box::new(std::io::stdout()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest_ram::GuestRam;
    use std::sync::Arc;

    /// A vCPU thread that never answers (stuck in the kernel) does not hang the supervisor:
    /// after the timeout it waits STOP_GRACE, then gives up on it.
    #[test]
    fn a_vcpu_that_never_stops_does_not_hang_the_supervisor() {
        kick::install().unwrap();
        let (_tx, rx) = mpsc::channel::<(usize, VcpuResult)>();
        let release = Arc::new(AtomicBool::new(false));
        let r = release.clone();
        let stuck = std::thread::spawn(move || {
            while !r.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        let threads = [stuck];
        let stop = AtomicBool::new(false);
        let dispatcher = Dispatcher::new(GuestRam::for_test(1 << 20), 1, None);
        let t = Instant::now();
        let ended = wait(&rx, &threads, &stop, Some(t), None, &dispatcher, t);
        let took = t.elapsed();
        release.store(true, Ordering::Release);
        assert!(ended.timed_out && ended.results[0].is_none());
        assert!(stop.load(Ordering::Acquire), "the vCPUs were told to stop");
        assert!(took >= STOP_GRACE && took < STOP_GRACE * 3, "{took:?}");
    }
}
