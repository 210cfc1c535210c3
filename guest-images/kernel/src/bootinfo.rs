//! Reads the zero page (Linux boot_params) the VMM prepared: command line and e820 map.

use crate::arch::KERNEL_VMA;

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

/// Longest command line the guest reads: the VMM's limit (4096 bytes with the NUL).
pub const CMDLINE_MAX: usize = 4095;

/// What the kernel learns from boot_params.
pub struct BootInfo {
    /// The command line, or why it cannot be used (too long, not UTF-8). It lives in low
    /// memory that the boot page tables map: read it before the kernel switches tables.
    pub cmdline: Result<&'static str, CmdlineError>,
    /// Number of e820 entries.
    pub e820_count: usize,
    table: u64,
}

/// A command line the guest refuses.
#[derive(Clone, Copy, Debug)]
pub enum CmdlineError {
    /// Longer than [`CMDLINE_MAX`] bytes (the byte count).
    TooLong(usize),
    /// Not UTF-8.
    NotUtf8,
}

impl core::fmt::Display for CmdlineError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            CmdlineError::TooLong(n) => write!(
                f,
                "the command line is {n} bytes, more than the {CMDLINE_MAX} the guest reads"
            ),
            CmdlineError::NotUtf8 => write!(f, "the command line is not UTF-8"),
        }
    }
}

const E820_ENTRIES: u64 = 0x1e8;
const E820_TABLE: u64 = 0x2d0;
const CMD_LINE_PTR: u64 = 0x228;
const CMDLINE_SIZE: u64 = 0x238;

impl BootInfo {
    /// Parses the zero page at virtual address `zp`.
    pub fn read(zp: u64) -> BootInfo {
        // SAFETY: the VMM maps and fills the zero page before entry.
        let (count, ptr, size) = unsafe {
            (
                core::ptr::read_volatile((zp + E820_ENTRIES) as *const u8) as usize,
                core::ptr::read_volatile((zp + CMD_LINE_PTR) as *const u32) as u64,
                core::ptr::read_volatile((zp + CMDLINE_SIZE) as *const u32) as usize,
            )
        };
        BootInfo {
            cmdline: read_cmdline(ptr, size),
            e820_count: count.min(128),
            table: zp + E820_TABLE,
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
}

/// The NUL-terminated command line at guest-physical `ptr`, `size` bytes with the NUL.
fn read_cmdline(ptr: u64, size: usize) -> Result<&'static str, CmdlineError> {
    let len = size.saturating_sub(1);
    if len > CMDLINE_MAX {
        return Err(CmdlineError::TooLong(len));
    }
    if ptr == 0 || len == 0 {
        return Ok("");
    }
    // SAFETY: the VMM wrote `size` bytes at `ptr`, in low RAM that the boot tables map
    // through the kernel window; nothing writes them afterwards.
    let bytes = unsafe { core::slice::from_raw_parts((ptr + KERNEL_VMA) as *const u8, len) };
    let len = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    core::str::from_utf8(&bytes[..len]).map_err(|_| CmdlineError::NotUtf8)
}
