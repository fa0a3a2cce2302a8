//! The detection evaluator against references on one generated set of images (a test of the
//! evaluator, comparing two implementations on the same input; the numbers mean nothing about any
//! model): COCO's AP against pycocotools' own `COCOeval` (run by `tests/coco_eval.py`), and VOC's
//! AP, both interpolations and both pixel conventions, against a transliteration of the classic
//! `voc_eval.py` written here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use int8_core::rng::CounterRng;
use int8_train::map::{DetBox, GtBox, ImageEval, Interpolation, PixelConvention, VocParams, coco_map, voc_ap};
use serde_json::{Value, json};

/// Uniform numbers from a seeded counter stream.
struct Stream {
    rng: CounterRng,
    next: u64,
}

impl Stream {
    fn u(&mut self) -> f64 {
        self.next += 1;
        self.rng.uniform_f64(self.next)
    }

    /// A value in `[lo, hi)` on a quarter-pixel grid: exact in f32, f64 and decimal JSON, so
    /// that both implementations see the same numbers.
    fn quarter(&mut self, lo: f64, hi: f64) -> f32 {
        ((lo + self.u() * (hi - lo)) * 4.0).round() as f32 / 4.0
    }

    /// A score on a grid of 1/32, so that some detections tie.
    fn score(&mut self, lo: f64, hi: f64) -> f32 {
        ((lo + self.u() * (hi - lo)) * 32.0).floor() as f32 / 32.0
    }

    /// `b` with each side moved by up to `frac` of its size.
    fn jitter(&mut self, b: [f32; 4], frac: f64) -> [f32; 4] {
        let (w, h) = (f64::from(b[2] - b[0]) * frac, f64::from(b[3] - b[1]) * frac);
        [b[0] + self.quarter(-w, w), b[1] + self.quarter(-h, h), b[2] + self.quarter(-w, w), b[3] + self.quarter(-h, h)]
    }
}

/// 40 images: up to 6 boxes each of classes 1 to 3 (about one in seven difficult, some tiny), most found by
/// a noisy detection (now and then of the wrong class), some found twice, low-scoring false
/// positives; class 4 has only difficult boxes and class 5 only detections (neither counts);
/// images 3 and 5 hold ties and difficult boxes that the matching rules decide; image 7 has 130
/// detections of class 1, past COCO's 100.
fn dataset() -> Vec<ImageEval> {
    let mut s = Stream { rng: CounterRng::new(2024), next: 0 };
    (0..40)
        .map(|image| {
            let mut im = ImageEval::default();
            for _ in 0..(s.u() * 7.0) as usize {
                let class = 1 + (s.u() * 3.0) as u32;
                let (x, y) = (s.quarter(0.0, 200.0), s.quarter(0.0, 200.0));
                // Some boxes are a few pixels across, where the devkit's +1 changes the IoU most.
                let small = s.u() < 0.3;
                let (lo, hi) = if small { (2.0, 8.0) } else { (8.0, 100.0) };
                let bbox = [x, y, x + s.quarter(lo, hi), y + s.quarter(lo, hi)];
                im.ground_truth.push(GtBox { bbox, class, difficult: s.u() < 0.15 });
                if s.u() < 0.85 {
                    let class = if s.u() < 0.9 { class } else { 1 + (s.u() * 3.0) as u32 };
                    let score = s.score(0.3, 1.0);
                    let found = s.jitter(bbox, if small { 0.35 } else { 0.15 });
                    im.detections.push(DetBox { bbox: found, class, score });
                    if s.u() < 0.25 {
                        let dup = DetBox { bbox: s.jitter(bbox, 0.1), class, score: s.score(0.2, f64::from(score)) };
                        im.detections.push(dup);
                    }
                }
            }
            if s.u() < 0.2 {
                let bbox = [10.0, 10.0, 60.0, 60.0];
                im.ground_truth.push(GtBox { bbox, class: 4, difficult: true });
                im.detections.push(DetBox { bbox: s.jitter(bbox, 0.05), class: 4, score: s.score(0.5, 1.0) });
            }
            for _ in 0..(s.u() * 4.0) as usize {
                let (x, y) = (s.quarter(0.0, 250.0), s.quarter(0.0, 250.0));
                let bbox = [x, y, x + s.quarter(5.0, 60.0), y + s.quarter(5.0, 60.0)];
                let class = 1 + (s.u() * 5.0) as u32;
                im.detections.push(DetBox { bbox, class, score: s.score(0.0, 0.5) });
            }
            if image == 3 {
                // Two boxes tie for the first detection (IoU 2/3 each); the second detection
                // overlaps only the later box. COCO gives the tie to the later box (the second
                // detection then misses), VOC's argmax to the first.
                for bbox in [[0.0, 200.0, 10.0, 210.0], [4.0, 200.0, 14.0, 210.0]] {
                    im.ground_truth.push(GtBox { bbox, class: 2, difficult: false });
                }
                im.detections.push(DetBox { bbox: [2.0, 200.0, 12.0, 210.0], class: 2, score: 0.97 });
                im.detections.push(DetBox { bbox: [5.0, 200.0, 15.0, 210.0], class: 2, score: 0.96 });
            }
            if image == 5 {
                // A difficult box listed before a regular one, the detection closer to the
                // difficult one (IoU 0.95 against 0.86): COCO prefers the regular box, VOC takes
                // the best and ignores the detection.
                im.ground_truth.push(GtBox { bbox: [102.0, 250.0, 142.0, 290.0], class: 3, difficult: true });
                im.ground_truth.push(GtBox { bbox: [100.0, 250.0, 140.0, 290.0], class: 3, difficult: false });
                im.detections.push(DetBox { bbox: [103.0, 250.0, 143.0, 290.0], class: 3, score: 0.99 });
            }
            if image == 7 {
                let bbox = [100.0, 100.0, 180.0, 160.0];
                im.ground_truth.push(GtBox { bbox, class: 1, difficult: false });
                for _ in 0..130 {
                    im.detections.push(DetBox { bbox: s.jitter(bbox, 0.3), class: 1, score: s.score(0.0, 1.0) });
                }
            }
            im
        })
        .collect()
}

fn xywh(b: &[f32; 4]) -> Vec<f64> {
    let b = b.map(f64::from);
    vec![b[0], b[1], b[2] - b[0], b[3] - b[1]]
}

/// The set as a COCO ground-truth file and a results file. pycocotools has no `difficult` flag;
/// a difficult box gets an area past the "all" range's upper end (1e10), which makes COCOeval
/// ignore it exactly as int8_train::map ignores a difficult box (the area field only selects the
/// range; the IoU is the box's).
fn write_coco(images: &[ImageEval], dir: &Path) -> (PathBuf, PathBuf) {
    let mut annotations = Vec::new();
    let mut results = Vec::new();
    for (i, im) in images.iter().enumerate() {
        for g in &im.ground_truth {
            let b = xywh(&g.bbox);
            let area = if g.difficult { 1e11 } else { b[2] * b[3] };
            annotations.push(json!({
                "id": annotations.len() + 1, "image_id": i + 1, "category_id": g.class,
                "bbox": b, "area": area, "iscrowd": 0,
            }));
        }
        for d in &im.detections {
            results.push(json!({
                "image_id": i + 1, "category_id": d.class, "bbox": xywh(&d.bbox), "score": f64::from(d.score),
            }));
        }
    }
    let gt = json!({
        "images": (1..=images.len()).map(|id| json!({"id": id, "width": 320, "height": 320})).collect::<Vec<_>>(),
        "annotations": annotations,
        "categories": (1..=5).map(|c| json!({"id": c, "name": format!("class{c}")})).collect::<Vec<_>>(),
    });
    let (gt_path, dt_path) = (dir.join("gt.json"), dir.join("results.json"));
    std::fs::write(&gt_path, gt.to_string()).expect("write the ground truth");
    std::fs::write(&dt_path, Value::from(results).to_string()).expect("write the results");
    (gt_path, dt_path)
}

fn pycocotools(gt: &Path, dt: &Path) -> Value {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/coco_eval.py");
    let out = Command::new("python3").arg(&script).arg(gt).arg(dt).output().unwrap_or_else(|e| {
        panic!("python3 did not start ({e}); install Python 3 and pycocotools (`python3 -m pip install pycocotools`, scripts/setup does it)")
    });
    assert!(
        out.status.success(),
        "pycocotools' COCOeval failed; install it with `python3 -m pip install pycocotools` (scripts/setup does it):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("coco_eval.py prints JSON")
}

fn close(what: &str, ours: f64, theirs: f64) {
    assert!((ours - theirs).abs() <= 1e-9, "{what}: ours {ours}, reference {theirs}");
}

#[test]
fn coco_map_equals_pycocotools() {
    let images = dataset();
    let dir = tempfile::tempdir().expect("temp dir");
    let (gt, dt) = write_coco(&images, dir.path());
    let reference = pycocotools(&gt, &dt);
    let stats: Vec<f64> = reference["stats"].as_array().expect("stats").iter().filter_map(Value::as_f64).collect();
    assert_eq!(stats.len(), 12);
    let ours = coco_map(&images).expect("coco");
    // The set is neither trivial nor hopeless, so that matching decisions matter.
    assert!(ours.map > 0.2 && ours.map < 0.9, "{ours:?}");
    close("AP@[.5:.95]", ours.map, stats[0]);
    close("AP@0.5", ours.map50, stats[1]);
    close("AP@0.75", ours.map75, stats[2]);
    let per_class = reference["per_class"].as_object().expect("per_class");
    let want: Vec<String> = ours.per_class.keys().map(u32::to_string).collect();
    assert_eq!(
        per_class.keys().cloned().collect::<Vec<_>>(),
        want,
        "classes 1-3 count; 4 (only difficult) and 5 do not"
    );
    for (class, ap) in &ours.per_class {
        let r = &per_class[&class.to_string()];
        close(&format!("class {class} AP"), ap.ap, r["ap"].as_f64().expect("ap"));
        close(&format!("class {class} AP50"), ap.ap50, r["ap50"].as_f64().expect("ap50"));
        close(&format!("class {class} AP75"), ap.ap75, r["ap75"].as_f64().expect("ap75"));
    }
}

/// py-faster-rcnn's `voc_eval` for one class, transliterated: `class_recs` per image, the
/// detections sorted by descending confidence (stably, as our input order defines ties), each
/// matched to the argmax-overlap box, then `voc_ap`. `one` is the devkit's +1 (or 0).
fn voc_eval(images: &[ImageEval], class: u32, ovthresh: f64, use_07_metric: bool, one: f64) -> Option<f64> {
    struct Rec {
        bbox: Vec<[f64; 4]>,
        difficult: Vec<bool>,
        det: Vec<bool>,
    }
    let mut recs: Vec<Rec> = images
        .iter()
        .map(|im| {
            let r: Vec<&GtBox> = im.ground_truth.iter().filter(|g| g.class == class).collect();
            Rec {
                bbox: r.iter().map(|g| g.bbox.map(f64::from)).collect(),
                difficult: r.iter().map(|g| g.difficult).collect(),
                det: vec![false; r.len()],
            }
        })
        .collect();
    let npos = recs.iter().map(|r| r.difficult.iter().filter(|d| !**d).count()).sum::<usize>() as f64;
    if npos == 0.0 {
        return None;
    }
    let mut lines: Vec<(usize, f64, [f64; 4])> = Vec::new();
    for (i, im) in images.iter().enumerate() {
        for d in im.detections.iter().filter(|d| d.class == class) {
            lines.push((i, f64::from(d.score), d.bbox.map(f64::from)));
        }
    }
    lines.sort_by(|a, b| b.1.total_cmp(&a.1));
    let nd = lines.len();
    let (mut tp, mut fp) = (vec![0.0; nd], vec![0.0; nd]);
    for (d, &(image, _, bb)) in lines.iter().enumerate() {
        let r = &mut recs[image];
        let mut ovmax = f64::NEG_INFINITY;
        let mut jmax = 0;
        for (j, g) in r.bbox.iter().enumerate() {
            let iw = (g[2].min(bb[2]) - g[0].max(bb[0]) + one).max(0.0);
            let ih = (g[3].min(bb[3]) - g[1].max(bb[1]) + one).max(0.0);
            let inters = iw * ih;
            let uni =
                (bb[2] - bb[0] + one) * (bb[3] - bb[1] + one) + (g[2] - g[0] + one) * (g[3] - g[1] + one) - inters;
            let overlap = inters / uni;
            if overlap > ovmax {
                ovmax = overlap;
                jmax = j;
            }
        }
        if ovmax > ovthresh {
            if !r.difficult[jmax] {
                if !r.det[jmax] {
                    tp[d] = 1.0;
                    r.det[jmax] = true;
                } else {
                    fp[d] = 1.0;
                }
            }
        } else {
            fp[d] = 1.0;
        }
    }
    let cumsum = |v: &[f64]| {
        v.iter()
            .scan(0.0, |s, x| {
                *s += x;
                Some(*s)
            })
            .collect::<Vec<f64>>()
    };
    let (tp, fp) = (cumsum(&tp), cumsum(&fp));
    let rec: Vec<f64> = tp.iter().map(|t| t / npos).collect();
    let prec: Vec<f64> = tp.iter().zip(&fp).map(|(t, f)| t / (t + f).max(f64::EPSILON)).collect();
    Some(voc_ap_reference(&rec, &prec, use_07_metric))
}

/// `voc_ap` of `voc_eval.py`.
fn voc_ap_reference(rec: &[f64], prec: &[f64], use_07_metric: bool) -> f64 {
    if use_07_metric {
        let mut ap = 0.0;
        for i in 0..11 {
            let t = f64::from(i) * 0.1;
            let above: Vec<f64> = rec.iter().zip(prec).filter(|(r, _)| **r >= t).map(|(_, p)| *p).collect();
            let p = if above.is_empty() { 0.0 } else { above.iter().cloned().fold(f64::MIN, f64::max) };
            ap += p / 11.0;
        }
        return ap;
    }
    let mut mrec = vec![0.0];
    mrec.extend_from_slice(rec);
    mrec.push(1.0);
    let mut mpre = vec![0.0];
    mpre.extend_from_slice(prec);
    mpre.push(0.0);
    for i in (1..mpre.len()).rev() {
        mpre[i - 1] = mpre[i - 1].max(mpre[i]);
    }
    let changes: Vec<usize> = (0..mrec.len() - 1).filter(|&i| mrec[i + 1] != mrec[i]).collect();
    changes.iter().map(|&i| (mrec[i + 1] - mrec[i]) * mpre[i + 1]).sum()
}

#[test]
fn voc_ap_equals_the_voc_eval_reference() {
    let images = dataset();
    for (interpolation, use_07) in [(Interpolation::ElevenPoint, true), (Interpolation::AllPoint, false)] {
        for (convention, one) in [(PixelConvention::Continuous, 0.0), (PixelConvention::PlusOne, 1.0)] {
            let params = VocParams { iou_threshold: 0.5, interpolation, convention };
            let ours = voc_ap(&images, &params).expect("voc");
            let want: BTreeMap<u32, f64> =
                (1..=5).filter_map(|c| voc_eval(&images, c, 0.5, use_07, one).map(|ap| (c, ap))).collect();
            assert_eq!(ours.per_class.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "{params:?}");
            for (class, ap) in &want {
                close(&format!("{params:?} class {class}"), ours.per_class[class], *ap);
            }
            let mean = want.values().sum::<f64>() / want.len() as f64;
            close(&format!("{params:?} mean"), ours.mean, mean);
            assert!(ours.mean > 0.2 && ours.mean < 0.95, "{params:?}: {ours:?}");
        }
    }
    // The +1 convention makes boxes overlap more, so the two differ on this set.
    let ap = |convention| voc_ap(&images, &VocParams { convention, ..VocParams::default() }).expect("voc").mean;
    assert_ne!(ap(PixelConvention::Continuous), ap(PixelConvention::PlusOne));
}

/// The committed set `tests/fixtures/map/images.json`: a few hand-made images (a crowd with tied
/// scores and duplicates, difficult boxes, tiny boxes where the devkit's +1 decides, an image
/// without ground truth, a class with only difficult boxes).
fn fixture_images() -> Vec<ImageEval> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/map/images.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let doc: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let bbox = |v: &Value| -> [f32; 4] {
        let b: Vec<f32> =
            v.as_array().expect("a box is 4 numbers").iter().map(|x| x.as_f64().expect("number") as f32).collect();
        b.try_into().expect("a box is 4 numbers")
    };
    let class = |v: &Value| v.as_u64().expect("a class is a non-negative integer") as u32;
    doc["images"]
        .as_array()
        .expect("images")
        .iter()
        .map(|im| ImageEval {
            ground_truth: im["ground_truth"]
                .as_array()
                .expect("ground_truth")
                .iter()
                .map(|g| GtBox {
                    bbox: bbox(&g["bbox"]),
                    class: class(&g["class"]),
                    difficult: g["difficult"].as_bool().expect("difficult"),
                })
                .collect(),
            detections: im["detections"]
                .as_array()
                .expect("detections")
                .iter()
                .map(|d| DetBox {
                    bbox: bbox(&d["bbox"]),
                    class: class(&d["class"]),
                    score: d["score"].as_f64().expect("score") as f32,
                })
                .collect(),
        })
        .collect()
}

fn fixture_reference() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/map/reference.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn number(v: &Value, what: &str) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("reference.json: {what} is not a number"))
}

#[test]
fn the_fixed_set_equals_its_recorded_pycocotools_and_voc_eval_numbers() {
    let images = fixture_images();
    let reference = fixture_reference();
    let coco = &reference["coco"];
    let ours = coco_map(&images).expect("coco");
    close("fixture AP@[.5:.95]", ours.map, number(&coco["stats"][0], "stats[0]"));
    close("fixture AP@0.5", ours.map50, number(&coco["stats"][1], "stats[1]"));
    close("fixture AP@0.75", ours.map75, number(&coco["stats"][2], "stats[2]"));
    let per_class = coco["per_class"].as_object().expect("per_class");
    assert_eq!(
        per_class.keys().cloned().collect::<Vec<_>>(),
        ours.per_class.keys().map(u32::to_string).collect::<Vec<_>>(),
        "classes 1-3 count; 4 (only difficult ground truth) does not"
    );
    for (class, ap) in &ours.per_class {
        let r = &per_class[&class.to_string()];
        close(&format!("fixture class {class} AP"), ap.ap, number(&r["ap"], "ap"));
        close(&format!("fixture class {class} AP50"), ap.ap50, number(&r["ap50"], "ap50"));
        close(&format!("fixture class {class} AP75"), ap.ap75, number(&r["ap75"], "ap75"));
    }
    for (name, interpolation, convention) in [
        ("eleven_point_continuous", Interpolation::ElevenPoint, PixelConvention::Continuous),
        ("eleven_point_plus_one", Interpolation::ElevenPoint, PixelConvention::PlusOne),
        ("all_point_continuous", Interpolation::AllPoint, PixelConvention::Continuous),
        ("all_point_plus_one", Interpolation::AllPoint, PixelConvention::PlusOne),
    ] {
        let want = &reference["voc"][name];
        let ours = voc_ap(&images, &VocParams { iou_threshold: 0.5, interpolation, convention }).expect("voc");
        close(&format!("fixture VOC {name} mean"), ours.mean, number(&want["mean"], "mean"));
        let want_classes = want["per_class"].as_object().expect("per_class");
        assert_eq!(
            want_classes.keys().cloned().collect::<Vec<_>>(),
            ours.per_class.keys().map(u32::to_string).collect::<Vec<_>>(),
            "VOC {name}"
        );
        for (class, ap) in &ours.per_class {
            close(&format!("fixture VOC {name} class {class}"), *ap, number(&want_classes[&class.to_string()], "ap"));
        }
    }
    // The set is made so that the settings differ: the +1 convention finds the tiny box that
    // continuous sides miss, and COCO's stricter thresholds cost AP.
    let voc = |name: &str| number(&reference["voc"][name]["mean"], "mean");
    assert!(voc("all_point_plus_one") > voc("all_point_continuous"));
    assert!(voc("all_point_continuous") > voc("eleven_point_continuous"));
    assert!(ours.map < ours.map75 && ours.map75 < ours.map50);
}

#[test]
fn the_recorded_reference_is_what_pycocotools_and_voc_eval_print_now() {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/map/reference.py");
    let out = Command::new("python3").arg(&script).output().unwrap_or_else(|e| {
        panic!("python3 did not start ({e}); install Python 3, then run scripts/setup (it installs pycocotools)")
    });
    assert!(
        out.status.success(),
        "tests/fixtures/map/reference.py failed; run scripts/setup (it installs pycocotools with pip):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let now: Value = serde_json::from_slice(&out.stdout).expect("reference.py prints JSON");
    // Numbers to 1e-12 (another numpy may sum in another order); structure exactly.
    fn same(a: &Value, b: &Value, at: &str) {
        match (a, b) {
            (Value::Object(x), Value::Object(y)) => {
                assert_eq!(x.keys().collect::<Vec<_>>(), y.keys().collect::<Vec<_>>(), "{at}");
                for (k, v) in x {
                    same(v, &y[k], &format!("{at}.{k}"));
                }
            }
            (Value::Array(x), Value::Array(y)) => {
                assert_eq!(x.len(), y.len(), "{at}");
                for (i, (v, w)) in x.iter().zip(y).enumerate() {
                    same(v, w, &format!("{at}[{i}]"));
                }
            }
            _ => {
                let (x, y) = (a.as_f64().expect("number"), b.as_f64().expect("number"));
                assert!(
                    (x - y).abs() <= 1e-12,
                    "{at}: reference.py prints {x} now, reference.json holds {y}; regenerate reference.json (see reference.py)"
                );
            }
        }
    }
    same(&now, &fixture_reference(), "reference");
}
