//! The one-line diagnosis of a vCPU that KVM could not emulate: the instruction bytes at RIP,
//! read from guest memory through the guest's own page tables, and the instruction's name
//! when it is one of the system/extended-state instructions software KVM hosts trip over
//! (`xrstor`, `cmpxchg16b`, ...). Pure functions over `vm_memory`; no KVM needed.

use crate::x86::{CR0_PG, CR4_LA57, CR4_PAE, CR4_PSE, EFER_LMA};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

/// Longest x86 instruction.
pub const MAX_INSN: usize = 15;

const PTE_P: u64 = 1;
const PTE_PS: u64 = 1 << 7;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// The paging controls a guest-linear address is translated with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Paging {
    /// CR0.
    pub cr0: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// EFER.
    pub efer: u64,
}

/// Why a linear address could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalkError {
    /// The entry at this level (4 = PML4 ... 1 = PT; 5 = PML5) is not present.
    NotPresent(u8),
    /// A table or the target lies outside guest memory.
    OutsideMemory(u64),
}

impl std::fmt::Display for WalkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WalkError::NotPresent(l) => write!(f, "not mapped (level-{l} entry not present)"),
            WalkError::OutsideMemory(a) => write!(f, "guest-physical {a:#x} is outside RAM"),
        }
    }
}

fn entry<M: GuestMemory>(mem: &M, addr: u64, wide: bool) -> Result<u64, WalkError> {
    let g = GuestAddress(addr);
    let v = if wide {
        mem.read_obj::<u64>(g).ok()
    } else {
        mem.read_obj::<u32>(g).ok().map(u64::from)
    };
    v.ok_or(WalkError::OutsideMemory(addr))
}

/// Translates a guest-linear address to guest-physical through the guest's page tables
/// (no paging, 32-bit, PAE, 4- and 5-level; large pages included). Permissions are not
/// checked: this is for reading code the vCPU was executing.
pub fn translate<M: GuestMemory>(mem: &M, p: &Paging, linear: u64) -> Result<u64, WalkError> {
    if p.cr0 & CR0_PG == 0 {
        return Ok(linear);
    }
    if p.cr4 & CR4_PAE == 0 {
        let pde = entry(
            mem,
            (p.cr3 & 0xffff_f000) + ((linear >> 22) & 0x3ff) * 4,
            false,
        )?;
        if pde & PTE_P == 0 {
            return Err(WalkError::NotPresent(2));
        }
        if pde & PTE_PS != 0 && p.cr4 & CR4_PSE != 0 {
            return Ok((pde & 0xffc0_0000) | (linear & 0x3f_ffff));
        }
        let pte = entry(
            mem,
            (pde & 0xffff_f000) + ((linear >> 12) & 0x3ff) * 4,
            false,
        )?;
        if pte & PTE_P == 0 {
            return Err(WalkError::NotPresent(1));
        }
        return Ok((pte & 0xffff_f000) | (linear & 0xfff));
    }
    let (mut level, mut table) = if p.efer & EFER_LMA == 0 {
        // PAE: four PDPTEs at CR3 (32-byte aligned), then PD and PT.
        let pdpte = entry(mem, (p.cr3 & 0xffff_ffe0) + ((linear >> 30) & 3) * 8, true)?;
        if pdpte & PTE_P == 0 {
            return Err(WalkError::NotPresent(3));
        }
        (2u8, pdpte & ADDR_MASK)
    } else if p.cr4 & CR4_LA57 != 0 {
        (5u8, p.cr3 & ADDR_MASK)
    } else {
        (4u8, p.cr3 & ADDR_MASK)
    };
    loop {
        let shift = 12 + 9 * u32::from(level - 1);
        let e = entry(mem, table + ((linear >> shift) & 0x1ff) * 8, true)?;
        if e & PTE_P == 0 {
            return Err(WalkError::NotPresent(level));
        }
        let page = 1u64 << shift;
        if level == 1 || (e & PTE_PS != 0 && level <= 3) {
            return Ok((e & ADDR_MASK & !(page - 1)) | (linear & (page - 1)));
        }
        table = e & ADDR_MASK;
        level -= 1;
    }
}

/// Reads up to [`MAX_INSN`] bytes of code at `linear`, page by page; stops at the first
/// page that cannot be read. Returns the bytes and, if short, why.
pub fn read_code<M: GuestMemory>(mem: &M, p: &Paging, linear: u64) -> (Vec<u8>, Option<WalkError>) {
    let mut out = Vec::with_capacity(MAX_INSN);
    while out.len() < MAX_INSN {
        let at = linear.wrapping_add(out.len() as u64);
        let room = (0x1000 - (at & 0xfff)) as usize;
        let n = room.min(MAX_INSN - out.len());
        let phys = match translate(mem, p, at) {
            Ok(a) => a,
            Err(e) => return (out, Some(e)),
        };
        let mut buf = vec![0u8; n];
        if mem.read_slice(&mut buf, GuestAddress(phys)).is_err() {
            return (out, Some(WalkError::OutsideMemory(phys)));
        }
        out.extend_from_slice(&buf);
    }
    (out, None)
}

/// Names the instruction in `code` if it is one of the system, extended-state or atomic
/// instructions a host's emulator may not run; `long` selects 64-bit decoding (REX).
pub fn mnemonic(code: &[u8], long: bool) -> Option<&'static str> {
    let mut i = 0;
    let mut rex_w = false;
    while let Some(&b) = code.get(i) {
        match b {
            0x26 | 0x2e | 0x36 | 0x3e | 0x64 | 0x65 | 0x66 | 0x67 | 0xf0 | 0xf2 | 0xf3 => i += 1,
            0x40..=0x4f if long => {
                rex_w = b & 8 != 0;
                i += 1;
            }
            _ => break,
        }
    }
    let op = *code.get(i)?;
    if op != 0x0f {
        return match op {
            0xc4 | 0xc5 if long => Some("a VEX-encoded (AVX) instruction"),
            0x62 if long => Some("an EVEX-encoded (AVX-512) instruction"),
            0xf4 => Some("hlt"),
            0xcc => Some("int3"),
            0xcd => Some("int n"),
            0xcf => Some("iret"),
            _ => None,
        };
    }
    let op2 = *code.get(i + 1)?;
    let modrm = code.get(i + 2).copied();
    let reg = modrm.map(|m| (m >> 3) & 7);
    let mem_form = modrm.is_some_and(|m| m >> 6 != 3);
    Some(match (op2, reg, mem_form) {
        (0xae, Some(0), true) => "fxsave",
        (0xae, Some(1), true) => "fxrstor",
        (0xae, Some(2), true) => "ldmxcsr",
        (0xae, Some(3), true) => "stmxcsr",
        (0xae, Some(4), true) => "xsave",
        (0xae, Some(5), true) => "xrstor",
        (0xae, Some(6), true) => "xsaveopt",
        (0xae, Some(7), true) => "clflush",
        (0xae, Some(5), false) => "lfence",
        (0xae, Some(6), false) => "mfence",
        (0xae, Some(7), false) => "sfence",
        (0xc7, Some(1), true) if rex_w => "cmpxchg16b",
        (0xc7, Some(1), true) => "cmpxchg8b",
        (0xc7, Some(3), true) => "xrstors",
        (0xc7, Some(4), true) => "xsavec",
        (0xc7, Some(5), true) => "xsaves",
        (0xc7, Some(6), false) => "rdrand",
        (0xc7, Some(7), false) => "rdseed",
        (0x01, _, _) => return op_0f01(modrm?),
        (0x05, ..) => "syscall",
        (0x07, ..) => "sysret",
        (0x0b, ..) => "ud2",
        (0x20 | 0x22, ..) => "mov to/from a control register",
        (0x21 | 0x23, ..) => "mov to/from a debug register",
        (0x30, ..) => "wrmsr",
        (0x31, ..) => "rdtsc",
        (0x32, ..) => "rdmsr",
        (0xa2, ..) => "cpuid",
        (0x78, ..) => "vmread",
        (0x79, ..) => "vmwrite",
        (0x10..=0x17 | 0x28..=0x2f | 0x50..=0x7f | 0xc2..=0xc6 | 0xd0..=0xff, ..) => {
            "an SSE/MMX instruction"
        }
        _ => return None,
    })
}

/// The `0f 01` group, by ModRM byte.
fn op_0f01(modrm: u8) -> Option<&'static str> {
    Some(match modrm {
        0xc1 => "vmcall",
        0xca => "clac",
        0xcb => "stac",
        0xd0 => "xgetbv",
        0xd1 => "xsetbv",
        0xd8 => "vmrun",
        0xd9 => "vmmcall",
        0xda => "vmload",
        0xdb => "vmsave",
        0xdc => "stgi",
        0xdd => "clgi",
        0xee => "rdpkru",
        0xef => "wrpkru",
        0xf8 => "swapgs",
        0xf9 => "rdtscp",
        m if m >> 6 != 3 => match (m >> 3) & 7 {
            0 => "sgdt",
            1 => "sidt",
            2 => "lgdt",
            3 => "lidt",
            7 => "invlpg",
            _ => return None,
        },
        _ => return None,
    })
}

/// The one-line diagnosis: where, which bytes, and the instruction's name if known.
pub fn describe(rip: u64, code: &[u8], short: Option<WalkError>, long: bool) -> String {
    let hex: Vec<String> = code.iter().map(|b| format!("{b:02x}")).collect();
    let mut s = format!("instruction at rip {rip:#x}: ");
    if code.is_empty() {
        s += "bytes unreadable";
    } else {
        s += &format!("bytes {}", hex.join(" "));
        s += &match mnemonic(code, long) {
            Some(m) => format!(" ({m})"),
            None => " (not one pvmm can name)".into(),
        };
    }
    if let Some(e) = short {
        s += &format!("; code after byte {} {e}", code.len());
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap()
    }

    #[test]
    fn names_the_instructions_software_kvm_cannot_run() {
        // xrstor (%rsi) with REX.W: 48 0f ae 2e; cmpxchg16b (%rsi): f0 48 0f c7 0e.
        assert_eq!(mnemonic(&[0x48, 0x0f, 0xae, 0x2e], true), Some("xrstor"));
        assert_eq!(mnemonic(&[0x0f, 0xae, 0x6f, 0x40], true), Some("xrstor"));
        assert_eq!(
            mnemonic(&[0xf0, 0x48, 0x0f, 0xc7, 0x0e], true),
            Some("cmpxchg16b")
        );
        assert_eq!(mnemonic(&[0xf0, 0x0f, 0xc7, 0x0e], true), Some("cmpxchg8b"));
        assert_eq!(mnemonic(&[0x0f, 0xae, 0x27], true), Some("xsave"));
        assert_eq!(mnemonic(&[0x0f, 0xae, 0xf0], true), Some("mfence"));
        assert_eq!(mnemonic(&[0x0f, 0x01, 0xd0], true), Some("xgetbv"));
        assert_eq!(mnemonic(&[0x0f, 0x01, 0xd9], true), Some("vmmcall"));
        assert_eq!(mnemonic(&[0x0f, 0x01, 0x38], true), Some("invlpg"));
        assert_eq!(
            mnemonic(&[0xc5, 0xf8, 0x77], true),
            Some("a VEX-encoded (AVX) instruction")
        );
        assert_eq!(
            mnemonic(&[0x0f, 0x57, 0xc0], true),
            Some("an SSE/MMX instruction")
        );
        assert_eq!(mnemonic(&[0x90], true), None);
        assert_eq!(mnemonic(&[0x0f], true), None, "truncated code");
        assert_eq!(mnemonic(&[], true), None);
        // Outside long mode 0x48 is `dec eax`, not REX.
        assert_eq!(mnemonic(&[0x48, 0x0f, 0xae, 0x2e], false), None);
    }

    #[test]
    fn describes_on_one_line() {
        let d = describe(0xffff_ffff_8100_1234, &[0x48, 0x0f, 0xae, 0x2e], None, true);
        assert_eq!(
            d,
            "instruction at rip 0xffffffff81001234: bytes 48 0f ae 2e (xrstor)"
        );
        let d = describe(0x1000, &[], Some(WalkError::NotPresent(4)), true);
        assert_eq!(
            d,
            "instruction at rip 0x1000: bytes unreadable; code after byte 0 not mapped (level-4 entry not present)"
        );
        assert!(!describe(5, &[0x90, 0x90], None, true).contains('\n'));
        assert!(describe(5, &[0x90], None, true).ends_with("(not one pvmm can name)"));
    }

    /// 4-level tables: code page at linear 0xffff_ffff_8000_0ff8 (high half, crosses into
    /// the next page) mapped to physical 0x30_0ff8 through a 2 MiB page and a 4 KiB page.
    #[test]
    fn reads_code_through_four_level_tables_across_a_page() {
        let m = mem();
        let w = |a: u64, v: u64| m.write_obj(v, GuestAddress(a)).unwrap();
        let (pml4, pdpt, pd, pt) = (0x1000u64, 0x2000u64, 0x3000u64, 0x4000u64);
        let lin = 0xffff_ffff_8000_0ff8u64;
        w(pml4 + 511 * 8, pdpt | 3);
        w(pdpt + 510 * 8, pd | 3);
        w(pd, pt | 3); // first 2 MiB through a page table
        w(pt, 0x30_0000 | 3); // page 0 -> 0x300000
        w(pt + 8, 0x50_0000 | 3); // page 1 -> 0x500000 (not contiguous)
        m.write_slice(
            &[0xf0, 0x48, 0x0f, 0xc7, 0x0e, 1, 2, 3],
            GuestAddress(0x30_0ff8),
        )
        .unwrap();
        m.write_slice(&[9; 8], GuestAddress(0x50_0000)).unwrap();
        let p = Paging {
            cr0: CR0_PG | 1,
            cr3: pml4,
            cr4: CR4_PAE,
            efer: EFER_LMA | (1 << 8),
        };
        assert_eq!(translate(&m, &p, lin), Ok(0x30_0ff8));
        let (code, short) = read_code(&m, &p, lin);
        assert_eq!(short, None);
        assert_eq!(
            code,
            [0xf0, 0x48, 0x0f, 0xc7, 0x0e, 1, 2, 3, 9, 9, 9, 9, 9, 9, 9]
        );
        assert_eq!(mnemonic(&code, true), Some("cmpxchg16b"));
        // A 2 MiB page, and an unmapped address.
        w(pd + 8, 0x60_0000 | 3 | PTE_PS);
        assert_eq!(translate(&m, &p, 0xffff_ffff_8020_1234), Ok(0x60_1234));
        assert_eq!(translate(&m, &p, 0x1234), Err(WalkError::NotPresent(4)));
        // The second page missing: the bytes of the first page and why the rest is absent.
        w(pt + 8, 0);
        let (code, short) = read_code(&m, &p, lin);
        assert_eq!(code.len(), 8);
        assert_eq!(short, Some(WalkError::NotPresent(1)));
    }

    #[test]
    fn translates_without_paging_and_with_32_bit_and_pae_tables() {
        let m = mem();
        let none = Paging::default();
        assert_eq!(translate(&m, &none, 0x12345), Ok(0x12345));
        // 32-bit: a 4 MiB page (PSE) for 0x0040_0000.
        m.write_obj(0x0040_0000u32 | 0x83, GuestAddress(0x1000 + 4))
            .unwrap();
        let p32 = Paging {
            cr0: CR0_PG,
            cr3: 0x1000,
            cr4: CR4_PSE,
            efer: 0,
        };
        assert_eq!(translate(&m, &p32, 0x0040_1234), Ok(0x0040_1234));
        assert_eq!(
            translate(&m, &p32, 0x0080_0000),
            Err(WalkError::NotPresent(2))
        );
        // PAE: PDPTE 0 -> PD at 0x3000, 2 MiB page at 0x20_0000.
        m.write_obj(0x3000u64 | 1, GuestAddress(0x2000)).unwrap();
        m.write_obj(0x20_0000u64 | 0x83, GuestAddress(0x3000))
            .unwrap();
        let pae = Paging {
            cr0: CR0_PG,
            cr3: 0x2000,
            cr4: CR4_PAE,
            efer: 0,
        };
        assert_eq!(translate(&m, &pae, 0x1234), Ok(0x20_1234));
        // A table pointer outside RAM.
        m.write_obj(0x4000_0000u64 | 1, GuestAddress(0x2008))
            .unwrap();
        assert_eq!(
            translate(&m, &pae, 0x4000_0000),
            Err(WalkError::OutsideMemory(0x4000_0000))
        );
    }
}
