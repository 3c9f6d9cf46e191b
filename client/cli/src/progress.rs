//! Download progress on stderr: a bar on a terminal, a line every few seconds otherwise.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use llama_agent_client::proto::loader::v1::{Progress, Stage};

pub enum Reporter {
    Bar(ProgressBar),
    Lines { last: Option<Instant>, stage: i32 },
}

const LINE_EVERY: Duration = Duration::from_secs(5);

impl Reporter {
    pub fn new() -> Self {
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg:12} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .expect("static template")
                .progress_chars("=> "),
            );
            Reporter::Bar(bar)
        } else {
            Reporter::Lines {
                last: None,
                stage: -1,
            }
        }
    }

    pub fn update(&mut self, p: &Progress) {
        let stage = stage_name(p.stage);
        match self {
            Reporter::Bar(bar) => {
                bar.set_message(stage);
                bar.set_length(p.bytes_total);
                bar.set_position(p.bytes_done);
            }
            Reporter::Lines { last, stage: prev } => {
                let due = last.is_none_or(|t| t.elapsed() >= LINE_EVERY);
                if due || *prev != p.stage {
                    let resumed = if p.resumed_from > 0 {
                        format!(" (resumed at {})", p.resumed_from)
                    } else {
                        String::new()
                    };
                    if p.bytes_total > 0 {
                        eprintln!(
                            "{stage} {} {}/{} bytes{resumed}",
                            p.file, p.bytes_done, p.bytes_total
                        );
                    } else {
                        eprintln!("{stage}");
                    }
                    *last = Some(Instant::now());
                    *prev = p.stage;
                }
            }
        }
    }

    pub fn finish(&self) {
        if let Reporter::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}

fn stage_name(stage: i32) -> &'static str {
    match Stage::try_from(stage).unwrap_or(Stage::Unspecified) {
        Stage::Unspecified => "working",
        Stage::Resolving => "resolving",
        Stage::Waiting => "waiting",
        Stage::Evicting => "making room",
        Stage::Downloading => "downloading",
        Stage::Importing => "importing",
        Stage::Verifying => "verifying",
        Stage::Done => "done",
    }
}
