//! Checks of a 64-bit ELF kernel file before it is loaded, so that the user hears what is
//! wrong with the file (truncated, a user-space program) rather than a loader's guess.

use crate::error::SetupError;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

const PT_LOAD: u32 = 1;
const PT_INTERP: u32 = 3;
const PT_TLS: u32 = 7;
const ET_DYN: u16 = 3;
/// More program headers than any kernel has: the file is refused past this.
const MAX_PHDRS: u16 = 256;

/// What the program headers say about a file.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ElfFacts {
    /// ELF type (`e_type`).
    pub e_type: u16,
    /// It names a program interpreter (a dynamically linked program).
    pub interp: bool,
    /// It has a thread-local storage segment (a user-space program).
    pub tls: bool,
    /// The largest file offset a `PT_LOAD` segment needs.
    pub load_end: u64,
}

/// Reads the facts from `file` when it is a 64-bit little-endian ELF; `None` otherwise (the
/// loader then tries a bzImage). Never trusts a header field to stay in bounds.
pub fn facts(file: &mut (impl Read + Seek)) -> Option<ElfFacts> {
    let mut h = [0u8; 64];
    file.seek(SeekFrom::Start(0)).ok()?;
    file.read_exact(&mut h).ok()?;
    if h.get(0..4)? != b"\x7fELF" || h.get(4) != Some(&2) || h.get(5) != Some(&1) {
        return None;
    }
    let u16_at = |b: &[u8], o: usize| Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |b: &[u8], o: usize| Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |b: &[u8], o: usize| Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?));
    let (phoff, phentsize, phnum) = (u64_at(&h, 32)?, u16_at(&h, 54)?, u16_at(&h, 56)?);
    let mut f = ElfFacts {
        e_type: u16_at(&h, 16)?,
        ..ElfFacts::default()
    };
    if phentsize < 56 || phnum > MAX_PHDRS {
        return Some(f);
    }
    let mut ph = vec![0u8; usize::from(phentsize) * usize::from(phnum)];
    file.seek(SeekFrom::Start(phoff)).ok()?;
    file.read_exact(&mut ph).ok()?;
    for e in ph.chunks_exact(usize::from(phentsize)) {
        match u32_at(e, 0)? {
            PT_INTERP => f.interp = true,
            PT_TLS => f.tls = true,
            PT_LOAD => {
                let end = u64_at(e, 8)?.saturating_add(u64_at(e, 32)?);
                f.load_end = f.load_end.max(end);
            }
            _ => {}
        }
    }
    Some(f)
}

/// Refuses a file whose ELF headers show it cannot be a kernel, or that is cut short.
pub fn check(path: &Path, file: &mut (impl Read + Seek), len: u64) -> Result<(), SetupError> {
    let Some(f) = facts(file) else {
        return Ok(());
    };
    let bad = |why: String| SetupError::BadKernel {
        path: path.to_path_buf(),
        why,
    };
    if f.interp || f.tls || f.e_type == ET_DYN {
        let what = if f.interp {
            "it names a program interpreter"
        } else if f.tls {
            "it has a thread-local storage segment"
        } else {
            "it is position-independent (ET_DYN)"
        };
        return Err(bad(format!(
            "it is a user-space program, not a kernel ({what}); pass a vmlinux, a bzImage or the bundled guest"
        )));
    }
    if f.load_end > len {
        return Err(bad(format!(
            "the file is truncated: its segments need {} bytes, it has {len}",
            f.load_end
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// A 64-bit ELF with one PT_LOAD of `filesz` bytes at offset 0x1000, plus `extra` phdrs.
    fn elf(filesz: u64, extra: &[u32], e_type: u16) -> Vec<u8> {
        let mut e = vec![0u8; 0x1000];
        e[0..4].copy_from_slice(b"\x7fELF");
        e[4] = 2;
        e[5] = 1;
        e[16..18].copy_from_slice(&e_type.to_le_bytes());
        e[32..40].copy_from_slice(&64u64.to_le_bytes());
        e[54..56].copy_from_slice(&56u16.to_le_bytes());
        e[56..58].copy_from_slice(&(1 + extra.len() as u16).to_le_bytes());
        e[64..68].copy_from_slice(&PT_LOAD.to_le_bytes());
        e[72..80].copy_from_slice(&0x1000u64.to_le_bytes());
        e[96..104].copy_from_slice(&filesz.to_le_bytes());
        for (i, t) in extra.iter().enumerate() {
            let o = 64 + 56 * (i + 1);
            e[o..o + 4].copy_from_slice(&t.to_le_bytes());
        }
        e
    }

    fn run(bytes: Vec<u8>, len: u64) -> Result<(), String> {
        check(Path::new("k"), &mut Cursor::new(bytes), len).map_err(|e| e.to_string())
    }

    #[test]
    fn kernels_pass_programs_and_truncated_files_do_not() {
        assert_eq!(run(elf(16, &[], 2), 0x1010), Ok(()));
        assert!(run(elf(0x4000, &[], 2), 0x1010)
            .unwrap_err()
            .contains("truncated"));
        assert!(run(elf(16, &[PT_INTERP], 2), 0x1010)
            .unwrap_err()
            .contains("user-space program"));
        assert!(run(elf(16, &[PT_TLS], 2), 0x1010)
            .unwrap_err()
            .contains("thread-local"));
        assert!(run(elf(16, &[], ET_DYN), 0x1010)
            .unwrap_err()
            .contains("ET_DYN"));
        assert_eq!(
            run(vec![0x42; 4096], 4096),
            Ok(()),
            "not ELF: the bzImage path decides"
        );
        let mut huge = elf(16, &[], 2);
        huge[56..58].copy_from_slice(&u16::MAX.to_le_bytes());
        assert_eq!(
            run(huge, 0x1010),
            Ok(()),
            "absurd phnum: left to the loader"
        );
    }
}
