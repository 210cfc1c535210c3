//! `pvmm` binary: parses flags, runs the VM, prints the statistics, exits with the guest's
//! status or a documented VMM exit code.

use anyhow::Context;
use clap::Parser;
use std::io::Write;
use std::process::ExitCode;
use vmm::cli::{Cli, Command, StatsMode};
use vmm::error::exit_code;
use vmm::stats::report;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
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
        } => {
            init_logging(0);
            return match vmm::bench::run(iterations, repeat, json) {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("pvmm: {e}");
                    ExitCode::from(exit_code::SETUP as u8)
                }
            };
        }
    };
    init_logging(args.verbose);
    match run(&args) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("pvmm: {e}");
            ExitCode::from(exit_code::SETUP as u8)
        }
    }
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

fn run(args: &vmm::cli::RunArgs) -> anyhow::Result<i32> {
    let out = vmm::vm::run(args, &vmm::hcall::mmu_batch::factory)?;
    if let Some(m) = &out.message {
        eprintln!("pvmm: {m}");
    }
    for r in &out.regs {
        eprint!("{r}");
    }
    let text = match args.stats {
        StatsMode::None => None,
        StatsMode::Table => Some(report::to_table(&out.report)),
        StatsMode::Json => Some(report::to_json(&out.report) + "\n"),
    };
    if let Some(t) = text {
        match &args.stats_file {
            // With --stats-interval the file is JSON Lines: the final report is the last line.
            Some(p) if args.stats_interval.is_some() => {
                let line = serde_json::to_string(&out.report).unwrap_or_default();
                let mut f = std::fs::OpenOptions::new()
                    .append(true)
                    .create(true)
                    .open(p)
                    .with_context(|| format!("opening stats file '{}'", p.display()))?;
                writeln!(f, "{line}")
                    .with_context(|| format!("writing stats file '{}'", p.display()))?;
            }
            Some(p) => std::fs::write(p, t)
                .with_context(|| format!("writing stats file '{}'", p.display()))?,
            None => {
                let _ = std::io::stderr().write_all(t.as_bytes());
            }
        }
    }
    Ok(out.exit_code)
}
