//! Embedding progress on stderr: a bar with texts/s and ETA on a terminal; otherwise an
//! info log line every few seconds (seen with RUST_LOG=info).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

const LINE_EVERY: Duration = Duration::from_secs(5);

pub struct Meter {
    bar: Option<ProgressBar>,
    started: Instant,
    last_line: Instant,
    texts: u64,
}

impl Meter {
    /// `total_bytes`: the input's size when it is a file (the bar follows bytes read).
    pub fn new(total_bytes: Option<u64>) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let (bar, template) = match total_bytes {
                Some(n) => (
                    ProgressBar::new(n),
                    "[{bar:30}] {percent:>3}% {msg} eta {eta}",
                ),
                None => (ProgressBar::new_spinner(), "{spinner} {msg}"),
            };
            bar.set_style(
                ProgressStyle::with_template(template)
                    .expect("static template")
                    .progress_chars("=> "),
            );
            bar
        });
        Self {
            bar,
            started: Instant::now(),
            last_line: Instant::now(),
            texts: 0,
        }
    }

    pub fn rate(&self) -> f64 {
        self.texts as f64 / self.started.elapsed().as_secs_f64().max(1e-9)
    }

    pub fn update(&mut self, texts: u64, bytes_read: u64) {
        self.texts += texts;
        let rate = self.rate();
        match &self.bar {
            Some(bar) => {
                bar.set_position(bytes_read);
                bar.set_message(format!("{} texts, {rate:.0} texts/s", self.texts));
            }
            None if self.last_line.elapsed() >= LINE_EVERY => {
                tracing::info!(
                    texts = self.texts,
                    texts_per_second = rate.round(),
                    bytes_read,
                    "embedding"
                );
                self.last_line = Instant::now();
            }
            None => {}
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
