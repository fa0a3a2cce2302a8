//! What differs between the two tasks a run trains: image classification (cross-entropy, top-1
//! and top-5) and object detection (the detector's own loss terms, mAP). Here are the network,
//! its data, one training step and the evaluation of each; the loop, checkpoints, logs and resume
//! are shared (`run.rs`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::Receiver;

use int8_datasets::detection::Object;
use int8_datasets::detection_loader::{DetectionBatch, detection_epoch};
use int8_datasets::loader::{Batch as ClassBatch, epoch_from};
use int8_datasets::open::{Opened, OpenedDetection, open, open_detection};
use int8_nn::ops::cross_entropy;
use int8_nn::optim::Sgd;
use int8_nn::{Device, Layer, Module, Tensor, no_grad};
use int8_zoo::Model;
use int8_zoo::detection::{Detections, Detector, Target};
use serde::{Deserialize, Serialize};

use crate::Result;
use crate::map::{DetBox, GtBox, ImageEval, VocParams, coco_map, voc_ap};
use crate::recipe::{Recipe, Task};
use crate::step::{Step, detection_step, train_step};

/// The network a run trains.
#[derive(Debug)]
pub enum Net {
    /// An image classifier.
    Classifier(Box<dyn Model>),
    /// An object detector.
    Detector(Box<dyn Detector>),
}

impl Module for Net {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(Layer<'a>)) {
        match self {
            Net::Classifier(m) => m.visit(f),
            Net::Detector(d) => d.visit(f),
        }
    }
}

impl Net {
    /// The device its parameters are on (the CPU for a network without any).
    pub fn device(&self) -> Device {
        self.layers().iter().flat_map(|l| l.params()).next().map_or(Device::Cpu, |p| p.device())
    }

    /// The registry name.
    pub fn name(&self) -> &str {
        match self {
            Net::Classifier(m) => m.name(),
            Net::Detector(d) => d.name(),
        }
    }
}

/// A run's data.
#[derive(Debug, Clone)]
pub enum Data {
    /// Labelled images.
    Classification(Opened),
    /// Images with boxes.
    Detection(OpenedDetection),
}

/// One training or test batch.
#[derive(Debug)]
pub enum Batch {
    /// Images and class labels.
    Classes(ClassBatch),
    /// Images and boxes.
    Boxes(DetectionBatch),
}

impl Batch {
    /// Images in the batch.
    pub fn len(&self) -> usize {
        match self {
            Batch::Classes(b) => b.labels.len(),
            Batch::Boxes(b) => b.indices.len(),
        }
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An epoch's batches, assembled ahead.
#[derive(Debug)]
pub enum Batches {
    /// Of a classification dataset.
    Classes(Receiver<int8_datasets::Result<ClassBatch>>),
    /// Of a detection dataset.
    Boxes(Receiver<int8_datasets::Result<DetectionBatch>>),
}

impl Iterator for Batches {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Batches::Classes(rx) => rx.recv().ok().map(|b| Ok(Batch::Classes(b?))),
            Batches::Boxes(rx) => rx.recv().ok().map(|b| Ok(Batch::Boxes(b?))),
        }
    }
}

/// Opens `recipe`'s data (searching `data_dir` first) and builds its network for it.
pub fn build(recipe: &Recipe, data_dir: Option<&Path>) -> Result<(Net, Data)> {
    let spec = recipe.data_spec(data_dir);
    let (policy, seed) = (recipe.policy(), recipe.train.seed);
    let device = recipe.device()?;
    let (net, data) = match recipe.task {
        Task::Classification => {
            let data = open(&spec)?;
            (Net::Classifier(int8_zoo::build(&recipe.model, data.classes, &policy, seed)?), Data::Classification(data))
        }
        Task::Detection => {
            let options = recipe.detector.options();
            let data = open_detection(&spec, int8_zoo::detection::image_size(&recipe.model, &options)?)?;
            // The detector's class 0 is the background.
            let net = int8_zoo::detection::build(&recipe.model, data.classes.len() + 1, &policy, seed, &options)?;
            (Net::Detector(net), Data::Detection(data))
        }
    };
    if device != Device::Cpu {
        net.to_device(&device)?;
    }
    Ok((net, data))
}

impl Data {
    /// Training images.
    pub fn train_len(&self) -> usize {
        match self {
            Data::Classification(d) => d.train.len(),
            Data::Detection(d) => d.train.len(),
        }
    }

    /// Test images.
    pub fn test_len(&self) -> usize {
        match self {
            Data::Classification(d) => d.test.len(),
            Data::Detection(d) => d.test.len(),
        }
    }

    /// Classes (the background not counted).
    pub fn classes(&self) -> usize {
        match self {
            Data::Classification(d) => d.classes,
            Data::Detection(d) => d.classes.len(),
        }
    }

    /// Where the data was read from.
    pub fn root(&self) -> &PathBuf {
        match self {
            Data::Classification(d) => &d.root,
            Data::Detection(d) => &d.root,
        }
    }

    /// The training batches of `epoch` after the first `skip`, shuffled and augmented with `seed`.
    pub fn train_epoch(&self, batch: usize, seed: u64, epoch: u64, skip: usize) -> Result<Batches> {
        Ok(match self {
            Data::Classification(d) => {
                Batches::Classes(epoch_from(d.train.clone(), batch, true, seed, epoch, 3, skip)?)
            }
            Data::Detection(d) => Batches::Boxes(detection_epoch(d.train.clone(), batch, true, seed, epoch, skip)?),
        })
    }
}

/// A batch's images as a tensor on `device`.
fn tensor(images: Vec<f32>, dims: [usize; 4], device: &Device) -> Result<Tensor> {
    let x = Tensor::from_vec(images, dims)?;
    Ok(if *device == Device::Cpu { x } else { x.to_device(device)? })
}

/// A detection batch's ground truth as the detector takes it: difficult boxes left out, labels
/// from 1 (0 is the background).
pub fn targets(b: &DetectionBatch) -> Vec<Target> {
    b.objects
        .iter()
        .map(|objs| {
            let kept: Vec<_> = objs.iter().filter(|o| !o.difficult).collect();
            Target { boxes: kept.iter().map(|o| o.bbox).collect(), labels: kept.iter().map(|o| o.class + 1).collect() }
        })
        .collect()
}

/// One training step of `net` on `batch` at learning rate `lr` (see [`crate::step`]).
pub fn step(net: &Net, sgd: &mut Sgd, batch: Batch, lr: f64) -> Result<std::result::Result<Step, String>> {
    match (net, batch) {
        (Net::Classifier(m), Batch::Classes(b)) => {
            let x = tensor(b.images, b.dims, &net.device())?;
            train_step(m.as_ref(), sgd, &x, &b.labels, lr)
        }
        (Net::Detector(d), Batch::Boxes(b)) => {
            let t = targets(&b);
            let x = tensor(b.images, b.dims, &net.device())?;
            detection_step(d.as_ref(), sgd, &x, &t, lr)
        }
        (net, _) => Err(crate::TrainError::Recipe {
            path: net.name().into(),
            why: "got a batch of the other task; this is a bug in the trainer".into(),
        }),
    }
}

/// A test evaluation: what the task measures, in percent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Test loss (classification).
    pub loss: Option<f64>,
    /// Top-1 accuracy (classification).
    pub top1: Option<f64>,
    /// Top-5 accuracy (classification).
    pub top5: Option<f64>,
    /// Pascal VOC mAP at IoU 0.5, all-point (detection).
    pub map50: Option<f64>,
    /// COCO mAP over IoU 0.5:0.95 (detection).
    pub map: Option<f64>,
}

impl Metrics {
    /// The number a run is judged by: top-1, or mAP@0.5.
    pub fn headline(&self) -> f64 {
        self.top1.or(self.map50).unwrap_or(0.0)
    }

    /// As TensorBoard scalars under `test/`.
    pub fn scalars(&self) -> Vec<(String, f64)> {
        [("loss", self.loss), ("top1", self.top1), ("top5", self.top5), ("map50", self.map50), ("map", self.map)]
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (format!("test/{k}"), v)))
            .collect()
    }

    /// For the progress line.
    pub fn describe(&self) -> String {
        match (self.top1, self.map50) {
            (Some(t1), _) => format!(
                "test loss {:.4} top-1 {t1:.2}% top-5 {:.2}%",
                self.loss.unwrap_or(f64::NAN),
                self.top5.unwrap_or(f64::NAN)
            ),
            (None, Some(m)) => format!("test mAP@0.5 {m:.2}% mAP@[.5:.95] {:.2}%", self.map.unwrap_or(f64::NAN)),
            _ => String::new(),
        }
    }
}

/// Evaluates `net` on `data`'s test split in evaluation mode, recording nothing.
pub fn evaluate(net: &Net, data: &Data, batch: usize) -> Result<Metrics> {
    net.set_training(false);
    let m = match (net, data) {
        (Net::Classifier(m), Data::Classification(d)) => classify(m.as_ref(), d, batch, &net.device()),
        (Net::Detector(det), Data::Detection(d)) => detect(det.as_ref(), d, batch, &net.device()),
        (net, _) => Err(crate::TrainError::Recipe {
            path: net.name().into(),
            why: "got data of the other task; this is a bug in the trainer".into(),
        }),
    };
    net.set_training(true);
    m
}

fn classify(model: &dyn Model, data: &Opened, batch: usize, device: &Device) -> Result<Metrics> {
    let (mut loss, mut top1, mut top5, mut n) = (0.0, 0usize, 0usize, 0usize);
    for b in epoch_from(data.test.clone(), batch, false, 0, 0, 2, 0)? {
        let b = b?;
        let x = tensor(b.images, b.dims, device)?;
        let (_, r) = no_grad(|| -> Result<_> { Ok(cross_entropy(&model.forward(&x)?, &b.labels)?) })?;
        loss += r.loss * b.labels.len() as f64;
        top1 += r.top1;
        top5 += r.top5;
        n += b.labels.len();
    }
    let n = n.max(1) as f64;
    Ok(Metrics {
        loss: Some(loss / n),
        top1: Some(100.0 * top1 as f64 / n),
        top5: Some(100.0 * top5 as f64 / n),
        ..Default::default()
    })
}

fn detect(detector: &dyn Detector, data: &OpenedDetection, batch: usize, device: &Device) -> Result<Metrics> {
    let test: Arc<_> = data.test.clone();
    let mut found = Vec::with_capacity(test.len());
    let mut truth = Vec::with_capacity(test.len());
    for b in detection_epoch(test, batch, false, 0, 0, 0)? {
        let b = b?;
        let x = tensor(b.images.clone(), b.dims, device)?;
        found.extend(no_grad(|| detector.detect(&x))?);
        truth.extend(b.objects);
    }
    let (map50, map) = mean_ap(&truth, &found)?;
    Ok(Metrics { map50: Some(100.0 * map50), map: Some(100.0 * map), ..Default::default() })
}

/// VOC mAP@0.5 (all-point) and COCO mAP@[.5:.95] of `found` against `truth`, image by image,
/// as fractions. Labels are compared as the detector gives them (the dataset's class plus 1).
fn mean_ap(truth: &[Vec<Object>], found: &[Detections]) -> Result<(f64, f64)> {
    let images: Vec<ImageEval> = truth
        .iter()
        .zip(found)
        .map(|(t, d)| ImageEval {
            ground_truth: t
                .iter()
                .map(|o| GtBox { bbox: o.bbox, class: o.class + 1, difficult: o.difficult })
                .collect(),
            detections: (0..d.boxes.len())
                .map(|i| DetBox { bbox: d.boxes[i], class: d.labels[i], score: d.scores[i] })
                .collect(),
        })
        .collect();
    let voc = voc_ap(&images, &VocParams::default())?;
    Ok((voc.mean, coco_map(&images)?.map))
}
