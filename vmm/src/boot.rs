//! Kernel, initrd and command-line loading (linux-loader), and the zero page.

use crate::error::SetupError;
use crate::layout::{self, Layout};
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::Elf;
use linux_loader::loader::{bzimage::BzImage, KernelLoader};
use std::fs::File;
use std::io::Seek;
use std::path::Path;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Boot protocol version we require of a bzImage (2.12: 64-bit entry, xloadflags).
const MIN_BOOT_PROTOCOL: u16 = 0x020c;
/// `xloadflags` bit: the kernel has a 64-bit entry point at `code32_start + 0x200`.
const XLF_KERNEL_64: u16 = 1 << 0;
/// Loader type written to the setup header ("undefined" boot loader).
const LOADER_TYPE: u8 = 0xff;
/// Setup header magic "HdrS".
const HDRS_MAGIC: u32 = 0x5372_6448;

/// What the kernel loader produced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadedKernel {
    /// 64-bit entry point (RIP).
    pub entry: u64,
    /// First byte past the loaded image.
    pub end: u64,
    /// The format that was recognised.
    pub format: KernelFormat,
}

/// Kernel image formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// 64-bit ELF (entry = `e_entry`).
    Elf,
    /// bzImage (entry = protected-mode kernel + 0x200).
    BzImage,
}

fn load_err(path: &Path, e: impl std::fmt::Display) -> SetupError {
    SetupError::BadKernel {
        path: path.to_path_buf(),
        why: e.to_string(),
    }
}

/// Loads `path` into guest memory and fills the zero page (boot_params) with the command
/// line, the initrd and the e820 map.
pub fn load(
    mem: &GuestMemoryMmap,
    layout: &Layout,
    path: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
) -> Result<LoadedKernel, SetupError> {
    let mut file = File::open(path).map_err(|source| SetupError::KernelFile {
        path: path.to_path_buf(),
        source,
    })?;
    let len = file
        .metadata()
        .map_err(|source| SetupError::KernelFile {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    if len < 64 {
        return Err(SetupError::NotAKernel(path.to_path_buf()));
    }
    crate::kernel_check::check(path, &mut file, len)?;
    file.seek(std::io::SeekFrom::Start(0))
        .map_err(|source| SetupError::KernelFile {
            path: path.to_path_buf(),
            source,
        })?;
    let mut params = boot_params::default();
    let loaded = match Elf::load(
        mem,
        None,
        &mut file,
        Some(GuestAddress(layout::HIGH_MEM_START)),
    ) {
        Ok(r) => {
            if r.kernel_end > layout.low_ram_end() {
                return Err(too_big(layout, path));
            }
            LoadedKernel {
                entry: r.kernel_load.0,
                end: r.kernel_end,
                format: KernelFormat::Elf,
            }
        }
        Err(linux_loader::loader::Error::Elf(
            linux_loader::loader::elf::Error::InvalidElfMagicNumber,
        )) => load_bzimage(mem, layout, path, &mut file, &mut params)?,
        Err(linux_loader::loader::Error::Elf(
            linux_loader::loader::elf::Error::ReadKernelImage,
        )) => {
            return Err(too_big(layout, path));
        }
        Err(linux_loader::loader::Error::Elf(e)) => return Err(load_err(path, elf_reason(e))),
        Err(e) => return Err(load_err(path, e)),
    };
    write_cmdline(mem, cmdline, &mut params)?;
    if let Some(p) = initrd {
        load_initrd(mem, layout, p, loaded.end, &mut params)?;
    }
    fill_e820(layout, &mut params)?;
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new::<boot_params>(&params, GuestAddress(layout::ZERO_PAGE)),
        mem,
    )
    .map_err(|e| SetupError::other("writing boot_params", e))?;
    Ok(loaded)
}

/// What a linux-loader ELF error means for the user.
fn elf_reason(e: linux_loader::loader::elf::Error) -> String {
    use linux_loader::loader::elf::Error as E;
    match e {
        E::InvalidEntryAddress => "its entry point is below 1 MiB; pvmm loads ELF kernels at \
            their physical addresses, at or above 1 MiB (is it a user-space program or a \
            32-bit/real-mode image?)"
            .into(),
        E::ReadElfHeader | E::ReadProgramHeader | E::SeekProgramHeader => {
            "the file ends inside its ELF headers (truncated?)".into()
        }
        E::InvalidProgramHeaderSize | E::InvalidProgramHeaderOffset | E::BigEndianElfOnLittle => {
            format!("{e} (not an x86-64 little-endian kernel ELF)")
        }
        other => other.to_string(),
    }
}

fn too_big(layout: &Layout, path: &Path) -> SetupError {
    SetupError::KernelTooBig {
        mem: layout.mem_size,
        path: path.to_path_buf(),
    }
}

fn load_bzimage(
    mem: &GuestMemoryMmap,
    layout: &Layout,
    path: &Path,
    file: &mut File,
    params: &mut boot_params,
) -> Result<LoadedKernel, SetupError> {
    let r = match BzImage::load(mem, None, file, Some(GuestAddress(layout::HIGH_MEM_START))) {
        Ok(r) => r,
        Err(linux_loader::loader::Error::Bzimage(
            linux_loader::loader::bzimage::Error::InvalidBzImage,
        )) => return Err(SetupError::NotAKernel(path.to_path_buf())),
        Err(linux_loader::loader::Error::Bzimage(
            linux_loader::loader::bzimage::Error::ReadBzImageCompressedKernel,
        ))
        | Err(linux_loader::loader::Error::InvalidKernelStartAddress) => {
            return Err(too_big(layout, path))
        }
        Err(e) => return Err(load_err(path, e)),
    };
    let hdr = r
        .setup_header
        .ok_or_else(|| load_err(path, "no setup header"))?;
    if hdr.header != HDRS_MAGIC {
        return Err(SetupError::NotAKernel(path.to_path_buf()));
    }
    if hdr.version < MIN_BOOT_PROTOCOL {
        return Err(load_err(path, {
            let v = hdr.version;
            format!("boot protocol {v:#x} is older than 2.12")
        }));
    }
    if hdr.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(load_err(path, "bzImage has no 64-bit entry point"));
    }
    if r.kernel_end > layout.low_ram_end() {
        return Err(too_big(layout, path));
    }
    params.hdr = hdr;
    params.hdr.type_of_loader = LOADER_TYPE;
    params.hdr.loadflags |= 0x01 | 0x80; // LOADED_HIGH | CAN_USE_HEAP
    params.hdr.heap_end_ptr = 0xfe00;
    Ok(LoadedKernel {
        entry: r.kernel_load.0 + 0x200,
        end: r.kernel_end,
        format: KernelFormat::BzImage,
    })
}

fn write_cmdline(
    mem: &GuestMemoryMmap,
    cmdline: &str,
    params: &mut boot_params,
) -> Result<(), SetupError> {
    if cmdline.len() >= layout::CMDLINE_MAX {
        return Err(SetupError::Cmdline(format!(
            "longer than {} bytes",
            layout::CMDLINE_MAX - 1
        )));
    }
    let mut c = linux_loader::cmdline::Cmdline::new(layout::CMDLINE_MAX)
        .map_err(|e| SetupError::Cmdline(e.to_string()))?;
    if !cmdline.is_empty() {
        c.insert_str(cmdline)
            .map_err(|e| SetupError::Cmdline(e.to_string()))?;
    }
    linux_loader::loader::load_cmdline(mem, GuestAddress(layout::CMDLINE), &c)
        .map_err(|e| SetupError::Cmdline(e.to_string()))?;
    params.hdr.cmd_line_ptr = layout::CMDLINE as u32;
    params.hdr.cmdline_size = cmdline.len() as u32 + 1;
    Ok(())
}

fn load_initrd(
    mem: &GuestMemoryMmap,
    layout: &Layout,
    path: &Path,
    kernel_end: u64,
    params: &mut boot_params,
) -> Result<(), SetupError> {
    let data = std::fs::read(path).map_err(|source| SetupError::InitrdFile {
        path: path.to_path_buf(),
        source,
    })?;
    let size = data.len() as u64;
    // Top of low RAM, page aligned, above the kernel.
    let top = layout.low_ram_end().min(0x3800_0000);
    let addr = top
        .checked_sub(size)
        .map(|a| a & !(layout::PAGE - 1))
        .filter(|&a| a >= kernel_end.max(layout::HIGH_MEM_START));
    let addr = addr.ok_or(SetupError::InitrdTooBig { size })?;
    mem.write_slice(&data, GuestAddress(addr))
        .map_err(|e| SetupError::other("writing initrd", e))?;
    params.hdr.ramdisk_image = addr as u32;
    params.hdr.ramdisk_size = size as u32;
    Ok(())
}

fn fill_e820(layout: &Layout, params: &mut boot_params) -> Result<(), SetupError> {
    if layout.e820.len() > params.e820_table.len() {
        return Err(SetupError::other("e820", "too many entries"));
    }
    for (slot, e) in params.e820_table.iter_mut().zip(&layout.e820) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_entries = layout.e820.len() as u8;
    Ok(())
}
