//! `snapkv`: the command-line interface over the snapkv library.
//!
//! - `snapkv generate`: evaluate a prompt (optionally with SnapKV) and
//!   generate text, with timings.
//! - `snapkv demo`: a long document with hidden facts, answered from full,
//!   SnapKV and streaming caches branched from one evaluation.
//! - `snapkv eval`: the synthetic long-context task suite (accuracy
//!   heatmaps).
//! - `snapkv fidelity`: KL divergence and top-1 agreement with the full
//!   cache, beside llama.cpp's quantized KV caches.
//! - `snapkv bench`: prefill, compression and decode speed, memory in use.
//! - `snapkv capacity`: how many long sequences fit one context.

mod bench;
mod capacity;
mod common;
mod demo;
mod eval;
mod fidelity;
mod generate;
mod options;
mod plot;

use clap::{Parser, Subcommand};

/// SnapKV KV-cache compression for llama.cpp models.
#[derive(Debug, Parser)]
#[command(name = "snapkv", version, about)]
struct Cli {
    /// Show llama.cpp's log output (-v warnings, -vv info, -vvv debug).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Evaluate a prompt and generate text, printing timings (and SnapKV stats with --snapkv).
    Generate(generate::GenerateArgs),
    /// Answer a question about a long document from full, SnapKV and streaming caches (the README's demo).
    Demo(demo::DemoArgs),
    /// Run the synthetic long-context suite (passkey, multi-key, multi-value, variable tracking).
    Eval(eval::EvalArgs),
    /// Draw the standard grid (accuracy against compression ratio, one chart per protocol) from finished eval runs.
    Grid(eval::grid::GridArgs),
    /// Compare next-token distributions with the full cache (KL divergence, top-1), beside quantized KV caches.
    Fidelity(fidelity::FidelityArgs),
    /// Measure prefill, compression and decode speed and KV memory, full vs compressed.
    Bench(bench::BenchArgs),
    /// Count how many long sequences fit one context, with and without compression.
    Capacity(capacity::CapacityArgs),
}

fn main() {
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => snapkv::LogLevel::Error,
        1 => snapkv::LogLevel::Warn,
        2 => snapkv::LogLevel::Info,
        _ => snapkv::LogLevel::Debug,
    };
    env_logger::Builder::new()
        .filter_level(if cli.verbose == 0 {
            log::LevelFilter::Error
        } else {
            log::LevelFilter::Debug
        })
        .format_timestamp(None)
        .init();
    snapkv::set_log_level(level);
    let result = match cli.command {
        Command::Generate(args) => generate::run(&args),
        Command::Demo(args) => demo::run(&args),
        Command::Eval(args) => eval::run(&args),
        Command::Grid(args) => eval::grid::run(&args),
        Command::Fidelity(args) => fidelity::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::Capacity(args) => capacity::run(&args),
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
