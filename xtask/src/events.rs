//! TensorBoard event files read back, for the pictures of `cargo xtask plot`: each file is a
//! sequence of TFRecords (length, masked CRC32C of the length, an `Event` protocol buffer, masked
//! CRC32C of the data), the format of TensorFlow's `record_writer.cc` and `event.proto` that
//! the trainer writes (`crates/int8-train/src/tensorboard.rs`). xtask links none of the
//! workspace's crates (see `main.rs`), so it decodes the few fields it needs itself: scalars
//! (`simple_value`), session starts and file versions; histograms and text are skipped.
//!
//! A run folder reads as TensorBoard's `EventAccumulator` reads it: files in name order (the
//! order they were started), and a session start at step `s` (a resumed run) drops every point at
//! step `s` or later read before it, which an interrupted session logged past its checkpoint; so
//! the newest session's value of each step is the one kept.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use prost::Message;

/// `tensorflow.Event`, with the fields read here (the wall time is skipped).
#[derive(Clone, PartialEq, Message)]
struct Event {
    #[prost(int64, tag = "2")]
    step: i64,
    #[prost(oneof = "EventWhat", tags = "3, 5, 7")]
    what: Option<EventWhat>,
}

/// The payload of an event.
#[derive(Clone, PartialEq, prost::Oneof)]
enum EventWhat {
    #[prost(string, tag = "3")]
    FileVersion(String),
    #[prost(message, tag = "5")]
    Summary(Summary),
    #[prost(message, tag = "7")]
    SessionLog(SessionLog),
}

/// `tensorflow.SessionLog`: status 1 is START.
#[derive(Clone, PartialEq, Message)]
struct SessionLog {
    #[prost(int32, tag = "1")]
    status: i32,
}

/// `tensorflow.Summary`.
#[derive(Clone, PartialEq, Message)]
struct Summary {
    #[prost(message, repeated, tag = "1")]
    value: Vec<SummaryValue>,
}

/// `tensorflow.Summary.Value`: a scalar has `simple_value` (field 2); other kinds are skipped.
#[derive(Clone, PartialEq, Message)]
struct SummaryValue {
    #[prost(string, tag = "1")]
    tag: String,
    #[prost(float, optional, tag = "2")]
    simple_value: Option<f32>,
}

/// `SessionLog.START`.
const SESSION_START: i32 = 1;

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

    fn push(&mut self, tag: String, point: (u64, f32)) {
        match self.points.get_mut(&tag) {
            Some(points) => points.push(point),
            None => {
                self.tags.push(tag.clone());
                self.points.insert(tag, vec![point]);
            }
        }
    }

    /// Drops every point at step `step` or later (a session restarted there).
    fn purge_from(&mut self, step: u64) {
        for points in self.points.values_mut() {
            points.retain(|p| p.0 < step);
        }
    }
}

/// The event files of a run folder (`events.out.tfevents.*`), in name order: the names start with
/// the second the file was started, so this is the order of the sessions.
pub fn event_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("cannot read the folder {}", dir.display()))? {
        let e = e.with_context(|| format!("cannot read the folder {}", dir.display()))?;
        if e.file_name().to_string_lossy().starts_with("events.out.tfevents.") && e.path().is_file() {
            files.push(e.path());
        }
    }
    files.sort();
    Ok(files)
}

/// Reads the scalars of every event file of the run folder `dir`, as TensorBoard shows them (see
/// the module's header). A folder without event files is an error.
pub fn read_run(dir: &Path) -> Result<Scalars> {
    let files = event_files(dir)?;
    if files.is_empty() {
        bail!("{} holds no TensorBoard event file (events.out.tfevents.*); give a run's folder", dir.display());
    }
    let mut out = Scalars::default();
    for path in &files {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let events = decode_records(&bytes).with_context(|| format!("{}", path.display()))?;
        for event in events {
            let step = event.step.max(0) as u64;
            match event.what {
                Some(EventWhat::SessionLog(log)) if log.status == SESSION_START => out.purge_from(step),
                Some(EventWhat::Summary(summary)) => {
                    for v in summary.value {
                        if let Some(x) = v.simple_value {
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

/// CRC32C of `data`, masked as TFRecord requires (rotated right by 15, plus a constant), so that
/// a checksum stored inside checksummed data does not confuse a reader.
fn masked_crc(data: &[u8]) -> u32 {
    crc32c::crc32c(data).rotate_right(15).wrapping_add(0xa282_ead8)
}

/// The events of one file, checking both checksums of every record. A record cut short at the end
/// (a writer killed mid-write, or a file still being written) ends the file; a wrong checksum
/// elsewhere, or a first record that is not TensorBoard's file version, is an error.
fn decode_records(bytes: &[u8]) -> Result<Vec<Event>> {
    let word = |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    let mut events = Vec::new();
    let mut at = 0;
    // A record needs its 8-byte length and the length's 4-byte checksum before anything is known.
    while at + 12 <= bytes.len() {
        let len_bytes = &bytes[at..at + 8];
        if word(at + 8) != masked_crc(len_bytes) {
            bail!(
                "the record at byte {at} has a wrong length checksum: not a TensorBoard event file, or a damaged \
                 one; move it out of the run folder"
            );
        }
        let len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes"));
        let Some(end) = usize::try_from(len).ok().and_then(|l| (at + 12).checked_add(l)) else { break };
        if end.checked_add(4).is_none_or(|e| e > bytes.len()) {
            break;
        }
        let data = &bytes[at + 12..end];
        if word(end) != masked_crc(data) {
            bail!(
                "the record at byte {at} has a wrong data checksum: the file is damaged; move it out of the run folder"
            );
        }
        let event = Event::decode(data).with_context(|| {
            format!("the record at byte {at} is not a TensorBoard event; move the file out of the run folder")
        })?;
        if events.is_empty() && !matches!(&event.what, Some(EventWhat::FileVersion(v)) if v.starts_with("brain.Event:"))
        {
            bail!("its first record is not TensorBoard's file version (brain.Event:N): not an event file");
        }
        events.push(event);
        at = end + 4;
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
    }

    /// Every scalar tag of `dir` with its (step, value) points, as TensorBoard's `EventAccumulator`
    /// reads them (`crates/int8-train/tests/read_events.py`).
    fn tensorboard_scalars(dir: &Path) -> serde_json::Map<String, serde_json::Value> {
        let script = root().join("crates/int8-train/tests/read_events.py");
        let out = Command::new("python3").arg(&script).arg(dir).output().expect("python3 runs");
        assert!(
            out.status.success(),
            "TensorBoard's reader failed (install it with `pip install tensorboard`; the README's set-up does it):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["scalars"].as_object().unwrap().clone()
    }

    /// A one-epoch INT8 run of the small CNN on 384 Fashion-MNIST images (12 steps), killed after
    /// step 6 with its checkpoint of step 4, then resumed to the end: two event files, the first
    /// with points past step 4 that TensorBoard drops.
    fn killed_and_resumed_run(dir: &Path) {
        assert!(
            Path::new("/usr/share/datasets/fashion-mnist").exists(),
            "Fashion-MNIST is missing: apt-get install -y dataset-fashion-mnist (the README's set-up does it)"
        );
        let trainer = crate::sweep::build_trainer(&root(), false).unwrap();
        let sets = [
            "data.train_limit=384",
            "data.test_limit=500",
            "train.epochs=1",
            "train.batch=32",
            "train.eval_batch=250",
            "train.checkpoint_every=4",
            "train.log_every=1",
            "train.histogram_every=5",
            "quant.precision=\"int8\"",
        ];
        let mut cmd = Command::new(&trainer);
        cmd.current_dir(root()).args(["cnn-small-fashion-mnist", "--progress", "quiet", "--out"]).arg(dir);
        for s in sets {
            cmd.args(["--set", s]);
        }
        let killed = cmd.env("INT8_TRAIN_KILL_AT_STEP", "6").output().unwrap();
        assert!(!killed.status.success(), "{}", String::from_utf8_lossy(&killed.stderr));
        let resumed = cmd.env_remove("INT8_TRAIN_KILL_AT_STEP").arg("--resume").output().unwrap();
        assert!(resumed.status.success(), "{}", String::from_utf8_lossy(&resumed.stderr));
    }

    #[test]
    fn a_killed_and_resumed_trainer_run_reads_as_tensorboard_reads_it_and_damage_is_caught() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("run");
        killed_and_resumed_run(&dir);
        let files = event_files(&dir).unwrap();
        assert_eq!(files.len(), 2, "one event file per session");

        let ours = read_run(&dir).unwrap();
        let theirs = tensorboard_scalars(&dir);
        let mut tags: Vec<&String> = ours.tags().iter().collect();
        tags.sort();
        assert_eq!(tags, theirs.keys().collect::<Vec<_>>());
        for (tag, points) in &theirs {
            let want: Vec<(u64, f32)> = points
                .as_array()
                .unwrap()
                .iter()
                .map(|p| (p[0].as_u64().unwrap(), p[1].as_f64().unwrap() as f32))
                .collect();
            assert_eq!(ours.get(tag), want.as_slice(), "{tag}");
        }
        // Every step once: the killed session's steps 5 and 6 are dropped for the resumed ones.
        let steps: Vec<u64> = ours.get("train/loss").iter().map(|p| p.0).collect();
        assert_eq!(steps, (1..=12).collect::<Vec<_>>());
        assert_eq!(ours.get("test/top1").len(), 1);
        // Per-layer tags come in the model's order of layers.
        let clips: Vec<&str> = ours.tags().iter().filter(|t| t.ends_with("/clip")).map(String::as_str).collect();
        assert_eq!(clips, ["quant/conv2/clip", "quant/conv3/clip"]);

        // A record cut short at the end (the writer killed mid-write) ends the file quietly: the
        // second file's last event (the epoch's scalars, test top-1 among them) is lost.
        let last = files.last().unwrap();
        let whole = std::fs::read(last).unwrap();
        std::fs::write(last, &whole[..whole.len() - 7]).unwrap();
        let cut = read_run(&dir).unwrap();
        assert!(cut.get("test/top1").is_empty());
        assert_eq!(cut.get("train/loss"), ours.get("train/loss"));

        // A byte changed in the middle is an error naming the file, not a shorter curve.
        let mut bad = whole.clone();
        bad[whole.len() / 2] ^= 0x10;
        std::fs::write(last, &bad).unwrap();
        let err = format!("{:#}", read_run(&dir).unwrap_err());
        assert!(err.contains(&last.display().to_string()) && err.contains("checksum"), "{err}");

        // A file that is not an event file is an error naming it, even when its records are
        // well formed.
        std::fs::write(last, &whole).unwrap();
        let other = dir.join("events.out.tfevents.9999999999.notes");
        std::fs::write(&other, b"step,loss\n1,2.30\n2,2.25\n").unwrap();
        let err = format!("{:#}", read_run(&dir).unwrap_err());
        assert!(err.contains(&other.display().to_string()) && err.contains("not a TensorBoard event file"), "{err}");
        let mut framed = Vec::new();
        // Well-formed records of something else: a first record without a file version.
        let data = b"\x0a\x03abc";
        framed.extend_from_slice(&(data.len() as u64).to_le_bytes());
        framed.extend_from_slice(&masked_crc(&(data.len() as u64).to_le_bytes()).to_le_bytes());
        framed.extend_from_slice(data);
        framed.extend_from_slice(&masked_crc(data).to_le_bytes());
        std::fs::write(&other, &framed).unwrap();
        let err = format!("{:#}", read_run(&dir).unwrap_err());
        assert!(err.contains(&other.display().to_string()) && err.contains("not"), "{err}");

        let empty = tempfile::tempdir().unwrap();
        assert!(format!("{:#}", read_run(empty.path()).unwrap_err()).contains("no TensorBoard event file"));
    }

    #[test]
    fn masked_crc_matches_tensorflow() {
        // CRC32C of "123456789" is 0xE3069283 (the standard check value); rotated right by 15 it
        // is 0x2507C60D, plus 0xa282ead8.
        assert_eq!(masked_crc(b"123456789"), 0xC78A_B0E5);
    }
}
