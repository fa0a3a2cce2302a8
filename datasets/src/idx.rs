//! The IDX format of MNIST and Fashion-MNIST (LeCun et al.): a big-endian header — two zero
//! bytes, a type code, the number of dimensions, then each dimension as a u32 — followed by the
//! data. Files may be gzipped (`.gz`, detected by their magic bytes). Only unsigned-byte data
//! (type 0x08) occurs in these datasets and is accepted.

use std::io::Read;
use std::path::Path;

use flate2::read::GzDecoder;

use crate::{DatasetError, Result, io_err};

/// An IDX array of unsigned bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxArray {
    /// The dimensions (for images: count, rows, columns; for labels: count).
    pub dims: Vec<usize>,
    /// The values, row-major.
    pub data: Vec<u8>,
}

/// Reads an IDX file (raw or gzipped).
pub fn read_idx(path: &Path) -> Result<IdxArray> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    parse_idx(&bytes).map_err(|why| DatasetError::Invalid { path: path.into(), why })
}

/// Parses IDX bytes (raw or gzipped); the error says what is wrong with them.
pub fn parse_idx(bytes: &[u8]) -> std::result::Result<IdxArray, String> {
    let owned;
    let bytes = if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        // A hostile gzip stream could expand without bound: cap it well above the largest real
        // file (ImageNet-sized IDX files do not exist; MNIST's largest is 47 MB).
        GzDecoder::new(bytes)
            .take(1 << 31)
            .read_to_end(&mut out)
            .map_err(|e| format!("is not valid gzip ({e}); re-download it"))?;
        owned = out;
        &owned[..]
    } else {
        bytes
    };
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err("is not an IDX file (it must start with two zero bytes)".into());
    }
    if bytes[2] != 0x08 {
        return Err(format!("has IDX type code {:#04x}; only unsigned bytes (0x08) are supported", bytes[2]));
    }
    let ndim = bytes[3] as usize;
    if ndim == 0 || bytes.len() < 4 + 4 * ndim {
        return Err(format!("is truncated inside its header ({} dimensions declared)", ndim));
    }
    let dims: Vec<usize> = (0..ndim)
        .map(|i| u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().unwrap_or([0; 4])) as usize)
        .collect();
    let count =
        dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or("declares more values than fit in memory")?;
    let body = &bytes[4 + 4 * ndim..];
    if body.len() != count {
        return Err(format!(
            "declares {dims:?} = {count} values but holds {}; the file is truncated or corrupt",
            body.len()
        ));
    }
    Ok(IdxArray { dims, data: body.to_vec() })
}

/// Images and labels of an MNIST-style pair of files, checked against each other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxDataset {
    /// `count x rows x cols` pixels.
    pub images: IdxArray,
    /// One label per image, each below `classes`.
    pub labels: Vec<u8>,
}

/// Reads an image file and a label file, checking that they agree and that labels are below
/// `classes`.
pub fn read_idx_pair(images: &Path, labels: &Path, classes: u8) -> Result<IdxDataset> {
    let img = read_idx(images)?;
    let lab = read_idx(labels)?;
    if img.dims.len() != 3 {
        return Err(DatasetError::Invalid {
            path: images.into(),
            why: format!("has dimensions {:?}; images need count x rows x cols", img.dims),
        });
    }
    if lab.dims.len() != 1 || lab.dims[0] != img.dims[0] {
        return Err(DatasetError::Invalid {
            path: labels.into(),
            why: format!("has dimensions {:?} for {} images", lab.dims, img.dims[0]),
        });
    }
    if let Some(i) = lab.data.iter().position(|&l| l >= classes) {
        return Err(DatasetError::Invalid {
            path: labels.into(),
            why: format!("label {} of sample {i} is not below {classes}", lab.data[i]),
        });
    }
    Ok(IdxDataset { images: img, labels: lab.data })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn idx_bytes(dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut v = vec![0, 0, 0x08, dims.len() as u8];
        for d in dims {
            v.extend(d.to_be_bytes());
        }
        v.extend(data);
        v
    }

    fn gz(bytes: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn parses_raw_and_gzipped_files() {
        let data: Vec<u8> = (0..24).collect();
        let raw = idx_bytes(&[2, 3, 4], &data);
        let want = IdxArray { dims: vec![2, 3, 4], data: data.clone() };
        assert_eq!(parse_idx(&raw).unwrap(), want);
        assert_eq!(parse_idx(&gz(&raw)).unwrap(), want);
    }

    #[test]
    fn bad_files_are_errors_that_say_what_is_wrong() {
        let raw = idx_bytes(&[2, 3, 4], &[0; 24]);
        assert!(parse_idx(&raw[..20]).unwrap_err().contains("truncated"));
        assert!(parse_idx(&[1, 0, 8, 1, 0, 0, 0, 0]).unwrap_err().contains("not an IDX"));
        assert!(parse_idx(&[0, 0, 0x0d, 1, 0, 0, 0, 1, 0, 0, 0, 0]).unwrap_err().contains("0x0d"));
        assert!(parse_idx(&idx_bytes(&[u32::MAX, u32::MAX, u32::MAX], &[])).is_err());
        assert!(parse_idx(&[0x1f, 0x8b, 1, 2, 3]).unwrap_err().contains("gzip"));
    }

    #[test]
    fn image_and_label_files_are_checked_against_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let (img, lab) = (dir.path().join("img"), dir.path().join("lab"));
        std::fs::write(&img, idx_bytes(&[3, 2, 2], &[0; 12])).unwrap();
        std::fs::write(&lab, idx_bytes(&[3], &[0, 9, 4])).unwrap();
        let ds = read_idx_pair(&img, &lab, 10).unwrap();
        assert_eq!(ds.labels, vec![0, 9, 4]);
        let err = read_idx_pair(&img, &lab, 5).unwrap_err().to_string();
        assert!(err.contains("lab") && err.contains("label 9"), "{err}");
        std::fs::write(&lab, idx_bytes(&[2], &[0, 1])).unwrap();
        assert!(read_idx_pair(&img, &lab, 10).unwrap_err().to_string().contains("for 3 images"));
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse_idx(&bytes);
        }

        #[test]
        fn mutated_files_never_panic(flips in proptest::collection::vec((0usize..40, any::<u8>()), 1..6), cut in 0usize..40) {
            let mut bytes = idx_bytes(&[2, 3, 4], &(0..24).collect::<Vec<u8>>());
            crate::mutate(&mut bytes, &flips);
            bytes.truncate(cut.max(1));
            let _ = parse_idx(&bytes);
            let _ = parse_idx(&gz(&bytes));
        }
    }
}

/// Checks against the real Fashion-MNIST files where Debian's `dataset-fashion-mnist` package put
/// them (CI installs it): 60,000 training and 10,000 test images of 28x28, 10 classes.
#[cfg(test)]
mod real_files {
    use super::*;

    #[test]
    fn fashion_mnist_has_its_published_counts() {
        let dir = Path::new("/usr/share/datasets/fashion-mnist");
        assert!(
            dir.exists(),
            "{} is absent: apt-get install -y dataset-fashion-mnist (scripts/setup does)",
            dir.display()
        );
        for (split, n) in [("train", 60_000), ("t10k", 10_000)] {
            let ds = read_idx_pair(
                &dir.join(format!("{split}-images-idx3-ubyte.gz")),
                &dir.join(format!("{split}-labels-idx1-ubyte.gz")),
                10,
            )
            .unwrap();
            assert_eq!(ds.images.dims, vec![n, 28, 28]);
            let mut counts = [0usize; 10];
            for &l in &ds.labels {
                counts[l as usize] += 1;
            }
            // Fashion-MNIST is balanced: 6,000 and 1,000 of each class.
            assert!(counts.iter().all(|&c| c == n / 10), "{split}: {counts:?}");
        }
    }
}
