//! `--stats-interval`: one JSON line per interval, each a whole report of the same schema
//! as the final one (`"kind": "interval"`), with **delta** semantics: every figure is the
//! change since the previous line (the first line: since the VM started).

use super::report::{build_kind, to_json_line, Report, VmInfo};
use super::VcpuStats;
use serde_json::{json, Map, Value};
use std::io::Write;

/// Writes interval lines and remembers the previous totals.
pub struct IntervalWriter<W: Write> {
    out: W,
    info: VmInfo,
    prev: Vec<VcpuStats>,
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
    /// A writer starting from zero at time 0; `info` describes the running VM.
    pub fn new(out: W, info: VmInfo) -> Self {
        IntervalWriter {
            out,
            info,
            prev: Vec::new(),
            prev_mmu: None,
            prev_t: 0,
        }
    }

    /// The report for totals `per_vcpu` (and MMU counters) observed at `t_ns` since start.
    pub fn line(&mut self, t_ns: u64, per_vcpu: &[VcpuStats], mmu: Option<Value>) -> Report {
        let empty = VcpuStats::default();
        let deltas: Vec<VcpuStats> = per_vcpu
            .iter()
            .enumerate()
            .map(|(i, s)| s.since(self.prev.get(i).unwrap_or(&empty)))
            .collect();
        let mut info = self.info.clone();
        info.wall_ns = t_ns;
        let mmu_delta = mmu.as_ref().map(|m| num_delta(m, self.prev_mmu.as_ref()));
        let r = build_kind(
            "interval",
            t_ns,
            t_ns.saturating_sub(self.prev_t),
            info,
            &deltas,
            mmu_delta,
        );
        self.prev = per_vcpu.to_vec();
        self.prev_mmu = mmu;
        self.prev_t = t_ns;
        r
    }

    /// Computes and writes one line.
    pub fn write(
        &mut self,
        t_ns: u64,
        per_vcpu: &[VcpuStats],
        mmu: Option<Value>,
    ) -> std::io::Result<()> {
        let l = self.line(t_ns, per_vcpu, mmu);
        writeln!(self.out, "{}", to_json_line(&l))?;
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(w: &mut IntervalWriter<Vec<u8>>, t: u64, s: &[VcpuStats], m: Option<Value>) -> Value {
        serde_json::to_value(w.line(t, s, m)).unwrap()
    }

    #[test]
    fn lines_carry_deltas() {
        let info = VmInfo {
            end_reason: "running".into(),
            exit_code: 0,
            wall_ns: 0,
            vcpus: 1,
            mem_bytes: 1 << 28,
            hypercall_transport: "pio".into(),
            transport_choice: "forced".into(),
            transport_probe_ns: 0,
            transport_probe_cached: false,
            pool_resync: Default::default(),
            guest_status: None,
        };
        let mut w = IntervalWriter::new(Vec::new(), info);
        let mut s = VcpuStats::default();
        s.exit("io", 10);
        s.hypercall("MMU_BATCH", 100, None, Some(64));
        s.kvm_start.insert("exits".into(), 5);
        s.kvm_end.insert("exits".into(), 8);
        let l1 = line(
            &mut w,
            1000,
            std::slice::from_ref(&s),
            Some(json!({"pte_updates": 64, "rejects": {"pool": 1}})),
        );
        assert_eq!(
            (l1["schema_version"].clone(), l1["kind"].clone()),
            (json!(2), json!("interval"))
        );
        assert_eq!(l1["merged"]["exits"][0]["count"], 1);
        assert_eq!(l1["merged"]["kvm"]["exits"]["delta"], 3);
        assert_eq!(l1["mmu"]["pte_updates"], 64);
        s.exit("io", 20);
        s.exit("io", 20);
        s.hypercall("MMU_BATCH", 100, None, Some(16));
        s.kvm_end.insert("exits".into(), 18);
        let l2 = line(
            &mut w,
            3000,
            &[s],
            Some(json!({"pte_updates": 80, "rejects": {"pool": 1}})),
        );
        assert_eq!(l2["interval_ns"], 2000);
        let io = &l2["merged"]["exits"][0];
        assert_eq!(
            (
                io["name"].clone(),
                io["count"].clone(),
                io["total_ns"].clone()
            ),
            (json!("io"), json!(2), json!(40))
        );
        assert_eq!(l2["merged"]["exits_total"], 2);
        assert_eq!(
            l2["merged"]["hypercalls"][0]["entries_per_call"]["total"],
            16
        );
        assert_eq!(l2["merged"]["kvm"]["exits"]["delta"], 10);
        assert_eq!(l2["mmu"]["pte_updates"], 16);
        assert_eq!(l2["mmu"]["rejects"]["pool"], 0);
        w.write(4000, &[], None).unwrap();
        assert!(String::from_utf8(w.out).unwrap().ends_with("}\n"));
    }
}
