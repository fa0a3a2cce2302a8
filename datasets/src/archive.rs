//! Importing a `.tar.gz` archive: entries are streamed, filtered, and each file is written to a
//! temporary name and renamed into place, so an interrupted import never leaves a torn file.

use std::io::Read;
use std::path::{Component, Path};

use flate2::read::GzDecoder;

use crate::{DatasetError, Result, io_err};

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
        let mut bytes = Vec::with_capacity(entry.size() as usize);
        entry.read_to_end(&mut bytes).map_err(|e| DatasetError::Invalid {
            path: archive.into(),
            why: format!("entry {} is truncated ({e})", rel.display()),
        })?;
        let tmp = out.with_extension("part");
        std::fs::write(&tmp, &bytes).map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, &out).map_err(io_err(&out))?;
        written += 1;
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
