//! Downloading a known dataset from its canonical sources over HTTP(S): each file is streamed to a
//! temporary name while its MD5 is computed, checked against the checksum its publishers give,
//! and only then moved into place; archives are extracted the same way. Where there is no network,
//! the error says so and how to import a copy from elsewhere.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use md5::{Digest, Md5};

use crate::archive::extract_tar_gz;
use crate::registry::{Download, KnownDataset, locate};
use crate::{DatasetError, Result, io_err};

/// Progress of one download: the file, bytes so far, and the total where the server says it.
pub type Progress<'a> = &'a mut dyn FnMut(&str, u64, Option<u64>);

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(20)))
        .timeout_recv_body(Some(Duration::from_secs(120)))
        .build()
        .into()
}

/// Downloads `dl.url` to `dest`, checking its MD5. Nothing is left at `dest` unless it matches.
fn download(name: &str, dl: &Download, dest: &Path, progress: Progress<'_>) -> Result<()> {
    let no_network = |why: String| DatasetError::Invalid {
        path: PathBuf::from(dl.url),
        why: format!(
            "cannot be downloaded ({why}); if this machine has no network, download it elsewhere and run `cargo xtask data import {name} FILE`"
        ),
    };
    let mut resp = agent().get(dl.url).call().map_err(|e| no_network(e.to_string()))?;
    let total = resp.body().content_length();
    let mut reader = resp.body_mut().as_reader();
    let part = dest.with_extension("part");
    let mut out = std::fs::File::create(&part).map_err(io_err(&part))?;
    let mut md5 = Md5::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut got = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                let _ = std::fs::remove_file(&part);
                return Err(no_network(format!("the transfer broke off after {got} bytes: {e}")));
            }
        };
        md5.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(io_err(&part))?;
        got += n as u64;
        progress(dl.file, got, total);
    }
    out.sync_all().map_err(io_err(&part))?;
    drop(out);
    let sum: String = md5.finalize().iter().map(|b| format!("{b:02x}")).collect();
    if sum != dl.md5 {
        let _ = std::fs::remove_file(&part);
        return Err(DatasetError::Invalid {
            path: PathBuf::from(dl.url),
            why: format!(
                "downloaded with MD5 {sum}, but its publishers give {}; the file was discarded, try again",
                dl.md5
            ),
        });
    }
    std::fs::rename(&part, dest).map_err(io_err(dest))
}

/// Downloads `ds` into `cache/<folder>` unless it is there already, and returns the folder. The
/// files gather in a hidden folder that is renamed into place once all are checked, so an
/// interrupted fetch leaves nothing that looks complete.
pub fn fetch(ds: &KnownDataset, cache: &Path, progress: Progress<'_>) -> Result<PathBuf> {
    let dest = cache.join(ds.folder);
    if locate(ds, &[cache.to_path_buf()]).is_some() {
        return Ok(dest);
    }
    if ds.downloads.is_empty() {
        return Err(DatasetError::Invalid {
            path: PathBuf::from(ds.name),
            why: format!("has no download source; get it from {}", ds.sources.join(" or ")),
        });
    }
    let tmp = cache.join(format!(".{}.fetching", ds.folder));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
    let result = (|| {
        for dl in ds.downloads {
            let file = tmp.join(dl.file);
            download(ds.name, dl, &file, &mut *progress)?;
            if dl.extract {
                extract_tar_gz(&file, &tmp, |_| true)?;
                std::fs::remove_file(&file).map_err(io_err(&file))?;
            }
        }
        // An archive holds the dataset's folder; plain files are the folder's contents.
        let top = tmp.join(ds.folder);
        let src = if top.is_dir() { top } else { tmp.clone() };
        if !ds.marker_files.iter().all(|f| src.join(f).is_file()) {
            return Err(DatasetError::Invalid {
                path: PathBuf::from(ds.name),
                why: format!("the downloads do not hold its files ({:?})", ds.marker_files),
            });
        }
        if dest.exists() {
            std::fs::remove_dir_all(&dest).map_err(io_err(&dest))?;
        }
        std::fs::rename(&src, &dest).map_err(io_err(&dest))
    })();
    if tmp.exists() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result.map(|()| dest)
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader};
    use std::net::TcpListener;

    use super::*;

    /// Serves `files` (path -> bytes) over HTTP/1.1 on localhost for `requests` requests; a path
    /// it does not know gets a 404. Returns the base URL.
    fn serve(files: Vec<(&'static str, Vec<u8>)>, requests: usize) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            for stream in listener.incoming().take(requests) {
                let mut stream = stream.unwrap();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).unwrap() <= 2 {
                        break;
                    }
                }
                match files.iter().find(|(p, _)| *p == path) {
                    Some((_, body)) => {
                        let head =
                            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
                        stream.write_all(head.as_bytes()).unwrap();
                        stream.write_all(body).unwrap();
                    }
                    None => {
                        stream
                            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                            .unwrap();
                    }
                }
            }
        });
        base
    }

    fn md5_hex(b: &[u8]) -> &'static str {
        let s: String = Md5::digest(b).iter().map(|b| format!("{b:02x}")).collect();
        Box::leak(s.into_boxed_str())
    }

    fn dataset(downloads: Vec<Download>) -> KnownDataset {
        KnownDataset {
            name: "toy",
            description: "a toy dataset served from localhost",
            folder: "toy",
            marker_files: &["a.bin", "b.bin"],
            archive_sha256: None,
            sources: &["a test server"],
            downloads: Box::leak(downloads.into_boxed_slice()),
            format: crate::registry::Format::Idx,
            classes: 10,
            mean: &[0.5],
            std: &[0.5],
            build: None,
        }
    }

    fn leak(s: String) -> &'static str {
        Box::leak(s.into_boxed_str())
    }

    #[test]
    fn fetch_downloads_checks_md5_and_moves_into_place() {
        let (a, b) = (vec![1u8; 70_000], b"second".to_vec());
        let base = serve(vec![("/a.bin", a.clone()), ("/b.bin", b.clone())], 4);
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        let dl = |file: &'static str, md5: &'static str| Download {
            url: leak(format!("{base}/{file}")),
            file,
            md5,
            extract: false,
        };
        // A wrong checksum leaves nothing behind.
        let bad = dataset(vec![dl("a.bin", md5_hex(&a)), dl("b.bin", md5_hex(b"other"))]);
        let e = fetch(&bad, &cache, &mut |_, _, _| {}).unwrap_err().to_string();
        assert!(e.contains("b.bin") && e.contains("MD5"), "{e}");
        assert!(!cache.join("toy").exists() && !cache.join(".toy.fetching").exists());
        let good = dataset(vec![dl("a.bin", md5_hex(&a)), dl("b.bin", md5_hex(&b))]);
        let mut seen = 0;
        let root = fetch(&good, &cache, &mut |_, got, total| {
            assert!(total.is_none_or(|t| got <= t));
            seen += 1;
        })
        .unwrap();
        assert!(seen >= 2);
        assert_eq!(std::fs::read(root.join("a.bin")).unwrap(), a);
        assert_eq!(std::fs::read(root.join("b.bin")).unwrap(), b);
    }

    #[test]
    fn fetch_extracts_archives_and_says_when_a_source_is_unreachable() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        {
            let mut t = tar::Builder::new(&mut gz);
            for f in ["a.bin", "b.bin"] {
                let mut h = tar::Header::new_gnu();
                h.set_size(2);
                h.set_mode(0o644);
                h.set_cksum();
                t.append_data(&mut h, format!("toy/{f}"), &b"ok"[..]).unwrap();
            }
            t.finish().unwrap();
        }
        let archive = gz.finish().unwrap();
        let base = serve(vec![("/toy.tar.gz", archive.clone())], 2);
        let dir = tempfile::tempdir().unwrap();
        let ds = dataset(vec![Download {
            url: leak(format!("{base}/toy.tar.gz")),
            file: "toy.tar.gz",
            md5: md5_hex(&archive),
            extract: true,
        }]);
        let root = fetch(&ds, dir.path(), &mut |_, _, _| {}).unwrap();
        assert_eq!(std::fs::read(root.join("b.bin")).unwrap(), b"ok");
        // A closed port stands for a machine without network.
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let offline = dataset(vec![Download {
            url: leak(format!("http://127.0.0.1:{port}/toy.tar.gz")),
            file: "toy.tar.gz",
            md5: "0",
            extract: true,
        }]);
        let e = fetch(&offline, &dir.path().join("other"), &mut |_, _, _| {}).unwrap_err().to_string();
        assert!(e.contains("no network") && e.contains("data import toy"), "{e}");
        // A server that answers 404.
        let base = serve(vec![], 1);
        let missing = dataset(vec![Download { url: leak(format!("{base}/gone.tar.gz")), ..ds.downloads[0] }]);
        let e = fetch(&missing, &dir.path().join("third"), &mut |_, _, _| {}).unwrap_err().to_string();
        assert!(e.contains("gone.tar.gz") && e.contains("404"), "{e}");
    }
}
