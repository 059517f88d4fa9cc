//! The library's modules import each other without circles.
//!
//! A module is a file of `src/` (the binary under `src/bin/` is a crate of its own). It
//! depends on another when its code names an item of that module through a `crate::`,
//! `super::` or child-module path, in a `use` or in code. Left out, since they are not
//! dependencies: comments (doc links included), test modules (`#[cfg(test)] mod tests`
//! to the end of the file), and a module's `pub use` of its own descendants (a facade
//! re-exporting them). An item named through the crate root's re-exports
//! (`crate::Error`) counts for the module that defines it.
//!
//! The check reads the source as text; `checker_finds_a_circle` shows that it fails on a
//! tree with a circle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

type Modules = BTreeMap<String, String>;
type Graph = BTreeMap<String, BTreeSet<String>>;

/// The module path of a file under `src/`: `lib.rs` → `crate`, `a.rs` and `a/mod.rs` →
/// `crate::a`, `a/b.rs` → `crate::a::b`.
fn module_of(relative: &str) -> String {
    let trimmed = relative.trim_end_matches(".rs");
    let mut parts: Vec<&str> = trimmed.split('/').collect();
    if parts.last() == Some(&"mod") || parts == ["lib"] {
        parts.pop();
    }
    std::iter::once("crate")
        .chain(parts)
        .collect::<Vec<_>>()
        .join("::")
}

/// The code of `source` without comments and without its test module.
fn code(source: &str) -> String {
    let mut kept = Vec::new();
    let mut lines = source.lines().peekable();
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        if trimmed == "#[cfg(test)]"
            && lines
                .peek()
                .is_some_and(|next| next.trim_start().starts_with("mod tests"))
        {
            break;
        }
        if trimmed.starts_with("//") {
            continue;
        }
        kept.push(line.split(" // ").next().unwrap_or(line));
    }
    kept.join("\n")
}

/// The paths a `use` tree spells: `a::{b, c::{d, e}}` → `a::b`, `a::c::d`, `a::c::e`.
fn expand(tree: &str) -> Vec<String> {
    let tree = tree.trim();
    let Some(open) = tree.find('{') else {
        let path = tree.split(" as ").next().unwrap_or(tree).trim();
        return vec![path.trim_end_matches("::").to_owned()];
    };
    let prefix = tree[..open].trim_end_matches("::");
    let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&inner[start..]);
    parts
        .into_iter()
        .filter(|part| !part.trim().is_empty())
        .flat_map(expand)
        .map(|path| match path.as_str() {
            "self" => prefix.to_owned(),
            _ if prefix.is_empty() => path,
            _ => format!("{prefix}::{path}"),
        })
        .collect()
}

/// Resolves `path`, named in `module`, to the module whose item it names.
fn resolve(path: &str, module: &str, modules: &Modules, root_items: &Modules) -> Option<String> {
    let mut segments = path.split("::").peekable();
    let mut base: Vec<&str> = match *segments.peek()? {
        "crate" => {
            segments.next();
            vec!["crate"]
        }
        "super" => {
            let mut base: Vec<&str> = module.split("::").collect();
            while segments.peek() == Some(&"super") {
                segments.next();
                base.pop();
            }
            base
        }
        // A child module of `module`.
        first if modules.contains_key(&format!("{module}::{first}")) => {
            module.split("::").collect()
        }
        _ => return None,
    };
    let mut found = base.join("::");
    for segment in segments {
        base.push(segment);
        let candidate = base.join("::");
        if modules.contains_key(&candidate) {
            found = candidate;
        } else {
            break;
        }
    }
    if found == "crate" {
        // An item the crate root re-exports: the module that defines it.
        let item = path.strip_prefix("crate::")?.split("::").next()?;
        return Some(root_items.get(item).cloned().unwrap_or(found));
    }
    Some(found)
}

/// The `use` statements of `code`, each whole, with whether it is `pub`; and the rest
/// of the code.
fn split_uses(code: &str) -> (Vec<(bool, String)>, String) {
    let mut found = Vec::new();
    let mut rest_of_code = String::new();
    let mut rest = code;
    while let Some(at) = rest.find("use ") {
        let before = &rest[..at];
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let prefix = before[line_start..].trim();
        if !(prefix.is_empty() || prefix.starts_with("pub")) {
            rest_of_code.push_str(&rest[..at + 4]);
            rest = &rest[at + 4..];
            continue;
        }
        let end = rest[at..].find(';').map_or(rest.len(), |i| at + i + 1);
        found.push((
            !prefix.is_empty(),
            rest[at + 4..end].trim_end_matches(';').to_owned(),
        ));
        rest_of_code.push_str(&rest[..line_start]);
        rest = &rest[end..];
    }
    rest_of_code.push_str(rest);
    (found, rest_of_code)
}

/// The paths starting with one of `starts` (each ending in `::`) named in `code`.
fn paths_in_code(code: &str, starts: &[String]) -> Vec<String> {
    let mut found = Vec::new();
    for start in starts {
        let mut rest = code;
        while let Some(at) = rest.find(start.as_str()) {
            let preceded = rest[..at]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':');
            let path: String = rest[at..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            if !preceded {
                found.push(path.trim_end_matches(':').to_owned());
            }
            rest = &rest[at + start.len()..];
        }
    }
    found
}

/// The dependency graph of `files` (path relative to `src/` → source).
fn graph(files: &BTreeMap<String, String>) -> Graph {
    let modules: Modules = files
        .iter()
        .map(|(file, source)| (module_of(file), code(source)))
        .collect();
    let mut root_items = Modules::new();
    if let Some(root) = modules.get("crate") {
        for (_, tree) in split_uses(root).0.into_iter().filter(|(public, _)| *public) {
            for path in expand(&tree) {
                let item = path.rsplit("::").next().unwrap_or(&path).to_owned();
                if let Some(defining) = resolve(
                    &format!("crate::{path}"),
                    "crate",
                    &modules,
                    &Modules::new(),
                ) {
                    root_items.insert(item, defining);
                }
            }
        }
    }
    let mut graph = Graph::new();
    for (module, code) in &modules {
        let edges = graph.entry(module.clone()).or_default();
        let (uses, rest) = split_uses(code);
        let mut named: Vec<String> = Vec::new();
        for (public, tree) in uses {
            for path in expand(&tree) {
                let Some(target) = resolve(&path, module, &modules, &root_items) else {
                    continue;
                };
                // A facade re-exporting its own descendants.
                if public && target.starts_with(&format!("{module}::")) {
                    continue;
                }
                named.push(target);
            }
        }
        let children = modules.keys().filter_map(|other| {
            let child = other.strip_prefix(&format!("{module}::"))?;
            (!child.contains("::")).then(|| format!("{child}::"))
        });
        let starts: Vec<String> = ["crate::".to_owned(), "super::".to_owned()]
            .into_iter()
            .chain(children)
            .collect();
        named.extend(
            paths_in_code(&rest, &starts)
                .iter()
                .filter_map(|path| resolve(path, module, &modules, &root_items)),
        );
        edges.extend(named.into_iter().filter(|target| target != module));
    }
    graph
}

/// The circles of `graph`: its strongly connected components of more than one module
/// (Tarjan's algorithm).
fn circles(graph: &Graph) -> Vec<Vec<String>> {
    struct State<'g> {
        graph: &'g Graph,
        index: BTreeMap<&'g str, usize>,
        low: BTreeMap<&'g str, usize>,
        stack: Vec<&'g str>,
        on_stack: BTreeSet<&'g str>,
        found: Vec<Vec<String>>,
    }
    fn visit<'g>(state: &mut State<'g>, node: &'g str) {
        let next = state.index.len();
        state.index.insert(node, next);
        state.low.insert(node, next);
        state.stack.push(node);
        state.on_stack.insert(node);
        let graph = state.graph;
        for target in graph.get(node).into_iter().flatten() {
            let target = target.as_str();
            if !state.index.contains_key(target) {
                visit(state, target);
                let low = state.low[node].min(state.low[target]);
                state.low.insert(node, low);
            } else if state.on_stack.contains(target) {
                let low = state.low[node].min(state.index[target]);
                state.low.insert(node, low);
            }
        }
        if state.low[node] == state.index[node] {
            let mut component = Vec::new();
            while let Some(member) = state.stack.pop() {
                state.on_stack.remove(member);
                component.push(member.to_owned());
                if member == node {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                state.found.push(component);
            }
        }
    }
    let mut state = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for node in graph.keys() {
        if !state.index.contains_key(node.as_str()) {
            visit(&mut state, node);
        }
    }
    state.found
}

/// Every `.rs` file under `dir`, by its path relative to `root`, but `bin/`.
fn read_tree(root: &Path, dir: &Path, files: &mut BTreeMap<String, String>) {
    for entry in std::fs::read_dir(dir).expect("read src/") {
        let path = entry.expect("read src/").path();
        let relative = path
            .strip_prefix(root)
            .expect("under src/")
            .to_string_lossy()
            .replace('\\', "/");
        if path.is_dir() {
            if relative != "bin" {
                read_tree(root, &path, files);
            }
        } else if relative.ends_with(".rs") {
            files.insert(
                relative,
                std::fs::read_to_string(&path).expect("read a file"),
            );
        }
    }
}

#[test]
fn the_library_has_no_import_circles() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = BTreeMap::new();
    read_tree(&root, &root, &mut files);
    let graph = graph(&files);
    assert!(
        graph.len() > 20 && graph["crate::claim"].contains("crate::engine"),
        "the checker no longer sees the crate's modules: {graph:#?}"
    );
    let circles = circles(&graph);
    let described: Vec<String> = circles
        .iter()
        .map(|circle| {
            let ties: Vec<String> = circle
                .iter()
                .flat_map(|from| {
                    graph[from]
                        .iter()
                        .filter(|to| circle.contains(to))
                        .map(move |to| format!("{from} -> {to}"))
                })
                .collect();
            ties.join(", ")
        })
        .collect();
    assert!(
        circles.is_empty(),
        "modules that import each other in a circle:\n{}",
        described.join("\n")
    );
}

fn tree(files: &[(&str, &str)]) -> BTreeMap<String, String> {
    files
        .iter()
        .map(|(file, source)| ((*file).to_owned(), (*source).to_owned()))
        .collect()
}

#[test]
fn checker_finds_a_circle() {
    // store -> claim -> store, as the crate had it; and a child that names its parent's
    // item while the parent uses the child's.
    let files = tree(&[
        (
            "lib.rs",
            "mod claim;\nmod store;\nmod engine;\npub use store::Store;\n",
        ),
        (
            "store.rs",
            "use crate::claim::{Claim, connection_broke};\npub struct Store;\n",
        ),
        (
            "claim.rs",
            "use crate::Store;\n// use crate::engine::Engine;\npub struct Claim;\n",
        ),
        (
            "engine/mod.rs",
            "mod take;\nfn f() { take::run() }\npub(crate) use take::Held;\n",
        ),
        ("engine/take.rs", "use super::{Engine, waiters::Waited};\n"),
    ]);
    let graph = graph(&files);
    assert_eq!(
        circles(&graph),
        vec![
            vec!["crate::claim".to_owned(), "crate::store".to_owned()],
            vec!["crate::engine".to_owned(), "crate::engine::take".to_owned()],
        ]
    );
    // The comment and the re-export are no dependencies.
    assert!(!graph["crate::claim"].contains("crate::engine"));
}

#[test]
fn facades_comments_and_tests_are_no_dependencies() {
    let files = tree(&[
        ("lib.rs", "mod a;\nmod b;\npub use a::A;\n"),
        (
            "a.rs",
            "mod inner;\npub use inner::X;\n/// See [`B`](crate::b::B).\npub struct A;\n\
             #[cfg(test)]\nmod tests {\n    use crate::b::B;\n}\n",
        ),
        ("a/inner.rs", "use super::A;\npub struct X;\n"),
        ("b.rs", "pub struct B(crate::A);\n"),
    ]);
    let graph = graph(&files);
    assert!(circles(&graph).is_empty(), "{graph:#?}");
    assert_eq!(graph["crate::b"], BTreeSet::from(["crate::a".to_owned()]));
    assert_eq!(
        graph["crate::a::inner"],
        BTreeSet::from(["crate::a".to_owned()])
    );
    assert!(graph["crate::a"].is_empty(), "{graph:#?}");
}
