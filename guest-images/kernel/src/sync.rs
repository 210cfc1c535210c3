//! The kernel's shared-state primitives, built for the SMP guest (issue 14) and used on one
//! CPU today:
//!
//! - [`SpinLock`]: state shared by every CPU (process table, frame allocator). A CPU that
//!   takes a lock it already holds panics instead of spinning forever.
//! - [`PerCpu`]: one value per CPU for state that is `Sync` by itself (atomics).
//! - [`CpuLocal`]: one value per CPU with exclusive, flag-checked borrows (the MMU state of
//!   a CPU). Only the owning CPU reaches its slot, and a second borrow panics.
//! - [`Once`]: a value set once at boot, read-only afterwards.
//!
//! The kernel runs with interrupts off, so none of these has to mask interrupts. A CPU
//! spinning on a lock serves its TLB mailbox (`tlb::poll`), so a native shootdown never
//! waits on a CPU that waits for the shootdown's initiator.

use crate::arch::{cpu_id, MAX_CPUS};
use crate::tlb;
use core::cell::UnsafeCell;
use core::marker::PhantomData;
use core::mem::MaybeUninit;
use core::ops::{Deref, DerefMut};
use core::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};

/// A spin lock around `T`. The lock word holds 0 when free, else the owner's CPU id + 1.
pub struct SpinLock<T> {
    owner: AtomicUsize,
    value: UnsafeCell<T>,
}

// SAFETY: the lock hands out at most one guard at a time, so `T` is reached by one CPU at a
// time; `T: Send` because it may be reached from any CPU.
unsafe impl<T: Send> Sync for SpinLock<T> {}

impl<T> SpinLock<T> {
    /// A free lock around `value`.
    pub const fn new(value: T) -> SpinLock<T> {
        SpinLock {
            owner: AtomicUsize::new(0),
            value: UnsafeCell::new(value),
        }
    }

    /// Takes the lock, spinning while another CPU holds it. Panics if this CPU holds it
    /// already (that would deadlock).
    pub fn lock(&self) -> SpinGuard<'_, T> {
        let me = cpu_id() + 1;
        loop {
            match self
                .owner
                .compare_exchange(0, me, Ordering::Acquire, Ordering::Relaxed)
            {
                Ok(_) => {
                    return SpinGuard {
                        lock: self,
                        _not_send: PhantomData,
                    }
                }
                Err(o) if o == me => panic!("spin lock taken twice by CPU {}", me - 1),
                Err(_) => {
                    tlb::poll();
                    core::hint::spin_loop()
                }
            }
        }
    }
}

/// Exclusive access to a [`SpinLock`]'s value; releases the lock when dropped.
pub struct SpinGuard<'a, T> {
    lock: &'a SpinLock<T>,
    /// A guard stays on the CPU that took the lock.
    _not_send: PhantomData<*mut ()>,
}

impl<T> Deref for SpinGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the guard proves this CPU holds the lock.
        unsafe { &*self.lock.value.get() }
    }
}

impl<T> DerefMut for SpinGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the guard proves this CPU holds the lock, and `&mut self` that no other
        // reference from this guard is live.
        unsafe { &mut *self.lock.value.get() }
    }
}

impl<T> Drop for SpinGuard<'_, T> {
    fn drop(&mut self) {
        self.lock.owner.store(0, Ordering::Release);
    }
}

/// One `T` per CPU, shared: `T` is `Sync` (atomics), so a plain reference is enough.
pub struct PerCpu<T> {
    slots: [T; MAX_CPUS],
}

impl<T> PerCpu<T> {
    /// One value per CPU.
    pub const fn new(slots: [T; MAX_CPUS]) -> PerCpu<T> {
        PerCpu { slots }
    }

    /// The calling CPU's value.
    pub fn this(&self) -> &T {
        &self.slots[cpu_id()]
    }
}

/// One `T` per CPU, reached only by its own CPU, one borrow at a time.
pub struct CpuLocal<T> {
    borrowed: [AtomicBool; MAX_CPUS],
    values: UnsafeCell<[T; MAX_CPUS]>,
}

// SAFETY: each CPU reaches only its own element, and its borrow flag makes that access
// exclusive; guards are not `Send`, so a borrow never moves to another CPU.
unsafe impl<T: Send> Sync for CpuLocal<T> {}

impl<T> CpuLocal<T> {
    /// One value per CPU.
    pub const fn new(values: [T; MAX_CPUS]) -> CpuLocal<T> {
        CpuLocal {
            borrowed: [const { AtomicBool::new(false) }; MAX_CPUS],
            values: UnsafeCell::new(values),
        }
    }

    /// Borrows the calling CPU's value. Panics if it is borrowed already.
    pub fn borrow_mut(&self) -> CpuRefMut<'_, T> {
        self.try_borrow_mut()
            .unwrap_or_else(|| panic!("per-CPU state borrowed twice on CPU {}", cpu_id()))
    }

    /// Borrows the calling CPU's value, or None if it is borrowed already.
    pub fn try_borrow_mut(&self) -> Option<CpuRefMut<'_, T>> {
        let cpu = cpu_id();
        let flag = &self.borrowed[cpu];
        if flag.swap(true, Ordering::Acquire) {
            return None;
        }
        // SAFETY: `cpu < MAX_CPUS` (it indexed `borrowed`), so the element is in the array.
        let value = unsafe { (self.values.get() as *mut T).add(cpu) };
        Some(CpuRefMut {
            flag,
            value,
            _life: PhantomData,
        })
    }
}

/// Exclusive access to this CPU's slot of a [`CpuLocal`]; released when dropped.
pub struct CpuRefMut<'a, T> {
    flag: &'a AtomicBool,
    value: *mut T,
    /// Borrows the cell; the raw pointer also makes the guard neither `Send` nor `Sync`.
    _life: PhantomData<&'a mut T>,
}

impl<T> Deref for CpuRefMut<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the borrow flag is ours, so nothing else reaches this element.
        unsafe { &*self.value }
    }
}

impl<T> DerefMut for CpuRefMut<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the borrow flag is ours and `&mut self` is unique.
        unsafe { &mut *self.value }
    }
}

impl<T> Drop for CpuRefMut<'_, T> {
    fn drop(&mut self) {
        self.flag.store(false, Ordering::Release);
    }
}

/// A value written once (at boot) and only read afterwards.
pub struct Once<T> {
    /// 0 empty, 1 being written, 2 set.
    state: AtomicU8,
    value: UnsafeCell<MaybeUninit<T>>,
}

// SAFETY: the value is written once, before `state` says 2 (release), and only read after
// `state` reads 2 (acquire); readers get shared references only.
unsafe impl<T: Send + Sync> Sync for Once<T> {}

impl<T> Once<T> {
    /// An empty cell.
    pub const fn new() -> Once<T> {
        Once {
            state: AtomicU8::new(0),
            value: UnsafeCell::new(MaybeUninit::uninit()),
        }
    }

    /// Sets the value. Panics if it was set before.
    pub fn set(&self, v: T) {
        assert!(
            self.state
                .compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed)
                .is_ok(),
            "Once set twice"
        );
        // SAFETY: state 1 makes this the only writer, and no reader looks before state 2.
        unsafe { (*self.value.get()).write(v) };
        self.state.store(2, Ordering::Release);
    }

    /// The value. Panics if it was never set.
    pub fn get(&self) -> &T {
        assert!(
            self.state.load(Ordering::Acquire) == 2,
            "Once read before it was set"
        );
        // SAFETY: state 2: the value is initialised and never written again.
        unsafe { (*self.value.get()).assume_init_ref() }
    }
}
