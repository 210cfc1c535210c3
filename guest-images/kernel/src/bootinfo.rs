//! Reads the zero page (Linux boot_params) the VMM prepared: command line and e820 map.

/// One e820 entry.
#[derive(Clone, Copy)]
pub struct E820 {
    /// Start address.
    pub addr: u64,
    /// Length.
    pub size: u64,
    /// 1 = usable, others reserved.
    pub kind: u32,
}

/// What the kernel learns from boot_params.
pub struct BootInfo {
    /// The command line.
    pub cmdline: &'static str,
    /// Number of e820 entries.
    pub e820_count: usize,
    table: u64,
}

const E820_ENTRIES: u64 = 0x1e8;
const E820_TABLE: u64 = 0x2d0;
const CMD_LINE_PTR: u64 = 0x228;
const CMDLINE_SIZE: u64 = 0x238;

impl BootInfo {
    /// Parses the zero page at virtual address `zp`.
    pub fn read(zp: u64) -> BootInfo {
        // SAFETY: the VMM maps and fills the zero page and command line before entry.
        unsafe {
            let count = core::ptr::read_volatile((zp + E820_ENTRIES) as *const u8) as usize;
            let ptr = core::ptr::read_volatile((zp + CMD_LINE_PTR) as *const u32) as u64;
            let size = core::ptr::read_volatile((zp + CMDLINE_SIZE) as *const u32) as usize;
            let bytes = core::slice::from_raw_parts(
                (ptr + crate::KERNEL_VMA) as *const u8,
                size.saturating_sub(1).min(4095),
            );
            let len = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
            let cmdline = core::str::from_utf8(&bytes[..len]).unwrap_or("");
            BootInfo {
                cmdline,
                e820_count: count.min(128),
                table: zp + E820_TABLE,
            }
        }
    }

    /// The e820 entries.
    pub fn e820(&self) -> impl Iterator<Item = E820> + '_ {
        (0..self.e820_count).map(move |i| {
            let p = self.table + i as u64 * 20;
            // SAFETY: inside the zero page's e820 table.
            unsafe {
                E820 {
                    addr: core::ptr::read_unaligned(p as *const u64),
                    size: core::ptr::read_unaligned((p + 8) as *const u64),
                    kind: core::ptr::read_unaligned((p + 16) as *const u32),
                }
            }
        })
    }

    /// Value of `key=` on the command line.
    pub fn arg(&self, key: &str) -> Option<&'static str> {
        self.cmdline
            .split(' ')
            .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
    }

    /// Numeric value of `key=`.
    pub fn arg_u64(&self, key: &str) -> Option<u64> {
        self.arg(key).and_then(|v| v.parse().ok())
    }
}
