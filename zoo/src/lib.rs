//! `int8-zoo`: model structs by name, their parameter counts, and the TOML recipes under
//! `zoo/recipes/`. Not yet written: see the project's zoo and trainer issue.
