//! The trainer binary's tool commands besides training, which `cargo xtask` runs rather than
//! linking the whole stack: the zoo's models and recipes, the datasets (list, import, fetch), and
//! the sweep's plan check (typing every run's recipe and checking its layer rules against the
//! model before anything runs).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use int8_datasets::registry::{DATASETS, import, known, locate, search_dirs, workspace_cache};
use int8_nn::policy::LayerPolicy;
use serde::{Deserialize, Serialize};

use crate::recipe::{Recipe, builtin};
use crate::{Result, TrainError};

/// Every model with its parameter count, and every built-in recipe, as Markdown tables.
pub fn zoo() -> Result<String> {
    let mut out = String::from("| model | classes | parameters |\n| --- | ---: | ---: |\n");
    for name in int8_zoo::MODELS {
        let cifar =
            name.ends_with("-cifar") || *name == "cnn-small" || ["resnet20", "resnet32", "resnet56"].contains(name);
        let classes = if cifar { 10 } else { 1000 };
        let model = int8_zoo::build(name, classes, &LayerPolicy::fp32(), 0)?;
        let _ = writeln!(out, "| {name} | {classes} | {} |", group_digits(model.param_count()));
    }
    // Detectors counted with COCO's 91 classes, as torchvision counts them.
    out.push_str("\n| detector | input | classes | parameters |\n| --- | --- | ---: | ---: |\n");
    for &(name, (h, w)) in int8_zoo::detection::DETECTORS {
        let options = int8_zoo::detection::DetectorOptions::default();
        let model = int8_zoo::detection::build(name, 91, &LayerPolicy::fp32(), 0, &options)?;
        let _ = writeln!(out, "| {name} | {h}x{w} | 91 | {} |", group_digits(model.param_count()));
    }
    out.push_str("\n| recipe | model | dataset | epochs | batch | lr | schedule |\n| --- | --- | --- | ---: | ---: | ---: | --- |\n");
    for (name, _) in builtin() {
        match Recipe::find(name, &[]) {
            Ok(r) => {
                let _ = writeln!(
                    out,
                    "| {name} | {} | {} | {} | {} | {} | {:?} |",
                    r.model, r.dataset, r.train.epochs, r.train.batch, r.optim.lr, r.optim.schedule
                );
            }
            Err(e) => {
                let _ = writeln!(out, "| {name} | invalid: {e} | | | | | |");
            }
        }
    }
    out.push_str(
        "\ntrain one: cargo xtask train RECIPE [--precision fp32|int8]; the recipes are crates/int8-train/recipes/*.toml\n",
    );
    Ok(out)
}

/// `1234567` as `1,234,567`.
fn group_digits(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Each known dataset and where it was found (searching `data_dir` first), or how to get it.
pub fn data_list(data_dir: Option<&Path>) -> String {
    let dirs = search_dirs(data_dir, &workspace_cache());
    let mut out = String::from("| dataset | status | what it is |\n| --- | --- | --- |\n");
    for ds in DATASETS {
        let status = match locate(ds, &dirs) {
            Some(p) => format!("found: {}", p.display()),
            None if !ds.downloads.is_empty() => {
                format!("missing: `cargo xtask data fetch {}` (or {})", ds.name, ds.sources.join(" or "))
            }
            None => format!("missing: {}", ds.sources.first().copied().unwrap_or("no known source")),
        };
        let _ = writeln!(out, "| {} | {status} | {} |", ds.name, ds.description);
    }
    let _ = writeln!(
        out,
        "\nsearched, in order: {}\nany other dataset: name its folder by path in a recipe (`dataset = \"/data/kmnist\"`): \
         MNIST-layout IDX files, CIFAR binary batches, or train/ and val/ image folders",
        dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
    );
    out
}

/// Imports dataset `name` from a local archive or folder into the workspace's cache; returns
/// where it now is.
pub fn data_import(name: &str, path: &Path) -> Result<PathBuf> {
    let ds = known(name)?;
    if !path.exists() {
        return Err(TrainError::Recipe {
            path: path.to_path_buf(),
            why: "no such file or folder; pass the dataset's .tar.gz archive or its folder".into(),
        });
    }
    eprintln!("importing {name} from {} (checking its checksum, then extracting or converting)...", path.display());
    Ok(import(ds, path, &workspace_cache())?)
}

/// Downloads dataset `name` from its canonical source into the workspace's cache (each file
/// checked against its published MD5), unless it is found already; returns where it is.
pub fn data_fetch(name: &str, data_dir: Option<&Path>) -> Result<PathBuf> {
    let ds = known(name)?;
    let cache = workspace_cache();
    if let Some(found) = locate(ds, &search_dirs(data_dir, &cache)) {
        return Ok(found);
    }
    eprintln!("fetching {name} into {} (each file checked against its published MD5)...", cache.display());
    let mut last = (String::new(), 0u64);
    Ok(int8_datasets::fetch::fetch(ds, &cache, &mut |file, got, total| {
        // One line per file and per 10 MiB, so that logs stay short.
        if last.0 != file || got >= last.1 + (10 << 20) || total == Some(got) {
            let of = total.map(|t| format!(" of {:.1} MiB", t as f64 / 1048576.0)).unwrap_or_default();
            eprintln!("  {file}: {:.1} MiB{of}", got as f64 / 1048576.0);
            last = (file.to_string(), got);
        }
    })?)
}

/// One run of a sweep to check: its recipe (a built-in name or a file) and overrides.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanRequest {
    /// A built-in recipe's name or a recipe file's path.
    pub recipe: String,
    /// Overrides, in order.
    pub sets: Vec<String>,
}

/// What the check found for one run: the resolved recipe (as saved beside the run) and what the
/// plan shows of it, or why the run cannot run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlanAnswer {
    /// The run can start.
    Ok {
        /// The resolved recipe as TOML.
        resolved: String,
        /// The model.
        model: String,
        /// The dataset.
        dataset: String,
        /// Epochs.
        epochs: usize,
        /// Batch size.
        batch: usize,
    },
    /// It cannot, and why.
    Error(String),
}

/// Types each request's recipe and checks its layer rules against the model's layer names
/// (building each model once per distinct set of rules).
pub fn plan(requests: &[PlanRequest]) -> Vec<PlanAnswer> {
    let mut checked = std::collections::HashMap::new();
    requests
        .iter()
        .map(|req| {
            let recipe = match Recipe::find(&req.recipe, &req.sets) {
                Ok(r) => r,
                Err(e) => return PlanAnswer::Error(e.to_string()),
            };
            let policy = recipe.policy();
            if !policy.rules.is_empty() {
                let key = (
                    recipe.model.clone(),
                    policy.rules.iter().map(|r| r.pattern.as_str()).collect::<Vec<_>>().join("\n"),
                );
                let verdict = checked
                    .entry(key)
                    .or_insert_with(|| int8_zoo::build(&recipe.model, 10, &policy, 0).err().map(|e| e.to_string()));
                if let Some(e) = verdict {
                    return PlanAnswer::Error(e.clone());
                }
            }
            PlanAnswer::Ok {
                resolved: recipe.to_toml(),
                model: recipe.model.clone(),
                dataset: recipe.dataset.clone(),
                epochs: recipe.train.epochs,
                batch: recipe.train.batch,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_zoo_lists_models_detectors_and_recipes_with_torchvisions_counts() {
        let out = zoo().unwrap();
        assert!(out.contains("| resnet20 | 10 | 272,474 |"), "{out}");
        assert!(out.contains("| ssd300-vgg16 | 300x300 | 91 | 35,641,826 |"), "{out}");
        assert!(out.contains("| ssdlite-mobilenetv2 | 320x320 | 91 | 4,664,988 |"), "{out}");
        assert!(
            out.contains("| ssdlite-mobilenetv2-deepforest-trees | ssdlite-mobilenetv2 | deepforest-trees |"),
            "{out}"
        );
    }

    #[test]
    fn the_plan_check_types_recipes_and_names_rules_that_match_no_layer() {
        let req = |recipe: &str, sets: &[&str]| PlanRequest {
            recipe: recipe.into(),
            sets: sets.iter().map(|s| s.to_string()).collect(),
        };
        let answers = plan(&[
            req("resnet20-cifar10", &["train.epochs=2"]),
            req("resnet20-cifar10", &["optim.lrr=1"]),
            req("resnet20-cifar10", &[r#"quant.rules=[{ pattern = "*.dw.conv", int8 = false }]"#]),
            req("mobilenetv2-cifar10", &[r#"quant.rules=[{ pattern = "*.dw.conv", int8 = false }]"#]),
            req("no-such-recipe", &[]),
        ]);
        match &answers[0] {
            PlanAnswer::Ok { resolved, model, epochs, .. } => {
                assert_eq!((model.as_str(), *epochs), ("resnet20", 2));
                assert_eq!(resolved, &Recipe::find("resnet20-cifar10", &["train.epochs=2".into()]).unwrap().to_toml());
            }
            other => panic!("{other:?}"),
        }
        let err = |i: usize| match &answers[i] {
            PlanAnswer::Error(e) => e.clone(),
            other => panic!("{other:?}"),
        };
        assert!(err(1).contains("lrr"), "{}", err(1));
        assert!(err(2).contains("`*.dw.conv` matches no conv or linear layer of resnet20"), "{}", err(2));
        assert!(matches!(answers[3], PlanAnswer::Ok { .. }));
        assert!(err(4).contains("no-such-recipe"), "{}", err(4));
        // The answers travel as JSON between the trainer and xtask.
        let json = serde_json::to_string(&answers).unwrap();
        assert_eq!(serde_json::from_str::<Vec<PlanAnswer>>(&json).unwrap(), answers);
    }

    #[test]
    fn digits_are_grouped_in_threes() {
        assert_eq!(group_digits(272_474), "272,474");
        assert_eq!(group_digits(61_100_840), "61,100,840");
        assert_eq!(group_digits(7), "7");
    }
}
