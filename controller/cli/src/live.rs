//! Progress on a terminal: one live line per host (indicatif), showing its
//! current step or the latest line of a build or an apt run, the time
//! since its first step, and a bar while bytes move (the stack's files,
//! images shipped between hosts). A host whose step ended keeps its last
//! line, marked done (`✓`) or failed (`✗`), until its next step begins.
//! Lines of their own (warnings, notes) print above the live ones.
//!
//! Used only when stderr is a terminal and `-v` is not given; everything
//! else gets the plain lines of [`crate::printer`], one per event.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// The looks of a line, parsed once (a build sends a step per output line).
struct Styles {
    /// A host at work: its spinner, time and step.
    running: ProgressStyle,
    /// Bytes sent, of a known total.
    sending: ProgressStyle,
    /// Bytes sent, total unknown.
    streaming: ProgressStyle,
    done: ProgressStyle,
    failed: ProgressStyle,
}

impl Styles {
    fn new() -> Self {
        Styles {
            running: style("  {prefix} {spinner:.cyan} {elapsed:>4}  {wide_msg}"),
            sending: style(
                "  {prefix} {spinner:.cyan} {elapsed:>4}  {msg} [{wide_bar:.cyan/blue}] {bytes}/{total_bytes} {binary_bytes_per_sec}",
            ),
            streaming: style("  {prefix} {spinner:.cyan} {elapsed:>4}  {bytes} {binary_bytes_per_sec}  {wide_msg}"),
            done: style("  {prefix} {wide_msg}"),
            failed: style("  {prefix} {wide_msg:.red}"),
        }
    }
}

/// How often a running host's spinner turns (and its elapsed time counts).
const TICK: Duration = Duration::from_millis(120);

struct Line {
    host: String,
    bar: ProgressBar,
    last: String,
    /// Whether its spinner turns: started once per run of steps (each
    /// start or stop of indicatif's ticker joins or spawns a thread).
    ticking: bool,
}

impl Line {
    fn tick(&mut self, on: bool) {
        if on != self.ticking {
            if on {
                self.bar.enable_steady_tick(TICK);
            } else {
                self.bar.disable_steady_tick();
            }
            self.ticking = on;
        }
    }
}

pub struct Live {
    multi: MultiProgress,
    /// Host → its line and the text of its latest step, in the order
    /// hosts first reported.
    bars: Mutex<Vec<Line>>,
    /// Once the result is printed, no line is live any more.
    settled: AtomicBool,
    styles: Styles,
}

/// What a host's line shows.
pub enum State<'a> {
    /// A step under way, described by `text`.
    Step(&'a str),
    /// `done` bytes of `what` sent, of `total` when known.
    Transfer { what: &'a str, done: u64, total: Option<u64> },
    /// The host's part of the current step ended well.
    Done,
    /// The host failed: `text` says why.
    Failed(&'a str),
}

impl Live {
    pub fn new() -> Self {
        Live {
            multi: MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(10)),
            bars: Mutex::new(Vec::new()),
            settled: AtomicBool::new(false),
            styles: Styles::new(),
        }
    }

    /// Updates `host`'s line (`label`: the host's name, padded to the
    /// longest one).
    pub fn update(&self, host: &str, label: &str, state: &State<'_>) {
        if self.settled.load(Ordering::Relaxed) {
            return;
        }
        let mut bars = self.bars.lock().expect("not poisoned");
        let index = match bars.iter().position(|l| l.host == host) {
            Some(i) => i,
            None => {
                // Styled before it is added: added, it draws at once.
                let bar = ProgressBar::new(0).with_style(self.styles.running.clone()).with_prefix(label.to_string());
                let bar = self.multi.add(bar);
                bars.push(Line { host: host.to_string(), bar, last: String::new(), ticking: false });
                bars.len() - 1
            }
        };
        let line = &mut bars[index];
        line.tick(matches!(state, State::Step(_) | State::Transfer { .. }));
        let bar = &line.bar;
        match state {
            // The style first (setting it draws nothing), then what
            // draws: no frame shows a new style with the old message.
            State::Step(text) => {
                bar.set_style(self.styles.running.clone());
                bar.set_message(text.to_string());
                line.last = text.to_string();
            }
            State::Transfer { what, done, total } => {
                let style = if total.is_some() { &self.styles.sending } else { &self.styles.streaming };
                bar.set_style(style.clone());
                bar.set_message(format!("sending {what}"));
                if let Some(total) = total {
                    bar.set_length(*total);
                }
                bar.set_position(*done);
            }
            // The time is written in: a line that is done no longer counts.
            State::Done => {
                bar.set_style(self.styles.done.clone());
                bar.set_message(format!("✓ {:>4}  {}", crate::printer::secs(bar.elapsed()), line.last));
            }
            State::Failed(text) => {
                bar.set_style(self.styles.failed.clone());
                bar.set_message(format!("✗ {:>4}  {text}", crate::printer::secs(bar.elapsed())));
            }
        }
    }

    pub fn is_settled(&self) -> bool {
        self.settled.load(Ordering::Relaxed)
    }

    /// A line of its own, above the live ones.
    pub fn println(&self, line: &str) -> bool {
        if self.settled.load(Ordering::Relaxed) {
            return false;
        }
        // Fails only when the terminal is gone; the line is then lost
        // with the rest of the display (the run log keeps it).
        let _ = self.multi.println(line);
        true
    }

    /// Ends the live display: every line stays as last drawn, and output
    /// after it prints below. Idempotent.
    pub fn settle(&self) {
        if self.settled.swap(true, Ordering::Relaxed) {
            return;
        }
        let mut bars = self.bars.lock().expect("not poisoned");
        for line in bars.iter_mut() {
            line.tick(false);
            line.bar.abandon();
        }
        // The last line is left without its newline: what prints next
        // starts below it, not after it.
        if !bars.is_empty() {
            let _ = std::io::Write::write_all(&mut std::io::stderr(), b"\n");
        }
    }
}

fn style(template: &str) -> ProgressStyle {
    // The templates are constants of this file: a bad one is a bug.
    ProgressStyle::with_template(template).expect("a valid template").progress_chars("=> ")
}
