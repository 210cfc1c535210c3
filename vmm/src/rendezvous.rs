//! Cross-vCPU rendezvous: delivering remote TLB flushes (and `DETACH` root switches) before a
//! hypercall returns, and stopping the world for a host resync.
//!
//! Each vCPU has a slot: whether it is inside `KVM_RUN`, and a request/done sequence pair
//! (its mailbox). An issuer posts a request (bumps `requested`), kicks the target only if it
//! is inside `KVM_RUN` (the kick signal also sets the target's `immediate_exit`, so a kick
//! that lands just before `KVM_RUN` is never lost), and waits until the target's `done`
//! reaches the posted number. A target applies its delivery on its own thread (only the
//! owning thread may call `KVM_SET_SREGS`) before it enters `KVM_RUN` again; `enter` and
//! `post` are ordered (both `SeqCst`, Dekker style) so that either the issuer sees the
//! target inside `KVM_RUN` and kicks it, or the target sees the request before it enters.
//!
//! No lock is held while waiting, and every waiting vCPU (an issuer, a parked vCPU, a
//! would-be leader) keeps servicing its own mailbox, so two vCPUs that flush each other, or
//! a target that is itself waiting, cannot deadlock. A target that has ended counts as
//! delivered (it never runs guest code again); the wait also ends when the VM is stopping.

use shadow::VcpuSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::SeqCst};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

const OUTSIDE: u8 = 0;
const IN_RUN: u8 = 1;
const ENDED: u8 = 2;

/// How long a waiter sleeps between checks (it is woken by every acknowledgement).
const POLL: Duration = Duration::from_micros(500);
/// A target still inside `KVM_RUN` after this is kicked again.
const REKICK: Duration = Duration::from_millis(2);

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

/// What one delivery cost the issuer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Delivered {
    /// Requests posted (targets that had not ended).
    pub sent: u32,
    /// Kicks sent (targets found inside `KVM_RUN`; re-kicks included).
    pub kicks: u32,
    /// Per kicked target: ns from its first kick to its acknowledgement.
    pub kick_rtt_ns: Vec<u64>,
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
        self.0.cv.notify_all();
    }
}

/// The rendezvous of one VM's vCPUs.
pub struct Rendezvous {
    slots: Vec<Slot>,
    stopping: AtomicBool,
    gate: Mutex<Gate>,
    cv: Condvar,
    kicker: Box<dyn Kicker>,
}

impl Rendezvous {
    /// A rendezvous for `vcpus` vCPUs, all outside `KVM_RUN`.
    pub fn new(vcpus: usize, kicker: Box<dyn Kicker>) -> Rendezvous {
        Rendezvous {
            slots: (0..vcpus).map(|_| Slot::default()).collect(),
            stopping: AtomicBool::new(false),
            gate: Mutex::new(Gate::default()),
            cv: Condvar::new(),
            kicker,
        }
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
            s.state.store(OUTSIDE, SeqCst);
        }
    }

    /// vCPU `me` will never run guest code again: nobody waits for it any more.
    pub fn ended(&self, me: usize) {
        if let Some(s) = self.slots.get(me) {
            s.state.store(ENDED, SeqCst);
        }
        let _g = self.gate();
        self.cv.notify_all();
    }

    /// Applies `me`'s delivery with `apply` if one was requested, and acknowledges it; then,
    /// if another vCPU is stopping the world, parks until it is done (servicing meanwhile).
    pub fn service(&self, me: usize, apply: &mut dyn FnMut()) {
        self.ack(me, apply);
        if self.stopping.load(SeqCst) {
            self.park(me, apply);
        }
    }

    /// Applies and acknowledges a pending request of `me`; true if there was one.
    fn ack(&self, me: usize, apply: &mut dyn FnMut()) -> bool {
        let Some(s) = self.slots.get(me) else {
            return false;
        };
        let r = s.requested.load(SeqCst);
        if r <= s.done.load(SeqCst) {
            return false;
        }
        apply();
        s.done.store(r, SeqCst);
        let _g = self.gate();
        self.cv.notify_all();
        true
    }

    /// Parks `me` while a world stop led by another vCPU is on.
    fn park(&self, me: usize, apply: &mut dyn FnMut()) {
        let mut g = self.gate();
        if g.leader.is_none_or(|l| l == me) {
            return;
        }
        let epoch = g.epoch;
        g.parked |= VcpuSet::one(me);
        self.cv.notify_all();
        while g.epoch == epoch {
            drop(g);
            self.ack(me, apply);
            g = self.gate();
            if g.epoch != epoch {
                break;
            }
            g = self
                .cv
                .wait_timeout(g, POLL)
                .map_or_else(|p| p.into_inner().0, |r| r.0);
        }
    }

    /// Posts a delivery request to every vCPU of `targets` (not `me`), kicks those inside
    /// `KVM_RUN`, and waits until each has acknowledged (or ended, or `stop` is set),
    /// servicing `me`'s own mailbox and world stops meanwhile.
    pub fn deliver(
        &self,
        me: usize,
        targets: VcpuSet,
        stop: &AtomicBool,
        apply: &mut dyn FnMut(),
    ) -> Delivered {
        let mut out = Delivered::default();
        let mut wait: Vec<(usize, u64, Option<Instant>, Instant)> = Vec::new();
        for w in targets.without(me).iter() {
            let Some(s) = self.slots.get(w) else { continue };
            if s.state.load(SeqCst) == ENDED {
                continue;
            }
            let seq = s.requested.fetch_add(1, SeqCst) + 1;
            out.sent += 1;
            let now = Instant::now();
            let kicked = (s.state.load(SeqCst) == IN_RUN).then(|| {
                self.kicker.kick(w);
                out.kicks += 1;
                now
            });
            wait.push((w, seq, kicked, now));
        }
        while !wait.is_empty() {
            self.service(me, apply);
            wait.retain(|&(w, seq, kicked, _)| {
                // `w` was checked against `slots` when it was posted.
                let acked = self
                    .slots
                    .get(w)
                    .is_none_or(|s| s.done.load(SeqCst) >= seq || s.state.load(SeqCst) == ENDED);
                if let (true, Some(t)) = (acked, kicked) {
                    out.kick_rtt_ns.push(t.elapsed().as_nanos() as u64);
                }
                !acked
            });
            if wait.is_empty() || stop.load(SeqCst) {
                break;
            }
            for (w, _, kicked, last) in wait.iter_mut() {
                if self.state(*w) == IN_RUN && last.elapsed() >= REKICK {
                    self.kicker.kick(*w);
                    out.kicks += 1;
                    *last = Instant::now();
                    kicked.get_or_insert(*last);
                }
            }
            let g = self.gate();
            drop(self.cv.wait_timeout(g, POLL));
        }
        out
    }

    /// Stops the world: waits to become the leader (parking for other leaders meanwhile),
    /// kicks every vCPU inside `KVM_RUN`, waits until every other vCPU is parked or ended
    /// (or `stop` is set), runs `work` (given `apply`, to deliver while the world is
    /// stopped), and releases them. `me` services its mailbox while
    /// it waits. Returns `work`'s result (`None` if the VM stopped first) and the cost.
    pub fn stop_world<R>(
        &self,
        me: usize,
        stop: &AtomicBool,
        apply: &mut dyn FnMut(),
        work: impl FnOnce(&mut dyn FnMut()) -> R,
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
        let others = VcpuSet::first(self.slots.len()).without(me);
        let mut last_kick: Option<Instant> = None;
        loop {
            self.ack(me, apply);
            let g = self.gate();
            let waiting: Vec<usize> = others
                .iter()
                .filter(|&w| !g.parked.contains(w) && self.state(w) != ENDED)
                .collect();
            if waiting.is_empty() || stop.load(SeqCst) {
                drop(g);
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
            drop(self.cv.wait_timeout(g, POLL));
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
