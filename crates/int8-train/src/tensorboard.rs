//! A small TensorBoard event-file writer: scalars, histograms, text and session starts, each an
//! `Event` protocol buffer (encoded with `prost`) framed as a TFRecord (length, masked CRC32C of
//! the length, data, masked CRC32C of the data); and [`read_scalars`], which reads a run folder's
//! scalar curves back as TensorBoard shows them (for `cargo xtask scalars`). Written here rather
//! than taken from `tensorboard-rs`, which is unmaintained, pulls a protobuf crate with a security
//! advisory and leaves histograms and text unimplemented. The messages mirror TensorFlow's
//! `event.proto`, `summary.proto`, `tensor.proto` and `tensor_shape.proto`, with only the fields
//! used here.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use prost::Message;

use crate::{Result, TrainError};

/// `tensorflow.Event`.
#[derive(Clone, PartialEq, Message)]
struct Event {
    #[prost(double, tag = "1")]
    wall_time: f64,
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

/// `tensorflow.SessionLog`; status 1 is START, which tells readers to drop events of later
/// steps left by an interrupted run.
#[derive(Clone, PartialEq, Message)]
struct SessionLog {
    #[prost(int32, tag = "1")]
    status: i32,
    #[prost(string, tag = "3")]
    msg: String,
}

/// `tensorflow.Summary`.
#[derive(Clone, PartialEq, Message)]
struct Summary {
    #[prost(message, repeated, tag = "1")]
    value: Vec<SummaryValue>,
}

/// `tensorflow.Summary.Value`.
#[derive(Clone, PartialEq, Message)]
struct SummaryValue {
    #[prost(string, tag = "1")]
    tag: String,
    #[prost(message, optional, tag = "9")]
    metadata: Option<SummaryMetadata>,
    #[prost(oneof = "ValueKind", tags = "2, 5, 8")]
    value: Option<ValueKind>,
}

/// The kinds of summary value used here.
#[derive(Clone, PartialEq, prost::Oneof)]
enum ValueKind {
    #[prost(float, tag = "2")]
    SimpleValue(f32),
    #[prost(message, tag = "5")]
    Histo(HistogramProto),
    #[prost(message, tag = "8")]
    Tensor(TensorProto),
}

/// `tensorflow.SummaryMetadata`.
#[derive(Clone, PartialEq, Message)]
struct SummaryMetadata {
    #[prost(message, optional, tag = "1")]
    plugin_data: Option<PluginData>,
}

/// `tensorflow.SummaryMetadata.PluginData`.
#[derive(Clone, PartialEq, Message)]
struct PluginData {
    #[prost(string, tag = "1")]
    plugin_name: String,
}

/// `tensorflow.HistogramProto`: bucket `i` counts values in `(limit[i-1], limit[i]]`.
#[derive(Clone, PartialEq, Message)]
struct HistogramProto {
    #[prost(double, tag = "1")]
    min: f64,
    #[prost(double, tag = "2")]
    max: f64,
    #[prost(double, tag = "3")]
    num: f64,
    #[prost(double, tag = "4")]
    sum: f64,
    #[prost(double, tag = "5")]
    sum_squares: f64,
    #[prost(double, repeated, tag = "6")]
    bucket_limit: Vec<f64>,
    #[prost(double, repeated, tag = "7")]
    bucket: Vec<f64>,
}

/// `tensorflow.TensorProto`, for a string scalar.
#[derive(Clone, PartialEq, Message)]
struct TensorProto {
    #[prost(int32, tag = "1")]
    dtype: i32,
    #[prost(message, optional, tag = "2")]
    tensor_shape: Option<TensorShapeProto>,
    #[prost(bytes = "vec", repeated, tag = "8")]
    string_val: Vec<Vec<u8>>,
}

/// `tensorflow.TensorShapeProto` (no dimensions: a scalar).
#[derive(Clone, PartialEq, Message)]
struct TensorShapeProto {}

/// TensorFlow's `DT_STRING`.
const DT_STRING: i32 = 7;

/// Buckets of a histogram.
const HISTOGRAM_BUCKETS: usize = 30;

/// CRC32C of `data`, masked as TFRecord requires.
fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// Writes one event file in a log folder.
#[derive(Debug)]
pub struct EventWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl EventWriter {
    /// Starts a new event file in `dir` (created if missing). `suffix` keeps the names of files
    /// started in the same second apart.
    pub fn create(dir: &Path, suffix: &str) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(TrainError::io(dir))?;
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into());
        let name = format!("events.out.tfevents.{:010}.{host}.{}.{suffix}", now() as u64, std::process::id());
        let path = dir.join(name);
        let file = File::create(&path).map_err(TrainError::io(&path))?;
        let mut w = Self { path, out: BufWriter::new(file) };
        w.write_event(&Event {
            wall_time: now(),
            step: 0,
            what: Some(EventWhat::FileVersion("brain.Event:2".into())),
        })?;
        Ok(w)
    }

    /// The file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write_event(&mut self, event: &Event) -> Result<()> {
        let data = event.encode_to_vec();
        let len = (data.len() as u64).to_le_bytes();
        let mut record = Vec::with_capacity(data.len() + 16);
        record.extend_from_slice(&len);
        record.extend_from_slice(&masked_crc(&len).to_le_bytes());
        record.extend_from_slice(&data);
        record.extend_from_slice(&masked_crc(&data).to_le_bytes());
        self.out.write_all(&record).map_err(TrainError::io(&self.path))
    }

    fn write_values(&mut self, step: u64, value: Vec<SummaryValue>) -> Result<()> {
        self.write_event(&Event {
            wall_time: now(),
            step: step as i64,
            what: Some(EventWhat::Summary(Summary { value })),
        })
    }

    /// Scalars at `step`, as (tag, value) pairs.
    pub fn scalars(&mut self, step: u64, values: &[(String, f64)]) -> Result<()> {
        let value = values
            .iter()
            .map(|(tag, v)| SummaryValue {
                tag: tag.clone(),
                metadata: None,
                value: Some(ValueKind::SimpleValue(*v as f32)),
            })
            .collect();
        self.write_values(step, value)
    }

    /// A histogram of `data` at `step`, over equal-width buckets between its extremes;
    /// non-finite values are left out.
    pub fn histogram(&mut self, step: u64, tag: &str, data: &[f32]) -> Result<()> {
        let finite = || data.iter().copied().filter(|v| v.is_finite()).map(f64::from);
        let (min, max) = finite().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
        if min > max {
            return Ok(());
        }
        let width = (max - min) / HISTOGRAM_BUCKETS as f64;
        let mut bucket = vec![0.0; HISTOGRAM_BUCKETS];
        let (mut num, mut sum, mut sum_squares) = (0.0, 0.0, 0.0);
        for v in finite() {
            let i = if width > 0.0 { (((v - min) / width) as usize).min(HISTOGRAM_BUCKETS - 1) } else { 0 };
            bucket[i] += 1.0;
            num += 1.0;
            sum += v;
            sum_squares += v * v;
        }
        let bucket_limit = (1..=HISTOGRAM_BUCKETS)
            .map(|i| if i == HISTOGRAM_BUCKETS { max } else { min + width * i as f64 })
            .collect();
        let histo = HistogramProto { min, max, num, sum, sum_squares, bucket_limit, bucket };
        self.write_values(
            step,
            vec![SummaryValue { tag: tag.into(), metadata: None, value: Some(ValueKind::Histo(histo)) }],
        )
    }

    /// Markdown text at `step` (TensorBoard's text plugin).
    pub fn text(&mut self, step: u64, tag: &str, markdown: &str) -> Result<()> {
        let tensor = TensorProto {
            dtype: DT_STRING,
            tensor_shape: Some(TensorShapeProto {}),
            string_val: vec![markdown.as_bytes().to_vec()],
        };
        let metadata = SummaryMetadata { plugin_data: Some(PluginData { plugin_name: "text".into() }) };
        self.write_values(
            step,
            vec![SummaryValue { tag: tag.into(), metadata: Some(metadata), value: Some(ValueKind::Tensor(tensor)) }],
        )
    }

    /// Marks a (re)start at `step`: readers drop earlier-written events of this step and later
    /// ones, which an interrupted run left behind, so that resumed curves have no doubled stretch.
    pub fn session_start(&mut self, step: u64) -> Result<()> {
        self.write_event(&Event {
            wall_time: now(),
            step: step as i64,
            what: Some(EventWhat::SessionLog(SessionLog { status: 1, msg: "resumed".into() })),
        })
    }

    /// Pushes what is written to the file.
    pub fn flush(&mut self) -> Result<()> {
        self.out.flush().map_err(TrainError::io(&self.path))
    }
}

impl Drop for EventWriter {
    fn drop(&mut self) {
        let _ = self.out.flush();
    }
}

/// A run's scalar curves: each tag's (step, value) points in step order.
pub type Scalars = BTreeMap<String, Vec<(u64, f32)>>;

/// Reads the scalars of every event file in `dir` (`events.out.tfevents.*`, in name order, which
/// is the order they were started), as TensorBoard shows them: a session start at step `s` (a
/// resumed run) drops every point logged at `s` or later before it, which an interrupted session
/// wrote past its checkpoint. A record whose checksum is wrong is an error naming the file; a
/// record cut short at the end of a file (a writer killed mid-write) ends that file.
pub fn read_scalars(dir: &Path) -> Result<Scalars> {
    let entries = std::fs::read_dir(dir).map_err(TrainError::io(dir))?;
    let mut files = Vec::new();
    for e in entries {
        let e = e.map_err(TrainError::io(dir))?;
        if e.file_name().to_string_lossy().starts_with("events.out.tfevents.") {
            files.push(e.path());
        }
    }
    if files.is_empty() {
        let why = "holds no TensorBoard event file (events.out.tfevents.*); give a run's folder".to_string();
        return Err(TrainError::Events { path: dir.into(), why });
    }
    files.sort();
    let mut out = Scalars::new();
    for path in &files {
        let bytes = std::fs::read(path).map_err(TrainError::io(path))?;
        for event in decode_records(&bytes).map_err(|why| TrainError::Events { path: path.clone(), why })? {
            let step = event.step.max(0) as u64;
            match event.what {
                Some(EventWhat::SessionLog(log)) if log.status == 1 => {
                    for points in out.values_mut() {
                        points.retain(|p| p.0 < step);
                    }
                }
                Some(EventWhat::Summary(summary)) => {
                    for v in summary.value {
                        if let Some(ValueKind::SimpleValue(x)) = v.value {
                            out.entry(v.tag).or_default().push((step, x));
                        }
                    }
                }
                _ => {}
            }
        }
    }
    for points in out.values_mut() {
        points.sort_by_key(|p| p.0);
    }
    Ok(out)
}

/// The events of one file's TFRecords, checking both checksums of each record.
fn decode_records(bytes: &[u8]) -> std::result::Result<Vec<Event>, String> {
    let mut events = Vec::new();
    let mut at = 0;
    while at + 12 <= bytes.len() {
        let len_bytes = &bytes[at..at + 8];
        let crc = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        if crc(&bytes[at + 8..]) != masked_crc(len_bytes) {
            return Err(format!("the record at byte {at} has a bad length checksum; the file is damaged"));
        }
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap_or_default()) as usize;
        let end = (at + 12).saturating_add(len);
        if end.saturating_add(4) > bytes.len() {
            break;
        }
        let data = &bytes[at + 12..end];
        if crc(&bytes[end..]) != masked_crc(data) {
            return Err(format!("the record at byte {at} has a bad data checksum; the file is damaged"));
        }
        let event = Event::decode(data).map_err(|e| format!("the record at byte {at} is not an event ({e})"))?;
        events.push(event);
        at = end + 4;
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_crc_matches_tensorflow() {
        // CRC32C of "123456789" is 0xE3069283 (the standard check value); TFRecord masks it as
        // rotate-right-15 plus 0xa282ead8.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        // Worked by hand: 0xE3069283 rotated right by 15 is 0x2507C60D; plus 0xa282ead8.
        assert_eq!(masked_crc(b"123456789"), 0xC78A_B0E5);
    }

    #[test]
    fn records_are_framed_and_decode_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path(), "0").unwrap();
        w.scalars(3, &[("train/loss".into(), 1.5)]).unwrap();
        w.histogram(3, "weights/fc", &[-1.0, 0.0, 0.5, 2.0, f32::NAN]).unwrap();
        let path = w.path().to_path_buf();
        drop(w);
        let bytes = std::fs::read(path).unwrap();
        let mut events = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            let len_bytes = &bytes[at..at + 8];
            let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
            assert_eq!(u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap()), masked_crc(len_bytes));
            let data = &bytes[at + 12..at + 12 + len];
            assert_eq!(u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap()), masked_crc(data));
            events.push(Event::decode(data).unwrap());
            at += 16 + len;
        }
        assert_eq!(events.len(), 3);
        assert_eq!(events[0].what, Some(EventWhat::FileVersion("brain.Event:2".into())));
        let Some(EventWhat::Summary(s)) = &events[1].what else { panic!("a summary") };
        assert_eq!(s.value[0].value, Some(ValueKind::SimpleValue(1.5)));
        let Some(EventWhat::Summary(s)) = &events[2].what else { panic!("a summary") };
        let Some(ValueKind::Histo(h)) = &s.value[0].value else { panic!("a histogram") };
        assert_eq!((h.min, h.max, h.num, h.sum), (-1.0, 2.0, 4.0, 1.5));
        assert_eq!(h.bucket.iter().sum::<f64>(), 4.0);
        assert_eq!((h.bucket[0], h.bucket[HISTOGRAM_BUCKETS - 1]), (1.0, 1.0));
    }

    #[test]
    fn scalars_read_back_as_tensorboard_shows_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path(), "0").unwrap();
        for step in 1..=6 {
            w.scalars(step, &[("train/loss".into(), step as f64), ("quant/a/clip".into(), 0.5)]).unwrap();
        }
        w.histogram(6, "weights/fc", &[1.0, 2.0]).unwrap();
        drop(w);
        // A resumed session, started at step 4: the first session's points from step 4 on go.
        let mut w = EventWriter::create(dir.path(), "1").unwrap();
        w.session_start(4).unwrap();
        w.scalars(4, &[("train/loss".into(), 40.0)]).unwrap();
        drop(w);
        let s = read_scalars(dir.path()).unwrap();
        assert_eq!(s.keys().collect::<Vec<_>>(), ["quant/a/clip", "train/loss"]);
        assert_eq!(s["train/loss"], vec![(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]);
        assert_eq!(s["quant/a/clip"].len(), 3);

        // A record cut short at the end is where the file ends; a flipped byte is an error.
        let path = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path()).min().unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        let whole = bytes.len();
        std::fs::write(&path, &bytes[..whole - 5]).unwrap();
        assert_eq!(read_scalars(dir.path()).unwrap()["train/loss"].len(), 4);
        bytes[whole / 2] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        let err = read_scalars(dir.path()).unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()) && err.contains("damaged"), "{err}");

        let empty = tempfile::tempdir().unwrap();
        assert!(read_scalars(empty.path()).unwrap_err().to_string().contains("no TensorBoard event file"));
    }
}
