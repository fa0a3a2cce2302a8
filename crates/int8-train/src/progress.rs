//! Progress of a run: a bar with ETA on a terminal, plain lines in logs, or JSON lines on stdout
//! for a sweep to read (one object per update: `step`, `steps`, `epoch`, `epochs`, `loss`,
//! `eta_s`).

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    /// A bar on stderr (terminals).
    Bar,
    /// A line on stderr every few seconds (logs).
    Plain,
    /// JSON lines on stdout (for `cargo xtask sweep`).
    Json,
    /// Nothing.
    Quiet,
}

impl ProgressMode {
    /// A bar on a terminal, plain lines otherwise.
    pub fn auto() -> Self {
        if std::io::IsTerminal::is_terminal(&std::io::stderr()) { ProgressMode::Bar } else { ProgressMode::Plain }
    }
}

/// The progress of one run.
#[derive(Debug)]
pub struct Progress {
    mode: ProgressMode,
    bar: Option<ProgressBar>,
    total: u64,
    first: u64,
    start: Instant,
    last: Instant,
}

impl Progress {
    /// Progress over `total` steps, of which `done` were finished before this session.
    pub fn new(mode: ProgressMode, total: u64, done: u64) -> Self {
        let bar = (mode == ProgressMode::Bar).then(|| {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} steps {msg} (eta {eta})")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            bar.set_position(done);
            bar.reset_eta();
            bar
        });
        let now = Instant::now();
        Self { mode, bar, total, first: done, start: now, last: now - Duration::from_secs(3600) }
    }

    /// Seconds left, from this session's pace.
    fn eta(&self, step: u64) -> f64 {
        let done = step.saturating_sub(self.first);
        if done == 0 {
            return f64::NAN;
        }
        self.start.elapsed().as_secs_f64() / done as f64 * self.total.saturating_sub(step) as f64
    }

    /// Step `step` (of all) finished in epoch `epoch` of `epochs` with batch loss `loss`.
    pub fn step(&mut self, step: u64, epoch: usize, epochs: usize, loss: f64) {
        let due = self.last.elapsed()
            >= Duration::from_secs(match self.mode {
                ProgressMode::Json => 1,
                _ => 10,
            })
            || step == self.total;
        match self.mode {
            ProgressMode::Bar => {
                if let Some(b) = &self.bar {
                    b.set_prefix(format!("epoch {epoch}/{epochs}"));
                    b.set_message(format!("loss {loss:.3}"));
                    b.set_position(step);
                }
            }
            ProgressMode::Plain if due => {
                eprintln!(
                    "epoch {epoch}/{epochs} step {step}/{} loss {loss:.4} eta {}",
                    self.total,
                    format_secs(self.eta(step))
                );
                self.last = Instant::now();
            }
            ProgressMode::Json if due => {
                let eta = self.eta(step);
                println!(
                    "{}",
                    serde_json::json!({
                        "step": step, "steps": self.total, "epoch": epoch, "epochs": epochs,
                        "loss": if loss.is_finite() { Some(loss) } else { None },
                        "eta_s": if eta.is_finite() { Some(eta.round()) } else { None },
                    })
                );
                self.last = Instant::now();
            }
            _ => {}
        }
    }

    /// A message line that does not break the bar.
    pub fn message(&self, line: &str) {
        match (&self.bar, self.mode) {
            (Some(b), _) => b.println(line),
            (None, ProgressMode::Quiet) => {}
            (None, _) => eprintln!("{line}"),
        }
    }

    /// Ends the bar.
    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// `1h02m`, `3m05s` or `12s`; `?` when unknown.
pub fn format_secs(s: f64) -> String {
    if !s.is_finite() {
        return "?".into();
    }
    let s = s.round() as u64;
    match (s / 3600, (s / 60) % 60, s % 60) {
        (0, 0, sec) => format!("{sec}s"),
        (0, m, sec) => format!("{m}m{sec:02}s"),
        (h, m, _) => format!("{h}h{m:02}m"),
    }
}
