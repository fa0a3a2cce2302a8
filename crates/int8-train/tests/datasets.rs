//! Datasets the trainer reads through the registry and by path, on real images: CIFAR-100's
//! binary batches (made from the first 20 CIFAR-100 test images, which the foolbox wheel ships
//! losslessly; `scripts/setup` fetches them), and Fashion-MNIST's IDX files named by their
//! folder's path, gzipped and raw.

use std::path::{Path, PathBuf};

use int8_datasets::loader::InMemory;
use int8_datasets::open::pixel_moments;
use int8_train::progress::ProgressMode;
use int8_train::recipe::Recipe;
use int8_train::run::{RunOptions, Summary, run};

const FASHION: &str = "/usr/share/datasets/fashion-mnist";

/// CIFAR-100's superclass of each of its 100 classes (the `coarse_label` that the meta file
/// pairs with each `fine_label`).
const COARSE: [u8; 100] = [
    4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11, 6, 11, 5, 10, 7, 6, 13, 15, 3, 15, 0, 11, 1, 10,
    12, 14, 16, 9, 11, 5, 5, 19, 8, 8, 15, 13, 14, 17, 18, 10, 16, 4, 17, 4, 2, 0, 17, 4, 18, 17, 10, 3, 2, 12, 12, 16,
    12, 1, 9, 19, 2, 10, 0, 1, 16, 12, 9, 13, 15, 13, 16, 19, 2, 4, 6, 19, 5, 5, 8, 19, 18, 1, 2, 15, 6, 0, 17, 8, 14,
    13,
];

fn samples() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../datasets/cache/foolbox-samples");
    assert!(dir.join("cifar100_19_53.png").is_file(), "{} lacks the sample images: run scripts/setup", dir.display());
    dir
}

fn opts(out: &Path) -> RunOptions {
    RunOptions { progress: ProgressMode::Quiet, ..RunOptions::new(out) }
}

fn recipe(text: &str, sets: &[String]) -> Recipe {
    Recipe::parse(text, Path::new("test-recipe.toml"), sets).unwrap()
}

/// CIFAR-100 binary records (coarse label, fine label, three 32x32 planes) of the sample images
/// `cifar100_<index>_<fine label>.png` with these indices.
fn cifar100_records(dir: &Path, indices: std::ops::Range<usize>) -> Vec<u8> {
    let mut out = Vec::new();
    for i in indices {
        let name = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .find(|n| n.starts_with(&format!("cifar100_{i:02}_")))
            .unwrap();
        let fine: u8 = name.trim_end_matches(".png").rsplit('_').next().unwrap().parse().unwrap();
        let img = image::open(dir.join(&name)).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (32, 32), "{name}");
        out.extend([COARSE[usize::from(fine)], fine]);
        for c in 0..3 {
            out.extend(img.pixels().map(|p| p[c]));
        }
    }
    out
}

#[test]
fn cifar100_trains_from_its_binary_batches() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("cifar-100-binary");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("train.bin"), cifar100_records(&samples(), 0..16)).unwrap();
    std::fs::write(root.join("test.bin"), cifar100_records(&samples(), 16..20)).unwrap();
    let text = format!(
        r#"
model = "resnet20"
dataset = "cifar100"
[data]
root = "{}"
pad = 4
flip = true
[train]
epochs = 1
batch = 8
eval_batch = 4
[optim]
lr = 0.05
"#,
        root.display()
    );
    let out = tempfile::tempdir().unwrap();
    let s: Summary = run(&recipe(&text, &[]), &opts(out.path())).unwrap();
    assert_eq!(s.images, (16, 4));
    // ResNet-20's classifier for 100 classes: 64 x 100 + 100 parameters where CIFAR-10's has 650.
    assert_eq!(s.params, 272_474 - 650 + 6_500);
    assert!(s.final_train_loss.is_finite() && s.int8_layers == 20, "{s:?}");
}

#[test]
fn an_idx_folder_named_by_path_trains_gzipped_or_raw() {
    assert!(Path::new(FASHION).exists(), "{FASHION} is missing: apt-get install -y dataset-fashion-mnist");
    // The same files unpacked, as some MNIST-family downloads come.
    let raw = tempfile::tempdir().unwrap();
    for f in ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    {
        let mut gz =
            flate2::read::GzDecoder::new(std::fs::File::open(Path::new(FASHION).join(format!("{f}.gz"))).unwrap());
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut gz, &mut bytes).unwrap();
        std::fs::write(raw.path().join(f), bytes).unwrap();
    }
    let text = |path: &Path| {
        format!(
            r#"
model = "cnn-small"
dataset = "{}"
[data]
train_limit = 256
test_limit = 200
pad = 2
[train]
epochs = 1
batch = 64
eval_batch = 100
[optim]
lr = 0.05
"#,
            path.display()
        )
    };
    let one = |path: &Path| -> Summary {
        let out = tempfile::tempdir().unwrap();
        let r = recipe(&text(path), &[]);
        rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap().install(|| run(&r, &opts(out.path()))).unwrap()
    };
    let (gz, unpacked) = (one(Path::new(FASHION)), one(raw.path()));
    assert_eq!(gz.images, (256, 200));
    assert!(gz.final_train_loss.is_finite() && gz.top1.unwrap() > 10.0, "{gz:?}");
    // The same images train the same way from either form.
    assert_eq!((gz.top1, gz.final_train_loss), (unpacked.top1, unpacked.final_train_loss));
    // A folder by path has no published normalisation: it is computed from its training images,
    // and for Fashion-MNIST it comes out as the published one.
    let ds = int8_datasets::idx::read_idx_pair(
        &Path::new(FASHION).join("train-images-idx3-ubyte.gz"),
        &Path::new(FASHION).join("train-labels-idx1-ubyte.gz"),
        10,
    )
    .unwrap();
    let (mean, std) = pixel_moments(&InMemory::from_idx(ds));
    assert!((mean[0] - 0.2860).abs() < 1e-3 && (std[0] - 0.3530).abs() < 1e-3, "{mean:?} {std:?}");
}
