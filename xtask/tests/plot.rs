//! `cargo xtask plot` end to end: a small real sweep (the small CNN on 512 Fashion-MNIST images,
//! 3 epochs, seeds 0 and 1, FP32 and INT8 at two learning rates, so that the three configurations'
//! curves lie apart) draws its pictures when it writes its tables, `cargo xtask plot` draws the
//! same ones again, and each panel holds the lines it should: every configuration's colour in each
//! panel of `curves.png`, both INT8 layers' lines in each panel of `layers.png`. A run without
//! events, or with a damaged event file, is left out with a note.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use image::RgbImage;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn xtask(args: &[&std::ffi::OsStr]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .current_dir(root())
        .args(args)
        .env_remove("INT8_TRAIN_KILL_AT_STEP")
        .output()
        .unwrap();
    eprintln!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    out
}

const EXPERIMENT: &str = r#"
description = "cargo xtask plot's test: a small real sweep"
recipes = ["cnn-small-fashion-mnist"]
precisions = ["fp32", "int8"]
seeds = [0, 1]
set = [
    "data.train_limit=512",
    "data.test_limit=500",
    "train.epochs=3",
    "train.batch=32",
    "train.eval_batch=250",
    "train.log_every=1",
    "train.histogram_every=1000",
    "train.checkpoint_every=1000",
]

# FP32 keeps the recipe's 0.05.
[[axis]]
name = "lr"
key = "optim.lr"
values = [0.2, 0.01]
int8_only = true
"#;

/// The colours of the configurations, in plan order: FP32, INT8 at lr 0.2, INT8 at lr 0.01 (the
/// first of `plot.rs`'s FP32 and INT8 palettes, matplotlib's tab10 blue, orange and green).
const COLOURS: [[u8; 3]; 3] = [[31, 119, 180], [255, 127, 14], [44, 160, 44]];

/// Pixels of `img` in the rectangle at (x, y) of size (w, h) that are exactly `rgb`.
fn count(img: &RgbImage, (x, y, w, h): (u32, u32, u32, u32), rgb: [u8; 3]) -> usize {
    (y..y + h).flat_map(|j| (x..x + w).map(move |i| (i, j))).filter(|&(i, j)| img.get_pixel(i, j).0 == rgb).count()
}

/// How much of colour `c` pixel `p` is, when `p` is `c` mixed with white (as plotters draws a
/// one-pixel line: anti-aliased, its colour spread over the pixels it crosses), else `None`.
fn share(p: [u8; 3], c: [u8; 3]) -> Option<f64> {
    let k = (0..3).max_by_key(|&k| 255 - c[k])?;
    let a = (255.0 - p[k] as f64) / (255.0 - c[k] as f64);
    let fits = (0..3).all(|k| ((255.0 - a * (255.0 - c[k] as f64)) - p[k] as f64).abs() <= 4.0);
    (fits && (0.0..=1.02).contains(&a)).then_some(a)
}

/// Pixels in the rectangle that are colour `c` mixed with white, with a share of `c` in `shares`.
fn count_mixed(img: &RgbImage, (x, y, w, h): (u32, u32, u32, u32), c: [u8; 3], shares: Range<f64>) -> usize {
    (y..y + h)
        .flat_map(|j| (x..x + w).map(move |i| (i, j)))
        .filter(|&(i, j)| share(img.get_pixel(i, j).0, c).is_some_and(|a| shares.contains(&a)))
        .count()
}

/// Pixels in the rectangle that are colour `c` mixed with white, with a share of `c` in `shares`,
/// and more than 4 pixels away from any pixel of exactly `c`: lines of `c`'s lighter shade apart
/// from its full-colour lines (whose anti-aliased edges are lighter shades too).
fn count_apart(img: &RgbImage, (x, y, w, h): (u32, u32, u32, u32), c: [u8; 3], shares: Range<f64>) -> usize {
    let near_full = |i: u32, j: u32| {
        (i.saturating_sub(4)..=(i + 4).min(img.width() - 1))
            .any(|a| (j.saturating_sub(4)..=(j + 4).min(img.height() - 1)).any(|b| img.get_pixel(a, b).0 == c))
    };
    (y..y + h)
        .flat_map(|j| (x..x + w).map(move |i| (i, j)))
        .filter(|&(i, j)| share(img.get_pixel(i, j).0, c).is_some_and(|a| shares.contains(&a)) && !near_full(i, j))
        .count()
}

/// The distinct clearly coloured values in the rectangle (text, axes and grid are grey).
fn colours(img: &RgbImage, (x, y, w, h): (u32, u32, u32, u32)) -> Vec<[u8; 3]> {
    let mut out: Vec<[u8; 3]> = Vec::new();
    for j in y..y + h {
        for i in x..x + w {
            let p = img.get_pixel(i, j).0;
            if p.iter().max().unwrap() - p.iter().min().unwrap() >= 40 && !out.contains(&p) {
                out.push(p);
            }
        }
    }
    out
}

fn decode(path: &Path) -> RgbImage {
    image::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).to_rgb8()
}

#[test]
fn a_sweep_draws_its_curves_and_layers_and_the_plot_command_draws_the_same() {
    assert!(
        Path::new("/usr/share/datasets/fashion-mnist").exists(),
        "Fashion-MNIST is missing: apt-get install -y dataset-fashion-mnist (the README's set-up does it)"
    );
    let dir = tempfile::tempdir().unwrap();
    let experiment = dir.path().join("plot-test.toml");
    std::fs::write(&experiment, EXPERIMENT).unwrap();
    let out = dir.path().join("plot-test");
    let swept = xtask(&["sweep".as_ref(), experiment.as_os_str(), "--out".as_ref(), out.as_os_str()]);
    assert!(swept.status.success());
    let said = String::from_utf8_lossy(&swept.stdout);
    assert!(said.contains("pictures:") && said.contains("curves.png") && said.contains("layers.png"), "{said}");
    let (curves, layers) = (out.join("curves.png"), out.join("layers.png"));
    let from_sweep = (std::fs::read(&curves).unwrap(), std::fs::read(&layers).unwrap());

    // The command draws the same pictures from the same events.
    std::fs::remove_file(&curves).unwrap();
    std::fs::remove_file(&layers).unwrap();
    let plotted = xtask(&["plot".as_ref(), experiment.as_os_str(), "--out".as_ref(), out.as_os_str()]);
    assert!(plotted.status.success());
    assert_eq!(std::fs::read(&curves).unwrap(), from_sweep.0, "curves.png differs from the sweep's");
    assert_eq!(std::fs::read(&layers).unwrap(), from_sweep.1, "layers.png differs from the sweep's");

    // curves.png: a title and a legend of two rows (three configurations, two a row) above four
    // panels of 800 x 500; each configuration's mean line (three pixels wide, drawn as a polygon
    // in its exact colour) in every panel, and in the accuracy panel each seed's thin line too (the
    // colour mixed with white, 45% colour, anti-aliased: at most that share of the colour).
    let img = decode(&curves);
    let header = 64 + 26 * 2;
    assert_eq!(img.dimensions(), (1600, header + 1000));
    for (k, panel) in [(0, 0), (800, 0), (0, 500), (800, 500)].into_iter().enumerate() {
        let rect = (panel.0, header + panel.1, 800, 500);
        for rgb in COLOURS {
            let n = count(&img, rect, rgb);
            assert!(n >= 100, "panel {k} has {n} pixels of {rgb:?}");
        }
        if k == 0 {
            for rgb in COLOURS {
                let n = count_apart(&img, rect, rgb, 0.15..0.47);
                assert!(n >= 100, "panel {k} has {n} pixels of the seeds' lines of {rgb:?}");
            }
        }
    }
    // The legend names every configuration in its colour, above the panels.
    for rgb in COLOURS {
        assert!(count(&img, (0, 0, 1600, header), rgb) >= 30, "no legend line of {rgb:?}");
    }

    // layers.png: a column of three 800 x 400 panels for each INT8 configuration, under a header
    // of 100, and a legend of 260 at the right naming the small CNN's two INT8 layers (conv2,
    // conv3) in two colours; both layers' lines in every panel.
    let img = decode(&layers);
    assert_eq!(img.dimensions(), (2 * 800 + 260, 100 + 3 * 400));
    let legend = colours(&img, (1600, 100, 260, 1200));
    assert_eq!(legend.len(), 2, "the legend's colours: {legend:?}");
    for row in 0..3 {
        for col in 0..2 {
            let rect = (col * 800, 100 + row * 400, 800, 400);
            for &c in &legend {
                let n = count_mixed(&img, rect, c, 0.3..1.01);
                assert!(n >= 100, "panel ({row}, {col}) has {n} pixels of the layer line {c:?}");
            }
        }
    }

    // A run without events is left out with a note, and so is one with a damaged event file,
    // named; the others are still drawn.
    let fp32_s1 = out.join("cnn-small-fashion-mnist-fp32-s1");
    for e in std::fs::read_dir(&fp32_s1).unwrap() {
        let p = e.unwrap().path();
        if p.file_name().unwrap().to_string_lossy().starts_with("events.out.tfevents.") {
            std::fs::remove_file(p).unwrap();
        }
    }
    let damaged = std::fs::read_dir(out.join("cnn-small-fashion-mnist-int8-lr_0.01-s1"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("events.out.tfevents."))
        .unwrap();
    let mut bytes = std::fs::read(&damaged).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x20;
    std::fs::write(&damaged, &bytes).unwrap();
    let partial = xtask(&["plot".as_ref(), experiment.as_os_str(), "--out".as_ref(), out.as_os_str()]);
    assert!(partial.status.success());
    let said = String::from_utf8_lossy(&partial.stdout);
    assert!(said.contains("no TensorBoard events yet") && said.contains("cnn-small-fashion-mnist-fp32-s1"), "{said}");
    assert!(said.contains(&damaged.display().to_string()) && said.contains("checksum"), "{said}");
    assert_ne!(std::fs::read(&curves).unwrap(), from_sweep.0, "the pictures are drawn again without those runs");

    // A folder that is not a sweep's is an error that says what to give.
    let err = xtask(&["plot".as_ref(), "plot-test".as_ref(), "--out".as_ref(), dir.path().as_os_str()]);
    assert!(!err.status.success());
    assert!(String::from_utf8_lossy(&err.stderr).contains("plan.json"));
}
