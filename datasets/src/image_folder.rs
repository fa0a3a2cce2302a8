//! Image folders: `root/<class>/*.{jpg,jpeg,png}`, classes in sorted order (the ImageNet and
//! torchvision `ImageFolder` convention). Every image is checked on decode: a file that does not
//! decode, or whose size differs from what the dataset expects, is an error naming it.

use std::path::{Path, PathBuf};

use crate::decoded::DecodedImage;
use crate::{DatasetError, Result, io_err};

/// The images of one split folder, with their labels.
#[derive(Debug, Clone)]
pub struct ImageFolder {
    /// The folder.
    pub root: PathBuf,
    /// Class names in label order.
    pub classes: Vec<String>,
    /// Every image and its label, grouped by class in sorted file order.
    pub items: Vec<(PathBuf, u32)>,
}

fn is_image(p: &Path) -> bool {
    matches!(
        p.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase()).as_deref(),
        Some("jpg" | "jpeg" | "png")
    )
}

impl ImageFolder {
    /// Lists `root`'s class folders and their images; a missing root, no class folders, or an
    /// empty class folder is an error naming it.
    pub fn open(root: &Path) -> Result<Self> {
        let mut classes: Vec<String> = std::fs::read_dir(root)
            .map_err(io_err(root))?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .collect();
        classes.sort();
        if classes.is_empty() {
            return Err(DatasetError::Invalid {
                path: root.into(),
                why: "no class folders; expected root/<class>/<image>".into(),
            });
        }
        let mut items = Vec::new();
        for (label, class) in classes.iter().enumerate() {
            let dir = root.join(class);
            let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
                .map_err(io_err(&dir))?
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| is_image(p))
                .collect();
            if files.is_empty() {
                return Err(DatasetError::Invalid {
                    path: dir,
                    why: "class folder holds no .jpg, .jpeg or .png images".into(),
                });
            }
            files.sort();
            items.extend(files.into_iter().map(|f| (f, label as u32)));
        }
        Ok(Self { root: root.into(), classes, items })
    }

    /// Decodes image `index`, resizes it (bilinear) so that its shorter side is `side`, and
    /// crops the centre `side x side` square: ImageNet's evaluation transform.
    pub fn load_center(&self, index: usize, side: usize) -> Result<(DecodedImage, u32)> {
        let (img, label) = self.load(index, None)?;
        Ok((crate::transform::resize_center(img, side), label))
    }

    /// Decodes image `index`, checking that it is `size` (width, height) when given.
    pub fn load(&self, index: usize, size: Option<(usize, usize)>) -> Result<(DecodedImage, u32)> {
        let (path, label) = &self.items[index];
        let bytes = std::fs::read(path).map_err(io_err(path))?;
        let img = image::load_from_memory(&bytes)
            .map_err(|e| DatasetError::Invalid {
                path: path.clone(),
                why: format!("does not decode as an image ({e}); delete or replace it"),
            })?
            .to_rgb8();
        let (w, h) = (img.width() as usize, img.height() as usize);
        if let Some((ew, eh)) = size
            && (w, h) != (ew, eh)
        {
            return Err(DatasetError::Invalid {
                path: path.clone(),
                why: format!("is {w}x{h}, but this dataset's images are {ew}x{eh}"),
            });
        }
        Ok((DecodedImage { width: w, height: h, data: img.into_raw() }, *label))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_png(path: &Path, w: u32, h: u32, v: u8) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        image::RgbImage::from_pixel(w, h, image::Rgb([v, v / 2, 255 - v])).save(path).unwrap();
    }

    #[test]
    fn lists_classes_in_order_and_decodes_with_checks() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write_png(&root.join("cat/b.png"), 4, 3, 10);
        write_png(&root.join("cat/a.png"), 4, 3, 20);
        write_png(&root.join("ant/x.png"), 4, 3, 30);
        write_png(&root.join("dog/y.png"), 5, 3, 40);
        std::fs::write(root.join("dog/notes.txt"), "not an image").unwrap();
        let f = ImageFolder::open(root).unwrap();
        assert_eq!(f.classes, vec!["ant", "cat", "dog"]);
        let names: Vec<_> =
            f.items.iter().map(|(p, l)| (p.file_name().unwrap().to_str().unwrap().to_string(), *l)).collect();
        assert_eq!(names, vec![("x.png".into(), 0), ("a.png".into(), 1), ("b.png".into(), 1), ("y.png".into(), 2)]);
        let (img, label) = f.load(1, Some((4, 3))).unwrap();
        assert_eq!((img.width, img.height, label), (4, 3, 1));
        assert_eq!(&img.data[..3], &[20, 10, 235]);
        let chw = img.to_chw([0.0; 3], [1.0; 3]);
        assert!((chw[0] - 20.0 / 255.0).abs() < 1e-6 && (chw[12] - 10.0 / 255.0).abs() < 1e-6);
        // Resized so that the shorter side is 2, then the centre 2x2 square; a flat image stays
        // flat.
        let (small, _) = f.load_center(3, 2).unwrap();
        assert_eq!((small.width, small.height), (2, 2));
        assert!(small.data.chunks(3).all(|px| px == [40, 20, 215]), "{:?}", small.data);
        let err = f.load(3, Some((4, 3))).unwrap_err().to_string();
        assert!(err.contains("y.png") && err.contains("5x3"), "{err}");
    }

    #[test]
    fn bad_folders_and_files_are_errors_naming_them() {
        let dir = tempfile::tempdir().unwrap();
        assert!(ImageFolder::open(&dir.path().join("missing")).unwrap_err().to_string().contains("missing"));
        assert!(ImageFolder::open(dir.path()).unwrap_err().to_string().contains("no class folders"));
        std::fs::create_dir_all(dir.path().join("empty")).unwrap();
        assert!(ImageFolder::open(dir.path()).unwrap_err().to_string().contains("empty"));
        let bad = dir.path().join("empty/broken.jpg");
        std::fs::write(&bad, b"\xff\xd8\xff\xe0 truncated").unwrap();
        let f = ImageFolder::open(dir.path()).unwrap();
        let err = f.load(0, None).unwrap_err().to_string();
        assert!(err.contains("broken.jpg") && err.contains("does not decode"), "{err}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        #[test]
        fn random_and_mutated_images_never_panic(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400),
            flips in proptest::collection::vec((0usize..4096, proptest::prelude::any::<u8>()), 1..6),
        ) {
            let dir = tempfile::tempdir().unwrap();
            write_png(&dir.path().join("c/ok.png"), 6, 5, 77);
            std::fs::write(dir.path().join("c/random.jpg"), &bytes).unwrap();
            let mut png = std::fs::read(dir.path().join("c/ok.png")).unwrap();
            crate::mutate(&mut png, &flips);
            std::fs::write(dir.path().join("c/mutated.png"), &png).unwrap();
            let f = ImageFolder::open(dir.path()).unwrap();
            for i in 0..f.items.len() {
                let _ = f.load(i, Some((6, 5)));
                let _ = f.load_center(i, 4);
            }
        }
    }
}
