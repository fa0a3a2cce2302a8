//! CIFAR-10 and CIFAR-100 binary batches (Krizhevsky, 2009): records of label bytes (one for
//! CIFAR-10; coarse then fine for CIFAR-100) followed by a 32x32 image as three 1024-byte planes
//! (red, green, blue). The official `.tar.gz` archives are imported with
//! [`crate::archive::extract_tar_gz`] and their `.bin` files read here.

use std::path::Path;

use crate::{DatasetError, Result, io_err};

/// Bytes of one image.
pub const IMAGE_BYTES: usize = 3 * 32 * 32;

/// Which CIFAR, and for CIFAR-100 which labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CifarKind {
    /// CIFAR-10: one label byte, 10 classes.
    Cifar10,
    /// CIFAR-100 with its 100 fine labels.
    Cifar100Fine,
    /// CIFAR-100 with its 20 coarse labels.
    Cifar100Coarse,
}

impl CifarKind {
    fn label_bytes(self) -> usize {
        if self == CifarKind::Cifar10 { 1 } else { 2 }
    }

    /// The number of classes.
    pub fn classes(self) -> u8 {
        match self {
            CifarKind::Cifar10 => 10,
            CifarKind::Cifar100Fine => 100,
            CifarKind::Cifar100Coarse => 20,
        }
    }
}

/// Images (`count x 3 x 32 x 32` bytes, planar) and labels of one or more batches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CifarBatch {
    /// Pixels, one image after another, each as three 32x32 planes.
    pub images: Vec<u8>,
    /// One label per image.
    pub labels: Vec<u8>,
}

impl CifarBatch {
    /// The number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// Parses the bytes of one `.bin` batch; the error says what is wrong with them.
pub fn parse_cifar(bytes: &[u8], kind: CifarKind) -> std::result::Result<CifarBatch, String> {
    let record = kind.label_bytes() + IMAGE_BYTES;
    if bytes.is_empty() || !bytes.len().is_multiple_of(record) {
        return Err(format!(
            "holds {} bytes, not a whole number of {record}-byte records; the file is truncated or not a {kind:?} batch",
            bytes.len()
        ));
    }
    let mut out =
        CifarBatch { images: Vec::with_capacity(bytes.len()), labels: Vec::with_capacity(bytes.len() / record) };
    for (i, r) in bytes.chunks_exact(record).enumerate() {
        let label = if kind == CifarKind::Cifar100Fine { r[1] } else { r[0] };
        if label >= kind.classes() {
            return Err(format!(
                "record {i} has label {label}, not below {}; is this a {kind:?} file?",
                kind.classes()
            ));
        }
        out.labels.push(label);
        out.images.extend_from_slice(&r[kind.label_bytes()..]);
    }
    Ok(out)
}

/// Reads one `.bin` batch.
pub fn read_cifar(path: &Path, kind: CifarKind) -> Result<CifarBatch> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    parse_cifar(&bytes, kind).map_err(|why| DatasetError::Invalid { path: path.into(), why })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn record(labels: &[u8], fill: u8) -> Vec<u8> {
        let mut r = labels.to_vec();
        r.extend(std::iter::repeat_n(fill, IMAGE_BYTES));
        r
    }

    #[test]
    fn parses_both_kinds() {
        let bytes = [record(&[3], 7), record(&[9], 8)].concat();
        let b = parse_cifar(&bytes, CifarKind::Cifar10).unwrap();
        assert_eq!(b.labels, vec![3, 9]);
        assert_eq!(b.images.len(), 2 * IMAGE_BYTES);
        assert_eq!((b.images[0], b.images[IMAGE_BYTES]), (7, 8));
        let bytes = [record(&[19, 99], 1), record(&[0, 5], 2)].concat();
        assert_eq!(parse_cifar(&bytes, CifarKind::Cifar100Fine).unwrap().labels, vec![99, 5]);
        assert_eq!(parse_cifar(&bytes, CifarKind::Cifar100Coarse).unwrap().labels, vec![19, 0]);
    }

    #[test]
    fn bad_files_are_errors_naming_them() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("data_batch_1.bin");
        std::fs::write(&p, &record(&[3], 0)[..100]).unwrap();
        let err = read_cifar(&p, CifarKind::Cifar10).unwrap_err().to_string();
        assert!(err.contains("data_batch_1.bin") && err.contains("truncated"), "{err}");
        std::fs::write(&p, record(&[12], 0)).unwrap();
        assert!(read_cifar(&p, CifarKind::Cifar10).unwrap_err().to_string().contains("label 12"));
        assert!(parse_cifar(&[], CifarKind::Cifar10).is_err());
    }

    proptest! {
        #[test]
        fn random_and_mutated_bytes_never_panic(
            len in 0usize..(3 * 3075),
            flips in proptest::collection::vec((0usize..9225, any::<u8>()), 0..8),
        ) {
            let mut bytes = [record(&[1], 5), record(&[2], 6), record(&[3], 7)].concat();
            crate::mutate(&mut bytes, &flips);
            bytes.truncate(len);
            for kind in [CifarKind::Cifar10, CifarKind::Cifar100Fine, CifarKind::Cifar100Coarse] {
                let _ = parse_cifar(&bytes, kind);
            }
        }
    }
}
