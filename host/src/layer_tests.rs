//! Keeps the layer order of the crate doc (`lib.rs`) true: reads every module
//! source under `src/`, finds each `crate::...` and `super::...` path (in `use`
//! statements, in code and in doc links), and fails naming `file:line` for
//! every one that runs against the order, and for every cycle among the
//! submodules of one module (`workflow/plan.rs` and `workflow/template.rs`).
//!
//! The order itself is read from the numbered list in `lib.rs`'s doc, so it is
//! written down in one place. A module may use the modules listed before it
//! (lower layers, and earlier ones of its own layer), never one listed after.
//!
//! What it does not see: a dependency through a glob import (`use super::*`
//! inside a `mod tests` block is the usual one, and refers to the file's own
//! module), and paths built by macros.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

const SRC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src");

/// This file: its examples are not imports.
const SELF_FILE: &str = "layer_tests.rs";

/// The modules of the layer list in `lib.rs`'s doc, bottom first, with their
/// layer number. A list item is a doc line `//! N. ...`; every module named in
/// backticks on it (`` [`engine`] ``) belongs to layer N, in the order written.
fn layer_order(lib: &str) -> Vec<(String, u32)> {
    let mut order = Vec::new();
    for line in lib.lines() {
        let Some(text) = line.strip_prefix("//! ") else {
            continue;
        };
        let Some((number, rest)) = text.split_once(". ") else {
            continue;
        };
        let Ok(layer) = number.trim().parse::<u32>() else {
            continue;
        };
        for (i, part) in rest.split('`').enumerate() {
            let is_name = !part.is_empty()
                && part
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
            if i % 2 == 1 && is_name {
                order.push((part.to_owned(), layer));
            }
        }
    }
    order
}

/// One source file: its module path (`["workflow", "plan"]`) and text.
struct Source {
    /// Relative to `src/`, for messages.
    file: String,
    module: Vec<String>,
    text: String,
}

fn sources() -> Vec<Source> {
    fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("reading src/") {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                walk(&path, found);
            } else if path.extension().is_some_and(|ext| ext == "rs") {
                found.push(path);
            }
        }
    }
    let mut paths = Vec::new();
    walk(Path::new(SRC), &mut paths);
    paths.sort();
    let mut sources = Vec::new();
    for path in paths {
        let relative = path.strip_prefix(SRC).unwrap();
        let file = relative.to_string_lossy().replace('\\', "/");
        if file == "main.rs" || file == SELF_FILE {
            continue;
        }
        let mut module: Vec<String> = relative
            .with_extension("")
            .iter()
            .map(|part| part.to_string_lossy().into_owned())
            .collect();
        if matches!(module.last().map(String::as_str), Some("mod" | "lib")) {
            module.pop();
        }
        let text = std::fs::read_to_string(&path).unwrap();
        sources.push(Source {
            file: format!("host/src/{file}"),
            module,
            text,
        });
    }
    sources
}

/// `pub use child::{A, B};` in a module: which child each re-exported name
/// comes from, so that `super::A` counts as a use of `child`.
fn reexports(source: &Source, modules: &BTreeSet<Vec<String>>) -> BTreeMap<String, String> {
    let mut found = BTreeMap::new();
    let mut rest = source.text.as_str();
    while let Some(start) = rest.find("pub use ") {
        let statement = &rest[start + "pub use ".len()..];
        let end = statement.find(';').unwrap_or(statement.len());
        let statement = &statement[..end];
        rest = &rest[start + 1..];
        let Some((child, items)) = statement.split_once("::") else {
            continue;
        };
        let mut child_path = source.module.clone();
        child_path.push(child.trim().to_owned());
        if !modules.contains(&child_path) {
            continue;
        }
        let items = items.trim().trim_start_matches('{').trim_end_matches('}');
        for item in items.split(',') {
            let name = item.split(" as ").last().unwrap_or_default().trim();
            let name = name.rsplit("::").next().unwrap_or_default();
            if !name.is_empty() && name != "self" && name != "*" {
                found.insert(name.to_owned(), child.trim().to_owned());
            }
        }
    }
    found
}

/// A path as written after `crate::` or `super::`, its group expanded:
/// `a::{b, c::d}` gives `[a, b]` and `[a, c, d]`.
fn expand(text: &str) -> Vec<Vec<String>> {
    let mut prefix = Vec::new();
    let mut rest = text;
    loop {
        let end = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        let segment = &rest[..end];
        rest = &rest[end..];
        if !segment.is_empty() {
            prefix.push(segment.to_owned());
        }
        let Some(after) = rest.strip_prefix("::") else {
            return vec![prefix];
        };
        rest = after.trim_start();
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let mut close = group.len();
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            close = i;
                            break;
                        }
                    }
                    _ => {}
                }
            }
            let mut paths = Vec::new();
            let mut depth = 0;
            let mut item_start = 0;
            let group = &group[..close];
            for (i, c) in group.char_indices().chain([(group.len(), ',')]) {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        let item = group[item_start..i].trim();
                        item_start = i + 1;
                        if item.is_empty() || item == "self" || item == "*" {
                            paths.push(prefix.clone());
                            continue;
                        }
                        for tail in expand(item) {
                            let mut path = prefix.clone();
                            path.extend(tail);
                            paths.push(path);
                        }
                    }
                    _ => {}
                }
            }
            return paths;
        }
    }
}

/// A use of module `to` by the file's module, at a line.
struct Reference {
    line: usize,
    to: Vec<String>,
}

/// Every `crate::` and `super::` path of `source`, resolved to the module it
/// reaches (`super::Plan`, re-exported from `plan`, reaches `plan`).
fn references(
    source: &Source,
    modules: &BTreeSet<Vec<String>>,
    reexports: &BTreeMap<Vec<String>, BTreeMap<String, String>>,
) -> Vec<Reference> {
    // How many inline modules (`mod tests {`) enclose each line: a `super::`
    // inside one first leaves it. rustfmt puts the closing brace alone on a
    // line at the indentation of `mod`.
    let mut inline_depth = Vec::new();
    let mut open: Vec<String> = Vec::new();
    for line in source.text.lines() {
        let trimmed = line.trim_start();
        let indent = &line[..line.len() - trimmed.len()];
        if open.last().is_some_and(|close| line == close) {
            open.pop();
        }
        inline_depth.push(open.len());
        let declaration = trimmed
            .strip_prefix("pub(crate) ")
            .or_else(|| trimmed.strip_prefix("pub "))
            .unwrap_or(trimmed);
        if declaration.starts_with("mod ") && declaration.ends_with('{') {
            open.push(format!("{indent}}}"));
        }
    }

    let text = &source.text;
    let mut found = Vec::new();
    for keyword in ["crate::", "super::"] {
        let mut from = 0;
        while let Some(at) = text[from..].find(keyword).map(|i| i + from) {
            from = at + keyword.len();
            let before = text[..at].chars().next_back();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            let line = text[..at].matches('\n').count();
            let mut base: Vec<String> = if keyword == "crate::" {
                Vec::new()
            } else {
                let mut supers = 1;
                let mut rest = &text[from..];
                while let Some(after) = rest.strip_prefix("super::") {
                    supers += 1;
                    rest = after;
                }
                from = text.len() - rest.len();
                let depth = inline_depth[line];
                if supers <= depth {
                    continue; // inside the file's own module
                }
                let up = supers - depth;
                if up > source.module.len() {
                    continue;
                }
                source.module[..source.module.len() - up].to_vec()
            };
            base.shrink_to_fit();
            for path in expand(&text[from..]) {
                let mut full = base.clone();
                full.extend(path);
                let to = resolve(&full, modules, reexports);
                found.push(Reference { line: line + 1, to });
            }
        }
    }
    found
}

/// The module a full path reaches: its longest prefix that is a module, and
/// then through re-exports into the child that defines the item.
fn resolve(
    path: &[String],
    modules: &BTreeSet<Vec<String>>,
    reexports: &BTreeMap<Vec<String>, BTreeMap<String, String>>,
) -> Vec<String> {
    let mut module = Vec::new();
    for segment in path {
        let mut next = module.clone();
        next.push(segment.clone());
        if modules.contains(&next) {
            module = next;
            continue;
        }
        match reexports.get(&module).and_then(|names| names.get(segment)) {
            Some(child) => module.push(child.clone()),
            None => break,
        }
    }
    module
}

/// Every problem: uses against the layer order, and cycles among siblings.
fn problems() -> Vec<String> {
    let lib = std::fs::read_to_string(Path::new(SRC).join("lib.rs")).unwrap();
    let order = layer_order(&lib);
    assert!(
        order.len() >= 8,
        "lib.rs's doc lists the layers as `//! N. ...` lines; found {order:?}"
    );
    let rank = |module: &str| order.iter().position(|(name, _)| name == module);
    let layer = |module: &str| order.iter().find(|(name, _)| name == module).map(|l| l.1);

    let sources = sources();
    let modules: BTreeSet<Vec<String>> = sources.iter().map(|s| s.module.clone()).collect();
    let reexports: BTreeMap<Vec<String>, BTreeMap<String, String>> = sources
        .iter()
        .map(|s| (s.module.clone(), self::reexports(s, &modules)))
        .collect();

    let mut problems = Vec::new();
    // parent -> (from, to) -> first place
    let mut siblings: BTreeMap<Vec<String>, BTreeMap<(String, String), String>> = BTreeMap::new();
    for source in &sources {
        let Some(top) = source.module.first() else {
            continue;
        };
        if rank(top).is_none() {
            problems.push(format!(
                "{}: module `{top}` is not in the layer list of lib.rs's doc",
                source.file
            ));
            continue;
        }
        for reference in references(source, &modules, &reexports) {
            let Some(target) = reference.to.first() else {
                continue;
            };
            let place = format!("{}:{}", source.file, reference.line);
            if target != top {
                match (rank(top), rank(target)) {
                    (Some(from), Some(to)) if to < from => {}
                    (_, None) => problems.push(format!(
                        "{place}: `{top}` uses `{target}`, which is not in the layer list of lib.rs's doc"
                    )),
                    _ => problems.push(format!(
                        "{place}: `{top}` (layer {}) uses `{target}` (layer {}), which comes after it in the layer order",
                        layer(top).unwrap(),
                        layer(target).unwrap(),
                    )),
                }
                continue;
            }
            let common = source
                .module
                .iter()
                .zip(&reference.to)
                .take_while(|(a, b)| a == b)
                .count();
            if common < source.module.len() && common < reference.to.len() {
                siblings
                    .entry(source.module[..common].to_vec())
                    .or_default()
                    .entry((source.module[common].clone(), reference.to[common].clone()))
                    .or_insert(place);
            }
        }
    }

    for (parent, edges) in &siblings {
        let graph: BTreeMap<&str, Vec<&str>> =
            edges.keys().fold(BTreeMap::new(), |mut graph, (a, b)| {
                graph.entry(a.as_str()).or_default().push(b.as_str());
                graph
            });
        let mut reported = BTreeSet::new();
        for start in graph.keys() {
            if let Some(cycle) = cycle_through(&graph, start) {
                let key: BTreeSet<&str> = cycle.iter().copied().collect();
                if !reported.insert(key) {
                    continue;
                }
                let mut message = format!(
                    "cycle among the submodules of `{}`: {}",
                    if parent.is_empty() {
                        "crate".to_owned()
                    } else {
                        parent.join("::")
                    },
                    cycle.join(" -> ")
                );
                for pair in cycle.windows(2) {
                    let place = &edges[&(pair[0].to_owned(), pair[1].to_owned())];
                    write!(message, "\n    {place}: `{}` uses `{}`", pair[0], pair[1]).unwrap();
                }
                problems.push(message);
            }
        }
    }
    problems
}

/// A path `start -> ... -> start` in `graph`, if there is one.
fn cycle_through<'a>(
    graph: &BTreeMap<&'a str, Vec<&'a str>>,
    start: &'a str,
) -> Option<Vec<&'a str>> {
    let mut path = vec![start];
    let mut seen = BTreeSet::new();
    fn visit<'a>(
        graph: &BTreeMap<&'a str, Vec<&'a str>>,
        start: &'a str,
        path: &mut Vec<&'a str>,
        seen: &mut BTreeSet<&'a str>,
    ) -> bool {
        let node = *path.last().unwrap();
        for &next in graph.get(node).into_iter().flatten() {
            if next == start {
                path.push(next);
                return true;
            }
            if seen.insert(next) {
                path.push(next);
                if visit(graph, start, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    visit(graph, start, &mut path, &mut seen).then_some(path)
}

#[test]
fn modules_use_only_the_layers_below_them() {
    let problems = problems();
    assert!(
        problems.is_empty(),
        "{} problem(s) with the layer order of lib.rs (a module uses only the modules \
         listed before it; an upward need becomes a trait below, implemented above):\n{}",
        problems.len(),
        problems.join("\n")
    );
}

#[test]
fn paths_and_groups_expand() {
    assert_eq!(
        expand("workflow::{self, Plan, plan::{A, B}};"),
        vec![
            vec!["workflow".to_owned()],
            vec!["workflow".to_owned(), "Plan".to_owned()],
            vec!["workflow".to_owned(), "plan".to_owned(), "A".to_owned()],
            vec!["workflow".to_owned(), "plan".to_owned(), "B".to_owned()],
        ]
    );
    assert_eq!(
        expand("engine::Limits)"),
        vec![vec!["engine".to_owned(), "Limits".to_owned()]]
    );
}

#[test]
fn the_order_is_read_from_the_crate_doc() {
    let order =
        layer_order("//! 1. vocabulary: [`limits`], `record`\n//! 2. [`engine`] < `config`\n");
    assert_eq!(
        order,
        [("limits", 1), ("record", 1), ("engine", 2), ("config", 2)]
            .map(|(name, layer)| (name.to_owned(), layer))
    );
}
