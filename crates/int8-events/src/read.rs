//! A run folder's scalar curves read back as TensorBoard's `EventAccumulator` reads them: the
//! event files in name order (the names start with the second each was started, so this is the
//! order of the sessions), and a session start at step `s` (a resumed run) drops every point at
//! step `s` or later read before it, which an interrupted session logged past its checkpoint; so
//! the newest session's value of each step is the one kept. Histograms and text are skipped.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use prost::Message;

use crate::proto::{Event, EventWhat, FILE_VERSION_PREFIX, SESSION_START, ValueKind};
use crate::record::unframe;
use crate::{EventError, Result};

/// What every event file's name starts with.
const PREFIX: &str = "events.out.tfevents.";

/// A run's scalar curves: each tag's (step, value) points in the order TensorBoard keeps them
/// (the order logged, less the points a restart dropped), and the tags in the order they were
/// first logged, which for per-layer tags is the model's order of layers.
#[derive(Debug, Clone, Default)]
pub struct Scalars {
    tags: Vec<String>,
    points: HashMap<String, Vec<(u64, f32)>>,
}

impl Scalars {
    /// The tags, in the order first logged.
    pub fn tags(&self) -> &[String] {
        &self.tags
    }

    /// The points of `tag`, empty if it was never logged.
    pub fn get(&self, tag: &str) -> &[(u64, f32)] {
        self.points.get(tag).map_or(&[], Vec::as_slice)
    }

    /// Each tag with its points, tags in the order first logged.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[(u64, f32)])> {
        self.tags.iter().map(|t| (t.as_str(), self.get(t)))
    }

    fn push(&mut self, tag: String, point: (u64, f32)) {
        match self.points.get_mut(&tag) {
            Some(points) => points.push(point),
            None => {
                self.tags.push(tag.clone());
                self.points.insert(tag, vec![point]);
            }
        }
    }

    /// Drops every point at step `step` or later (a session restarted there). A tag left without
    /// points keeps its place: TensorBoard still lists it.
    fn purge_from(&mut self, step: u64) {
        for points in self.points.values_mut() {
            points.retain(|p| p.0 < step);
        }
    }
}

/// The event files of the run folder `dir` (`events.out.tfevents.*`, plain files), in name order,
/// which is the order of the sessions.
pub fn event_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let read_err = |source| EventError::Read { path: dir.into(), source };
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir).map_err(read_err)? {
        let e = e.map_err(read_err)?;
        if e.file_name().to_string_lossy().starts_with(PREFIX) && e.path().is_file() {
            files.push(e.path());
        }
    }
    files.sort();
    Ok(files)
}

/// Reads the scalars of every event file of the run folder `dir`, as TensorBoard shows them (see
/// the module's header). A folder without event files is an error; so is a damaged record or a
/// file that is not an event file, naming the file; a record cut short at the end of a file (a
/// writer killed mid-write) ends that file.
pub fn read_run(dir: &Path) -> Result<Scalars> {
    let files = event_files(dir)?;
    if files.is_empty() {
        return Err(EventError::NoEventFiles { path: dir.into() });
    }
    let mut out = Scalars::default();
    for path in &files {
        let bytes = std::fs::read(path).map_err(|source| EventError::Read { path: path.clone(), source })?;
        for event in decode_events(path, &bytes)? {
            let step = event.step.max(0) as u64;
            match event.what {
                Some(EventWhat::SessionLog(log)) if log.status == SESSION_START => out.purge_from(step),
                Some(EventWhat::Summary(summary)) => {
                    for v in summary.value {
                        if let Some(ValueKind::SimpleValue(x)) = v.value {
                            out.push(v.tag, (step, x));
                        }
                    }
                }
                _ => {}
            }
        }
    }
    Ok(out)
}

/// The events of the file `path` whose contents are `bytes`: its records (see [`unframe`]) each
/// decoded, the first being TensorBoard's file version (`brain.Event:N`), which tells an event
/// file from another file of well-formed records.
pub(crate) fn decode_events(path: &Path, bytes: &[u8]) -> Result<Vec<Event>> {
    let bad = |offset: usize, why: String| EventError::BadRecord { path: path.into(), offset, why };
    let mut events = Vec::new();
    for (offset, data) in unframe(path, bytes)? {
        let event = Event::decode(data).map_err(|e| bad(offset, format!("is not a TensorBoard event ({e})")))?;
        let versioned = matches!(&event.what, Some(EventWhat::FileVersion(v)) if v.starts_with(FILE_VERSION_PREFIX));
        if events.is_empty() && !versioned {
            let why = "is not TensorBoard's file version (brain.Event:N): not a TensorBoard event file".to_string();
            return Err(bad(offset, why));
        }
        events.push(event);
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EventWriter;
    use crate::record::frame;
    use std::process::Command;

    /// A run killed after step 6 with a checkpoint of step 4, then resumed: the first file has
    /// points of steps 1-6 (and a histogram and text, which are not scalars), the second starts
    /// with a session start at step 4 and goes on to step 8. The layer tags come in the order
    /// `conv2` then `conv1` (the model's order here), not sorted.
    fn killed_and_resumed(dir: &Path) -> (PathBuf, PathBuf) {
        let mut w = EventWriter::create(dir, "0").unwrap();
        for step in 1..=6u64 {
            let mut values = vec![("train/loss".to_string(), 10.0 - step as f64)];
            values.push(("quant/conv2/clip".into(), 0.5));
            if step >= 2 {
                values.push(("quant/conv1/clip".into(), 0.25 * step as f64));
            }
            w.scalars(step, &values).unwrap();
        }
        w.histogram(3, "weights/conv1", &[1.0, 2.0, 3.0]).unwrap();
        w.text(1, "recipe", "lr = 0.1").unwrap();
        let first = w.path().to_path_buf();
        drop(w);
        let mut w = EventWriter::create(dir, "4").unwrap();
        w.session_start(4).unwrap();
        for step in 4..=8u64 {
            w.scalars(step, &[("train/loss".into(), 100.0 + step as f64)]).unwrap();
        }
        w.scalars(8, &[("test/top1".into(), 0.875)]).unwrap();
        let second = w.path().to_path_buf();
        drop(w);
        (first, second)
    }

    #[test]
    fn a_resumed_run_keeps_the_newest_session_of_each_step_and_damage_is_caught() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let (first, second) = killed_and_resumed(dir);
        // A folder whose name looks like an event file's is not one.
        std::fs::create_dir(dir.join("events.out.tfevents.0000000000.folder")).unwrap();
        assert_eq!(event_files(dir).unwrap(), [first.clone(), second.clone()]);

        let s = read_run(dir).unwrap();
        assert_eq!(s.tags(), ["train/loss", "quant/conv2/clip", "quant/conv1/clip", "test/top1"]);
        let loss: Vec<(u64, f32)> =
            (1..=3).map(|s| (s, 10.0 - s as f32)).chain((4..=8).map(|s| (s, 100.0 + s as f32))).collect();
        assert_eq!(s.get("train/loss"), loss.as_slice());
        assert_eq!(s.get("quant/conv2/clip"), [(1, 0.5), (2, 0.5), (3, 0.5)]);
        assert_eq!(s.get("quant/conv1/clip"), [(2, 0.5), (3, 0.75)]);
        assert_eq!(s.get("test/top1"), [(8, 0.875)]);
        assert!(s.get("weights/conv1").is_empty() && s.get("recipe").is_empty());
        assert_eq!(
            s.iter().map(|(t, p)| (t, p.len())).collect::<Vec<_>>(),
            [("train/loss", 8), ("quant/conv2/clip", 3), ("quant/conv1/clip", 2), ("test/top1", 1)]
        );

        // A record cut short at the end (the writer killed mid-write) ends the file quietly: the
        // second file's last event, test top-1, is lost.
        let whole = std::fs::read(&second).unwrap();
        std::fs::write(&second, &whole[..whole.len() - 7]).unwrap();
        let cut = read_run(dir).unwrap();
        assert!(cut.get("test/top1").is_empty());
        assert_eq!(cut.get("train/loss"), loss.as_slice());

        // A byte changed in the middle is an error naming the file, not a shorter curve.
        let mut bad = whole.clone();
        bad[whole.len() / 2] ^= 0x10;
        std::fs::write(&second, &bad).unwrap();
        let err = read_run(dir).unwrap_err().to_string();
        assert!(
            err.contains(&second.display().to_string()) && err.contains("checksum") && err.contains("damaged"),
            "{err}"
        );
        std::fs::write(&second, &whole).unwrap();

        // A file that is not an event file is an error naming it, even when its records are
        // well formed.
        let other = dir.join("events.out.tfevents.9999999999.notes");
        std::fs::write(&other, b"step,loss\n1,2.30\n2,2.25\n").unwrap();
        let err = read_run(dir).unwrap_err().to_string();
        assert!(err.contains(&other.display().to_string()) && err.contains("not a TensorBoard event file"), "{err}");
        // Well-formed records of something else: a first record that decodes as an event but is
        // no file version (a protocol buffer whose only field, 4, is the bytes "abc").
        std::fs::write(&other, frame(b"\x22\x03abc")).unwrap();
        let err = read_run(dir).unwrap_err().to_string();
        assert!(err.contains(&other.display().to_string()) && err.contains("file version"), "{err}");
        // Records that are not events: field 1 (the wall time, a double) as a string, and a field
        // of wire type 7, which protocol buffers do not have.
        for data in [&b"\x0a\x03abc"[..], b"\x0f\x0f\x0f"] {
            std::fs::write(&other, frame(data)).unwrap();
            let err = read_run(dir).unwrap_err().to_string();
            assert!(err.contains(&other.display().to_string()) && err.contains("not a TensorBoard event"), "{err}");
        }

        let empty = tempfile::tempdir().unwrap();
        let err = read_run(empty.path()).unwrap_err().to_string();
        assert!(err.contains("no TensorBoard event file") && err.contains(&empty.path().display().to_string()));
        assert!(read_run(&empty.path().join("missing")).unwrap_err().to_string().starts_with("cannot read"));
    }

    #[test]
    fn a_resumed_run_reads_as_tensorboards_own_reader_reads_it() {
        let tmp = tempfile::tempdir().unwrap();
        killed_and_resumed(tmp.path());
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../int8-train/tests/read_events.py");
        let out = Command::new("python3").arg(&script).arg(tmp.path()).output().expect("python3 runs");
        assert!(
            out.status.success(),
            "TensorBoard's reader failed (install it with `pip install tensorboard`; the README's set-up does it):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let theirs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let points = |v: &serde_json::Value| -> Vec<(u64, f64)> {
            v.as_array().unwrap().iter().map(|p| (p[0].as_u64().unwrap(), p[1].as_f64().unwrap())).collect()
        };

        let ours = read_run(tmp.path()).unwrap();
        let scalars = theirs["scalars"].as_object().unwrap();
        let mut tags: Vec<&String> = ours.tags().iter().collect();
        tags.sort();
        assert_eq!(tags, scalars.keys().collect::<Vec<_>>());
        for (tag, want) in scalars {
            let ours: Vec<(u64, f64)> = ours.get(tag).iter().map(|&(s, v)| (s, f64::from(v))).collect();
            assert_eq!(ours, points(want), "{tag}");
        }
        // The histogram and the text the writer wrote are what TensorBoard reads: three values
        // at step 3, the Markdown at step 1.
        assert_eq!(points(&theirs["histograms"]["weights/conv1"]), [(3, 3.0)]);
        assert_eq!(theirs["tensors"]["recipe"], serde_json::json!([[1, "lr = 0.1"]]));
    }
}
