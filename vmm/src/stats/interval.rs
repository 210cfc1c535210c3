//! `--stats-interval`: one JSON line per interval with **delta** semantics: every counter
//! is the change since the previous line (the first line: since the VM started).

use super::{merge_all, VcpuStats};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::io::Write;

/// Writes interval lines and remembers the previous totals.
pub struct IntervalWriter<W: Write> {
    out: W,
    prev: VcpuStats,
    prev_mmu: Option<Value>,
    prev_t: u64,
}

fn num_delta(cur: &Value, prev: Option<&Value>) -> Value {
    match cur {
        Value::Number(n) => {
            let p = prev.and_then(Value::as_u64).unwrap_or(0);
            json!(n.as_u64().unwrap_or(0).saturating_sub(p))
        }
        Value::Object(m) => {
            let mut o = Map::new();
            for (k, v) in m {
                o.insert(k.clone(), num_delta(v, prev.and_then(|p| p.get(k))));
            }
            Value::Object(o)
        }
        other => other.clone(),
    }
}

impl<W: Write> IntervalWriter<W> {
    /// A writer starting from zero at time 0.
    pub fn new(out: W) -> Self {
        IntervalWriter {
            out,
            prev: VcpuStats::default(),
            prev_mmu: None,
            prev_t: 0,
        }
    }

    /// The line for totals `per_vcpu` (and MMU counters) observed at `t_ns` since start.
    pub fn line(&mut self, t_ns: u64, per_vcpu: &[VcpuStats], mmu: Option<Value>) -> Value {
        let cur = merge_all(per_vcpu);
        let mut exits = Map::new();
        for (k, l) in &cur.exits {
            let (pc, pt) = self
                .prev
                .exits
                .get(k)
                .map_or((0, 0), |p| (p.count(), p.total()));
            let dc = l.count().saturating_sub(pc);
            if dc > 0 {
                exits.insert(
                    (*k).into(),
                    json!({"count": dc, "total_ns": l.total().saturating_sub(pt)}),
                );
            }
        }
        let mut hcs = Map::new();
        for (k, o) in &cur.hypercalls {
            let p = self.prev.hypercalls.get(k);
            let dc = o
                .latency
                .count()
                .saturating_sub(p.map_or(0, |p| p.latency.count()));
            if dc > 0 {
                let de = o
                    .entries
                    .total()
                    .saturating_sub(p.map_or(0, |p| p.entries.total()));
                hcs.insert((*k).into(), json!({"count": dc, "entries": de, "total_ns": o.latency.total().saturating_sub(p.map_or(0, |p| p.latency.total()))}));
            }
        }
        let kvm: BTreeMap<&String, u64> = cur
            .kvm_end
            .iter()
            .map(|(k, v)| {
                (
                    k,
                    v.saturating_sub(
                        *self
                            .prev
                            .kvm_end
                            .get(k)
                            .or(cur.kvm_start.get(k))
                            .unwrap_or(&0),
                    ),
                )
            })
            .collect();
        let line = json!({
            "t_ns": t_ns,
            "interval_ns": t_ns.saturating_sub(self.prev_t),
            "exits_total": cur.total_exits().saturating_sub(self.prev.total_exits()),
            "kvm_run_ns": cur.kvm_run_ns.saturating_sub(self.prev.kvm_run_ns),
            "vmm_ns": cur.vmm_ns.saturating_sub(self.prev.vmm_ns),
            "exits": exits,
            "hypercalls": hcs,
            "kvm": kvm,
            "mmu": mmu.as_ref().map(|m| num_delta(m, self.prev_mmu.as_ref())),
        });
        self.prev = cur;
        self.prev_mmu = mmu;
        self.prev_t = t_ns;
        line
    }

    /// Computes and writes one line.
    pub fn write(
        &mut self,
        t_ns: u64,
        per_vcpu: &[VcpuStats],
        mmu: Option<Value>,
    ) -> std::io::Result<()> {
        let l = self.line(t_ns, per_vcpu, mmu);
        writeln!(self.out, "{l}")?;
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_carry_deltas() {
        let mut w = IntervalWriter::new(Vec::new());
        let mut s = VcpuStats::default();
        s.exit("io", 10);
        s.hypercall("MMU_BATCH", 100, None, Some(64));
        s.kvm_start.insert("exits".into(), 5);
        s.kvm_end.insert("exits".into(), 8);
        let l1 = w.line(
            1000,
            std::slice::from_ref(&s),
            Some(json!({"pte_updates": 64, "rejects": {"pool": 1}})),
        );
        assert_eq!(l1["exits"]["io"]["count"], 1);
        assert_eq!(l1["kvm"]["exits"], 3);
        assert_eq!(l1["mmu"]["pte_updates"], 64);
        s.exit("io", 20);
        s.exit("io", 20);
        s.hypercall("MMU_BATCH", 100, None, Some(16));
        s.kvm_end.insert("exits".into(), 18);
        let l2 = w.line(
            3000,
            &[s],
            Some(json!({"pte_updates": 80, "rejects": {"pool": 1}})),
        );
        assert_eq!(l2["interval_ns"], 2000);
        assert_eq!(l2["exits"]["io"], json!({"count": 2, "total_ns": 40}));
        assert_eq!(l2["exits_total"], 2);
        assert_eq!(l2["hypercalls"]["MMU_BATCH"]["entries"], 16);
        assert_eq!(l2["kvm"]["exits"], 10);
        assert_eq!(l2["mmu"]["pte_updates"], 16);
        assert_eq!(l2["mmu"]["rejects"]["pool"], 0);
        w.write(4000, &[], None).unwrap();
        assert!(String::from_utf8(w.out).unwrap().ends_with("}\n"));
    }
}
