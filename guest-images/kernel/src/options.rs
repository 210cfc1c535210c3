//! The guest's command-line options: one table ([`OPTIONS`]) that both the parser and the
//! `help` reference are generated from, so the two cannot drift; `docs/guest.md` carries
//! the same reference and an end-to-end test compares them.
//!
//! Words are separated by spaces; every word is an option from the table, `name=value` or a
//! bare flag; a later word overrides an earlier one. Unknown words and bad values are
//! errors: the kernel prints a TAP `Bail out!` line and exits with [`status::BAD_CMDLINE`].

use crate::mmu::{Mode, QMAX};
use crate::selftest::{self, Selection};
use crate::vm::FAULT_AROUND_MAX;
use core::fmt::{self, Write};

/// The guest's exit statuses (the VMM's exit code passes them on).
pub mod status {
    /// Every selected test passed, or `help` printed the reference.
    pub const PASS: u8 = 0;
    /// Failure counts are capped here (there are fewer tests than this).
    /// Every status stays within 0-127, the range `pvmm` passes through unchanged.
    pub const MAX_FAILURES: u8 = 63;
    /// An unknown option or a bad value (sysexits' EX_USAGE).
    pub const BAD_CMDLINE: u8 = 64;
    /// mmu=pv or pv-lazy without MMU_BATCH, or mmu=emulate or wrpt without the VMM's
    /// page-table write trap (feature PT_TRAP) (sysexits' EX_UNAVAILABLE).
    pub const NO_MMU_BATCH: u8 = 69;
    /// A kernel panic: the highest status `pvmm` passes through as is (0-127).
    pub const PANIC: u8 = 127;
}

/// The parsed options.
#[derive(Clone, Copy)]
pub struct Opts {
    /// `help`: print the reference and exit.
    pub help: bool,
    /// `mmu=`.
    pub mode: Mode,
    /// `selftest=`.
    pub tests: Selection,
    /// `lazy_batch=`.
    pub lazy_batch: usize,
    /// `zero=vmm` (true) or `zero=cpu`.
    pub zero_vmm: bool,
    /// `copy=vmm` (true) or `copy=cpu`.
    pub copy_vmm: bool,
    /// `pages=`.
    pub pages: u64,
    /// `seed=`.
    pub seed: u64,
    /// `exit=`: overrides the exit status.
    pub exit: Option<u8>,
    /// `debug_faults`.
    pub debug_faults: bool,
    /// `break=drop_update`.
    pub drop_update: bool,
    /// `break=no_shootdown`.
    pub no_shootdown: bool,
    /// `drop_at=`.
    pub drop_at: u64,
    /// `fault_around=`: pages a demand fault maps (0: only the faulting one).
    pub fault_around: u64,
}

/// What values an option takes.
enum Kind {
    /// A bare word (or `name=1` / `name=0`).
    Flag,
    /// One of these words.
    Choice(&'static [&'static str]),
    /// A decimal or 0x-hexadecimal number in `min..=max`.
    Number { min: u64, max: u64 },
    /// `all`, `none` or a comma-separated list of selftest names.
    Tests,
    /// `ttyS0`, optionally with `,BAUD`.
    Console,
}

/// A parsed value.
enum Val {
    Flag(bool),
    Choice(usize),
    Number(u64),
    Tests(Selection),
}

/// One option of the table.
struct Opt {
    name: &'static str,
    kind: Kind,
    /// The default, parsed like a user's value before the command line; None: unset.
    default: Option<&'static str>,
    /// What "unset" means (shown when `default` is None).
    unset: &'static str,
    help: &'static str,
    set: fn(&mut Opts, Val),
}

const MODES: &[&str] = &["native", "pv", "pv-lazy", "emulate", "wrpt"];

/// Every option, in the order `help` lists them.
const OPTIONS: &[Opt] = &[
    Opt {
        name: "help",
        kind: Kind::Flag,
        default: None,
        unset: "off",
        help: "Print this reference and exit with status 0 (nothing else runs).",
        set: |o, v| o.help = flag(v),
    },
    Opt {
        name: "console",
        kind: Kind::Console,
        default: Some("ttyS0"),
        unset: "",
        help: "The console. COM1 (ttyS0) is the only one; a baud rate is accepted and ignored.",
        set: |_, _| {},
    },
    Opt {
        name: "mmu",
        kind: Kind::Choice(MODES),
        default: Some("native"),
        unset: "",
        help: "MMU backend. native: the kernel writes the page tables the CPU walks; pv: \
               every page-table change is one MMU_BATCH hypercall to the VMM's shadow MMU; \
               pv-lazy: changes queue inside lazy sections and go out as one batch; emulate: \
               plain stores to the page tables, each trapped and validated by the VMM; wrpt: \
               plain stores, the VMM unhooks a written L1 and re-validates it at the next \
               fault in its range or MMU hypercall (needs the VMM's PT_TRAP feature).",
        set: |o, v| {
            o.mode = match choice(v) {
                1 => Mode::Pv,
                2 => Mode::PvLazy,
                3 => Mode::Emulate,
                4 => Mode::Wrpt,
                _ => Mode::Native,
            }
        },
    },
    Opt {
        name: "selftest",
        kind: Kind::Tests,
        default: Some("all"),
        unset: "",
        help: "The selftests to run, in the listed order, reported as TAP 13 on the console: \
               all, none, or a comma-separated list of test names.",
        set: |o, v| {
            if let Val::Tests(t) = v {
                o.tests = t;
            }
        },
    },
    Opt {
        name: "pages",
        kind: Kind::Number { min: 1, max: 16384 },
        default: Some("256"),
        unset: "",
        help: "Pages per selftest workload (large values need a larger --mem).",
        set: |o, v| o.pages = number(v),
    },
    Opt {
        name: "seed",
        kind: Kind::Number {
            min: 0,
            max: u64::MAX,
        },
        default: Some("0x12345678"),
        unset: "",
        help: "Seed of the selftests' random page subsets.",
        set: |o, v| o.seed = number(v),
    },
    Opt {
        name: "lazy_batch",
        kind: Kind::Number {
            min: 1,
            max: QMAX as u64,
        },
        default: Some("1024"),
        unset: "",
        help: "pv-lazy: queued entries that force a flush (the batch size).",
        set: |o, v| o.lazy_batch = number(v) as usize,
    },
    Opt {
        name: "zero",
        kind: Kind::Choice(&["vmm", "cpu"]),
        default: Some("vmm"),
        unset: "",
        help: "PV modes: who zeroes new frames. vmm: ZERO_FRAME entries in the batch; cpu: \
               the kernel's own stores. Native mode always zeroes with the CPU.",
        set: |o, v| o.zero_vmm = choice(v) == 0,
    },
    Opt {
        name: "copy",
        kind: Kind::Choice(&["vmm", "cpu"]),
        default: Some("vmm"),
        unset: "",
        help: "PV modes: who copies a page on a copy-on-write fault. vmm: \
               COPY_FRAME entries in the batch (where the VMM offers them); cpu: the \
               kernel's own loads and stores. Native mode always copies with the CPU.",
        set: |o, v| o.copy_vmm = choice(v) == 0,
    },
    Opt {
        name: "fault_around",
        kind: Kind::Number {
            min: 0,
            max: FAULT_AROUND_MAX,
        },
        default: Some("16"),
        unset: "",
        help: "Demand faults map up to N pages of the faulting VMA in one lazy section: the \
               aligned N-page window around the address, inside its 2 MiB page table, every \
               empty page zero-filled and installed old (A=0), so reclaim can find the \
               never-touched ones with QUERY_AD (PV) or the A bits (native). 0 or 1: only \
               the faulting page.",
        set: |o, v| o.fault_around = number(v),
    },
    Opt {
        name: "exit",
        kind: Kind::Number { min: 0, max: 255 },
        default: None,
        unset: "the exit status below",
        help: "Exit with this status whatever the tests did (tests the VMM's pass-through).",
        set: |o, v| o.exit = Some(number(v) as u8),
    },
    Opt {
        name: "debug_faults",
        kind: Kind::Flag,
        default: None,
        unset: "off",
        help: "Log every user page fault (address, error code, rip, rsp, PTE).",
        set: |o, v| o.debug_faults = flag(v),
    },
    Opt {
        name: "break",
        kind: Kind::Choice(&["drop_update", "no_shootdown"]),
        default: None,
        unset: "none",
        help: "Fault injection. drop_update: the pv-lazy backend silently drops one queued \
               PT_UPDATE, so the selftests must fail (proves they can). no_shootdown: \
               native mode sends no TLB shootdown IPIs (a dying root is still dropped), so \
               the SMP shootdown tests must fail where the CPUs cache translations.",
        set: |o, v| {
            if choice(v) == 0 {
                o.drop_update = true
            } else {
                o.no_shootdown = true
            }
        },
    },
    Opt {
        name: "drop_at",
        kind: Kind::Number {
            min: 0,
            max: u32::MAX as u64,
        },
        default: Some("3"),
        unset: "",
        help: "With break=drop_update: PT_UPDATEs let through before the dropped one.",
        set: |o, v| o.drop_at = number(v),
    },
];

fn flag(v: Val) -> bool {
    matches!(v, Val::Flag(true))
}

fn choice(v: Val) -> usize {
    match v {
        Val::Choice(i) => i,
        _ => 0,
    }
}

fn number(v: Val) -> u64 {
    match v {
        Val::Number(n) => n,
        _ => 0,
    }
}

/// Why a command line was refused.
pub enum Error<'a> {
    /// A word that is no option.
    Unknown(&'a str),
    /// A value the option does not take.
    BadValue(&'static str, &'a str),
    /// A selftest name that does not exist.
    UnknownTest(&'a str),
}

impl fmt::Display for Error<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Unknown(w) => write!(
                f,
                "unknown option '{w}' (the command line 'help' lists the options)"
            ),
            Error::BadValue(name, v) => {
                let o = find(name);
                write!(f, "bad value '{v}' for {}: expected ", syntax_name(o))?;
                expected(f, o)
            }
            Error::UnknownTest(t) => {
                write!(
                    f,
                    "unknown selftest '{t}' in selftest=: expected all, none or"
                )?;
                write!(f, " a comma-separated list of: ")?;
                test_names(f)
            }
        }
    }
}

fn find(name: &str) -> &'static Opt {
    OPTIONS
        .iter()
        .find(|o| o.name == name)
        .unwrap_or(&OPTIONS[0])
}

fn syntax_name(o: &Opt) -> Syntax<'_> {
    Syntax(o, true)
}

/// The defaults alone (what an empty command line gives).
fn defaults() -> Opts {
    let mut o = Opts {
        help: false,
        mode: Mode::Native,
        tests: 0,
        lazy_batch: QMAX,
        zero_vmm: true,
        copy_vmm: true,
        pages: 0,
        seed: 0,
        exit: None,
        debug_faults: false,
        drop_update: false,
        no_shootdown: false,
        drop_at: 0,
        fault_around: 0,
    };
    for opt in OPTIONS {
        if let Some(d) = opt.default {
            match value(opt, Some(d)) {
                Ok(v) => (opt.set)(&mut o, v),
                Err(_) => panic!("the default of {}= does not parse", opt.name),
            }
        }
    }
    o
}

/// Parses a command line.
pub fn parse(cmdline: &str) -> Result<Opts, Error<'_>> {
    let mut o = defaults();
    for word in cmdline.split_ascii_whitespace() {
        let (name, v) = match word.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (word, None),
        };
        let opt = OPTIONS
            .iter()
            .find(|o| o.name == name)
            .ok_or(Error::Unknown(word))?;
        (opt.set)(&mut o, value(opt, v)?);
    }
    Ok(o)
}

/// True if the command line asks for the reference (checked before anything else).
pub fn wants_help(cmdline: &str) -> bool {
    cmdline
        .split_ascii_whitespace()
        .any(|w| w == "help" || w == "help=1")
}

fn value<'a>(o: &'static Opt, v: Option<&'a str>) -> Result<Val, Error<'a>> {
    let bad = || Error::BadValue(o.name, v.unwrap_or(""));
    match (&o.kind, v) {
        (Kind::Flag, None | Some("1")) => Ok(Val::Flag(true)),
        (Kind::Flag, Some("0")) => Ok(Val::Flag(false)),
        (Kind::Flag, Some(_)) | (_, None) => Err(bad()),
        (Kind::Choice(c), Some(v)) => c
            .iter()
            .position(|x| *x == v)
            .map(Val::Choice)
            .ok_or_else(bad),
        (Kind::Number { min, max }, Some(v)) => match parse_u64(v) {
            Some(n) if (*min..=*max).contains(&n) => Ok(Val::Number(n)),
            _ => Err(bad()),
        },
        (Kind::Tests, Some(v)) => tests(v).map(Val::Tests),
        (Kind::Console, Some(v)) => match v.split_once(',') {
            None if v == "ttyS0" => Ok(Val::Flag(true)),
            Some(("ttyS0", baud)) if parse_u64(baud).is_some() => Ok(Val::Flag(true)),
            _ => Err(bad()),
        },
    }
}

fn parse_u64(v: &str) -> Option<u64> {
    match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => v.parse().ok(),
    }
}

fn tests(v: &str) -> Result<Selection, Error<'_>> {
    match v {
        "all" => {
            return Ok(Selection::MAX >> (Selection::BITS as usize - selftest::names().count()))
        }
        "none" => return Ok(0),
        _ => {}
    }
    let mut sel = 0;
    for t in v.split(',') {
        let i = selftest::names()
            .position(|n| n == t)
            .ok_or(Error::UnknownTest(t))?;
        sel |= 1 << i;
    }
    Ok(sel)
}

/// `name=SYNTAX` of an option (with `.1`: only `name=` for error messages).
struct Syntax<'a>(&'a Opt, bool);

impl fmt::Display for Syntax<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = self.0;
        if self.1 {
            return match o.kind {
                Kind::Flag => write!(f, "{}", o.name),
                _ => write!(f, "{}=", o.name),
            };
        }
        match &o.kind {
            Kind::Flag => write!(f, "{}", o.name),
            Kind::Choice(c) => write!(f, "{}={}", o.name, Joined(c, "|")),
            Kind::Number { .. } => write!(f, "{}=N", o.name),
            Kind::Tests => write!(f, "{}=all|none|NAME[,NAME...]", o.name),
            Kind::Console => write!(f, "{}=ttyS0[,BAUD]", o.name),
        }
    }
}

struct Joined<'a>(&'a [&'a str], &'a str);

impl fmt::Display for Joined<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, w) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(self.1)?;
            }
            f.write_str(w)?;
        }
        Ok(())
    }
}

fn test_names(f: &mut fmt::Formatter<'_>) -> fmt::Result {
    for (i, n) in selftest::names().enumerate() {
        if i > 0 {
            f.write_str(", ")?;
        }
        f.write_str(n)?;
    }
    Ok(())
}

/// What values an option takes, in words.
fn expected(f: &mut fmt::Formatter<'_>, o: &Opt) -> fmt::Result {
    match &o.kind {
        Kind::Flag => write!(f, "none (the bare word turns it on), or =1 / =0"),
        Kind::Choice(c) => write!(f, "one of {}", Joined(c, ", ")),
        Kind::Number { min, max } => write!(f, "a number from {min} to {max} (decimal or 0x hex)"),
        Kind::Tests => {
            write!(f, "all, none or a comma-separated list of: ")?;
            test_names(f)
        }
        Kind::Console => write!(f, "ttyS0 or ttyS0,BAUD"),
    }
}

/// First line of the reference (tests look for it).
pub const HELP_FIRST_LINE: &str = "pvmm-guest options";
/// Last line of the reference.
pub const HELP_LAST_LINE: &str = "end of pvmm-guest options";

/// Prints the reference: every option of [`OPTIONS`] and the exit statuses.
pub fn print_help(w: &mut impl Write) -> fmt::Result {
    writeln!(w, "{HELP_FIRST_LINE}")?;
    writeln!(
        w,
        "Words on the kernel command line, separated by spaces; a later word overrides an"
    )?;
    writeln!(
        w,
        "earlier one. An unknown word or a bad value stops the guest with `Bail out!`."
    )?;
    for o in OPTIONS {
        writeln!(w)?;
        write!(w, "{}", Syntax(o, false))?;
        match o.default {
            Some(d) => writeln!(w, "  (default: {d})")?,
            None => writeln!(w, "  (default: {})", o.unset)?,
        }
        let mut buf = [0u8; 512];
        let mut c = Cursor(&mut buf, 0);
        write!(c, "{}", Expected(o))?;
        let n = c.1;
        wrap(
            w,
            "    values: ",
            "      ",
            core::str::from_utf8(&buf[..n]).unwrap_or(""),
        )?;
        wrap(w, "    ", "    ", o.help)?;
    }
    print_statuses(w)?;
    writeln!(w, "{HELP_LAST_LINE}")
}

struct Expected<'a>(&'a Opt);

impl fmt::Display for Expected<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        expected(f, self.0)
    }
}

/// Writes `text` after `first`, continued on lines starting with `rest`, wrapped at 92
/// columns.
fn wrap(w: &mut impl Write, first: &str, rest: &str, text: &str) -> fmt::Result {
    w.write_str(first)?;
    let mut col = first.len();
    let mut empty = true;
    for word in text.split_ascii_whitespace() {
        if !empty && col + 1 + word.len() > 92 {
            writeln!(w)?;
            w.write_str(rest)?;
            col = rest.len();
            empty = true;
        }
        if !empty {
            w.write_str(" ")?;
            col += 1;
        }
        w.write_str(word)?;
        col += word.len();
        empty = false;
    }
    writeln!(w)
}

fn print_statuses(w: &mut impl Write) -> fmt::Result {
    use status::*;
    writeln!(w)?;
    writeln!(w, "Exit status (exit=N overrides it):")?;
    writeln!(
        w,
        "  {PASS:<5} every selected test passed, or `help` printed this reference"
    )?;
    let failures = Range(1, MAX_FAILURES);
    writeln!(
        w,
        "  {failures:<5} the number of failed tests (capped at {MAX_FAILURES})"
    )?;
    writeln!(
        w,
        "  {BAD_CMDLINE:<5} bad command line: an unknown option or a bad value (`Bail out!` says which)"
    )?;
    writeln!(
        w,
        "  {NO_MMU_BATCH:<5} mmu=pv or mmu=pv-lazy, but the VMM offers no MMU_BATCH; mmu=emulate or mmu=wrpt,\n        but it cannot trap page-table stores (`Bail out!`)"
    )?;
    writeln!(
        w,
        "  {PANIC:<5} kernel panic (`Bail out! kernel panic: ...`)"
    )
}

/// `a-b`, padded as one field.
struct Range(u8, u8);

impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; 8];
        let mut c = Cursor(&mut buf, 0);
        let _ = write!(c, "{}-{}", self.0, self.1);
        let n = c.1;
        f.pad(core::str::from_utf8(&buf[..n]).unwrap_or(""))
    }
}

/// A tiny fmt sink over a byte buffer.
struct Cursor<'a>(&'a mut [u8], usize);

impl Write for Cursor<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.1 + s.len();
        self.0
            .get_mut(self.1..end)
            .ok_or(fmt::Error)?
            .copy_from_slice(s.as_bytes());
        self.1 = end;
        Ok(())
    }
}
