//! The state of the trap modes (no engine code): the write mode, the test switches, the
//! counters and the unhooked L1s. The operations are in `trap` and `wrpt`.

/// How the guest updates its page tables.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WriteMode {
    /// Only through `MMU_BATCH` (`PT_UPDATE`); typed frames are read-only to the guest.
    #[default]
    Hypercall,
    /// Plain stores; each one traps and is validated and applied like a `PT_UPDATE`.
    Emulate,
    /// Plain stores; the first one to an L1 unhooks it (writable, reachable by no shadow)
    /// until it is re-validated in one pass; stores to L2..L4 are emulated.
    Wrpt,
}

impl WriteMode {
    /// The mode's name (the guest's `mmu=` value, `hypercall` for the batch modes).
    pub const fn name(self) -> &'static str {
        match self {
            WriteMode::Hypercall => "hypercall",
            WriteMode::Emulate => "emulate",
            WriteMode::Wrpt => "wrpt",
        }
    }
}

/// Test-only switches that turn one mechanism of the trap modes off (each has a test that
/// expects the failure it re-opens).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrapDebug {
    /// Apply trapped stores and re-hooked entries without validating them.
    pub no_validate: bool,
    /// Unhook an L1 without dropping its parents' shadow entries (it stays reachable while
    /// the guest writes it).
    pub keep_parents: bool,
    /// Unhook an L1 without first harvesting its shadow A/D bits into the guest entries.
    pub no_harvest: bool,
}

/// Counters of the trap modes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrapCounters {
    /// Stores that trapped (one per exit).
    pub trapped_writes: u64,
    /// Entries validated and applied like a `PT_UPDATE` from a trapped store.
    pub emulated_writes: u64,
    /// Entries refused (dropped, the guest entry keeps its old value): trapped stores and
    /// re-validated entries of an unhooked L1.
    pub refused_writes: u64,
    /// Trapped stores into frames that were no page table (stale alias mappings): written.
    pub passthrough_writes: u64,
    /// L1s unhooked (`wrpt`).
    pub unhooks: u64,
    /// L1s re-hooked (`wrpt`).
    pub rehooks: u64,
    /// Entries re-validated at re-hooks (changed since the unhook).
    pub revalidated_entries: u64,
    /// Most entries re-validated by one re-hook.
    pub revalidated_max: u64,
    /// Re-hooks by entries re-validated: 0, 1, 2-8, 9-64, 65-512.
    pub revalidated_hist: [u64; 5],
    /// Re-hooks forced by the bound on unhooked L1s (least recently unhooked first).
    pub lru_evictions: u64,
    /// Spurious page faults the guest reported (`PT_FAULT`).
    pub spurious_faults: u64,
}

impl TrapCounters {
    /// Labels of [`TrapCounters::revalidated_hist`].
    pub const HIST_LABELS: [&'static str; 5] = ["0", "1", "2-8", "9-64", "65-512"];

    /// Records one re-hook that re-validated `n` entries.
    pub(crate) fn record_rehook(&mut self, n: u64) {
        self.rehooks += 1;
        self.revalidated_entries += n;
        self.revalidated_max = self.revalidated_max.max(n);
        let b = match n {
            0 => 0,
            1 => 1,
            2..=8 => 2,
            9..=64 => 3,
            _ => 4,
        };
        if let Some(c) = self.revalidated_hist.get_mut(b) {
            *c += 1;
        }
    }
}

/// The trap state of an engine.
#[derive(Default)]
pub(crate) struct TrapState {
    pub mode: WriteMode,
    /// Guest-physical base of the alias (0 in hypercall mode).
    pub alias_base: u64,
    /// Unhooked L1s, least recently unhooked first.
    pub unhooked: Vec<Unhooked>,
    /// Bound on `unhooked`.
    pub max_unhooked: usize,
    pub debug: TrapDebug,
    pub counters: TrapCounters,
}

/// Default bound on unhooked L1s.
pub const DEFAULT_MAX_UNHOOKED: usize = 4;

/// One unhooked L1 and the entries it held when it was unhooked (after the harvest).
pub(crate) struct Unhooked {
    pub pfn: u64,
    pub snapshot: Box<[u64; 512]>,
}
