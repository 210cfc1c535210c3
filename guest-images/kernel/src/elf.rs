//! Loads the ring-3 programs: static ELF64 executables whose PT_LOAD segments are copied
//! into fresh frames of an address space.

use crate::mem;
use crate::mmu::Mmu;
use crate::vm::{self, Space, PROT_R, PROT_W};

fn rd_u64(b: &[u8], o: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?))
}

fn rd_u32(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?))
}

fn rd_u16(b: &[u8], o: usize) -> Option<usize> {
    Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?) as usize)
}

/// One PT_LOAD segment.
struct Segment {
    off: u64,
    vaddr: u64,
    filesz: u64,
    memsz: u64,
    prot: u8,
}

fn segment(elf: &[u8], ph: usize) -> Option<Option<Segment>> {
    if rd_u32(elf, ph)? != 1 {
        return Some(None);
    }
    let flags = rd_u32(elf, ph + 4)?;
    let s = Segment {
        off: rd_u64(elf, ph + 8)?,
        vaddr: rd_u64(elf, ph + 16)?,
        filesz: rd_u64(elf, ph + 32)?,
        memsz: rd_u64(elf, ph + 40)?,
        prot: PROT_R | if flags & 2 != 0 { PROT_W } else { 0 },
    };
    let file_end = s.off.checked_add(s.filesz)?;
    if file_end > elf.len() as u64
        || s.filesz > s.memsz
        || s.vaddr.checked_add(s.memsz)? >= vm::STACK_TOP
    {
        return None;
    }
    Some(Some(s))
}

/// Loads `elf` into `s`; returns the entry point, or None for a malformed image.
pub fn load(s: &mut Space, m: &mut Mmu, elf: &[u8]) -> Option<u64> {
    if elf.len() < 64 || &elf[0..4] != b"\x7fELF" {
        return None;
    }
    let phoff = rd_u64(elf, 0x20)? as usize;
    let phentsize = rd_u16(elf, 0x36)?;
    let phnum = rd_u16(elf, 0x38)?;
    for i in 0..phnum {
        if let Some(seg) = segment(elf, phoff.checked_add(i * phentsize)?)? {
            load_segment(s, m, elf, &seg)?;
        }
    }
    m.flush();
    rd_u64(elf, 0x18)
}

fn load_segment(s: &mut Space, m: &mut Mmu, elf: &[u8], seg: &Segment) -> Option<()> {
    let start = seg.vaddr & !0xfff;
    let end = (seg.vaddr + seg.memsz).next_multiple_of(4096);
    // Segments may share a page (.data and .bss): that page keeps the VMA it has (with
    // both protections), so that no page is in two VMAs (teardown would drop it twice).
    let mut vstart = start;
    while let Some(i) = s.find(vstart).filter(|_| vstart < end) {
        s.vmas[i].prot |= seg.prot;
        vstart += 4096;
    }
    if vstart < end {
        s.add_vma(vstart, end, seg.prot);
    }
    let mut va = start;
    while va < end {
        let ptr = s.pte_ptr(m, va, true)?;
        let e = mem::rd(ptr);
        let frame = if e & vm::P != 0 {
            e & vm::ADDR
        } else {
            s.map_zero(m, ptr, seg.prot, true)
        };
        // File bytes overlapping this page.
        let lo = va.max(seg.vaddr);
        let hi = (va + 4096).min(seg.vaddr + seg.filesz);
        if lo < hi {
            let from = (seg.off + (lo - seg.vaddr)) as usize;
            let src = &elf[from..from + (hi - lo) as usize];
            // SAFETY: `frame` is this space's fresh frame, reached through the direct map;
            // the bytes stay inside its page (lo..hi lies within va..va+4096).
            unsafe {
                core::ptr::copy_nonoverlapping(
                    src.as_ptr(),
                    mem::va(frame + (lo - va)) as *mut u8,
                    src.len(),
                )
            };
        }
        va += 4096;
    }
    Some(())
}
