//! A guest's log: what its `log` import, its stdout and its stderr write,
//! tagged with the policy's name and kept from flooding the host's log.
//!
//! One [`GuestLog`] per loaded policy, shared by all its instances: a guest
//! that traps after each line gets a fresh instance per call, and a limit
//! per instance would start over every time. A line is one line of the
//! host's log: control characters (a newline that would start a forged
//! line, a terminal escape) are shown escaped.

use std::sync::Arc;
use std::time::{Duration, Instant};

/// Log lines a policy may emit per second (log import, stdout and stderr
/// together); the rest are counted, not shown.
const LINES_PER_SEC: u32 = 20;
/// Longest log line kept from a policy.
const LINE_MAX: usize = 512;

/// A policy's log: tags lines with its name and keeps a chatty guest from
/// flooding the host's log.
pub struct GuestLog {
    policy: Arc<str>,
    window: Option<Instant>,
    in_window: u32,
    lines: u64,
    shown: u64,
}

impl GuestLog {
    pub fn new(policy: &str) -> Self {
        GuestLog {
            policy: policy.into(),
            window: None,
            in_window: 0,
            lines: 0,
            shown: 0,
        }
    }

    /// Lines the guest wrote, shown or not.
    pub fn lines(&self) -> u64 {
        self.lines
    }

    /// Lines that reached the host's log.
    pub fn shown(&self) -> u64 {
        self.shown
    }

    pub fn emit(&mut self, level: tracing::Level, message: &str) {
        self.lines += 1;
        // The I/O edge: a clock is fine here; it decides only what is shown.
        let now = Instant::now();
        match self.window {
            Some(start) if now.duration_since(start) < Duration::from_secs(1) => {
                self.in_window += 1
            }
            _ => {
                if self.in_window > LINES_PER_SEC {
                    tracing::warn!(
                        policy = &*self.policy,
                        "{} log lines dropped",
                        self.in_window - LINES_PER_SEC
                    );
                }
                self.window = Some(now);
                self.in_window = 1;
            }
        }
        if self.in_window > LINES_PER_SEC {
            return;
        }
        self.shown += 1;
        let mut message = escape_controls(message);
        if message.len() > LINE_MAX {
            let cut = (0..=LINE_MAX)
                .rev()
                .find(|&i| message.is_char_boundary(i))
                .unwrap_or(0);
            message = format!("{}…", &message[..cut]).into();
        }
        let policy = &*self.policy;
        match level {
            tracing::Level::ERROR => tracing::error!(policy, "{message}"),
            tracing::Level::WARN => tracing::warn!(policy, "{message}"),
            tracing::Level::INFO => tracing::info!(policy, "{message}"),
            _ => tracing::debug!(policy, "{message}"),
        }
    }
}

/// `message` with its control characters (C0, DEL, C1, and the Unicode
/// line and paragraph separators) written as Rust escapes, `\n`,
/// `\u{1b}`: what a guest writes can never end the host's log line.
fn escape_controls(message: &str) -> std::borrow::Cow<'_, str> {
    let is_control = |c: char| c.is_control() || matches!(c, '\u{2028}' | '\u{2029}');
    if !message.contains(is_control) {
        return message.into();
    }
    let mut escaped = String::with_capacity(message.len() + 8);
    for c in message.chars() {
        if is_control(c) {
            escaped.extend(c.escape_default());
        } else {
            escaped.push(c);
        }
    }
    escaped.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_cut_to_the_rate_and_long_lines_are_cut() {
        let mut log = GuestLog::new("chatty");
        for i in 0..1000 {
            log.emit(
                tracing::Level::INFO,
                &format!("line {i} {}", "é".repeat(400)),
            );
        }
        assert_eq!(log.lines(), 1000);
        // Within one second: the first LINES_PER_SEC, no more.
        assert_eq!(log.shown(), u64::from(LINES_PER_SEC));
    }

    #[test]
    fn control_characters_are_escaped_and_the_rest_kept() {
        assert_eq!(escape_controls("plain é"), "plain é");
        assert_eq!(
            escape_controls("a\nERROR b\r\t\x1b[2J\0\u{85}\u{2028}"),
            "a\\nERROR b\\r\\t\\u{1b}[2J\\u{0}\\u{85}\\u{2028}"
        );
    }
}
