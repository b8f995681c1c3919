//! How CLI commands report long work and results: a progress bar on a
//! terminal (indicatif, on stderr), nothing extra otherwise; the result as
//! one human line, or with `--json` as one JSON object on stdout.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

use crate::control::ProgressUpdate;

/// Progress and result output of one command.
#[derive(Debug)]
pub struct Reporter {
    json: bool,
    bar: Option<ProgressBar>,
}

impl Reporter {
    /// `json`: print the result as JSON (and never draw a bar).
    pub fn new(json: bool) -> Self {
        let bar = (!json && std::io::stderr().is_terminal()).then(|| {
            let b = ProgressBar::new(0);
            b.set_style(
                ProgressStyle::with_template("{msg:24} [{bar:40}] {pos}/{len} {per_sec} eta {eta}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            b
        });
        Reporter { json, bar }
    }

    /// Whether the result goes out as JSON.
    pub fn json(&self) -> bool {
        self.json
    }

    /// Shows one progress update (no-op without a terminal).
    pub fn progress(&self, p: &ProgressUpdate) {
        if let Some(b) = &self.bar {
            if b.length() != Some(p.total) {
                b.set_length(p.total);
            }
            b.set_position(p.done);
            if b.message() != p.message {
                b.set_message(p.message.clone());
            }
        }
    }

    /// Prints the result: `value` as JSON with `--json`, else `line`.
    pub fn finish(&self, line: &str, value: &serde_json::Value) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
        if self.json {
            println!(
                "{}",
                serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
            );
        } else {
            println!("{line}");
        }
    }

    /// Clears the bar before an error is printed.
    pub fn abandon(&self) {
        if let Some(b) = &self.bar {
            b.abandon();
        }
    }
}
