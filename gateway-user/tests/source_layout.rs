//! The request path's shape, as the README's layout section and the restructure (issue 8)
//! promise it, checked on the source so that a merge cannot quietly undo it:
//!
//! - no file of `gateway-user/src/` over 500 lines, its `#[cfg(test)]` module and test files
//!   (`tests.rs`, `*_tests.rs`) aside;
//! - no function in `gateway-user/src/proxy/` over 80 lines (a function ends at the first line
//!   that is its closing brace at its own indentation, as rustfmt writes it);
//! - no import cycle among the modules directly under `proxy/` (a module with its sub-modules
//!   is one node; `use` trees are flattened, and `crate::proxy::X` / `super::X` paths counted).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

const MAX_FILE_LINES: usize = 500;
const MAX_PROXY_FN_LINES: usize = 80;

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("reading the source tree") {
        let path = entry.expect("reading the source tree").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn is_test_file(path: &Path) -> bool {
    let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    name == "tests" || name.ends_with("_tests")
}

/// The file's lines before its `#[cfg(test)]` module: the first `#[cfg(test)]` line followed
/// by a `mod` (a `#[cfg(test)]` on an import or a function does not end the product code).
fn product_lines(path: &Path) -> Vec<String> {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let lines: Vec<&str> = text.lines().collect();
    let end = (0..lines.len())
        .find(|&i| {
            lines[i].starts_with("#[cfg(test)]")
                && lines.get(i + 1).is_some_and(|next| {
                    next.starts_with("mod ") || next.starts_with("pub(crate) mod ")
                })
        })
        .unwrap_or(lines.len());
    lines[..end].iter().map(|l| (*l).to_owned()).collect()
}

fn product_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    rust_files(dir, &mut files);
    files.retain(|f| !is_test_file(f));
    files.sort();
    files
}

#[test]
fn no_source_file_is_over_500_lines() {
    let over: Vec<String> = product_files(&src())
        .iter()
        .filter_map(|f| {
            let n = product_lines(f).len();
            (n > MAX_FILE_LINES).then(|| format!("{} ({n} lines)", f.display()))
        })
        .collect();
    assert!(
        over.is_empty(),
        "over {MAX_FILE_LINES} lines (tests aside): {over:#?}"
    );
}

/// `(name, first line, length)` of every function with a body in `lines`.
fn functions(lines: &[String]) -> Vec<(String, usize, usize)> {
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        let indent = &line[..line.len() - trimmed.len()];
        let Some(at) = trimmed.find("fn ") else {
            continue;
        };
        let before = &trimmed[..at];
        let is_item = before
            .split_whitespace()
            .all(|w| ["pub", "async", "const", "unsafe"].contains(&w) || w.starts_with("pub("));
        if !is_item || trimmed.starts_with("//") || trimmed.trim_end().ends_with(';') {
            continue;
        }
        let name: String = trimmed[at + 3..]
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let close = format!("{indent}}}");
        if let Some(end) = lines[i + 1..].iter().position(|l| *l == close) {
            out.push((name, i + 1, end + 2));
        }
    }
    out
}

#[test]
fn no_function_of_the_request_path_is_over_80_lines() {
    let mut over = Vec::new();
    for f in product_files(&src().join("proxy")) {
        for (name, line, len) in functions(&product_lines(&f)) {
            if len > MAX_PROXY_FN_LINES {
                over.push(format!("{}:{line} fn {name} ({len} lines)", f.display()));
            }
        }
    }
    assert!(
        over.is_empty(),
        "proxy/ functions over {MAX_PROXY_FN_LINES} lines: {over:#?}"
    );
}

#[test]
fn the_function_measure_sees_a_long_function() {
    let mut lines = vec!["pub(super) fn long(".to_owned(), ") {".to_owned()];
    lines.extend((0..90).map(|i| format!("    let _x{i} = {i};")));
    lines.push("}".to_owned());
    lines.push("    fn declared(&self);".to_owned());
    let found = functions(&lines);
    assert_eq!(found, vec![("long".to_owned(), 1, 93)]);
}

/// Flattens a `use` tree (`a::{b, c::{d, e}}`) into its paths.
fn flatten_use(tree: &str) -> Vec<String> {
    fn walk(s: &[char], mut i: usize, prefix: &str, out: &mut Vec<String>) -> usize {
        let mut cur = String::new();
        while i < s.len() {
            match s[i] {
                '{' => {
                    i = walk(s, i + 1, &format!("{prefix}{cur}"), out);
                    cur.clear();
                    continue;
                }
                ',' => {
                    if !cur.is_empty() {
                        out.push(format!("{prefix}{cur}"));
                    }
                    cur.clear();
                }
                '}' => {
                    if !cur.is_empty() {
                        out.push(format!("{prefix}{cur}"));
                    }
                    return i + 1;
                }
                c => cur.push(c),
            }
            i += 1;
        }
        if !cur.is_empty() {
            out.push(format!("{prefix}{cur}"));
        }
        i
    }
    let chars: Vec<char> = tree.chars().filter(|c| !c.is_whitespace()).collect();
    let mut out = Vec::new();
    walk(&chars, 0, "", &mut out);
    out
}

/// Every path a source text names: its `use` trees flattened, and inline `crate::proxy::X` and
/// `super::X` paths.
fn paths(text: &str) -> Vec<String> {
    let text: String = text
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    let mut out = Vec::new();
    let mut rest = text.as_str();
    while let Some(at) = rest.find("use ") {
        let starts_item = at == 0 || !rest.as_bytes()[at - 1].is_ascii_alphanumeric();
        rest = &rest[at + 4..];
        if let (true, Some(end)) = (starts_item, rest.find(';')) {
            out.extend(flatten_use(&rest[..end]));
        }
    }
    for word in text.split(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':')) {
        if word.starts_with("crate::proxy::") || word.starts_with("super::") {
            out.push(word.to_owned());
        }
    }
    out
}

/// The sibling module under `proxy/` that `path`, written in the module `module` (its path
/// under `proxy/`), names; `None` for anything else.
fn target(module: &[String], path: &str) -> Option<String> {
    let segs: Vec<&str> = path.split("::").collect();
    if segs.len() > 2 && segs[0] == "crate" && segs[1] == "proxy" {
        return Some(segs[2].to_owned());
    }
    let supers = segs.iter().take_while(|s| **s == "super").count();
    if supers == 0 || supers > module.len() {
        return None;
    }
    let parent = &module[..module.len() - supers];
    match parent.first() {
        Some(top) => Some(top.clone()),
        None => segs.get(supers).map(|s| (*s).to_owned()),
    }
}

#[test]
fn the_modules_of_the_request_path_import_no_cycle() {
    let proxy = src().join("proxy");
    let tops: BTreeSet<String> = std::fs::read_dir(&proxy)
        .expect("reading proxy/")
        .filter_map(|e| {
            let p = e.ok()?.path();
            Some(p.file_stem()?.to_str()?.to_owned())
        })
        .collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in product_files(&proxy) {
        let rel = f
            .strip_prefix(&proxy)
            .expect("under proxy/")
            .with_extension("");
        let module: Vec<String> = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        let text = product_lines(&f).join("\n");
        for p in paths(&text) {
            if let Some(t) = target(&module, &p)
                && tops.contains(&t)
                && t != module[0]
            {
                graph.entry(module[0].clone()).or_default().insert(t);
            }
        }
    }
    assert!(
        graph.values().map(BTreeSet::len).sum::<usize>() > 20,
        "the import graph looks empty, so the parser missed the imports: {graph:#?}"
    );
    // A cycle is a path back to where it started.
    for start in graph.keys() {
        let mut stack = vec![(start.clone(), vec![start.clone()])];
        let mut seen = BTreeSet::new();
        while let Some((node, trail)) = stack.pop() {
            for next in graph.get(&node).into_iter().flatten() {
                if next == start {
                    panic!("import cycle in proxy/: {} -> {start}", trail.join(" -> "));
                }
                if seen.insert(next.clone()) {
                    let mut t = trail.clone();
                    t.push(next.clone());
                    stack.push((next.clone(), t));
                }
            }
        }
    }
}

#[test]
fn the_import_parser_reads_nested_use_trees() {
    let text = "use crate::{\n    config::X,\n    proxy::{error::E, upstream::{a, b}},\n};\nuse super::{shared::S, *};\nfn f() { super::super::io::x(); }";
    let module = ["request".to_owned(), "attempt".to_owned()];
    let mut found: Vec<String> = paths(text)
        .iter()
        .filter_map(|p| target(&module, p))
        .collect();
    found.sort();
    found.dedup();
    assert_eq!(found, ["error", "io", "request", "upstream"]);
}
