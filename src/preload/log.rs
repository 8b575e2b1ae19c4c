//! Log lines, on stderr beside the host's own log, in llama.cpp's
//! `component: message` form (`snapkv: seq 0: 3211 -> 256 cells …`).
//!
//! Not through the host's llama.cpp log callback: llama-server and the
//! other `common/` programs show llama.cpp's INFO lines only at trace
//! verbosity, and the compression lines are what a user checks first.
//! `SNAPKV_LOG` switches them.

use std::io::Write;

/// The levels we log at.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Level {
    Info,
    Warn,
}

/// Writes one line (a newline is added) in one write, so that it does not
/// interleave with the host's lines.
pub(crate) fn log(level: Level, line: &str) {
    let tag = match level {
        Level::Info => "",
        Level::Warn => "warning: ",
    };
    let text = match line.strip_prefix("snapkv: ") {
        Some(rest) => format!("snapkv: {tag}{rest}\n"),
        None => format!("{tag}{line}\n"),
    };
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}
