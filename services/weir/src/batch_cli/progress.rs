//! A batch's progress on stderr: an indicatif bar on a terminal, a line per change otherwise.
//!
//! indicatif draws nothing when stderr is not a terminal (a CI log, `2> file`, a pipe), which
//! would leave a long batch silent in logs; there each change of the counts is one plain line.

use std::{io::Write, time::Duration};

use indicatif::{ProgressBar, ProgressStyle};
use weir_proto::router::{Batch, BatchCounts};

use super::state_name;

/// Shows the progress of one batch.
pub struct Progress {
    bar: ProgressBar,
    last: Option<(i32, BatchCounts)>,
}

impl Progress {
    /// A bar for a batch of `total` items, drawn on stderr if it is a terminal.
    pub fn new(total: u64) -> Self {
        let bar = ProgressBar::new(total);
        if !bar.is_hidden() {
            let style = ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}, ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar.enable_steady_tick(Duration::from_millis(200));
        }
        Self { bar, last: None }
    }

    /// Shows the batch's counts (a line only when they or the state changed).
    pub fn update(&mut self, batch: &Batch) {
        let counts = batch.counts.unwrap_or_default();
        let done = done(&counts);
        if self.bar.length() != Some(counts.total as u64) && counts.total > 0 {
            self.bar.set_length(counts.total as u64);
        }
        self.bar.set_position(done);
        self.bar.set_message(format!(
            "{}: {} ok, {} failed, {} cancelled/expired",
            state_name(batch),
            counts.succeeded,
            counts.failed,
            counts.cancelled,
        ));
        let now = (batch.state, counts);
        // The final state is the summary the caller prints once the results are written.
        if self.bar.is_hidden() && self.last != Some(now) && !super::is_terminal(batch) {
            eprintln!("{}", summary(batch));
            let _ = std::io::stderr().flush();
        }
        self.last = Some(now);
    }

    /// Removes the bar (what follows on stderr says how the batch ended).
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// Items that have ended, whatever their outcome.
fn done(counts: &BatchCounts) -> u64 {
    (counts.succeeded + counts.failed + counts.cancelled).max(0) as u64
}

/// `<id> <state>: <done>/<total> done (<n> succeeded, <n> failed, <n> cancelled/expired)`.
pub fn summary(batch: &Batch) -> String {
    let counts = batch.counts.unwrap_or_default();
    format!(
        "{} {}: {}/{} done ({} succeeded, {} failed, {} cancelled/expired)",
        batch.id,
        state_name(batch),
        done(&counts),
        counts.total,
        counts.succeeded,
        counts.failed,
        counts.cancelled
    )
}

#[cfg(test)]
mod tests {
    use weir_proto::router::BatchState;

    use super::*;

    #[test]
    fn the_summary_counts_every_ended_item_as_done() {
        let batch = Batch {
            id: "batch-1".into(),
            state: BatchState::InProgress as i32,
            counts: Some(BatchCounts {
                total: 10,
                succeeded: 4,
                failed: 1,
                cancelled: 2,
                pending: 3,
            }),
            ..Batch::default()
        };
        assert_eq!(
            summary(&batch),
            "batch-1 in_progress: 7/10 done (4 succeeded, 1 failed, 2 cancelled/expired)"
        );
    }
}
