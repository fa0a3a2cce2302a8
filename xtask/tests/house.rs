//! The house plan's rules that a machine can check: no module of a crate uses a module that uses
//! it back (top-level modules of each crate's `src/`, code only: comments and tests do not count).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The top-level module a path below `src/` belongs to (`crate` for lib.rs and main.rs).
fn top_module(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel.components().next().unwrap().as_os_str().to_string_lossy().into_owned();
    let first = first.trim_end_matches(".rs").to_string();
    if first == "lib" || first == "main" { "crate".into() } else { first }
}

/// The modules named by `crate::name` in `text`'s code (before its tests, without comments), and
/// by `super::name` in a top-level file.
fn uses(text: &str, top_level: bool) -> BTreeSet<String> {
    let code: String = text
        .split("#[cfg(test)]")
        .next()
        .unwrap()
        .lines()
        .map(|l| l.split("//").next().unwrap())
        .collect::<Vec<_>>()
        .join("\n");
    let mut out = BTreeSet::new();
    let prefixes: &[&str] = if top_level { &["crate::", "super::"] } else { &["crate::"] };
    for prefix in prefixes {
        for (i, _) in code.match_indices(prefix) {
            let rest = &code[i + prefix.len()..];
            let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            if !name.is_empty() {
                out.insert(name);
            }
        }
    }
    out
}

#[test]
fn no_crate_has_a_module_import_cycle() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    let mut crates: Vec<PathBuf> = vec![root.join("zoo/src"), root.join("datasets/src"), root.join("xtask/src")];
    for e in std::fs::read_dir(root.join("crates")).unwrap() {
        crates.push(e.unwrap().path().join("src"));
    }
    let mut cycles = Vec::new();
    for src in &crates {
        let mut files = Vec::new();
        rust_files(src, &mut files);
        assert!(!files.is_empty(), "{}", src.display());
        let mut deps: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for f in &files {
            let top = top_module(src, f);
            let top_level = f.parent() == Some(src.as_path()) || f.file_name().is_some_and(|n| n == "mod.rs");
            let used = uses(&std::fs::read_to_string(f).unwrap(), top_level);
            deps.entry(top.clone()).or_default().extend(used.into_iter().filter(|u| *u != top));
        }
        for (a, used) in &deps {
            for b in used {
                if a < b && deps.get(b).is_some_and(|back| back.contains(a)) {
                    cycles.push(format!("{}: {a} <-> {b}", src.display()));
                }
            }
        }
    }
    assert!(cycles.is_empty(), "module import cycles:\n{}", cycles.join("\n"));
}

#[test]
fn the_check_finds_a_cycle() {
    // Two modules that use each other, as the check reads them.
    let a = uses("use crate::b::Thing;\n// crate::c in a comment\n#[cfg(test)]\nuse crate::d;", true);
    assert_eq!(a, BTreeSet::from(["b".to_string()]));
    let nested = uses("use super::sibling;\nuse crate::e;", false);
    assert_eq!(nested, BTreeSet::from(["e".to_string()]));
}
