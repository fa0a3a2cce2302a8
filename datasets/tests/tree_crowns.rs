//! The NEON tree crowns of the deepforest wheel: the import is reproducible, its tiles and boxes are
//! what the module says, the registry's normalisation is the tiles' own, and bad files are errors
//! naming them. Needs the wheel `scripts/setup` downloads.

use std::path::{Path, PathBuf};

use int8_datasets::detection::{parse_voc_classes, read_voc_classes};
use int8_datasets::registry::{TREE_MEAN, TREE_STD, known};
use int8_datasets::tree_crowns::{CLASSES, TILE, import_into};

fn wheel() -> PathBuf {
    let w = Path::new(env!("CARGO_MANIFEST_DIR")).join("cache/downloads/deepforest-2.1.0-py3-none-any.whl");
    assert!(w.is_file(), "{} is missing: run scripts/setup (it downloads the deepforest wheel)", w.display());
    w
}

fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p.strip_prefix(dir).unwrap().to_path_buf(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn the_import_gives_the_documented_tiles_boxes_and_moments_and_repeats_byte_for_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    import_into(&wheel(), &a).unwrap();
    // From the unpacked wheel's data folder, the same bytes.
    let unpacked = tmp.path().join("unpacked/deepforest/data");
    std::fs::create_dir_all(&unpacked).unwrap();
    let mut zip = zip::ZipArchive::new(std::fs::File::open(wheel()).unwrap()).unwrap();
    for i in 0..zip.len() {
        let mut f = zip.by_index(i).unwrap();
        let full = f.name().unwrap().to_string();
        if let Some(name) = full.strip_prefix("deepforest/data/")
            && (name.ends_with(".xml") || name.ends_with(".png"))
        {
            std::io::copy(&mut f, &mut std::fs::File::create(unpacked.join(name)).unwrap()).unwrap();
        }
    }
    import_into(&tmp.path().join("unpacked"), &b).unwrap();
    assert_eq!(files(&a), files(&b));

    let (train, test) =
        (read_voc_classes(&a, "train", &CLASSES).unwrap(), read_voc_classes(&a, "test", &CLASSES).unwrap());
    let count = |s: &int8_datasets::detection::DetectionSet| {
        let boxes = s.items.iter().map(|i| i.objects.len()).sum::<usize>();
        let difficult = s.items.iter().flat_map(|i| &i.objects).filter(|o| o.difficult).count();
        (s.items.len(), boxes, difficult)
    };
    assert_eq!(count(&train), (44, 903, 126));
    assert_eq!(count(&test), (12, 483, 72));
    assert!(train.items.iter().chain(&test.items).all(|i| (i.width, i.height) == (TILE, TILE)));
    // No source image has tiles in both splits.
    let source = |p: &Path| p.file_name().unwrap().to_str().unwrap().split("_x").next().unwrap().to_string();
    for t in &test.items {
        assert!(train.items.iter().all(|i| source(&i.image) != source(&t.image)));
    }
    // The registry's normalisation is the training tiles' per-channel moments, in f64.
    let (mut sum, mut sq, mut n) = ([0f64; 3], [0f64; 3], 0f64);
    for item in &train.items {
        let img = image::open(&item.image).unwrap().to_rgb8();
        for p in img.pixels() {
            for c in 0..3 {
                let v = f64::from(p.0[c]) / 255.0;
                sum[c] += v;
                sq[c] += v * v;
            }
            n += 1.0;
        }
    }
    for c in 0..3 {
        let mean = sum[c] / n;
        let std = (sq[c] / n - mean * mean).sqrt();
        assert!((mean - f64::from(TREE_MEAN[c])).abs() < 1e-4, "channel {c}: mean {mean}");
        assert!((std - f64::from(TREE_STD[c])).abs() < 1e-4, "channel {c}: std {std}");
    }
    assert_eq!(known("deepforest-trees").unwrap().classes, CLASSES.len());

    // A file that is not deepforest 2.1.0's is refused by name before anything is written.
    let xml = unpacked.join("OSBS_029.xml");
    let text = std::fs::read_to_string(&xml).unwrap();
    std::fs::write(&xml, text.replacen("<xmin>203</xmin>", "<xmin>204</xmin>", 1)).unwrap();
    let e = import_into(&tmp.path().join("unpacked"), &tmp.path().join("c")).unwrap_err().to_string();
    assert!(e.contains("OSBS_029.xml") && e.contains("sha256"), "{e}");
    let e = import_into(&unpacked.join("OSBS_029.png"), &tmp.path().join("d")).unwrap_err().to_string();
    assert!(e.contains("OSBS_029.png") && e.contains("not a wheel"), "{e}");
}

#[test]
fn bad_tree_annotations_are_errors_naming_the_file() {
    let mut zip = zip::ZipArchive::new(std::fs::File::open(wheel()).unwrap()).unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut zip.by_name("deepforest/data/OSBS_029.xml").unwrap(), &mut text).unwrap();
    let class_of = |n: &str| (n == "Tree").then_some(0);
    let parse = |t: &str| parse_voc_classes(Path::new("OSBS_029.xml"), t, Path::new(""), &class_of, "Tree");
    assert_eq!(parse(&text).unwrap().objects.len(), 61);
    for (bad, says) in [
        (text.replacen("<xmax>227</xmax>", "<xmax>927</xmax>", 1), "outside its 400x400 image"),
        (text.replacen("<name>Tree</name>", "<name>Shrub</name>", 1), "class \"Shrub\", which is not one of Tree"),
        (String::new(), "not valid XML"),
        (text.replacen("<xmax>227</xmax>", "<xmax>190</xmax>", 1), "x2 < x1"),
    ] {
        let e = parse(&bad).unwrap_err().to_string();
        assert!(e.contains("OSBS_029.xml") && e.contains(says), "{e}");
    }
}
