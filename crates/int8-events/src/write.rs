//! The event-file writer of the trainer: scalars, histograms, text (TensorBoard's text plugin)
//! and session starts, each an `Event` encoded with prost and framed as one TFRecord.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use prost::Message;

use crate::proto::{
    DT_STRING, Event, EventWhat, FILE_VERSION, HistogramProto, PluginData, SESSION_START, SessionLog, Summary,
    SummaryMetadata, SummaryValue, TensorProto, TensorShapeProto, ValueKind,
};
use crate::record::frame;
use crate::{EventError, Result};

/// Buckets of a histogram.
pub(crate) const HISTOGRAM_BUCKETS: usize = 30;

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// Writes one event file in a log folder; what is buffered is flushed on drop.
#[derive(Debug)]
pub struct EventWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl EventWriter {
    /// Starts a new event file in `dir` (created if missing). `suffix` keeps the names of files
    /// started in the same second apart; the name starts with that second, so that name order is
    /// the order of the sessions (see [`crate::event_files`]).
    pub fn create(dir: &Path, suffix: &str) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|source| EventError::Write { path: dir.into(), source })?;
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into());
        let name = format!("events.out.tfevents.{:010}.{host}.{}.{suffix}", now() as u64, std::process::id());
        let path = dir.join(name);
        let file = File::create(&path).map_err(|source| EventError::Write { path: path.clone(), source })?;
        let mut w = Self { path, out: BufWriter::new(file) };
        w.write_event(&Event { wall_time: now(), step: 0, what: Some(EventWhat::FileVersion(FILE_VERSION.into())) })?;
        Ok(w)
    }

    /// The file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write_event(&mut self, event: &Event) -> Result<()> {
        let record = frame(&event.encode_to_vec());
        self.out.write_all(&record).map_err(|source| EventError::Write { path: self.path.clone(), source })
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
            what: Some(EventWhat::SessionLog(SessionLog { status: SESSION_START, msg: "resumed".into() })),
        })
    }

    /// Pushes what is written to the file.
    pub fn flush(&mut self) -> Result<()> {
        self.out.flush().map_err(|source| EventError::Write { path: self.path.clone(), source })
    }
}

impl Drop for EventWriter {
    fn drop(&mut self) {
        let _ = self.out.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::masked_crc;

    #[test]
    fn records_are_framed_and_decode_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path(), "0").unwrap();
        w.scalars(3, &[("train/loss".into(), 1.5)]).unwrap();
        w.histogram(3, "weights/fc", &[-1.0, 0.0, 0.5, 2.0, f32::NAN]).unwrap();
        // Nothing finite: no histogram.
        w.histogram(3, "weights/none", &[f32::NAN, f32::INFINITY]).unwrap();
        w.session_start(7).unwrap();
        let path = w.path().to_path_buf();
        drop(w);
        // The records walked by hand, independently of `unframe`.
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
        assert_eq!(at, bytes.len());
        assert_eq!(events.len(), 4);
        assert_eq!(events[0].what, Some(EventWhat::FileVersion("brain.Event:2".into())));
        let Some(EventWhat::Summary(s)) = &events[1].what else { panic!("a summary") };
        assert_eq!((events[1].step, s.value[0].tag.as_str()), (3, "train/loss"));
        assert_eq!(s.value[0].value, Some(ValueKind::SimpleValue(1.5)));
        let Some(EventWhat::Summary(s)) = &events[2].what else { panic!("a summary") };
        let Some(ValueKind::Histo(h)) = &s.value[0].value else { panic!("a histogram") };
        // Of -1, 0, 0.5, 2 (NaN left out): f64 sums by hand.
        assert_eq!((h.min, h.max, h.num, h.sum, h.sum_squares), (-1.0, 2.0, 4.0, 1.5, 5.25));
        assert_eq!(h.bucket.iter().sum::<f64>(), 4.0);
        assert_eq!((h.bucket[0], h.bucket[HISTOGRAM_BUCKETS - 1]), (1.0, 1.0));
        // Buckets of width 0.1 from -1: 0 falls in bucket 10, 0.5 in bucket 15.
        assert_eq!((h.bucket[10], h.bucket[15]), (1.0, 1.0));
        assert_eq!(h.bucket_limit.last(), Some(&2.0));
        assert_eq!(events[3].step, 7);
        assert_eq!(events[3].what, Some(EventWhat::SessionLog(SessionLog { status: 1, msg: "resumed".into() })));
    }

    #[test]
    fn a_folder_that_cannot_be_made_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a-file");
        std::fs::write(&file, b"").unwrap();
        let err = EventWriter::create(&file.join("logs"), "0").unwrap_err().to_string();
        assert!(err.starts_with("cannot write") && err.contains("a-file"), "{err}");
    }
}
