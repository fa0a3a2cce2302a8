//! `cargo xtask scalars` (`int8-train scalars`): a run's TensorBoard curves as a Markdown table, for
//! reading them without TensorBoard (over SSH, in notes) and for quoting a figure with the command
//! that printed it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use int8_nn::policy::glob;

use crate::tensorboard::read_scalars;
use crate::{Result, TrainError};

/// Which points to print.
#[derive(Debug, Clone, Default)]
pub struct Select {
    /// Tag patterns (`*` for any run of characters); none lists the tags instead.
    pub tags: Vec<String>,
    /// First step shown.
    pub from: Option<u64>,
    /// Last step shown.
    pub to: Option<u64>,
}

/// The table (or, without tag patterns, the list of tags) for the run folder `dir`.
pub fn render(dir: &Path, select: &Select) -> Result<String> {
    let all = read_scalars(dir)?;
    if select.tags.is_empty() {
        let mut out = String::from("| tag | points | steps |\n| --- | ---: | --- |\n");
        for (tag, points) in &all {
            let (first, last) = (points.first().map_or(0, |p| p.0), points.last().map_or(0, |p| p.0));
            out += &format!("| {tag} | {} | {first}-{last} |\n", points.len());
        }
        out += "\nPick columns with --tag PATTERN (repeatable; `*` matches any run of characters).\n";
        return Ok(out);
    }
    let mut tags: Vec<&String> = Vec::new();
    for pattern in &select.tags {
        let matched: Vec<&String> = all.keys().filter(|t| glob(pattern, t)).collect();
        if matched.is_empty() {
            return Err(TrainError::Events {
                path: dir.to_path_buf(),
                why: format!("--tag `{pattern}` matches no tag; `cargo xtask scalars {}` lists them", dir.display()),
            });
        }
        for t in matched {
            if !tags.contains(&t) {
                tags.push(t);
            }
        }
    }
    let in_range = |s: u64| select.from.is_none_or(|f| s >= f) && select.to.is_none_or(|t| s <= t);
    let columns: Vec<BTreeMap<u64, f32>> =
        tags.iter().map(|t| all[*t].iter().copied().filter(|p| in_range(p.0)).collect()).collect();
    let steps: BTreeSet<u64> = columns.iter().flat_map(|c| c.keys().copied()).collect();
    let mut out = format!(
        "| step | {} |\n| ---: |{}\n",
        tags.iter().map(|t| t.as_str()).collect::<Vec<_>>().join(" | "),
        " ---: |".repeat(tags.len())
    );
    for s in steps {
        let cells: Vec<String> = columns.iter().map(|c| c.get(&s).map_or(String::new(), |&v| number(v))).collect();
        out += &format!("| {s} | {} |\n", cells.join(" | "));
    }
    Ok(out)
}

/// Four significant digits, in scientific notation where fixed would hide them.
fn number(v: f32) -> String {
    let a = v.abs();
    if v == 0.0 {
        "0".into()
    } else if (1e-2..1e5).contains(&a) {
        let decimals = (3 - a.log10().floor() as i32).max(0) as usize;
        format!("{v:.decimals$}")
    } else {
        format!("{v:.3e}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensorboard::EventWriter;

    #[test]
    fn a_table_of_the_chosen_tags_and_steps() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path(), "0").unwrap();
        for step in [1u64, 10, 20, 30] {
            let v = step as f64;
            w.scalars(
                step,
                &[("quant/a.dw/clip".into(), v * 1e-3), ("quant/b/clip".into(), v), ("train/loss".into(), 2.5)],
            )
            .unwrap();
        }
        drop(w);
        let sel = Select { tags: vec!["quant/*/clip".into()], from: Some(10), to: Some(20) };
        let table = render(dir.path(), &sel).unwrap();
        assert_eq!(
            table,
            "| step | quant/a.dw/clip | quant/b/clip |\n| ---: | ---: | ---: |\n| 10 | 0.01000 | 10.00 |\n| 20 | 0.02000 | 20.00 |\n"
        );
        let list = render(dir.path(), &Select::default()).unwrap();
        assert!(list.contains("| train/loss | 4 | 1-30 |"), "{list}");
        let err = render(dir.path(), &Select { tags: vec!["test/*".into()], ..Default::default() }).unwrap_err();
        assert!(format!("{err:#}").contains("matches no tag"), "{err:#}");
        assert!(render(&dir.path().join("missing"), &Select::default()).is_err());
    }

    #[test]
    fn numbers_keep_four_significant_digits() {
        assert_eq!(number(0.0), "0");
        assert_eq!(number(0.2121), "0.2121");
        assert_eq!(number(1.5), "1.500");
        assert_eq!(number(1234.5), "1234");
        assert_eq!(number(9.577e-3), "9.577e-3");
        assert_eq!(number(-2.5e-5), "-2.500e-5");
    }
}
