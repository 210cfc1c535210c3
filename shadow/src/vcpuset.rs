//! [`VcpuSet`]: a set of vCPU indices (a 64-bit mask), the currency of flush targets.

/// A set of vCPUs: bit `n` is vCPU `n` (the engine supports at most [`VcpuSet::MAX`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VcpuSet(pub u64);

impl VcpuSet {
    /// The most vCPUs a set (and so an engine) can name.
    pub const MAX: usize = 64;
    /// No vCPU.
    pub const EMPTY: VcpuSet = VcpuSet(0);

    /// The set holding only `v` (empty if `v` is out of range).
    #[inline]
    pub fn one(v: usize) -> VcpuSet {
        VcpuSet(1u64.checked_shl(v as u32).unwrap_or(0))
    }

    /// The vCPUs `0..n`.
    pub fn first(n: usize) -> VcpuSet {
        if n >= Self::MAX {
            VcpuSet(u64::MAX)
        } else {
            VcpuSet((1u64 << n) - 1)
        }
    }

    /// Whether `v` is in the set.
    #[inline]
    pub fn contains(self, v: usize) -> bool {
        !(self & VcpuSet::one(v)).is_empty()
    }

    /// Whether the set is empty.
    #[inline]
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Number of vCPUs in the set.
    pub fn len(self) -> u32 {
        self.0.count_ones()
    }

    /// The set without `v`.
    #[inline]
    pub fn without(self, v: usize) -> VcpuSet {
        VcpuSet(self.0 & !VcpuSet::one(v).0)
    }

    /// The members, in index order.
    pub fn iter(self) -> impl Iterator<Item = usize> {
        (0..Self::MAX).filter(move |&v| self.contains(v))
    }
}

impl core::ops::BitOr for VcpuSet {
    type Output = VcpuSet;
    #[inline]
    fn bitor(self, o: VcpuSet) -> VcpuSet {
        VcpuSet(self.0 | o.0)
    }
}

impl core::ops::BitOrAssign for VcpuSet {
    #[inline]
    fn bitor_assign(&mut self, o: VcpuSet) {
        self.0 |= o.0;
    }
}

impl core::ops::BitAnd for VcpuSet {
    type Output = VcpuSet;
    #[inline]
    fn bitand(self, o: VcpuSet) -> VcpuSet {
        VcpuSet(self.0 & o.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets() {
        let s = VcpuSet::one(0) | VcpuSet::one(3);
        assert!(s.contains(3) && !s.contains(1) && !s.contains(64));
        assert_eq!(s.len(), 2);
        assert_eq!(s.without(3), VcpuSet::one(0));
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![0, 3]);
        assert_eq!(VcpuSet::one(64), VcpuSet::EMPTY);
        assert_eq!(VcpuSet::first(2), VcpuSet(3));
        assert_eq!(VcpuSet::first(64), VcpuSet(u64::MAX));
        assert!(VcpuSet::EMPTY.is_empty());
    }
}
