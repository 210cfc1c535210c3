//! Cross-vCPU rendezvous: delivering remote TLB flushes (and `DETACH` root switches) before a
//! hypercall returns, and stopping the world for a host resync.
//!
//! Each vCPU has a slot: whether it is inside `KVM_RUN`, and a request/done sequence pair
//! (its mailbox). An issuer posts a request (bumps `requested`), kicks the target only if it
//! is inside `KVM_RUN` (the kick signal also sets the target's `immediate_exit`, so a kick
//! that lands just before `KVM_RUN` is never lost), and waits until the target's `done`
//! reaches the posted number. A target applies its delivery on its own thread (only the
//! owning thread may call `KVM_SET_SREGS`) before it enters `KVM_RUN` again, in two parts
//! around the acknowledgement ([`Apply`]): the engine's hand-over before, its own ioctls
//! right after (off the issuer's wait); `enter` and
//! `post` are ordered (both `SeqCst`, Dekker style) so that either the issuer sees the
//! target inside `KVM_RUN` and kicks it, or the target sees the request before it enters.
//!
//! No lock is held while waiting, and every waiting vCPU (an issuer, a parked vCPU, a
//! would-be leader) keeps servicing its own mailbox, so two vCPUs that flush each other, or
//! a target that is itself waiting, cannot deadlock. An issuer spins briefly before it
//! sleeps ([`ACK_SPIN`], only while every vCPU can have a host CPU): the acknowledgement
//! usually comes within a kick's round trip, and a futex wake-up costs tens of µs. A target that has ended counts as
//! delivered (it never runs guest code again); the wait also ends when the VM is stopping.

use shadow::VcpuSet;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering::SeqCst};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

const OUTSIDE: u8 = 0;
const IN_RUN: u8 = 1;
const ENDED: u8 = 2;

/// How long a waiter sleeps between checks (it is woken by every acknowledgement).
const POLL: Duration = Duration::from_micros(500);

/// A target still inside `KVM_RUN` after this is kicked again.
/// An issuer's spin budget before it sleeps ([`ack_spin`]).
const ACK_SPIN: Duration = Duration::from_micros(200);

/// The spin budget for `vcpus` vCPUs: [`ACK_SPIN`] while every vCPU can have a host CPU of
/// its own, else none.
fn ack_spin(vcpus: usize) -> Duration {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    if vcpus <= cpus {
        ACK_SPIN
    } else {
        Duration::ZERO
    }
}

const REKICK: Duration = Duration::from_millis(2);

/// How a vCPU applies a delivery, in two parts around its acknowledgement. `take` runs
/// before it: whatever the issuer's next steps rely on (the engine's bookkeeping of what
/// the target holds). `finish` runs right after it, on the same thread and before the vCPU
/// can enter `KVM_RUN` again (`finish` is called inside the same [`Rendezvous`] step that
/// acknowledged): the target's own KVM ioctls, which nothing else observes and which
/// therefore need not delay the issuer. A plain closure is all `take`.
pub trait Apply {
    /// The part before the acknowledgement.
    fn take(&mut self);
    /// The part after it, before the vCPU runs guest code again.
    fn finish(&mut self) {}
}

impl<F: FnMut()> Apply for F {
    fn take(&mut self) {
        self()
    }
}

/// How a vCPU thread interrupts another (the real-time kick signal in the VMM; a recorder in
/// tests).
pub trait Kicker: Send + Sync {
    /// Interrupts vCPU `v`'s thread.
    fn kick(&self, v: usize);
}

#[derive(Default)]
struct Slot {
    state: AtomicU8,
    requested: AtomicU64,
    done: AtomicU64,
    /// When it last left `KVM_RUN` (ns since [`Rendezvous::base`]).
    left_ns: AtomicU64,
    /// When it last acknowledged a request (ns since [`Rendezvous::base`]).
    acked_ns: AtomicU64,
}

#[derive(Default)]
struct Gate {
    /// The vCPU that stops the world, if any.
    leader: Option<usize>,
    /// vCPUs parked for the current stop.
    parked: VcpuSet,
    /// Completed world stops.
    epoch: u64,
}

/// Where one kick's round trip went, ns: kick to the target leaving `KVM_RUN` (signal,
/// `EINTR` exit and any wait for a CPU), leaving to acknowledging (the target's flush
/// ioctls), acknowledging to the issuer noticing (its wake-up).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KickPhases {
    /// Kick to the target's exit from `KVM_RUN`.
    pub exit_ns: u64,
    /// The exit to the acknowledgement.
    pub apply_ns: u64,
    /// The acknowledgement to the issuer seeing it.
    pub wake_ns: u64,
}

/// What one delivery cost the issuer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Delivered {
    /// Requests posted (targets that had not ended).
    pub sent: u32,
    /// Kicks sent (targets found inside `KVM_RUN`; re-kicks included).
    pub kicks: u32,
    /// Per kicked target: ns from its first kick to its acknowledgement.
    pub kick_rtt_ns: Vec<u64>,
    /// Per kicked target: where that round trip went.
    pub kick_phases: Vec<KickPhases>,
}

/// Requests posted by [`Rendezvous::post`], to wait for with [`Rendezvous::wait_acks`].
pub struct Posted {
    wait: Vec<Pending>,
    out: Delivered,
}

/// One target an issuer waits for.
struct Pending {
    vcpu: usize,
    seq: u64,
    /// When it was first kicked (ns since [`Rendezvous::base`]), if it was.
    kicked: Option<u64>,
    /// When it was last kicked or posted to.
    last: Instant,
}

/// What one world stop cost the leader.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stopped {
    /// Kicks sent to vCPUs inside `KVM_RUN`.
    pub kicks: u32,
    /// ns from the start until every other vCPU was parked.
    pub park_ns: u64,
    /// ns the world stayed stopped for the work itself.
    pub work_ns: u64,
}

/// Ends the current world stop when dropped.
struct Release<'a>(&'a Rendezvous);

impl Drop for Release<'_> {
    fn drop(&mut self) {
        let mut g = self.0.gate();
        g.leader = None;
        g.epoch += 1;
        // No parked bit outlives its stop: the next leader waits for fresh ones.
        g.parked = VcpuSet::EMPTY;
        self.0.stopping.store(false, SeqCst);
        drop(g);
        self.0.changed();
    }
}

/// The rendezvous of one VM's vCPUs.
pub struct Rendezvous {
    slots: Vec<Slot>,
    stopping: AtomicBool,
    gate: Mutex<Gate>,
    cv: Condvar,
    /// Changes of state so far (see [`Rendezvous::changed`]).
    events: AtomicU64,
    /// Threads asleep on `cv` (or about to be): a change of state notifies only if non-zero.
    sleepers: AtomicU32,
    /// Waits that went to sleep on `cv` (the rest saw the change at once).
    sleeps: AtomicU64,
    kicker: Box<dyn Kicker>,
    /// The origin of the slots' timestamps.
    base: Instant,
    /// How long an issuer spins for an acknowledgement before it sleeps (zero where the
    /// vCPUs outnumber the host's CPUs: a spinning issuer would take a target's CPU).
    spin: Duration,
}

impl Rendezvous {
    /// A rendezvous for `vcpus` vCPUs, all outside `KVM_RUN`.
    pub fn new(vcpus: usize, kicker: Box<dyn Kicker>) -> Rendezvous {
        Rendezvous {
            slots: (0..vcpus).map(|_| Slot::default()).collect(),
            stopping: AtomicBool::new(false),
            gate: Mutex::new(Gate::default()),
            cv: Condvar::new(),
            events: AtomicU64::new(0),
            sleepers: AtomicU32::new(0),
            sleeps: AtomicU64::new(0),
            kicker,
            base: Instant::now(),
            spin: ack_spin(vcpus),
        }
    }

    fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    /// Publishes a change of state (an acknowledgement, a request, a park, an end, a new
    /// leader, a release) to the waiters. The change itself is stored (`SeqCst`) before
    /// this bumps `events` and reads `sleepers`; a sleeper counts itself in under the gate
    /// lock before it re-reads `events`, so either it sees the bump or it is counted here
    /// and woken under the lock.
    fn changed(&self) {
        self.events.fetch_add(1, SeqCst);
        if self.sleepers.load(SeqCst) > 0 {
            let _g = self.gate();
            self.cv.notify_all();
        }
    }

    /// The current change count, read before a waiter checks its condition.
    fn seen(&self) -> u64 {
        self.events.load(SeqCst)
    }

    /// Waits until some state changed since `seen` or about `POLL` passed: a sleep on the
    /// condvar that every change wakes (see [`Rendezvous::changed`]). No spin and no
    /// `sched_yield` first: a kick's round trip is never shorter than tens of µs here, and
    /// where threads outnumber free cores (the measured hosts: 2 cores shared with other
    /// work, the SVM bed's 2 emulated CPUs) a spinning waiter takes the CPU the vCPU it
    /// waits for needs, and a yielding one hands it to other work for a whole time slice;
    /// both measured slower than sleeping at once.
    /// Spins until something changed since `seen` or `self.spin` passed, then sleeps as
    /// [`Rendezvous::wait_change`] if nothing did: a sleeping issuer pays a futex wake
    /// (tens of µs on a loaded host) on top of every kick's round trip.
    fn wait_change_spinning(&self, seen: u64) {
        if !self.spin.is_zero() {
            let t = Instant::now();
            while self.events.load(SeqCst) == seen && t.elapsed() < self.spin {
                std::hint::spin_loop();
            }
        }
        self.wait_change(seen);
    }

    fn wait_change(&self, seen: u64) {
        let g = self.gate();
        self.sleepers.fetch_add(1, SeqCst);
        let g = if self.events.load(SeqCst) == seen {
            self.sleeps.fetch_add(1, SeqCst);
            self.cv
                .wait_timeout(g, POLL)
                .map_or_else(|p| p.into_inner().0, |r| r.0)
        } else {
            g
        };
        self.sleepers.fetch_sub(1, SeqCst);
        drop(g);
    }

    fn gate(&self) -> MutexGuard<'_, Gate> {
        self.gate.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn state(&self, v: usize) -> u8 {
        self.slots.get(v).map_or(ENDED, |s| s.state.load(SeqCst))
    }

    /// vCPU `me` is about to enter `KVM_RUN`: true if it may; false if it has a request or
    /// must park first (it is then outside again: call [`Rendezvous::service`]).
    pub fn enter(&self, me: usize) -> bool {
        let Some(s) = self.slots.get(me) else {
            return true;
        };
        s.state.store(IN_RUN, SeqCst);
        if s.requested.load(SeqCst) > s.done.load(SeqCst) || self.stopping.load(SeqCst) {
            s.state.store(OUTSIDE, SeqCst);
            return false;
        }
        true
    }

    /// vCPU `me` left `KVM_RUN`.
    pub fn left(&self, me: usize) {
        if let Some(s) = self.slots.get(me) {
            s.left_ns.store(self.now_ns(), SeqCst);
            s.state.store(OUTSIDE, SeqCst);
        }
    }

    /// vCPU `me` will never run guest code again: nobody waits for it any more.
    pub fn ended(&self, me: usize) {
        if let Some(s) = self.slots.get(me) {
            s.state.store(ENDED, SeqCst);
        }
        self.changed();
    }

    /// Applies `me`'s delivery with `apply` if one was requested, acknowledging it between
    /// [`Apply::take`] and [`Apply::finish`]; then,
    /// if another vCPU is stopping the world, parks until it is done (servicing meanwhile).
    pub fn service(&self, me: usize, apply: &mut dyn Apply) {
        self.ack(me, apply);
        if self.stopping.load(SeqCst) {
            self.park(me, apply);
        }
    }

    /// Applies and acknowledges a pending request of `me` (take, acknowledge, finish); true
    /// if there was one.
    fn ack(&self, me: usize, apply: &mut dyn Apply) -> bool {
        let Some(s) = self.slots.get(me) else {
            return false;
        };
        let r = s.requested.load(SeqCst);
        if r <= s.done.load(SeqCst) {
            return false;
        }
        apply.take();
        s.acked_ns.store(self.now_ns(), SeqCst);
        s.done.store(r, SeqCst);
        self.changed();
        apply.finish();
        true
    }

    /// Parks `me` while a world stop led by another vCPU is on.
    fn park(&self, me: usize, apply: &mut dyn Apply) {
        let mut g = self.gate();
        if g.leader.is_none_or(|l| l == me) {
            return;
        }
        let epoch = g.epoch;
        g.parked |= VcpuSet::one(me);
        drop(g);
        self.changed();
        loop {
            let seen = self.seen();
            self.ack(me, apply);
            if self.gate().epoch != epoch {
                break;
            }
            self.wait_change(seen);
        }
    }

    /// Posts a delivery request to every vCPU of `targets` (not `me`), then kicks those
    /// inside `KVM_RUN` (all before waiting, so the targets flush in parallel), and waits
    /// until each has acknowledged (or ended, or `stop` is set), servicing `me`'s own
    /// mailbox and world stops meanwhile. Targets outside `KVM_RUN` get no signal: they
    /// apply before they enter, and those waiting in the rendezvous are woken.
    pub fn deliver(
        &self,
        me: usize,
        targets: VcpuSet,
        stop: &AtomicBool,
        apply: &mut dyn Apply,
    ) -> Delivered {
        let posted = self.post(me, targets, true);
        self.wait_acks(me, posted, stop, apply)
    }

    /// Posts a delivery request to every live vCPU of `targets` but `me`; with `kick`, kicks
    /// those inside `KVM_RUN` once every request is out. Without `kick` the caller must
    /// get them out otherwise (a world stop kicks every vCPU inside `KVM_RUN`, and each
    /// applies its request before it parks). Wait with [`Rendezvous::wait_acks`].
    pub fn post(&self, me: usize, targets: VcpuSet, kick: bool) -> Posted {
        let mut out = Delivered::default();
        let mut wait: Vec<Pending> = Vec::new();
        for w in targets.without(me).iter() {
            let Some(s) = self.slots.get(w) else { continue };
            if s.state.load(SeqCst) == ENDED {
                continue;
            }
            let seq = s.requested.fetch_add(1, SeqCst) + 1;
            out.sent += 1;
            let last = Instant::now();
            wait.push(Pending {
                vcpu: w,
                seq,
                kicked: None,
                last,
            });
        }
        if wait.is_empty() {
            return Posted { wait, out };
        }
        self.changed();
        if kick {
            for p in &mut wait {
                if self.state(p.vcpu) == IN_RUN {
                    p.kicked = Some(self.now_ns());
                    self.kicker.kick(p.vcpu);
                    out.kicks += 1;
                }
            }
        }
        Posted { wait, out }
    }

    /// Waits until every target of `posted` acknowledged (or ended, or `stop` is set),
    /// servicing `me`'s mailbox and world stops meanwhile, and re-kicking a target still
    /// inside `KVM_RUN` after `REKICK`.
    pub fn wait_acks(
        &self,
        me: usize,
        posted: Posted,
        stop: &AtomicBool,
        apply: &mut dyn Apply,
    ) -> Delivered {
        let Posted { mut wait, mut out } = posted;
        while !wait.is_empty() {
            let seen = self.seen();
            self.service(me, apply);
            wait.retain(|p| !self.acked(p, &mut out));
            if wait.is_empty() || stop.load(SeqCst) {
                break;
            }
            self.rekick(&mut wait, &mut out);
            self.wait_change_spinning(seen);
        }
        out
    }

    /// Whether the target of `p` acknowledged (or ended); records the kick's round trip.
    fn acked(&self, p: &Pending, out: &mut Delivered) -> bool {
        let Some(s) = self.slots.get(p.vcpu) else {
            return true;
        };
        if s.done.load(SeqCst) >= p.seq {
            if let Some(k) = p.kicked {
                let now = self.now_ns();
                // Approximate when the target acknowledged several requests meanwhile.
                let acked = s.acked_ns.load(SeqCst).clamp(k, now);
                let left = s.left_ns.load(SeqCst).min(acked);
                out.kick_rtt_ns.push(now - k);
                out.kick_phases.push(KickPhases {
                    exit_ns: left.saturating_sub(k),
                    apply_ns: acked - left.max(k),
                    wake_ns: now - acked,
                });
            }
            return true;
        }
        s.state.load(SeqCst) == ENDED
    }

    /// Kicks again the targets still inside `KVM_RUN` `REKICK` after their last kick.
    fn rekick(&self, wait: &mut [Pending], out: &mut Delivered) {
        for p in wait.iter_mut() {
            if self.state(p.vcpu) == IN_RUN && p.last.elapsed() >= REKICK {
                p.kicked.get_or_insert(self.now_ns());
                self.kicker.kick(p.vcpu);
                out.kicks += 1;
                p.last = Instant::now();
            }
        }
    }

    /// Stops the world: waits to become the leader (parking for other leaders meanwhile),
    /// kicks every vCPU inside `KVM_RUN` (only those: the others park on their way in, or
    /// are woken where they wait), waits until every other vCPU is parked or ended (or
    /// `stop` is set), runs `work` (given `apply`, to deliver while the world is stopped),
    /// and releases them. `me` services its mailbox while it waits. Returns `work`'s result
    /// (`None` if the VM stopped first) and the cost.
    pub fn stop_world<R>(
        &self,
        me: usize,
        stop: &AtomicBool,
        apply: &mut dyn Apply,
        work: impl FnOnce(&mut dyn Apply) -> R,
    ) -> (Option<R>, Stopped) {
        let t0 = Instant::now();
        let mut cost = Stopped::default();
        loop {
            let mut g = self.gate();
            if g.leader.is_none() {
                g.leader = Some(me);
                self.stopping.store(true, SeqCst);
                break;
            }
            drop(g);
            self.service(me, apply);
            if stop.load(SeqCst) {
                return (None, cost);
            }
        }
        self.changed();
        let others = VcpuSet::first(self.slots.len()).without(me);
        let mut last_kick: Option<Instant> = None;
        loop {
            let seen = self.seen();
            self.ack(me, apply);
            let g = self.gate();
            let waiting: Vec<usize> = others
                .iter()
                .filter(|&w| !g.parked.contains(w) && self.state(w) != ENDED)
                .collect();
            drop(g);
            if waiting.is_empty() || stop.load(SeqCst) {
                break;
            }
            if last_kick.is_none_or(|t| t.elapsed() >= REKICK) {
                for &w in &waiting {
                    if self.state(w) == IN_RUN {
                        self.kicker.kick(w);
                        cost.kicks += 1;
                    }
                }
                last_kick = Some(Instant::now());
            }
            self.wait_change(seen);
        }
        cost.park_ns = t0.elapsed().as_nanos() as u64;
        let t1 = Instant::now();
        // Released even if `work` panics: a world left stopped would hang every vCPU.
        let release = Release(self);
        let r = (!stop.load(SeqCst)).then(|| work(apply));
        drop(release);
        cost.work_ns = t1.elapsed().as_nanos() as u64;
        (r, cost)
    }

    /// Whether no vCPU other than `me` can be inside `KVM_RUN` (tests and checks).
    pub fn others_outside(&self, me: usize) -> bool {
        (0..self.slots.len()).all(|w| w == me || self.state(w) != IN_RUN)
    }
}

#[cfg(test)]
mod tests;
