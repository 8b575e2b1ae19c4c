//! `snapkv`: the command-line interface over the snapkv library.
//!
//! - `snapkv generate`: evaluate a prompt (optionally with SnapKV) and
//!   generate text, with timings.

mod generate;
mod options;

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
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
