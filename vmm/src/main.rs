//! `pvmm` binary: parses flags, runs the VM, prints the statistics, exits with the guest's
//! status or a documented VMM exit code.

use anyhow::Context;
use clap::Parser;
use std::io::Write;
use std::process::ExitCode;
use vmm::cli::{Cli, Command, RunArgs, StatsMode};
use vmm::error::exit_code;
use vmm::stats::{report, table};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                // `pvmm` alone: the usage, on stderr, as a usage error.
                eprint!("{}", e.render());
                return ExitCode::from(exit_code::SETUP as u8);
            }
            // One line: clap's text up to its usage hint, joined.
            let msg = e.render().to_string();
            let parts: Vec<&str> = msg
                .lines()
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
                .map(|l| l.trim().trim_start_matches("error: "))
                .filter(|l| !l.is_empty())
                .collect();
            eprintln!("pvmm: {}", parts.join(" "));
            return ExitCode::from(exit_code::SETUP as u8);
        }
    };
    let args = match cli.command {
        Command::Run(a) => a,
        Command::BenchExits {
            iterations,
            repeat,
            json,
            seccomp,
            compare_seccomp,
        } => {
            init_logging(0);
            let r = if compare_seccomp {
                vmm::bench::compare_seccomp(iterations, repeat, json)
            } else {
                vmm::bench::run(iterations, repeat, json, seccomp)
            };
            return match r {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("pvmm: {}", one_line(&e));
                    ExitCode::from(exit_code::SETUP as u8)
                }
            };
        }
    };
    init_logging(args.verbose);
    match run(&args) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("pvmm: {}", one_line(e.as_ref()));
            ExitCode::from(exit_code::SETUP as u8)
        }
    }
}

/// The error and its causes on one line, each cause once: an error whose message already
/// names its source does not repeat it.
fn one_line(e: &(dyn std::error::Error + 'static)) -> String {
    let mut line = String::new();
    let mut next = Some(e);
    while let Some(cause) = next {
        next = cause.source();
        let text = cause.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    line
}

fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => log::LevelFilter::Warn,
        1 => log::LevelFilter::Info,
        2 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    };
    let _ = env_logger::Builder::new()
        .filter_level(level)
        .parse_env("PVMM_LOG")
        .try_init();
}

/// Where the final report goes, opened (and validated) before the VM starts: once the
/// seccomp filters are on, nothing can be opened any more.
enum StatsOut {
    File(std::fs::File, std::path::PathBuf),
    Stdout,
    Stderr,
}

impl StatsOut {
    fn open(args: &RunArgs) -> anyhow::Result<StatsOut> {
        if let Some(p) = &args.stats_file {
            // Emptied, then held open in append mode: with --stats-interval the interval lines
            // (written through their own descriptor) come first, the final report after them.
            std::fs::File::create(p)
                .with_context(|| format!("cannot create stats file '{}'", p.display()))?;
            let f = std::fs::OpenOptions::new()
                .append(true)
                .open(p)
                .with_context(|| format!("cannot open stats file '{}'", p.display()))?;
            return Ok(StatsOut::File(f, p.clone()));
        }
        Ok(match args.stats {
            StatsMode::Json => StatsOut::Stdout,
            _ => StatsOut::Stderr,
        })
    }

    fn write(self, text: &str) -> anyhow::Result<()> {
        match self {
            StatsOut::File(mut f, p) => f
                .write_all(text.as_bytes())
                .with_context(|| format!("writing stats file '{}'", p.display())),
            StatsOut::Stdout => Ok(std::io::stdout().write_all(text.as_bytes())?),
            StatsOut::Stderr => Ok(std::io::stderr().write_all(text.as_bytes())?),
        }
    }
}

fn run(args: &RunArgs) -> anyhow::Result<i32> {
    args.validate().map_err(anyhow::Error::msg)?;
    // Before anything is opened: every file and the KVM device are opened as that user.
    if let (Some(uid), Some(gid)) = (args.uid, args.gid) {
        vmm::privilege::drop_to(uid, gid, &vmm::vm::build::kvm_device())?;
    }
    let sink = StatsOut::open(args)?;
    let options = vmm::hcall::mmu_batch::MmuOptions {
        check_shadow: args.check_shadow,
        unguarded_response: args.debug_unguarded_response,
        trap_debug: args.trap_debug(),
        drop_remote_flushes: args.debug_drop_remote_flushes,
        kernel_flush_no_zap: args.debug_kernel_flush_no_zap,
        leaf_zap_skip: args.debug_leaf_zap_skip,
    };
    let mmu = move |ram: &vmm::guest_ram::GuestRam, layout: &vmm::layout::Layout, vcpus| {
        vmm::hcall::mmu_batch::factory_with(ram, layout, vcpus, options)
    };
    let out = vmm::vm::run(args, &mmu)?;
    if let Some(m) = &out.message {
        eprintln!("pvmm: {m}");
    }
    report_seccomp_refusals();
    for r in &out.regs {
        eprint!("{r}");
    }
    let text = match (args.stats, args.stats_interval.is_some()) {
        (StatsMode::None, _) => None,
        // With --stats-interval the output is JSON Lines: the final report is the last line.
        (_, true) => Some(report::to_json_line(&out.report) + "\n"),
        (StatsMode::Table, false) => Some(table::to_table(&out.report)),
        (StatsMode::Json, false) => Some(report::to_json(&out.report) + "\n"),
    };
    if let Some(t) = text {
        sink.write(&t)?;
    }
    Ok(out.exit_code)
}

/// With `--seccomp log`: how many syscalls the filters refused, and the first (the thread
/// that made it reported it by name when it happened).
fn report_seccomp_refusals() {
    if let Some(v) = vmm::seccomp::sigsys::violation() {
        let name = vmm::seccomp::names::name(v.nr).unwrap_or("unknown");
        eprintln!(
            "pvmm: seccomp: {} syscall(s) outside the allow-lists were refused (--seccomp log); the first: {name} in {}",
            v.count, v.thread
        );
    }
}
