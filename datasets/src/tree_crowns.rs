//! NEON tree crowns: the real aerial images with hand-drawn crown boxes that the `deepforest`
//! package (Weinstein et al., "Individual tree-crown detection in RGB imagery using
//! semi-supervised deep learning neural networks", Remote Sensing 2019) ships in its PyPI wheel,
//! made into a Pascal VOC folder for detection training.
//!
//! The wheel holds four annotated RGB images at 10 cm per pixel: two 400x400 plots (OSBS_029,
//! Florida, 61 crowns; SOAP_061, California, 37 crowns marked alive or dead) and two crops of
//! Yellowstone (2299x2472, 574 crowns; 1249x1035, 279 crowns). Import checks each file against
//! the sha256 of deepforest 2.1.0's copy, then cuts the crops into 400x400 tiles (the plots' size;
//! tiles spread evenly across an image, so neighbours overlap by less than a tile and nothing is
//! cut off). A box is clipped to its tile; one that keeps under half its area there is marked
//! `difficult` (left out of evaluation, as VOC does), one narrower than a pixel is dropped.
//!
//! The split is by source image, so that no crown is seen in training and test: the larger
//! Yellowstone crop and both plots train (44 tiles), the smaller Yellowstone crop tests (12). One
//! class, `tree` (the wheel's `Alive` and `Dead` crowns are trees).

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::detection::{DetectionItem, Object, parse_voc_classes, voc_xml};
use crate::{DatasetError, Result, io_err};

/// The class of every box.
pub const CLASSES: [&str; 1] = ["tree"];
/// The side of a tile, in pixels.
pub const TILE: u32 = 400;
/// The smallest fraction of its area a clipped box keeps to count as an ordinary box.
pub const VISIBLE: f32 = 0.5;

/// One annotated image of the wheel.
struct Source {
    /// The annotation file, in `deepforest/data/`.
    xml: &'static str,
    xml_sha256: &'static str,
    /// The image file it describes (OSBS_029's annotation names a TIFF; the wheel's PNG has the
    /// same pixels).
    image: &'static str,
    image_sha256: &'static str,
    /// Whether its tiles are training (or test) images.
    train: bool,
}

const SOURCES: [Source; 4] = [
    Source {
        xml: "2019_YELL_2_528000_4978000_image_crop2.xml",
        xml_sha256: "bd431af6a5086d721eb731b22f5ea28cd8a8eab06883efc1c665391acbc68e11",
        image: "2019_YELL_2_528000_4978000_image_crop2.png",
        image_sha256: "a9bdb0f4447fdd899d22f567e0e20ba8320c5413b2ad0cd0ac8d9f3b6e0f9767",
        train: true,
    },
    Source {
        xml: "OSBS_029.xml",
        xml_sha256: "1f68c4011d7b351c29ca755072e77f3d16e6fd1f995bd05a9dd4eb952b55373c",
        image: "OSBS_029.png",
        image_sha256: "d9477c6a00e4902c7bee487d4c5582c3b8b9a2f77f3908a29628b816b291e6ee",
        train: true,
    },
    Source {
        xml: "SOAP_061.xml",
        xml_sha256: "4833280af75fd9c47965a93e38945282835e9e725cac412bdb9469d63480947c",
        image: "SOAP_061.png",
        image_sha256: "256508f1a62149bec4a80879077a865caf50e8cace095e6564c76befa480d424",
        train: true,
    },
    Source {
        xml: "2019_YELL_2_541000_4977000_image_crop.xml",
        xml_sha256: "cefe4b96888bacbf8af1674f000082e549aa707aa6590d545effb23e43f26631",
        image: "2019_YELL_2_541000_4977000_image_crop.png",
        image_sha256: "178e58a23cc2642226a364a30f71bd9258ddc1b012c826f12250914a90c7a131",
        train: false,
    },
];

fn invalid(path: &Path, why: impl Into<String>) -> DatasetError {
    DatasetError::Invalid { path: path.into(), why: why.into() }
}

/// The files of the wheel's `deepforest/data/`, read from the wheel or from a folder it was
/// unpacked into (the folder holding `deepforest/`, or `deepforest/data/` itself).
enum Files {
    Wheel(PathBuf, zip::ZipArchive<std::fs::File>),
    Folder(PathBuf),
}

impl Files {
    fn open(from: &Path) -> Result<Self> {
        if from.is_dir() {
            let data = from.join("deepforest/data");
            return Ok(Self::Folder(if data.is_dir() { data } else { from.to_path_buf() }));
        }
        let f = std::fs::File::open(from).map_err(io_err(from))?;
        let zip = zip::ZipArchive::new(f).map_err(|e| {
            invalid(
                from,
                format!("is not a wheel (zip) file ({e}); pass deepforest's .whl or the folder it unpacks to"),
            )
        })?;
        Ok(Self::Wheel(from.to_path_buf(), zip))
    }

    /// The bytes of `name` and the path to name in messages.
    fn read(&mut self, name: &str) -> Result<(Vec<u8>, PathBuf)> {
        match self {
            Self::Folder(dir) => {
                let path = dir.join(name);
                Ok((std::fs::read(&path).map_err(io_err(&path))?, path))
            }
            Self::Wheel(wheel, zip) => {
                let shown = PathBuf::from(format!("{}!/deepforest/data/{name}", wheel.display()));
                let mut entry = zip.by_name(&format!("deepforest/data/{name}")).map_err(|_| {
                    invalid(wheel, format!("holds no deepforest/data/{name}; is it the deepforest wheel (2.1.0)?"))
                })?;
                let mut bytes = Vec::with_capacity(entry.size() as usize);
                entry
                    .read_to_end(&mut bytes)
                    .map_err(|e| invalid(&shown, format!("does not decompress ({e}); download the wheel again")))?;
                Ok((bytes, shown))
            }
        }
    }

    /// [`Self::read`], checked against deepforest 2.1.0's sha256 of the file.
    fn read_checked(&mut self, name: &str, sha256: &str) -> Result<(Vec<u8>, PathBuf)> {
        let (bytes, path) = self.read(name)?;
        let got: String = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
        if got != sha256 {
            return Err(invalid(
                &path,
                format!("has sha256 {got}, but deepforest 2.1.0's copy has {sha256}; use that version's wheel"),
            ));
        }
        Ok((bytes, path))
    }
}

/// The offsets of `tile`-wide windows covering `len` pixels, spread evenly: the first at 0, the
/// last ending at `len`, neighbours overlapping by less than a tile.
pub fn tile_offsets(len: u32, tile: u32) -> Vec<u32> {
    if len <= tile {
        return vec![0];
    }
    let n = len.div_ceil(tile);
    let span = len - tile;
    (0..n).map(|i| ((i as u64 * span as u64 + (n as u64 - 1) / 2) / (n as u64 - 1)) as u32).collect()
}

/// The objects of a `w x h` window at `(ox, oy)`: each box clipped and moved into the window;
/// one keeping under [`VISIBLE`] of its area is `difficult`, one under a pixel wide or high is
/// dropped.
pub fn window_objects(objects: &[Object], (ox, oy): (u32, u32), (w, h): (u32, u32)) -> Vec<Object> {
    let (ox, oy, w, h) = (ox as f32, oy as f32, w as f32, h as f32);
    let mut out = Vec::new();
    for o in objects {
        let [x1, y1, x2, y2] = o.bbox;
        let c = [(x1 - ox).clamp(0.0, w), (y1 - oy).clamp(0.0, h), (x2 - ox).clamp(0.0, w), (y2 - oy).clamp(0.0, h)];
        if c[2] - c[0] < 1.0 || c[3] - c[1] < 1.0 {
            continue;
        }
        let kept = (c[2] - c[0]) * (c[3] - c[1]) / ((x2 - x1) * (y2 - y1));
        out.push(Object { class: o.class, bbox: c, difficult: o.difficult || kept < VISIBLE });
    }
    out
}

/// Builds the VOC folder (`Annotations/`, `JPEGImages/` holding PNG tiles, `ImageSets/Main/`
/// `train.txt` and `test.txt`, and a `README.md` saying where it came from) in `dst` from the
/// deepforest wheel or its unpacked folder `from`.
pub fn import_into(from: &Path, dst: &Path) -> Result<()> {
    let mut files = Files::open(from)?;
    for dir in ["Annotations", "JPEGImages", "ImageSets/Main"] {
        std::fs::create_dir_all(dst.join(dir)).map_err(io_err(dst.join(dir)))?;
    }
    let class_of = |name: &str| matches!(name, "Tree" | "Alive" | "Dead").then_some(0);
    let (mut train, mut test) = (Vec::new(), Vec::new());
    // Boxes and difficult boxes per split, training first.
    let mut counts = [(0, 0); 2];
    let mut readme = String::from(
        "# NEON tree crowns, tiled\n\nMade by `cargo xtask data import deepforest-trees` from the `deepforest` 2.1.0 \
         wheel's `deepforest/data/` (see datasets/src/tree_crowns.rs). One class, `tree`.\n\n\
         | source | size | boxes | split | tiles |\n| --- | --- | --- | --- | --- |\n",
    );
    for s in &SOURCES {
        let (xml, xml_path) = files.read_checked(s.xml, s.xml_sha256)?;
        let text = String::from_utf8(xml).map_err(|_| invalid(&xml_path, "is not UTF-8 text"))?;
        let item: DetectionItem =
            parse_voc_classes(&xml_path, &text, Path::new(""), &class_of, "Tree, Alive, Dead (tree crowns)")?;
        if item.objects.is_empty() {
            return Err(invalid(&xml_path, "has no boxes; the deepforest 2.1.0 copy has some"));
        }
        let (png, png_path) = files.read_checked(s.image, s.image_sha256)?;
        let img = image::load_from_memory(&png)
            .map_err(|e| invalid(&png_path, format!("does not decode as an image ({e})")))?
            .to_rgb8();
        if (img.width(), img.height()) != (item.width, item.height) {
            return Err(invalid(
                &png_path,
                format!("is {}x{}, but {} says {}x{}", img.width(), img.height(), s.xml, item.width, item.height),
            ));
        }
        let stem = s.xml.trim_end_matches(".xml");
        let mut tiles = 0;
        for &oy in &tile_offsets(item.height, TILE) {
            for &ox in &tile_offsets(item.width, TILE) {
                let (w, h) = (TILE.min(item.width), TILE.min(item.height));
                let id = format!("{stem}_x{ox}_y{oy}");
                let file = format!("{id}.png");
                let out = dst.join("JPEGImages").join(&file);
                image::imageops::crop_imm(&img, ox, oy, w, h)
                    .to_image()
                    .save(&out)
                    .map_err(|e| invalid(&out, format!("could not be written ({e})")))?;
                let objects = window_objects(&item.objects, (ox, oy), (w, h));
                let c = &mut counts[usize::from(!s.train)];
                *c = (c.0 + objects.len(), c.1 + objects.iter().filter(|o| o.difficult).count());
                let ann = dst.join("Annotations").join(format!("{id}.xml"));
                std::fs::write(&ann, voc_xml(&file, w, h, &objects, &CLASSES)).map_err(io_err(&ann))?;
                if s.train { &mut train } else { &mut test }.push(id);
                tiles += 1;
            }
        }
        let split = if s.train { "train" } else { "test" };
        readme.push_str(&format!(
            "| {} | {}x{} | {} | {split} | {tiles} |\n",
            s.image,
            item.width,
            item.height,
            item.objects.len()
        ));
    }
    for (split, ids) in [("train", &train), ("test", &test)] {
        let list = dst.join("ImageSets/Main").join(format!("{split}.txt"));
        std::fs::write(&list, ids.join("\n") + "\n").map_err(io_err(&list))?;
    }
    for (split, ids, (boxes, difficult)) in [("train", &train, counts[0]), ("test", &test, counts[1])] {
        readme.push_str(&format!("\n{split}: {} tiles, {boxes} boxes ({difficult} difficult)", ids.len()));
    }
    readme.push_str(&format!(
        "\n\nTiles of {TILE}x{TILE}, spread evenly over each image; boxes clipped to their tile, those keeping under \
         {VISIBLE} of their area marked difficult.\n"
    ));
    std::fs::write(dst.join("README.md"), readme).map_err(io_err(dst.join("README.md")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_cover_the_image_evenly_and_end_at_its_border() {
        assert_eq!(tile_offsets(400, 400), vec![0]);
        assert_eq!(tile_offsets(300, 400), vec![0]);
        assert_eq!(tile_offsets(1249, 400), vec![0, 283, 566, 849]);
        for len in [401, 799, 800, 801, 1035, 2299, 2472] {
            let o = tile_offsets(len, 400);
            assert_eq!((o[0], *o.last().unwrap() + 400), (0, len), "{len}");
            // Neighbours overlap (or touch), by less than a tile.
            assert!(o.windows(2).all(|w| w[1] > w[0] && w[1] <= w[0] + 400), "{len}: {o:?}");
            assert_eq!(o.len() as u32, len.div_ceil(400));
        }
    }

    #[test]
    fn boxes_are_clipped_to_their_window_and_mostly_cut_ones_marked_difficult() {
        let obj = |bbox| Object { class: 0, bbox, difficult: false };
        let objects = [
            obj([10.0, 10.0, 30.0, 30.0]),     // inside
            obj([90.0, 10.0, 130.0, 30.0]),    // a quarter inside: difficult
            obj([70.0, 50.0, 110.0, 70.0]),    // three quarters inside
            obj([99.5, 10.0, 140.0, 30.0]),    // half a pixel inside: dropped
            obj([200.0, 200.0, 220.0, 220.0]), // outside
        ];
        let got = window_objects(&objects, (0, 0), (100, 100));
        assert_eq!(
            got,
            vec![
                obj([10.0, 10.0, 30.0, 30.0]),
                Object { class: 0, bbox: [90.0, 10.0, 100.0, 30.0], difficult: true },
                obj([70.0, 50.0, 100.0, 70.0]),
            ]
        );
        // A window elsewhere moves the boxes into its own pixels.
        assert_eq!(window_objects(&objects[4..], (150, 180), (100, 100)), vec![obj([50.0, 20.0, 70.0, 40.0])]);
    }
}
