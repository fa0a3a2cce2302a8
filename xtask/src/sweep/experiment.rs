//! Experiments (`experiments/*.toml`) and their expansion into runs: recipes x precision x
//! ablation axes x seeds, each run with its overrides in the order they apply, and the order in
//! which unfinished runs start.

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// An experiment file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Experiment {
    /// What it shows.
    #[serde(default)]
    pub description: String,
    /// Built-in recipe names (`cargo xtask zoo`) or recipe files, each with overrides of its own
    /// if needed.
    pub recipes: Vec<RecipeEntry>,
    /// Precisions to run.
    #[serde(default = "both")]
    pub precisions: Vec<String>,
    /// Seeds.
    #[serde(default = "seed0")]
    pub seeds: Vec<u64>,
    /// `key=value` overrides for every run.
    #[serde(default)]
    pub set: Vec<String>,
    /// Ablation axes.
    #[serde(default)]
    pub axis: Vec<Axis>,
    /// Another experiment whose FP32 runs this one's INT8 runs are compared with where this one
    /// has no FP32 run of the same recipe: an INT8-only ablation of an earlier FP32-vs-INT8 grid.
    /// Its runs are read from `runs/<baseline>/`, or else from the published
    /// `experiments/results/<baseline>/` (`plan.json` and `results.csv`); a run pairs only with
    /// one of the same recipe, seed and overrides other than `quant.*`.
    #[serde(default)]
    pub baseline: Option<String>,
}

/// A recipe of an experiment: its name or path, or that with overrides for its runs only (a
/// schedule that fits this recipe's cost, say), applied after the experiment's `set`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum RecipeEntry {
    /// A recipe name or path.
    Name(String),
    /// A recipe name or path with overrides.
    WithSet(RecipeWithSet),
}

/// A recipe name or path with overrides for its runs only.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RecipeWithSet {
    /// The recipe name or path.
    pub name: String,
    /// Overrides for this recipe's runs.
    pub set: Vec<String>,
}

impl RecipeEntry {
    fn name(&self) -> &str {
        match self {
            RecipeEntry::Name(n) | RecipeEntry::WithSet(RecipeWithSet { name: n, .. }) => n,
        }
    }
    fn sets(&self) -> &[String] {
        match self {
            RecipeEntry::Name(_) => &[],
            RecipeEntry::WithSet(r) => &r.set,
        }
    }
}

fn both() -> Vec<String> {
    vec!["fp32".into(), "int8".into()]
}
fn seed0() -> Vec<u64> {
    vec![0]
}

/// One ablation axis: a recipe key and its values, or labelled groups of overrides.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Axis {
    /// The label in run names and tables (`dsgc`).
    pub name: String,
    /// The recipe key the plain values set (`quant.dsgc`).
    #[serde(default)]
    pub key: Option<String>,
    /// The values: plain values for `key`, or `{ label = "...", set = ["k=v", ...] }`.
    pub values: Vec<AxisValue>,
    /// Whether the axis applies to INT8 runs only (FP32 runs take none of its values); by
    /// default, axes over `quant.*` keys or with labelled overrides do.
    #[serde(default)]
    pub int8_only: Option<bool>,
}

/// A value of an axis.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum AxisValue {
    /// A labelled group of overrides.
    Labelled {
        /// The label.
        label: String,
        /// Overrides.
        set: Vec<String>,
    },
    /// A plain value of the axis's key.
    Plain(toml::Value),
}

/// One run of a sweep.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlannedRun {
    /// Folder name under the sweep's output.
    pub name: String,
    /// A built-in recipe's name, or a recipe file's absolute path.
    pub recipe: String,
    /// The recipe's name.
    pub recipe_name: String,
    /// Overrides, in order.
    pub sets: Vec<String>,
    /// Axis labels (name, label), for the tables.
    pub labels: Vec<(String, String)>,
    /// `fp32` or `int8`.
    pub precision: String,
    /// Seed.
    pub seed: u64,
}

fn value_label(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        toml::Value::Boolean(true) => "on".into(),
        toml::Value::Boolean(false) => "off".into(),
        other => other.to_string(),
    }
}

/// A point of the axis grid: its (axis, label) pairs and its overrides.
type Combo = (Vec<(String, String)>, Vec<String>);

/// Expands an experiment into runs; `cli_sets` apply last.
pub fn plan(exp: &Experiment, cli_sets: &[String]) -> Result<Vec<PlannedRun>> {
    let mut runs = Vec::new();
    for p in &exp.precisions {
        if p != "fp32" && p != "int8" {
            bail!("precision `{p}` is not fp32 or int8");
        }
    }
    for entry in &exp.recipes {
        // A file is handed to the runs by its absolute path (they work from the workspace root);
        // anything else is a built-in recipe's name, which the trainer checks.
        let given = Path::new(entry.name());
        let recipe = if given.is_file() {
            std::path::absolute(given)
                .with_context(|| format!("cannot resolve {}", given.display()))?
                .to_string_lossy()
                .into_owned()
        } else {
            entry.name().to_string()
        };
        let recipe_name = given.file_stem().and_then(|s| s.to_str()).unwrap_or("run").to_string();
        for precision in &exp.precisions {
            // The grid of axis values that apply at this precision.
            let mut combos: Vec<Combo> = vec![(vec![], vec![])];
            for axis in &exp.axis {
                let labelled = axis.values.iter().any(|v| matches!(v, AxisValue::Labelled { .. }));
                let int8_only =
                    axis.int8_only.unwrap_or(labelled || axis.key.as_deref().is_some_and(|k| k.starts_with("quant.")));
                if int8_only && precision == "fp32" {
                    continue;
                }
                let mut next = Vec::new();
                for (labels, sets) in &combos {
                    for v in &axis.values {
                        let (label, extra) = match v {
                            AxisValue::Labelled { label, set } => (label.clone(), set.clone()),
                            AxisValue::Plain(val) => {
                                let key = axis.key.as_ref().with_context(|| {
                                    format!("axis `{}` has plain values, so it needs a `key`", axis.name)
                                })?;
                                (value_label(val), vec![format!("{key}={val}")])
                            }
                        };
                        let mut l = labels.clone();
                        l.push((axis.name.clone(), label));
                        let mut s = sets.clone();
                        s.extend(extra);
                        next.push((l, s));
                    }
                }
                combos = next;
            }
            for (labels, axis_sets) in combos {
                for &seed in &exp.seeds {
                    let mut name = format!("{recipe_name}-{precision}");
                    for (a, l) in &labels {
                        name.push_str(&format!("-{a}_{l}"));
                    }
                    name.push_str(&format!("-s{seed}"));
                    let mut sets = exp.set.clone();
                    sets.extend(entry.sets().iter().cloned());
                    sets.extend(axis_sets.iter().cloned());
                    sets.push(format!("quant.precision=\"{precision}\""));
                    sets.push(format!("train.seed={seed}"));
                    sets.extend(cli_sets.iter().cloned());
                    runs.push(PlannedRun {
                        name: name.replace(|c: char| !(c.is_ascii_alphanumeric() || "-_.".contains(c)), "_"),
                        recipe: recipe.clone(),
                        recipe_name: recipe_name.clone(),
                        sets,
                        labels: labels.clone(),
                        precision: precision.clone(),
                        seed,
                    });
                }
            }
        }
    }
    let mut names: Vec<&str> = runs.iter().map(|r| r.name.as_str()).collect();
    names.sort();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        bail!("two runs would share the folder `{}`; give the axes distinct labels", w[0]);
    }
    Ok(runs)
}

/// The unfinished runs' indices in the order they start: seed by seed, each seed's runs in plan
/// order. A grid stopped part-way (runs of hours, finished over several sittings) then holds
/// whole seeds, FP32 and INT8 side by side, rather than every FP32 seed and no INT8 one.
pub fn start_order(runs: &[PlannedRun], is_finished: impl Fn(&PlannedRun) -> bool) -> Vec<usize> {
    let mut todo: Vec<usize> = (0..runs.len()).filter(|&i| !is_finished(&runs[i])).collect();
    todo.sort_by_key(|&i| runs[i].seed);
    todo
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recipe_s_own_overrides_apply_to_its_runs_only_after_the_experiment_s() {
        let exp: Experiment = toml::from_str(
            r#"
            recipes = ["cnn-small-fashion-mnist", { name = "resnet20-cifar10", set = ["train.epochs=4"] }]
            seeds = [1]
            set = ["train.epochs=2"]
            [[axis]]
            name = "dsgc"
            key = "quant.dsgc"
            values = [false]
            "#,
        )
        .unwrap();
        let runs = plan(&exp, &["optim.lr=0.5".into()]).unwrap();
        let names: Vec<&str> = runs.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "cnn-small-fashion-mnist-fp32-s1",
                "cnn-small-fashion-mnist-int8-dsgc_off-s1",
                "resnet20-cifar10-fp32-s1",
                "resnet20-cifar10-int8-dsgc_off-s1",
            ]
        );
        assert_eq!(runs[0].sets, ["train.epochs=2", "quant.precision=\"fp32\"", "train.seed=1", "optim.lr=0.5"]);
        assert_eq!(
            runs[3].sets,
            [
                "train.epochs=2",
                "train.epochs=4",
                "quant.dsgc=false",
                "quant.precision=\"int8\"",
                "train.seed=1",
                "optim.lr=0.5"
            ]
        );
        // A misspelt field is an error, not a silently ignored override.
        let bad = toml::from_str::<Experiment>(r#"recipes = [{ name = "resnet20-cifar10", sets = ["a=1"] }]"#);
        assert!(bad.is_err());
    }

    #[test]
    fn runs_start_seed_by_seed_and_finished_ones_are_left_out() {
        let exp: Experiment = toml::from_str(
            r#"
            recipes = ["cnn-small-fashion-mnist"]
            precisions = ["fp32", "int8"]
            seeds = [0, 1, 2]
            "#,
        )
        .unwrap();
        let runs = plan(&exp, &[]).unwrap();
        let order = start_order(&runs, |r| r.name.ends_with("fp32-s1"));
        let names: Vec<&str> = order.iter().map(|&i| runs[i].name.as_str()).collect();
        assert_eq!(
            names,
            [
                "cnn-small-fashion-mnist-fp32-s0",
                "cnn-small-fashion-mnist-int8-s0",
                "cnn-small-fashion-mnist-int8-s1",
                "cnn-small-fashion-mnist-fp32-s2",
                "cnn-small-fashion-mnist-int8-s2",
            ]
        );
    }
}
