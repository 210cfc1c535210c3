//! The rendezvous with simulated vCPU threads: "KVM_RUN" is a wait until the thread is
//! kicked (or told to end), so every ordering question is exercised without KVM.

use super::*;
use std::sync::atomic::AtomicU32;
use std::sync::Arc;

/// Kicks set a per-vCPU flag that the simulated `KVM_RUN` waits for.
#[derive(Default)]
struct Flags {
    kicked: Vec<AtomicBool>,
    kicks: AtomicU32,
    /// Simulated vCPUs inside "KVM_RUN" right now.
    in_guest: AtomicU32,
}

struct FlagKicker(Arc<Flags>);

impl Kicker for FlagKicker {
    fn kick(&self, v: usize) {
        self.0.kicks.fetch_add(1, SeqCst);
        if let Some(k) = self.0.kicked.get(v) {
            k.store(true, SeqCst);
        }
    }
}

fn world(n: usize) -> (Arc<Rendezvous>, Arc<Flags>) {
    let flags = Arc::new(Flags {
        kicked: (0..n).map(|_| AtomicBool::new(false)).collect(),
        kicks: AtomicU32::new(0),
        in_guest: AtomicU32::new(0),
    });
    (
        Arc::new(Rendezvous::new(n, Box::new(FlagKicker(flags.clone())))),
        flags,
    )
}

/// A simulated vCPU: enters "KVM_RUN" (waits for a kick) until `end`, servicing its
/// mailbox whenever it is outside; counts the deliveries it applied.
fn runner(
    r: Arc<Rendezvous>,
    f: Arc<Flags>,
    me: usize,
    end: Arc<AtomicBool>,
    applied: Arc<AtomicU32>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut apply = || {
            applied.fetch_add(1, SeqCst);
        };
        while !end.load(SeqCst) {
            if !r.enter(me) {
                r.service(me, &mut apply);
                continue;
            }
            f.in_guest.fetch_add(1, SeqCst);
            while !f.kicked[me].swap(false, SeqCst) && !end.load(SeqCst) {
                std::thread::yield_now();
            }
            f.in_guest.fetch_sub(1, SeqCst);
            r.left(me);
        }
        r.ended(me);
    })
}

#[test]
fn a_target_inside_kvm_run_is_kicked_and_applies_before_the_issuer_returns() {
    let (r, f) = world(2);
    let (end, applied) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU32::new(0)),
    );
    let t = runner(r.clone(), f.clone(), 1, end.clone(), applied.clone());
    while r.state(1) != IN_RUN {
        std::thread::yield_now();
    }
    let stop = AtomicBool::new(false);
    let d = r.deliver(0, VcpuSet::one(1) | VcpuSet::one(0), &stop, &mut || {});
    assert_eq!(applied.load(SeqCst), 1, "applied before deliver returned");
    assert_eq!(d.sent, 1, "the issuer itself is not a remote target");
    assert!(d.kicks >= 1 && d.kick_rtt_ns.len() == 1, "{d:?}");
    end.store(true, SeqCst);
    f.kicked[1].store(true, SeqCst);
    t.join().unwrap();
    // An ended target is not waited for and gets no request.
    let d = r.deliver(0, VcpuSet::one(1), &stop, &mut || {});
    assert_eq!((d.sent, d.kicks), (0, 0));
}

#[test]
fn a_target_outside_kvm_run_applies_before_entering_without_a_kick() {
    let (r, f) = world(2);
    let stop = Arc::new(AtomicBool::new(false));
    // vCPU 1 has not entered yet: the request waits in its mailbox, no kick.
    let r2 = r.clone();
    let s2 = stop.clone();
    let issuer = std::thread::spawn(move || r2.deliver(0, VcpuSet::one(1), &s2, &mut || {}));
    while r.slots[1].requested.load(SeqCst) == 0 {
        std::thread::yield_now();
    }
    let mut applied = 0;
    assert!(!r.enter(1), "a pending request keeps it out");
    r.service(1, &mut || applied += 1);
    assert_eq!(applied, 1);
    let d = issuer.join().unwrap();
    assert_eq!((d.sent, d.kicks), (1, 0), "{d:?}");
    assert_eq!(f.kicks.load(SeqCst), 0);
    assert!(r.enter(1), "nothing pending any more");
}

#[test]
fn two_vcpus_flushing_each_other_do_not_deadlock() {
    let (r, _f) = world(2);
    let stop = Arc::new(AtomicBool::new(false));
    let counts: Vec<_> = (0..2).map(|_| Arc::new(AtomicU32::new(0))).collect();
    let threads: Vec<_> = (0..2)
        .map(|me| {
            let (r, stop, c) = (r.clone(), stop.clone(), counts[me].clone());
            std::thread::spawn(move || {
                for _ in 0..200 {
                    r.deliver(me, VcpuSet::one(1 - me), &stop, &mut || {
                        c.fetch_add(1, SeqCst);
                    });
                }
                // Keep answering the other until it is done too.
                r.ended(me);
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // Each applied every request the other made before it ended (at most 200).
    assert!(counts.iter().all(|c| c.load(SeqCst) <= 200));
}

#[test]
fn a_world_stop_parks_every_running_vcpu_and_leaders_take_turns() {
    let (r, f) = world(4);
    let end = Arc::new(AtomicBool::new(false));
    let applied = Arc::new(AtomicU32::new(0));
    let runners: Vec<_> = (2..4)
        .map(|v| runner(r.clone(), f.clone(), v, end.clone(), applied.clone()))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let leaders: Vec<_> = (0..2)
        .map(|me| {
            let (r, stop, f) = (r.clone(), stop.clone(), f.clone());
            std::thread::spawn(move || {
                let mut works = 0;
                for _ in 0..50 {
                    let (done, _) = r.stop_world(me, &stop, &mut || {}, |_| {
                        assert_eq!(f.in_guest.load(SeqCst), 0, "a vCPU ran during the stop");
                        let g = r.gate();
                        assert_eq!(g.leader, Some(me));
                        drop(g);
                    });
                    works += usize::from(done.is_some());
                }
                r.ended(me);
                works
            })
        })
        .collect();
    for l in leaders {
        assert_eq!(l.join().unwrap(), 50);
    }
    end.store(true, SeqCst);
    for v in 2..4 {
        f.kicked[v].store(true, SeqCst);
    }
    for t in runners {
        t.join().unwrap();
    }
    assert!(f.kicks.load(SeqCst) > 0);
}

#[test]
fn a_stopping_vm_ends_every_wait() {
    let (r, _f) = world(2);
    let stop = AtomicBool::new(true);
    // vCPU 1 never services: deliver and stop_world give up because the VM stops.
    let d = r.deliver(0, VcpuSet::one(1), &stop, &mut || {});
    assert_eq!(d.sent, 1);
    let (w, _) = r.stop_world(0, &stop, &mut || {}, |_| 1);
    assert_eq!(w, None);
    assert!(r.gate().leader.is_none(), "the stop was released");
}

#[test]
fn a_change_made_before_the_wait_ends_it_without_sleeping() {
    let (r, _f) = world(2);
    let seen = r.seen();
    r.changed();
    r.wait_change(seen);
    assert_eq!(r.sleeps.load(SeqCst), 0);
    assert_eq!(r.sleepers.load(SeqCst), 0);
}

#[test]
fn a_sleeping_waiter_is_counted_while_it_sleeps_and_sees_the_change() {
    let (r, _f) = world(2);
    let flag = Arc::new(AtomicBool::new(false));
    let (r2, f2) = (r.clone(), flag.clone());
    let waiter = std::thread::spawn(move || loop {
        let seen = r2.seen();
        if f2.load(SeqCst) {
            return;
        }
        r2.wait_change(seen);
    });
    // Let the waiter reach its sleep at least once (it counts itself in first).
    while r.sleeps.load(SeqCst) == 0 {
        std::thread::yield_now();
    }
    flag.store(true, SeqCst);
    r.changed();
    waiter.join().unwrap();
    assert_eq!(
        r.sleepers.load(SeqCst),
        0,
        "every sleeper counted itself out"
    );
}

/// A simulated vCPU that stays in "KVM_RUN" until every vCPU of `all` was kicked.
fn runner_until_kicks(
    r: Arc<Rendezvous>,
    f: Arc<Flags>,
    me: usize,
    all: std::ops::Range<usize>,
    applied: Arc<AtomicU32>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        assert!(r.enter(me));
        f.in_guest.fetch_add(1, SeqCst);
        while !all.clone().all(|w| f.kicked[w].load(SeqCst)) {
            std::thread::yield_now();
        }
        f.in_guest.fetch_sub(1, SeqCst);
        r.left(me);
        r.service(me, &mut || {
            applied.fetch_add(1, SeqCst);
        });
        r.ended(me);
    })
}

#[test]
fn kicks_to_several_targets_all_go_out_before_the_issuer_waits() {
    let (r, f) = world(4);
    let applied = Arc::new(AtomicU32::new(0));
    // Each target leaves only once all three were kicked (re-kicks of one do not count):
    // an issuer that waited for the first acknowledgement before kicking the next would
    // never return.
    let ts: Vec<_> = (1..4)
        .map(|v| runner_until_kicks(r.clone(), f.clone(), v, 1..4, applied.clone()))
        .collect();
    while (1..4).any(|v| r.state(v) != IN_RUN) {
        std::thread::yield_now();
    }
    let stop = AtomicBool::new(false);
    let d = r.deliver(0, VcpuSet::first(4), &stop, &mut || {});
    assert_eq!(applied.load(SeqCst), 3);
    assert!(d.sent == 3 && d.kicks >= 3, "{d:?}");
    assert_eq!((d.kick_rtt_ns.len(), d.kick_phases.len()), (3, 3));
    for t in ts {
        t.join().unwrap();
    }
}

#[test]
fn a_request_posted_before_a_world_stop_is_applied_on_the_way_to_parking_with_no_delivery_kick() {
    let (r, f) = world(2);
    let end = Arc::new(AtomicBool::new(false));
    let applied = Arc::new(AtomicU32::new(0));
    let t = runner(r.clone(), f.clone(), 1, end.clone(), applied.clone());
    while r.state(1) != IN_RUN {
        std::thread::yield_now();
    }
    let stop = AtomicBool::new(false);
    let posted = r.post(0, VcpuSet::one(1), false);
    assert_eq!(
        f.kicks.load(SeqCst),
        0,
        "posting without kick sends no signal"
    );
    let (d, cost) = r.stop_world(0, &stop, &mut || {}, |apply| {
        // Parked, and already applied: parking services the mailbox first.
        assert_eq!(applied.load(SeqCst), 1);
        r.wait_acks(0, posted, &stop, apply)
    });
    let d = d.unwrap();
    assert_eq!((d.sent, d.kicks), (1, 0), "{d:?}");
    assert!(cost.kicks >= 1, "the stop kicked the running vCPU");
    end.store(true, SeqCst);
    f.kicked[1].store(true, SeqCst);
    t.join().unwrap();
}

#[test]
fn a_vcpu_waiting_in_the_rendezvous_is_not_kicked_and_still_applies() {
    let (r, f) = world(2);
    let stop = Arc::new(AtomicBool::new(false));
    let applied = Arc::new(AtomicU32::new(0));
    // vCPU 1 is outside KVM_RUN, itself waiting for a delivery to vCPU 0 (which never
    // enters): it must apply vCPU 0's request meanwhile, with no kick.
    let (r1, s1, a1) = (r.clone(), stop.clone(), applied.clone());
    let one = std::thread::spawn(move || {
        r1.deliver(1, VcpuSet::one(0), &s1, &mut || {
            a1.fetch_add(1, SeqCst);
        })
    });
    while r.slots[0].requested.load(SeqCst) == 0 {
        std::thread::yield_now();
    }
    let d = r.deliver(0, VcpuSet::one(1), &stop, &mut || {});
    assert_eq!((d.sent, d.kicks), (1, 0), "{d:?}");
    assert_eq!(applied.load(SeqCst), 1);
    // Let vCPU 1's own wait end: vCPU 0 services its mailbox.
    r.service(0, &mut || {});
    assert_eq!(one.join().unwrap().kicks, 0);
    assert_eq!(f.kicks.load(SeqCst), 0);
}

/// Records where each part of a delivery ran relative to the acknowledgement.
struct Parts<'a> {
    r: &'a Rendezvous,
    me: usize,
    log: Vec<(&'static str, bool)>,
}

impl Apply for Parts<'_> {
    fn take(&mut self) {
        let s = &self.r.slots[self.me];
        let acked = s.done.load(SeqCst) >= s.requested.load(SeqCst);
        self.log.push(("take", acked));
    }
    fn finish(&mut self) {
        let s = &self.r.slots[self.me];
        let acked = s.done.load(SeqCst) >= s.requested.load(SeqCst);
        self.log.push(("finish", acked));
    }
}

#[test]
fn take_runs_before_the_acknowledgement_and_finish_after_it_before_service_returns() {
    let (r, _f) = world(2);
    let stop = Arc::new(AtomicBool::new(false));
    let r2 = r.clone();
    let s2 = stop.clone();
    let issuer = std::thread::spawn(move || r2.deliver(0, VcpuSet::one(1), &s2, &mut || {}));
    while r.slots[1].requested.load(SeqCst) == 0 {
        std::thread::yield_now();
    }
    let mut parts = Parts {
        r: &r,
        me: 1,
        log: Vec::new(),
    };
    assert!(!r.enter(1));
    r.service(1, &mut parts);
    // Both parts ran inside `service`, so before vCPU 1 could enter again.
    assert_eq!(parts.log, [("take", false), ("finish", true)]);
    assert_eq!(issuer.join().unwrap().sent, 1);
    assert!(r.enter(1));
}
