//! The trainer's TensorBoard logs, through `int8-events` (the workspace's one implementation of
//! the event-file format): [`EventWriter`] writes scalars, histograms, text and session starts,
//! and [`read_scalars`] reads a run folder's scalar curves back as TensorBoard shows them (for
//! `cargo xtask scalars`), keyed by tag in sorted order.

use std::collections::BTreeMap;
use std::path::Path;

pub use int8_events::EventWriter;

use crate::Result;

/// A run's scalar curves: each tag's (step, value) points in step order.
pub type Scalars = BTreeMap<String, Vec<(u64, f32)>>;

/// Reads the scalars of every event file in `dir` (see [`int8_events::read_run`]: a session start
/// at step `s`, written by a resumed run, drops every point logged at `s` or later before it). A
/// damaged record or a file that is not an event file is an error naming the file; a record cut
/// short at the end of a file (a writer killed mid-write) ends that file.
pub fn read_scalars(dir: &Path) -> Result<Scalars> {
    let run = int8_events::read_run(dir)?;
    Ok(run
        .iter()
        .map(|(tag, points)| {
            let mut points = points.to_vec();
            // Stable, so that points of one step keep the order they were logged in.
            points.sort_by_key(|p| p.0);
            (tag.to_string(), points)
        })
        .collect())
}
