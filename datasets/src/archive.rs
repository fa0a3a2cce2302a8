//! Importing a `.tar.gz` archive: entries are streamed, filtered, and each file is written to a
//! temporary name and renamed into place, so an interrupted import never leaves a torn file.

use std::path::{Component, Path};

use flate2::read::GzDecoder;

use crate::{DatasetError, Result, io_err};

/// Counts the regular files of `archive` for which `key` returns a key, by key, without
/// extracting anything.
pub fn count_tar_gz<K: Ord>(
    archive: &Path,
    mut key: impl FnMut(&Path) -> Option<K>,
) -> Result<std::collections::BTreeMap<K, usize>> {
    let file = std::fs::File::open(archive).map_err(io_err(archive))?;
    let mut tar = tar::Archive::new(GzDecoder::new(std::io::BufReader::new(file)));
    let mut counts = std::collections::BTreeMap::new();
    for entry in tar.entries().map_err(io_err(archive))? {
        let entry = entry.map_err(|e| DatasetError::Invalid {
            path: archive.into(),
            why: format!("not a readable tar.gz archive ({e}); re-download it"),
        })?;
        if entry.header().entry_type().is_file()
            && let Some(k) = key(&entry.path().map_err(io_err(archive))?)
        {
            *counts.entry(k).or_insert(0) += 1;
        }
    }
    Ok(counts)
}

/// Extracts the regular files of `archive` whose relative path passes `keep` into `dest`,
/// refusing entries that would escape `dest`. Returns how many files were written.
pub fn extract_tar_gz(archive: &Path, dest: &Path, mut keep: impl FnMut(&Path) -> bool) -> Result<usize> {
    let file = std::fs::File::open(archive).map_err(io_err(archive))?;
    let mut tar = tar::Archive::new(GzDecoder::new(std::io::BufReader::new(file)));
    let mut written = 0;
    for entry in tar.entries().map_err(io_err(archive))? {
        let mut entry = entry.map_err(|e| DatasetError::Invalid {
            path: archive.into(),
            why: format!("not a readable tar.gz archive ({e}); re-download it"),
        })?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let rel = entry.path().map_err(io_err(archive))?.into_owned();
        if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
            return Err(DatasetError::Invalid {
                path: archive.into(),
                why: format!("entry {} would escape the destination; refusing it", rel.display()),
            });
        }
        if !keep(&rel) {
            continue;
        }
        let out = dest.join(&rel);
        if let Some(dir) = out.parent() {
            std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        }
        // Streamed to its file: the header's size is the archive's word, not a number to
        // allocate by (a crafted one would claim exabytes).
        let tmp = out.with_extension("part");
        let truncated = |what: String| DatasetError::Invalid {
            path: archive.into(),
            why: format!("entry {} is truncated ({what}); re-download the archive", rel.display()),
        };
        let mut file = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
        let declared = entry.size();
        let copied = std::io::copy(&mut entry, &mut file);
        drop(file);
        match copied {
            Ok(n) if n == declared => {}
            Ok(n) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(truncated(format!("{n} of the {declared} bytes its header declares")));
            }
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof || e.kind() == std::io::ErrorKind::InvalidData => {
                let _ = std::fs::remove_file(&tmp);
                return Err(truncated(e.to_string()));
            }
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(io_err(&tmp)(e));
            }
        }
        std::fs::rename(&tmp, &out).map_err(io_err(&out))?;
        written += 1;
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CIFAR-10 JPEG archive in `shared/datasets/` beside an ancestor of this crate (where
    /// every developer machine and CI run has it; its absence fails the test).
    fn cifar_archive() -> std::path::PathBuf {
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .ancestors()
            .map(|a| a.join("shared/datasets/cifar10-jpeg.tar.gz"))
            .find(|p| p.exists())
            .expect("no shared/datasets/cifar10-jpeg.tar.gz beside the checkout")
    }

    #[test]
    fn cifar10_jpeg_archive_has_its_published_counts() {
        let a = cifar_archive();
        // Keys are (split, class) from `cifar10-jpeg/<split>/<class>/NNNN.jpg`.
        let counts = count_tar_gz(&a, |p| {
            let parts: Vec<String> = p.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
            (parts.len() == 4 && parts[3].ends_with(".jpg")).then(|| (parts[1].clone(), parts[2].clone()))
        })
        .unwrap();
        for (split, per_class) in [("train", 5_000), ("test", 1_000)] {
            let classes: Vec<_> = counts.iter().filter(|((s, _), _)| s == split).collect();
            assert_eq!(classes.len(), 10, "{split}");
            assert!(classes.iter().all(|(_, n)| **n == per_class), "{split}: {classes:?}");
        }
    }

    fn archive(dir: &Path, entries: &[(&str, &[u8])]) -> std::path::PathBuf {
        let path = dir.join("a.tar.gz");
        let gz = flate2::write::GzEncoder::new(std::fs::File::create(&path).unwrap(), flate2::Compression::fast());
        let mut b = tar::Builder::new(gz);
        for (name, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            // Written raw, so that a hostile path reaches the reader as it would from a bad archive.
            h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap().finish().unwrap();
        path
    }

    #[test]
    fn extracts_filtered_files_and_refuses_escapes() {
        let dir = tempfile::tempdir().unwrap();
        let a = archive(dir.path(), &[("set/train/a/1.jpg", b"one"), ("set/test/a/2.jpg", b"two")]);
        let dest = dir.path().join("out");
        let n = extract_tar_gz(&a, &dest, |p| p.starts_with("set/train")).unwrap();
        assert_eq!(n, 1);
        assert_eq!(std::fs::read(dest.join("set/train/a/1.jpg")).unwrap(), b"one");
        assert!(!dest.join("set/test").exists());
        let bad = archive(dir.path(), &[("../evil.txt", b"x")]);
        assert!(extract_tar_gz(&bad, &dest, |_| true).unwrap_err().to_string().contains("escape"));
        assert!(!dir.path().join("evil.txt").exists());
        std::fs::write(dir.path().join("junk.tar.gz"), b"not gzip").unwrap();
        assert!(extract_tar_gz(&dir.path().join("junk.tar.gz"), &dest, |_| true).is_err());
    }

    /// A header may declare any size: a huge one over a few bytes of data is a truncated entry,
    /// reported by name, not an allocation that aborts the process.
    #[test]
    fn hostile_header_sizes_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        for declared in [1u64 << 62, u64::from(u32::MAX) + 7, 1 << 40, 1 << 20] {
            let path = dir.path().join(format!("hostile-{declared}.tar.gz"));
            let gz = flate2::write::GzEncoder::new(std::fs::File::create(&path).unwrap(), flate2::Compression::fast());
            let mut b = tar::Builder::new(gz);
            let mut h = tar::Header::new_gnu();
            h.set_path("set/big.bin").unwrap();
            h.set_size(declared);
            h.set_mode(0o644);
            h.set_cksum();
            // The header's word against three bytes of data (padded to one block by the writer).
            b.append(&h, &b"abc"[..]).unwrap();
            b.into_inner().unwrap().finish().unwrap();
            let out = dir.path().join(format!("out-{declared}"));
            let err = extract_tar_gz(&path, &out, |_| true).unwrap_err().to_string();
            assert!(err.contains("set/big.bin") && err.contains("truncated"), "{declared}: {err}");
            assert!(!out.join("set/big.bin").exists() && !out.join("set/big.part").exists(), "{declared}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        #[test]
        fn random_and_mutated_archives_never_panic(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
            flips in proptest::collection::vec((0usize..4096, proptest::prelude::any::<u8>()), 1..6),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let junk = dir.path().join("junk.tar.gz");
            std::fs::write(&junk, &bytes).unwrap();
            let _ = extract_tar_gz(&junk, &dir.path().join("out"), |_| true);
            let _ = count_tar_gz(&junk, |p| Some(p.to_path_buf()));
            // A valid archive with a few bytes changed.
            let good = archive(dir.path(), &[("set/a/1.jpg", b"one"), ("set/b/2.jpg", b"two")]);
            let mut b = std::fs::read(&good).unwrap();
            crate::mutate(&mut b, &flips);
            std::fs::write(&good, &b).unwrap();
            let _ = extract_tar_gz(&good, &dir.path().join("out2"), |_| true);
        }
    }
}
